"""The layer math other than weight products: RMSNorm, RoPE, attention over a KV cache, SwiGLU.

Each op is one compiled kernel with shapes in its docstring. Formulas follow ggml's CPU ops
(ggml-cpu/ops.cpp) so that caravan and llama.cpp agree closely. Only attention runs in
parallel: the element-wise ops are a few microseconds of work, less than waking the threads.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from .numba_config import FASTMATH


@nb.njit(cache=True, fastmath=FASTMATH)
def _rmsnorm(x, weight, eps, out):
    n_rows, dim = x.shape
    for t in range(n_rows):
        total = 0.0  # float64, as ggml_compute_forward_rms_norm sums in ggml_float
        for j in range(dim):
            total += np.float64(x[t, j]) * np.float64(x[t, j])
        scale = np.float32(1.0) / np.float32(math.sqrt(np.float32(total / dim) + eps))
        for j in range(dim):
            out[t, j] = (x[t, j] * scale) * weight[j]


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (T, dim) -> x / sqrt(mean(x**2) + eps) * weight, (T, dim)."""
    out = np.empty_like(x)
    _rmsnorm(x, weight, np.float32(eps), out)
    return out


def rope_tables(n_positions: int, n_rot: int, theta_base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, each (n_positions, n_rot // 2) f32, for rotating pairs by pos * base**(-2i/n_rot).

    The angles are made as ggml_rope does: theta_scale = base**(-2/n_rot) in f32, and each
    pair's angle is the previous one times theta_scale, in f32."""
    theta_scale = np.float32(theta_base) ** np.float32(-2.0 / n_rot)
    theta = np.empty((n_positions, n_rot // 2), np.float32)
    theta[:, 0] = np.arange(n_positions, dtype=np.float32)
    for i in range(1, n_rot // 2):
        theta[:, i] = theta[:, i - 1] * theta_scale
    return np.cos(theta), np.sin(theta)


@nb.njit(cache=True, fastmath=FASTMATH)
def _rope(x, positions, cos, sin, n_heads, head_dim):
    n_rows = x.shape[0]
    n_pairs = cos.shape[1]
    for t in range(n_rows):
        p = positions[t]
        for h in range(n_heads):
            base = h * head_dim
            for i in range(n_pairs):
                x0 = x[t, base + 2 * i]
                x1 = x[t, base + 2 * i + 1]
                x[t, base + 2 * i] = x0 * cos[p, i] - x1 * sin[p, i]
                x[t, base + 2 * i + 1] = x0 * sin[p, i] + x1 * cos[p, i]


def rope_(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray, n_heads: int) -> None:
    """Rotate x (T, n_heads * head_dim) in place, GGML "normal" mode: adjacent pairs (2i, 2i+1)
    of the first n_rot dimensions of each head. llama.cpp's converter permutes the Q/K rows of
    `llama` models so that this is the right pairing (not the two halves, as in NeoX mode)."""
    _rope(x, positions, cos, sin, n_heads, x.shape[1] // n_heads)


@nb.njit(cache=True, parallel=True, fastmath=FASTMATH)
def _attention(q, k_cache, v_cache, start, n_heads, n_kv_heads, scale, out):
    n_rows = q.shape[0]
    head_dim = q.shape[1] // n_heads
    group = n_heads // n_kv_heads
    n_ctx = start + n_rows
    scores = np.empty((n_rows * n_heads, n_ctx), np.float32)
    for i in nb.prange(n_rows * n_heads):
        t = i // n_heads
        h = i % n_heads
        q_off = h * head_dim
        kv_off = (h // group) * head_dim
        n = start + t + 1  # causal: row t sees positions 0 .. start + t
        row = scores[i]
        top = -np.inf
        for p in range(n):
            dot = np.float32(0.0)
            for j in range(head_dim):
                dot += q[t, q_off + j] * k_cache[p, kv_off + j]
            dot *= scale
            row[p] = dot
            top = max(top, dot)
        total = 0.0  # float64, as ggml's soft_max sums in ggml_float
        for p in range(n):
            e = np.float32(math.exp(row[p] - top))
            row[p] = e
            total += e
        inv = np.float32(1.0 / total)
        acc = np.zeros(head_dim, np.float32)  # a local row: LLVM vectorizes it, not out[t, ...]
        for p in range(n):
            w = row[p] * inv
            for j in range(head_dim):
                acc[j] += w * v_cache[p, kv_off + j]
        out[t, q_off : q_off + head_dim] = acc


def attention(
    q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start: int, n_heads: int, n_kv_heads: int
) -> np.ndarray:
    """Causal grouped-query attention for T consecutive rows of one sequence.

    q (T, n_heads * head_dim) holds positions start .. start + T - 1; k_cache and v_cache
    (>= start + T, n_kv_heads * head_dim) already hold those positions and all before them.
    Query head h reads KV head h // (n_heads // n_kv_heads). Returns (T, n_heads * head_dim)."""
    out = np.empty_like(q)
    head_dim = q.shape[1] // n_heads
    _attention(q, k_cache, v_cache, start, n_heads, n_kv_heads, np.float32(1.0 / math.sqrt(head_dim)), out)
    return out


@nb.njit(cache=True, fastmath=FASTMATH)
def _swiglu(gate, up, out):
    n_rows, n = gate.shape
    for t in range(n_rows):
        for j in range(n):
            g = gate[t, j]
            # exp in float64, clamped so the uncompiled path cannot overflow (exp(88) is past f32)
            out[t, j] = g / (np.float32(1.0) + np.float32(math.exp(min(-g, np.float32(88.0))))) * up[t, j]


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up, both (T, hidden_dim)."""
    out = np.empty_like(gate)
    _swiglu(gate, up, out)
    return out
