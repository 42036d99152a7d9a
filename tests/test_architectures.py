"""Every architecture caravan runs, against llama.cpp (llama-cpp-python) on tiny random models.

Each model is written by the test with gguf.GGUFWriter (tiny_models.tiny_model) and loaded by
both engines: the logits of a 40-token prompt agree closely and 16 greedy tokens are the same.
The fixtures turn on what makes each family different (rope_freqs factors, linear RoPE
scaling, Q/K/V biases, fused QKV and gate+up, GeGLU, scaled embeddings, Q/K norms,
post-norms, soft-capping small enough to bite, sliding windows shorter than the prompt), and
`test_each_feature_matters` shows that leaving any of them out breaks the agreement.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from caravan.pipeline.generate import Pipeline
from caravan.pipeline.gguf_file import GGUFFile
from caravan.pipeline.loader import load_model
from caravan.pipeline.model import ModelError, ModelHead
from caravan.pipeline.stage import LayerRange, LocalStage, Segment
from support import naive
from support.llama_cpp_taps import LLAMA_CPP_THREADS
from support.tiny_models import dequantized_weights, tiny_model, write_gguf, write_tiny_model

N_CTX = 128
PROMPT = 40
NEW_TOKENS = 16

FIXTURES = {
    # Llama 3.1: rope_freqs.weight frequency factors, its own output matrix, the llama-bpe pre-split
    "llama3": dict(arch="llama", rope_freqs=True, tied_output=False),
    # Mistral's GGUF files are `llama`; llama.cpp ignores llama.attention.sliding_window, caravan
    # applies it, so here it is longer than the prompt and the tokens generated (40 + 16; see
    # test_mistral_sliding_window_matches_numpy_reference for a shorter one); linear RoPE scaling
    # as some Llama fine-tunes have
    "mistral": dict(arch="llama", n_kv_heads=1, metadata={
        "llama.attention.sliding_window": 64, "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}),
    # llama.cpp's loader takes one attn_qkv matrix in place of Q, K and V (create_tensor_qkv)
    "llama-fused-qkv": dict(arch="llama", fused=True),
    "qwen2": dict(arch="qwen2"),  # Q/K/V biases, NeoX RoPE
    "phi3": dict(arch="phi3", fused=True),  # attn_qkv, gate and up in ffn_up, NeoX RoPE
    # Gemma: head width 32 with dim 64 and 4 heads (q_dim 128 != dim, as Gemma's 256-wide heads)
    "gemma": dict(arch="gemma", head_dim=32, n_kv_heads=1),
    "gemma2": dict(arch="gemma2", metadata={
        "gemma2.attention.sliding_window": 8, "gemma2.attn_logit_softcapping": 2.0,
        "gemma2.final_logit_softcapping": 5.0}),
    # Gemma 3: 5 sliding layers then a global one, whose RoPE base and linear scaling differ
    "gemma3": dict(arch="gemma3", n_layers=6, head_dim=32, metadata={
        "gemma3.attention.sliding_window": 8, "gemma3.rope.freq_base": 1_000_000.0,
        "gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0}),
}
WEIGHT_TYPES = (QT.F32, QT.F16, QT.Q8_0, QT.Q4_0)

# max |caravan - llama.cpp| over the prompt's logits, as a fraction of the mean spread
# (max - min) of llama.cpp's logits per position. F32 and F16 weights: the engines differ in
# summation order and in llama.cpp rounding Q to f16 for its f16 K cache (observed <= 1.2e-3).
# Q8_0 and Q4_0: both quantize activations to 8-bit blocks before every product, and a value
# at a rounding boundary lands one step apart in the two engines, which the random layers pass
# on (observed <= 1.9e-2). Each bound is about 3x the worst seen; a wiring error (a missing
# cap, window, bias or norm, the wrong RoPE pairs) moves logits by 10% and more of the spread.
TOLERANCE = {QT.F32: 3e-3, QT.F16: 3e-3, QT.Q8_0: 5e-2, QT.Q4_0: 5e-2}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("architectures")


def write_fixture(model_dir, name: str, weight_type: QT):
    kwargs = dict(FIXTURES[name])
    path = model_dir / f"{name}-{weight_type.name}.gguf"
    if not path.exists():
        write_tiny_model(path, kwargs.pop("arch"), weight_type=weight_type, **kwargs)
    return path


def prompt_ids(vocab_size: int) -> np.ndarray:
    return np.random.default_rng(7).integers(0, vocab_size - 4, PROMPT)


def pipeline_for(model, config=None) -> Pipeline:
    config = config or model.config
    stage = LocalStage.load(model.file, config, LayerRange(0, config.n_layers), N_CTX)
    return Pipeline(ModelHead(model.file, config), [stage], N_CTX)


def caravan_logits(pipeline: Pipeline, ids: np.ndarray) -> np.ndarray:
    hidden = pipeline.forward([Segment("logits", 0, len(ids))], ids)
    pipeline.end_session("logits")
    return pipeline.head.logits(hidden)


def caravan_greedy(pipeline: Pipeline, ids: np.ndarray, n: int) -> list[int]:
    hidden = pipeline.forward([Segment("greedy", 0, len(ids))], ids)
    tokens = []
    for step in range(n):
        tokens.append(int(np.argmax(pipeline.head.logits(hidden[-1:])[0])))
        hidden = pipeline.forward([Segment("greedy", len(ids) + step, 1)], np.array(tokens[-1:]))
    pipeline.end_session("greedy")
    return tokens


def llama_cpp_model(path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the reference engine) is not installed")
    return llama_cpp.Llama(model_path=str(path), n_ctx=N_CTX, n_threads=LLAMA_CPP_THREADS,
                           logits_all=True, verbose=False)


def llama_cpp_logits(llama, ids: np.ndarray) -> np.ndarray:
    llama.reset()
    llama.eval(ids.tolist())
    return np.asarray(llama.scores[: len(ids)])


def llama_cpp_greedy(llama, ids: np.ndarray, n: int) -> list[int]:
    llama.reset()
    tokens = []
    for token in llama.generate(ids.tolist(), temp=0.0, top_k=1):
        tokens.append(token)
        if len(tokens) == n:
            return tokens


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / (ref.max(axis=1) - ref.min(axis=1)).mean())


@pytest.mark.oracle
@pytest.mark.parametrize("weight_type", WEIGHT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("name", list(FIXTURES))
def test_logits_and_greedy_tokens_match_llama_cpp(model_dir, name, weight_type):
    path = write_fixture(model_dir, name, weight_type)
    model = load_model(path)
    assert model.config.arch == FIXTURES[name]["arch"]
    pipeline = pipeline_for(model)
    llama = llama_cpp_model(path)
    ids = prompt_ids(model.config.vocab_size)
    error = relative_error(caravan_logits(pipeline, ids), llama_cpp_logits(llama, ids))
    print(f"{name} {weight_type.name}: max |logit error| / spread = {error:.2e}")
    assert error < TOLERANCE[weight_type]
    assert caravan_greedy(pipeline, ids, NEW_TOKENS) == llama_cpp_greedy(llama, ids, NEW_TOKENS)


# What each fixture's distinguishing feature is, as the config field that carries it and a value
# that switches it off.
FEATURES = [
    ("llama3", "rope_freq_factors", ()),
    ("mistral", "rope_scale", 1.0),
    ("gemma2", "attn_softcap", 0.0),
    ("gemma2", "final_softcap", 0.0),
    ("gemma2", "sliding_layers", (False,) * 3),
    ("gemma3", "sliding_window", 0),
    ("gemma3", "rope_theta_swa", 1_000_000.0),
    ("gemma3", "rope_scale", 1.0),
]


@pytest.mark.oracle
@pytest.mark.parametrize("name,field,off", FEATURES, ids=lambda v: str(v))
def test_each_feature_matters(model_dir, name, field, off):
    path = write_fixture(model_dir, name, QT.F32)
    model = load_model(path)
    ids = prompt_ids(model.config.vocab_size)
    ref = llama_cpp_logits(llama_cpp_model(path), ids)
    without = caravan_logits(pipeline_for(model, dataclasses.replace(model.config, **{field: off})), ids)
    assert relative_error(without, ref) > 10 * TOLERANCE[QT.F32]


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["qwen2", "gemma3"])
def test_biases_and_norms_matter(model_dir, name):
    """Zeroing the Q/K/V biases (Qwen2) or making the Q/K norms plain (Gemma 3) breaks the match."""
    path = write_fixture(model_dir, name, QT.F32)
    model = load_model(path)
    ids = prompt_ids(model.config.vocab_size)
    ref = llama_cpp_logits(llama_cpp_model(path), ids)
    pipeline = pipeline_for(model)
    stage = pipeline.stages[0]
    for i, w in enumerate(stage.weights):
        if name == "qwen2":
            stage.weights[i] = dataclasses.replace(w, attn_q_bias=w.attn_q_bias * 0, attn_k_bias=w.attn_k_bias * 0,
                                                   attn_v_bias=w.attn_v_bias * 0)
        else:
            stage.weights[i] = dataclasses.replace(w, attn_q_norm=np.ones_like(w.attn_q_norm),
                                                   attn_k_norm=np.ones_like(w.attn_k_norm))
    assert relative_error(caravan_logits(pipeline, ids), ref) > 10 * TOLERANCE[QT.F32]


def test_a_split_model_is_bit_identical_to_one_stage(model_dir):
    """Gemma 3's per-layer windows and RoPE tables follow the layer index through any split."""
    model = load_model(write_fixture(model_dir, "gemma3", QT.Q8_0))
    ids = prompt_ids(model.config.vocab_size)
    whole = caravan_logits(pipeline_for(model), ids)
    stages = [LocalStage.load(model.file, model.config, LayerRange(a, b), N_CTX) for a, b in ((0, 2), (2, 5), (5, 6))]
    split = Pipeline(ModelHead(model.file, model.config), stages, N_CTX)
    assert np.array_equal(caravan_logits(split, ids), whole)


