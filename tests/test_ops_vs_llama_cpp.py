"""Each of caravan's ops on llama.cpp's own inputs, against llama.cpp's own output, on the real
SmolLM2 and Gemma 3 models (the tensors read with llama_cpp_taps while llama.cpp evaluates a
prompt).

Why op by op: both engines round activations to 8-bit blocks, which turns a last-bit difference
anywhere into a different rounding of some block further on. A one-ulp change of the embeddings
alone moves caravan's own logits over a text by 3% (SmolLM2) to 5% (Gemma 3) of their size, as
much as they differ from llama.cpp's, and Gemma 3's perplexity over 510 tokens by up to 7%. So
the end-to-end comparisons (test_smollm2.py, test_gemma3.py) cannot see an op that is slightly
off; these can. Norms and GeGLU must be bit-exact; the products differ from ggml's only in the
order of their f32 sums (ulp-level); attention likewise.
"""

from __future__ import annotations

import numpy as np
import pytest

from caravan.pipeline.ops import attention, geglu, rmsnorm, swiglu
from caravan.pipeline.quants import Activations, matmul
from caravan.pipeline.stage import LayerRange, LocalStage

from support import llama_cpp_taps, naive

pytestmark = [pytest.mark.model, pytest.mark.oracle]
pytest.importorskip("llama_cpp", reason="llama-cpp-python (the reference engine) is not installed")

TEXT = ("The old lighthouse keeper climbed the stairs every evening, counting each of the 117 steps, "
        "and wrote down the weather, the ships he saw and the birds that rested on the rail.")


def kv_cache(k: np.ndarray, v: np.ndarray, n_kv_heads: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, n_kv_heads * head_dim) keys and values -> the KV cache's layout, rounded to f16 as
    llama.cpp's copy into its f16 cache rounds them."""
    n = k.shape[0]
    keys = k.reshape(n, n_kv_heads, head_dim).astype(np.float16).view(np.uint16).transpose(1, 2, 0)
    values = v.reshape(n, n_kv_heads, head_dim).astype(np.float16).view(np.uint16).transpose(1, 0, 2)
    return np.ascontiguousarray(keys), np.ascontiguousarray(values)


def assert_ulp_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    """The same sums in another f32 order: a few ulps apart, element by element. (An 8-bit
    block rounded differently from llama.cpp would put a whole row 1e-4 or more apart.)"""
    scale = np.abs(theirs).max(axis=-1, keepdims=True)
    assert np.all(np.abs(ours - theirs) <= 2e-6 * scale), np.abs(ours - theirs).max()


class Taps:
    """llama.cpp's tensors for one prompt, as (T, n) arrays: taps["Vcur-0"] is the first node of
    that name, taps["Qcur-0", -1] the last."""

    def __init__(self, path, ids: list[int], names: set[str]):
        self.n = len(ids)
        self._tensors = llama_cpp_taps.record(path, ids, names)

    def __getitem__(self, key) -> np.ndarray:
        name, index = key if isinstance(key, tuple) else (key, 0)
        return self._tensors[name][index].reshape(self.n, -1)


def layer_taps(path, ids: list[int], layers: tuple[int, ...], embedded: str, per_layer: tuple[str, ...]) -> Taps:
    """The tensors named per_layer in each of `layers`, the residual stream entering each (the
    embeddings, named `embedded`, or the layer before's output)."""
    names = {embedded} | {f"{name}-{layer}" for layer in layers for name in per_layer}
    return Taps(path, ids, names | {f"l_out-{layer - 1}" for layer in layers if layer})


def stage_through(model, layers: tuple[int, ...]) -> LocalStage:
    return LocalStage.load(model.file, model.config, LayerRange(0, max(layers) + 1), 512)


SMOLLM2_LAYERS = (0, 1, 17)


@pytest.fixture(scope="module")
def smollm2_taps(smollm2, smollm2_path):
    return layer_taps(smollm2_path, smollm2.tokenizer.encode(TEXT), SMOLLM2_LAYERS, "embd", (
        "attn_norm", "Qcur", "Kcur", "Vcur", "kqv_out", "ffn_inp", "ffn_norm", "ffn_gate", "ffn_up", "ffn_swiglu"))


@pytest.fixture(scope="module")
def smollm2_stage(smollm2):
    return stage_through(smollm2, SMOLLM2_LAYERS)


