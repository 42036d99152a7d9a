"""The layer math other than weight products: RMSNorm, RoPE, attention over a KV cache, SwiGLU.

Each op is one compiled kernel with shapes in its docstring. Formulas follow ggml's CPU ops
(ggml-cpu/ops.cpp) so that caravan and llama.cpp agree closely. Attention runs in parallel;
SwiGLU only for a prefill chunk's many rows: for a few rows the element-wise ops are a few
microseconds of work, less than waking the threads.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from .numba_config import FASTMATH
from .simd import TILE_COLS, TILE_ROWS, round_f16, tile_f16


@nb.njit(cache=True, nogil=True, fastmath=FASTMATH)
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


@nb.njit(cache=True, nogil=True, fastmath=FASTMATH)
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


@nb.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _softmax_rows(scores, n_rows, start, m0, group, scale, n_max):
    """Row i of scores (query vector m0 + i of a tile, position p in 0 .. n_max - 1) becomes
    softmax(scale * scores[i, :n]) with n = start + (m0 + i) // group + 1 (its causal limit),
    zero up to n_max. As ggml's soft_max: scale, subtract the max, exp, sum in float64, multiply by the
    f32 inverse of the sum; then rounded to f16, as ggml's mul_mat(V, KQ) reads them against
    its f16 V cache."""
    for i in range(n_rows):
        row = scores[i]
        n = start + (m0 + i) // group + 1
        top = -np.inf
        for p in range(n):
            row[p] *= scale
            top = max(top, row[p])
        total = 0.0
        for p in range(n):
            e = np.float32(math.exp(row[p] - top))
            row[p] = e
            total += e
        inv = np.float32(1.0 / total)
        for p in range(n):
            row[p] = round_f16(row[p] * inv)
        row[n:n_max] = 0.0


@nb.njit(cache=True, nogil=True, parallel=True, fastmath=FASTMATH)
def _attention(q, k_cache, v_cache, start, n_heads, scale, out):
    n_rows, q_dim = q.shape
    n_kv_heads, head_dim, capacity = k_cache.shape
    group = n_heads // n_kv_heads
    # The query vectors that read KV head g are m = t * group + i (row t, query head
    # g * group + i); tiles of TILE_ROWS of them share each K and V load.
    n_vectors = n_rows * group
    n_tiles = (n_vectors + TILE_ROWS - 1) // TILE_ROWS
    q_flat = q.reshape(-1)
    out_flat = out.reshape(-1)
    k_flat = k_cache.reshape(-1)
    v_flat = v_cache.reshape(-1)
    for task in nb.prange(n_kv_heads * n_tiles):
        g = task % n_kv_heads
        # Causal tiles grow with their rows: pair light and heavy ones (0, last, 1, last - 1,
        # ...) so that prange's contiguous chunks get about equal work.
        j = task // n_kv_heads
        tile = j // 2 if j % 2 == 0 else n_tiles - 1 - j // 2
        m0 = tile * TILE_ROWS
        mr = min(TILE_ROWS, n_vectors - m0)
        n_max = start + (m0 + mr - 1) // group + 1  # positions the tile's last vector sees
        q_offs = np.zeros(TILE_ROWS, np.int64)
        out_offs = np.zeros(TILE_ROWS, np.int64)
        for i in range(mr):
            m = m0 + i
            h = g * group + m % group
            q_offs[i] = out_offs[i] = (m // group) * q_dim + h * head_dim
        scores = np.empty((TILE_ROWS, n_max), np.float32)  # (vector, position)
        s_flat = scores.reshape(-1)
        # scores = q_tile @ K[g] (K is stored transposed: (head_dim, position))
        for p0 in range(0, n_max, TILE_COLS):
            tile_f16(
                mr, q_flat, q_offs[0], q_offs[1], q_offs[2], q_offs[3],
                k_flat, g * head_dim * capacity + p0, capacity, head_dim,
                s_flat, p0, n_max + p0, 2 * n_max + p0, 3 * n_max + p0, min(TILE_COLS, n_max - p0),
            )
        _softmax_rows(scores, mr, start, m0, group, scale, n_max)
        # out rows = probabilities @ V[g] ((position, head_dim)); zero weights past a row's
        # limit add exact zeros
        for j0 in range(0, head_dim, TILE_COLS):
            tile_f16(
                mr, s_flat, 0, n_max, 2 * n_max, 3 * n_max,
                v_flat, g * capacity * head_dim + j0, head_dim, n_max,
                out_flat, out_offs[0] + j0, out_offs[1] + j0, out_offs[2] + j0, out_offs[3] + j0,
                min(TILE_COLS, head_dim - j0),
            )


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start: int, n_heads: int) -> np.ndarray:
    """Causal grouped-query attention for T consecutive rows of one sequence.

    q (T, n_heads * head_dim) f32 holds positions start .. start + T - 1; k_cache
    (n_kv_heads, head_dim, capacity), keys transposed so that positions are contiguous, and
    v_cache (n_kv_heads, capacity, head_dim), both f16 bits (uint16), already hold those
    positions and all before them.
    Query head h reads KV head h // (n_heads // n_kv_heads). Returns (T, n_heads * head_dim)."""
    q = np.ascontiguousarray(q)
    out = np.empty_like(q)
    head_dim = k_cache.shape[1]
    _attention(q, k_cache, v_cache, start, n_heads, np.float32(1.0 / math.sqrt(head_dim)), out)
    return out


@nb.njit(inline="always", fastmath=FASTMATH)
def _swiglu_row(gate, up, out, t):
    for j in range(gate.shape[1]):
        g = gate[t, j]
        # exp in float64, clamped so the uncompiled path cannot overflow (exp(88) is past f32)
        out[t, j] = g / (np.float32(1.0) + np.float32(math.exp(min(-g, np.float32(88.0))))) * up[t, j]


@nb.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _swiglu(gate, up, out):
    for t in range(gate.shape[0]):
        _swiglu_row(gate, up, out, t)


@nb.njit(cache=True, nogil=True, parallel=True, fastmath=FASTMATH)
def _swiglu_parallel(gate, up, out):
    for t in nb.prange(gate.shape[0]):
        _swiglu_row(gate, up, out, t)


# Rows from which an element-wise op is worth waking the threads for (a prefill chunk).
PARALLEL_ROWS = 32


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up, both (T, hidden_dim). Each row is computed by the same code serially or
    in parallel, so the result does not depend on T or the thread count."""
    out = np.empty_like(gate)
    (_swiglu_parallel if gate.shape[0] >= PARALLEL_ROWS else _swiglu)(gate, up, out)
    return out