def test_mistral_sliding_window_matches_numpy_reference(tmp_path):
    """llama.attention.sliding_window 8 under a 40-token prompt: every layer attends to the last 8
    positions only, whether the prompt comes in one pass or in chunks that straddle the window;
    the logits equal the float64 reference with the window (test_stage.py's F32 bound) and are far
    from the one without."""
    path = write_tiny_model(tmp_path / "mistral-window.gguf", "llama", weight_type=QT.F32, n_kv_heads=1,
                            metadata={"llama.attention.sliding_window": 8})
    model = load_model(path)
    assert model.config.sliding_window == 8 and model.config.sliding_layers == (True,) * 3
    ids = prompt_ids(model.config.vocab_size)
    weights = dequantized_weights(GGUFFile(path))
    _, windowed = naive.forward_model(weights, model.config, ids, window=8)
    _, unwindowed = naive.forward_model(weights, model.config, ids)
    scale = np.abs(windowed).max()
    pipeline = pipeline_for(model)
    whole = caravan_logits(pipeline, ids)
    pieces = [ids[start : start + 7] for start in range(0, PROMPT, 7)]  # 7 at a time, the last 5
    chunked = pipeline.head.logits(np.concatenate([pipeline.forward([Segment("chunks", 7 * i, len(p))], p)
                                                   for i, p in enumerate(pieces)]))
    for logits in (whole, chunked):
        assert np.abs(logits - windowed).max() < 3e-4 * scale
        assert np.abs(logits - unwindowed).max() > 0.1 * scale