@pytest.mark.parametrize("layer", SMOLLM2_LAYERS)
def test_smollm2_layer_ops_equal_llama_cpp(smollm2, smollm2_taps, smollm2_stage, layer):
    c, w, taps = smollm2.config, smollm2_stage.weights[layer], smollm2_taps
    residual = taps["embd"] if layer == 0 else taps[f"l_out-{layer - 1}"]
    np.testing.assert_array_equal(rmsnorm(residual, w.attn_norm, c.norm_eps), taps[f"attn_norm-{layer}"])
    np.testing.assert_array_equal(rmsnorm(taps[f"ffn_inp-{layer}"], w.ffn_norm, c.norm_eps), taps[f"ffn_norm-{layer}"])
    assert_ulp_close(matmul(w.attn_v, Activations(taps[f"attn_norm-{layer}"])), taps[f"Vcur-{layer}"])
    assert_ulp_close(matmul(w.ffn_gate, Activations(taps[f"ffn_norm-{layer}"])), taps[f"ffn_gate-{layer}"])
    # SiLU's exp is not ggml's (both within 2 ulp of the exact value)
    np.testing.assert_allclose(swiglu(taps[f"ffn_gate-{layer}"], taps[f"ffn_up-{layer}"]), taps[f"ffn_swiglu-{layer}"],
                               rtol=1e-6, atol=1e-6)
    # the last nodes named Qcur and Kcur are after RoPE
    k, v = kv_cache(taps[f"Kcur-{layer}", -1], taps[f"Vcur-{layer}"], c.n_kv_heads, c.head_dim)
    ours = attention(taps[f"Qcur-{layer}", -1], k, v, 0, c.n_heads, c.attn_scale)
    naive.assert_attention_close(ours, taps[f"kqv_out-{layer}"], float(np.abs(v.view(np.float16)).max()))


GEMMA3_LAYERS = (0, 5)  # a sliding-window layer and a global one


@pytest.fixture(scope="module")
def gemma3_taps(gemma3, gemma3_path):
    return layer_taps(gemma3_path, gemma3.tokenizer.encode(TEXT, add_bos=True), GEMMA3_LAYERS, "inp_scaled", (
        "attn_norm", "Qcur", "Qcur_normed", "Kcur", "Vcur", "kqv_out", "sa_out", "ffn_norm", "ffn_gate", "ffn_up",
        "ffn_geglu", "ffn_out", "ffn_post_norm"))


@pytest.fixture(scope="module")
def gemma3_stage(gemma3):
    return stage_through(gemma3, GEMMA3_LAYERS)


@pytest.mark.parametrize("layer", GEMMA3_LAYERS)
def test_gemma3_layer_ops_equal_llama_cpp(gemma3, gemma3_taps, gemma3_stage, layer):
    c, w, taps, stage = gemma3.config, gemma3_stage.weights[layer], gemma3_taps, gemma3_stage
    residual = taps["inp_scaled"] if layer == 0 else taps[f"l_out-{layer - 1}"]
    np.testing.assert_array_equal(rmsnorm(residual, w.attn_norm, c.norm_eps), taps[f"attn_norm-{layer}"])
    per_head = taps[f"Qcur-{layer}"].reshape(-1, c.head_dim)  # the first node named Qcur: before its norm
    np.testing.assert_array_equal(rmsnorm(per_head, w.attn_q_norm, c.norm_eps).reshape(taps.n, -1),
                                  taps[f"Qcur_normed-{layer}"])
    np.testing.assert_array_equal(rmsnorm(taps[f"sa_out-{layer}"], w.ffn_norm, c.norm_eps), taps[f"ffn_norm-{layer}"])
    np.testing.assert_array_equal(geglu(taps[f"ffn_gate-{layer}"], taps[f"ffn_up-{layer}"]), taps[f"ffn_geglu-{layer}"])
    np.testing.assert_array_equal(rmsnorm(taps[f"ffn_out-{layer}"], w.post_ffw_norm, c.norm_eps),
                                  taps[f"ffn_post_norm-{layer}"])
    assert_ulp_close(matmul(w.ffn_gate, Activations(taps[f"ffn_norm-{layer}"])), taps[f"ffn_gate-{layer}"])
    # Gemma scales Q (ggml_scale, an f32 product) after RoPE, the last node named Qcur
    q = taps[f"Qcur-{layer}", -1] * np.float32(c.attn_scale)
    k, v = kv_cache(taps[f"Kcur-{layer}", -1], taps[f"Vcur-{layer}"], c.n_kv_heads, c.head_dim)
    ours = attention(q, k, v, 0, c.n_heads, 1.0, c.attn_softcap, stage.window[layer])
    naive.assert_attention_close(ours, taps[f"kqv_out-{layer}"], float(np.abs(v.view(np.float16)).max()))
