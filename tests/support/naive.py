"""Plain-numpy references for caravan's kernels and layer math, in float64.

Nothing here is fast or clever: each function is the formula, written once, so that a test can
say "the kernel agrees with the formula". Dequantization is not repeated here: gguf-py's
`gguf.quants.dequantize` is the format's reference and the tests use it directly.

Shapes follow llama2.c: x (T, dim), q (T, n_heads * head_dim), k/v (n_positions, kv_dim).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Callable

import numpy as np

QK = 32  # weights per quantization block


def f16_to_f32_bits(h: int) -> int:
    """The f32 bits of f16 bits h, per IEEE 754's fields: value (-1)^s * 2^(e - 15) * 1.m
    (subnormal: 2^-14 * 0.m), and a NaN keeps its payload and is made quiet (the f32 quiet
    bit set), as x86's vcvtph2ps and ggml's ggml_compute_fp16_to_fp32 do."""
    sign, exponent, mantissa = h >> 15, (h >> 10) & 0x1F, h & 0x3FF
    if exponent == 31:
        return sign << 31 | 0xFF << 23 | (0x400000 if mantissa else 0) | mantissa << 13
    value = math.ldexp(mantissa, -24) if exponent == 0 else math.ldexp(1024 + mantissa, exponent - 25)
    return struct.unpack("<I", struct.pack("<f", -value if sign else value))[0]


# ---------------------------------------------------------------------------------------------
# Activation rounding, as quants.py documents it (ggml's quantize_row_q8_0 / q8_1 and the f16
# rounding ggml_vec_dot_f16 applies to activations)


def quantize_q8_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (T, K) -> q (T, K) int8, d (T, K // 32) f32, s (T, K // 32) f32.

    Per block of 32: amax = max |x|, delta = amax / 127 (f32), q = rint(x * (127 / amax)),
    d = delta rounded to f16, s = (delta * sum(q)) rounded to f16 (Q8_1's block sum, read by
    Q4_1's `m` term): ggml's x86 quantize_row_q8_0 / q8_1, in f32 as there. (Its reference and
    NEON forms multiply by 1 / delta instead; caravan's kernel takes delta as amax * f32(1/127),
    which rounded to f16 is the same d but where the two straddle an f16 step.)
    """
    x = np.asarray(x, dtype=np.float32)
    n_rows, n = x.shape
    blocks = x.reshape(n_rows, n // QK, QK)
    amax = np.abs(blocks).max(axis=-1)  # (T, n_blocks) f32
    delta = amax / np.float32(127.0)
    with np.errstate(divide="ignore", over="ignore"):  # 127 / amax of a block whose delta is 0 is not used
        inv = np.where(delta > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    q = np.rint(blocks * inv[..., None]).astype(np.int32)  # |q| <= 127
    with np.errstate(over="ignore"):  # d * sum(q) past f16's 65504 is inf, as in ggml's block_q8_1
        d = delta.astype(np.float16).astype(np.float32)
        s = (delta * q.sum(axis=-1).astype(np.float32)).astype(np.float16).astype(np.float32)
    return q.reshape(n_rows, n).astype(np.int8), d, s


def dequantize_q8_activations(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The values the integer dot products see: q * d, (T, K) float64."""
    n_rows, n = q.shape
    blocks = q.reshape(n_rows, n // QK, QK).astype(np.float64) * d[..., None].astype(np.float64)
    return blocks.reshape(n_rows, n)


def round_f16(x: np.ndarray) -> np.ndarray:
    """x rounded to the nearest f16 (ties to even), as float64."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float64)


QK_K = 256  # values per Q8_K superblock


def quantize_q8_k_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (T, K) -> q (T, K) int8, d (T, K // 256) f32, bsums (T, K // 16) int16 (ggml's
    quantize_row_q8_K_ref, the K-quants' activations).

    Per superblock of 256: v = the first value of largest magnitude, scale = -127 / v (f32),
    q = min(127, rint(x * scale)), d = 1 / scale, bsums = the sums of each 16 q; all zero when
    the superblock is."""
    x = np.asarray(x, dtype=np.float32)
    n_rows, n = x.shape
    blocks = x.reshape(n_rows, n // QK_K, QK_K)
    vmax = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)[..., 0]
    with np.errstate(divide="ignore"):
        iscale = np.where(vmax != 0, np.float32(-127.0) / vmax, np.float32(0.0)).astype(np.float32)
        d = np.where(vmax != 0, np.float32(1.0) / iscale, np.float32(0.0)).astype(np.float32)
    q = np.minimum(127, np.rint(blocks * iscale[..., None])).astype(np.int32)
    bsums = q.reshape(n_rows, -1, 16).sum(axis=-1)
    return q.reshape(n_rows, n).astype(np.int8), d, bsums.astype(np.int16)


def dequantize_q8_k_activations(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    n_rows, n = q.shape
    return (q.reshape(n_rows, -1, QK_K).astype(np.float64) * d[..., None].astype(np.float64)).reshape(n_rows, n)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """x rounded to the nearest bf16 (ties to even), as float64: keep the top 16 bits of the f32
    after adding 0x7fff plus the lowest kept bit (ggml's GGML_FP32_TO_BF16, finite x)."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Layer ops


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (T, dim) / sqrt(mean(x**2) + eps) * weight."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(weight, dtype=np.float64)


def rope(x: np.ndarray, positions: np.ndarray, n_heads: int, n_rot: int, theta_base: float, neox: bool = False,
         freq_scale: float = 1.0, freq_factors=None) -> np.ndarray:
    """Rotate pairs of each head's first n_rot dimensions by freq_scale * pos * base**(-2i / n_rot)
    / factor_i: adjacent pairs (2i, 2i+1), or with neox the halves (i, i + n_rot/2).

    x (T, n_heads * head_dim); dimensions n_rot .. head_dim - 1 of each head are left alone."""
    x = np.array(x, dtype=np.float64)
    n_rows, width = x.shape
    head_dim = width // n_heads
    i = np.arange(n_rot // 2, dtype=np.float64)
    factors = np.ones(n_rot // 2) if freq_factors is None else np.asarray(freq_factors, dtype=np.float64)
    angles = freq_scale * np.asarray(positions, dtype=np.float64)[:, None] * theta_base ** (-2.0 * i / n_rot) / factors
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    heads = x.reshape(n_rows, n_heads, head_dim)
    first, second = (slice(0, n_rot // 2), slice(n_rot // 2, n_rot)) if neox else (slice(0, n_rot, 2), slice(1, n_rot, 2))
    x0 = heads[:, :, first].copy()
    x1 = heads[:, :, second].copy()
    heads[:, :, first] = x0 * cos - x1 * sin
    heads[:, :, second] = x0 * sin + x1 * cos
    return heads.reshape(n_rows, width)


def attention(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int, n_heads: int, n_kv_heads: int, f16_operands: bool = False,
    scale: float | None = None, softcap: float = 0.0, window: int = 0,
) -> np.ndarray:
    """Causal grouped-query attention: q (T, n_heads * hd) at positions start .. start + T - 1,
    k and v (>= start + T, n_kv_heads * hd); query head h reads KV head h // (n_heads // n_kv_heads).
    f16_operands: q and the softmax weights are rounded to f16 before they multiply k and v, as
    caravan's kernel and ggml's mul_mat(K, Q) and mul_mat(V, KQ) on an f16 cache do (mul_mat
    reads its f32 operand in the f16 one's type). Scores are softcap * tanh(q.k / softcap)
    (softcap > 0), times scale (default 1/sqrt(hd)); window > 0: the row at p sees p - window + 1 .. p."""
    q = np.asarray(q, dtype=np.float16 if f16_operands else np.float64).astype(np.float64)
    n_rows = q.shape[0]
    head_dim = q.shape[1] // n_heads
    group = n_heads // n_kv_heads
    n_ctx = start + n_rows
    k = np.asarray(k[:n_ctx], dtype=np.float64).reshape(n_ctx, n_kv_heads, head_dim)
    v = np.asarray(v[:n_ctx], dtype=np.float64).reshape(n_ctx, n_kv_heads, head_dim)
    out = np.empty((n_rows, n_heads, head_dim))
    scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
    for t in range(n_rows):
        n = start + t + 1
        lo = max(0, n - window) if window else 0
        for h in range(n_heads):
            kv = h // group
            scores = k[lo:n, kv] @ q[t, h * head_dim : (h + 1) * head_dim]
            if softcap:
                scores = softcap * np.tanh(scores / softcap)
            scores = scores * scale
            weights = np.exp(scores - scores.max())
            weights /= weights.sum()
            if f16_operands:
                weights = weights.astype(np.float16).astype(np.float64)
            out[t, h] = weights @ v[lo:n, kv]
    return out.reshape(n_rows, n_heads * head_dim)


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up."""
    gate = np.asarray(gate, dtype=np.float64)
    return gate / (1.0 + np.exp(-gate)) * np.asarray(up, dtype=np.float64)


def geglu(gate: np.ndarray, up: np.ndarray, f16_table: bool = False) -> np.ndarray:
    """gelu(gate) * up, GELU's tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x**3))).
    f16_table: as ggml with GGML_GELU_FP16, gate rounded to f16 and the GELU rounded to f16
    (zero below -10, the identity above 10)."""
    x = np.asarray(gate, dtype=np.float64)
    if f16_table:
        x = round_f16(x)
    gelu = 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))
    if f16_table:
        gelu = np.where(gate <= -10, 0.0, np.where(gate >= 10, gate, round_f16(gelu)))
    return gelu * np.asarray(up, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# A whole LLaMA model


@dataclass(frozen=True)
class RefConfig:
    """What the references read of a config; caravan's ModelConfig has the same field names."""

    n_layers: int
    dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_rot: int
    norm_eps: float
    rope_theta: float


# (weights, weight name, x (T, cols)) -> x @ W.T in float64. `exact_product` is the float64
# model; `kernel_product` rounds activations as caravan's kernels do.
Product = Callable[[dict, str, np.ndarray], np.ndarray]


def exact_product(weights: dict, name: str, x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64) @ weights[name].T


K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def kernel_product(weight_types: dict, q4_1_minima: dict) -> Product:
    """Products that see the activations the kernels see (ggml's vec_dot_type): Q8_K superblocks
    for the K-quants, Q8 blocks for the other block formats, f16 for F16 weights, bf16 for BF16,
    unrounded for F32. Q4_1 and Q5_1 read the activation's f16 block sum s for their `m` term, so
    m * (s - d * sum(q)) is added per block.

    weight_types: tensor name -> type name ("Q4_1"); q4_1_minima: name -> m (rows, n_blocks) of
    the Q4_1 and Q5_1 weights."""

    def product(weights: dict, name: str, x: np.ndarray) -> np.ndarray:
        kind = weight_types[name]
        if kind == "F32":
            return exact_product(weights, name, x)
        if kind == "F16":
            return round_f16(x) @ weights[name].T
        if kind == "BF16":
            return round_bf16(x) @ weights[name].T
        if kind in K_QUANTS:
            q, d, _ = quantize_q8_k_activations(x)
            return dequantize_q8_k_activations(q, d) @ weights[name].T
        q, d, s = quantize_q8_activations(np.asarray(x, dtype=np.float32))
        out = dequantize_q8_activations(q, d) @ weights[name].T
        if kind in ("Q4_1", "Q5_1"):
            block_q_sums = q.reshape(q.shape[0], -1, QK).astype(np.float64).sum(axis=-1)
            out += (s.astype(np.float64) - d * block_q_sums) @ q4_1_minima[name].astype(np.float64).T
        return out

    return product


def forward_layer(
    weights: dict,
    config: RefConfig,
    layer: int,
    x: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    start: int,
    product: Product = exact_product,
    window: int = 0,
) -> np.ndarray:
    """One transformer block on x (T, dim) at positions start .. start + T - 1.

    weights: GGUF tensor name -> float64 array, matrices (rows, cols). k_cache, v_cache
    (n_positions, kv_dim) float64 are written at those positions, rounded to f16 as caravan's
    and llama.cpp's caches hold them. window > 0: the row at p attends to p - window + 1 .. p."""
    c = config
    p = f"blk.{layer}."
    n_rows = x.shape[0]
    positions = np.arange(start, start + n_rows)
    h = rmsnorm(x, weights[p + "attn_norm.weight"], c.norm_eps)
    q = rope(product(weights, p + "attn_q.weight", h), positions, c.n_heads, c.n_rot, c.rope_theta)
    k = rope(product(weights, p + "attn_k.weight", h), positions, c.n_kv_heads, c.n_rot, c.rope_theta)
    v = product(weights, p + "attn_v.weight", h)
    k_cache[start : start + n_rows] = round_f16(k)
    v_cache[start : start + n_rows] = round_f16(v)
    attn = attention(q, k_cache, v_cache, start, c.n_heads, c.n_kv_heads, f16_operands=True, window=window)
    x = x + product(weights, p + "attn_output.weight", attn)
    h = rmsnorm(x, weights[p + "ffn_norm.weight"], c.norm_eps)
    gated = swiglu(product(weights, p + "ffn_gate.weight", h), product(weights, p + "ffn_up.weight", h))
    return x + product(weights, p + "ffn_down.weight", gated)


def forward_model(
    weights: dict, config: RefConfig, token_ids, product: Product = exact_product, window: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A whole prompt in one pass: token ids (T,) -> (hidden (T, dim) after the last layer,
    logits (T, vocab)). Tied output when `output.weight` is absent; window > 0: every layer's
    attention slides over that many positions (Mistral's sliding window)."""
    c = config
    token_ids = np.asarray(token_ids, dtype=np.int64)
    x = weights["token_embd.weight"][token_ids].astype(np.float64)
    kv_dim = c.n_kv_heads * c.head_dim
    for layer in range(c.n_layers):
        k_cache = np.zeros((len(token_ids), kv_dim))
        v_cache = np.zeros((len(token_ids), kv_dim))
        x = forward_layer(weights, c, layer, x, k_cache, v_cache, 0, product, window)
    out_name = "output.weight" if "output.weight" in weights else "token_embd.weight"
    logits = product(weights, out_name, rmsnorm(x, weights["output_norm.weight"], c.norm_eps))
    return x, logits


def assert_attention_close(got: np.ndarray, expected: np.ndarray, v_max: float) -> None:
    """got within f32 rounding of the float64 reference (scores off by ~head_dim ulps of |q||k|
    feed exp: ~1e-6 relative in the weights), except where a weight lies that close to an f16
    rounding boundary and rounds the other way: one f16 step (at most 2**-11) of one weight moves
    its head's outputs by up to 2**-11 * max|v|. Such weights are rare: a few outputs in a
    hundred at most, where an error in the kernel (a query not rounded to f16 included) moves
    most of them."""
    err = np.abs(got - expected)
    beyond = err > 1e-5 * (np.abs(expected) + v_max)
    assert beyond.mean() <= 0.02, f"{beyond.sum()} of {err.size} outputs beyond f32 rounding"
    assert err.max() <= 2.0**-11 * v_max * 1.01, f"max error {err.max()}: more than one f16 step of a weight"