def test_unknown_architecture_names_it_and_the_supported_ones(tmp_path):
    metadata, tensors = tiny_model("llama")
    metadata = {k.replace("llama.", "mamba."): v for k, v in metadata.items()}
    metadata["general.architecture"] = "mamba"
    with pytest.raises(ModelError, match=r"^unknown architecture 'mamba' \(general.architecture; supported: "
                                         r"llama, qwen2, phi3, gemma, gemma2, gemma3\)$"):
        load_model(write_gguf(tmp_path / "mamba.gguf", metadata, tensors))


@pytest.mark.parametrize("change,message", [
    (lambda m, t: t.pop("blk.0.attn_q.bias"), r"missing tensor blk.0.attn_q.bias"),
    (lambda m, t: t.update({"blk.0.ffn_gate_inp.weight": t["blk.0.ffn_up.weight"]}),
     r"blk.0.ffn_gate_inp.weight: not a tensor of a qwen2 block"),
    (lambda m, t: t.update({"blk.1.attn_q_norm.weight": t["blk.0.attn_k.bias"]}),
     r"blk.1.attn_q_norm.weight: not a tensor of this qwen2 model's 3 blocks"),
    (lambda m, t: m.update({"qwen2.rope.scaling.type": "yarn"}),
     r"qwen2.rope.scaling.type 'yarn' is not supported \(supported: none, linear\)"),
    (lambda m, t: t.update({"rope_factors_long.weight": t["blk.0.attn_k.bias"]}),
     r"rope_factors_long.weight: not a tensor caravan can run .* LongRoPE's rope_factors_\* are not supported"),
    (lambda m, t: t.update({"rope_freqs.weight": (np.ones(8, np.float32), QT.F32)}),
     r"rope_freqs.weight: qwen2 models have no RoPE frequency factors"),
])
def test_malformed_families_are_refused_in_one_line(tmp_path, change, message):
    metadata, tensors = tiny_model("qwen2")
    change(metadata, tensors)
    with pytest.raises(ModelError, match=message):
        load_model(write_gguf(tmp_path / "bad.gguf", metadata, tensors))


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["qwen2", "gemma2"])
def test_a_lora_adapter_on_another_family_matches_llama_cpp(model_dir, name):
    """LoRA deltas land on the products before Qwen2's biases and Gemma 2's post-norms, as
    llama.cpp's build_lora_mm does: prompt logits within the F32 bound, the same greedy tokens."""
    from caravan.pipeline.generate import Generation
    from caravan.pipeline.lora import LoraAdapter
    from caravan.pipeline.sampler import Sampler, SamplingParams
    from support.tiny_models import tiny_lora

    path = write_fixture(model_dir, name, QT.F32)
    adapter_path = write_gguf(model_dir / f"{name}-lora.gguf", *tiny_lora(arch=FIXTURES[name]["arch"], seed=3))
    model = load_model(path)
    pipeline = pipeline_for(model)
    adapter = LoraAdapter.open(adapter_path, model.config)
    pipeline.add_adapter(adapter)
    chosen = ((adapter.name, 1.0),)
    ids = prompt_ids(model.config.vocab_size)
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the reference engine) is not installed")
    llama = llama_cpp.Llama(model_path=str(path), n_ctx=N_CTX, n_threads=LLAMA_CPP_THREADS,
                            logits_all=True, verbose=False,
                            lora_path=str(adapter_path), lora_scale=1.0)
    ref = llama_cpp_logits(llama, ids)
    hidden = pipeline.forward([Segment("lora", 0, len(ids), chosen)], ids)
    pipeline.end_session("lora")
    assert relative_error(pipeline.head.logits(hidden), ref) < TOLERANCE[QT.F32]
    assert relative_error(caravan_logits(pipeline, ids), ref) > 10 * TOLERANCE[QT.F32]  # the adapter matters
    greedy = Generation(pipeline, ids.tolist(), Sampler(SamplingParams(temperature=0)), NEW_TOKENS, frozenset(), chosen)
    assert list(greedy) == llama_cpp_greedy(llama, ids, NEW_TOKENS)
