"""The layer math other than weight products: RMSNorm, RoPE, attention over a KV cache, SwiGLU
and GeGLU, soft-capping.

Each op is one compiled kernel with shapes in its docstring. Formulas follow ggml's CPU ops
(ggml-cpu/ops.cpp) so that caravan and llama.cpp agree closely. Attention runs in parallel;
SwiGLU only for a prefill chunk's many rows: for a few rows the element-wise ops are a few
microseconds of work, less than waking the threads.
"""

from __future__ import annotations

import functools
import math

import numba as nb
import numpy as np

from .numba_config import FASTMATH
from .quants import F16_TO_F32
from .attention_tiles import TILE_COLS, TILE_ROWS, tile_f16
from .vector import exp_f32, f16_bits, round_f16


@nb.njit(cache=True, nogil=True, fastmath={"reassoc", "nsz"})
def _sum_of_squares(x, t):
    """sum(x[t] ** 2) as ggml_compute_forward_rms_norm sums: each square rounded to f32, then
    added in float64 (ggml_float). No contraction, which would make each square exact in
    float64 (an fma); the order is free, so LLVM vectorizes it: terms of 24 bits sum in float64
    far below the f32 ulp of the mean taken from it."""
    total = 0.0
    for j in range(x.shape[1]):
        total += np.float64(x[t, j] * x[t, j])
    return total


@nb.njit(cache=True, nogil=True, fastmath=FASTMATH - {"reassoc"})
def _rmsnorm(x, weight, eps, out):
    # No reassociation here: ggml scales the row (ggml_vec_scale_f32), then multiplies by the
    # weight (its own ggml_mul), and (x * scale) * weight is not x * (scale * weight). A last-bit
    # difference in a norm's output moves some of the next product's 8-bit activations by one
    # step: with reassociation here, a quarter of SmolLM2's first norm outputs differed from
    # llama.cpp's in the last bit (tests/test_ops_vs_llama_cpp.py checks every bit).
    n_rows, dim = x.shape
    for t in range(n_rows):
        mean = np.float32(_sum_of_squares(x, t) / dim)
        scale = np.float32(1.0) / np.float32(math.sqrt(mean + eps))
        for j in range(dim):
            out[t, j] = (x[t, j] * scale) * weight[j]


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (T, dim) -> x / sqrt(mean(x**2) + eps) * weight, (T, dim)."""
    out = np.empty_like(x)
    _rmsnorm(x, weight, np.float32(eps), out)
    return out


def rope_tables(n_positions: int, n_rot: int, theta_base: float, freq_scale: float = 1.0,
                freq_factors: tuple[float, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, each (n_positions, n_rot // 2) f32, for rotating pairs by
    freq_scale * pos * base**(-2i/n_rot) / factor_i.

    The angles are made as ggml_rope does (ggml_rope_cache_init, rope_yarn without YaRN's
    extrapolation): theta_scale = base**(-2/n_rot) in f32, each pair's angle the previous one
    times theta_scale, in f32; then divided by the pair's frequency factor (rope_freqs.weight)
    and multiplied by freq_scale (1 / the linear scaling factor)."""
    theta_scale = np.float32(theta_base) ** np.float32(-2.0 / n_rot)
    theta = np.empty((n_positions, n_rot // 2), np.float32)
    theta[:, 0] = np.arange(n_positions, dtype=np.float32)
    for i in range(1, n_rot // 2):
        theta[:, i] = theta[:, i - 1] * theta_scale
    if freq_factors:
        theta = theta / np.asarray(freq_factors, dtype=np.float32)
    if freq_scale != 1.0:
        theta = np.float32(freq_scale) * theta
    return np.cos(theta), np.sin(theta)


@nb.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _rope(x, positions, cos, sin, n_heads, head_dim, half):
    n_rows = x.shape[0]
    n_pairs = cos.shape[1]
    for t in range(n_rows):
        p = positions[t]
        for h in range(n_heads):
            base = h * head_dim
            for i in range(n_pairs):
                # pair i: (2i, 2i + 1) in "normal" mode (half 0), (i, i + half) in NeoX mode
                if half == 0:
                    a = base + 2 * i
                    b = a + 1
                else:
                    a = base + i
                    b = a + half
                x0 = x[t, a]
                x1 = x[t, b]
                x[t, a] = x0 * cos[p, i] - x1 * sin[p, i]
                x[t, b] = x0 * sin[p, i] + x1 * cos[p, i]


def rope_(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray, n_heads: int,
          neox: bool = False, head_dim: int | None = None) -> None:
    """Rotate x (T, n_heads * head_dim) in place over the first n_rot dimensions of each head;
    with head_dim given, x may be wider and only its first n_heads heads turn (a row of Q, K
    and V side by side turns Q and K in one call).

    GGML "normal" mode (neox False) rotates adjacent pairs (2i, 2i+1): llama.cpp's converter
    permutes the Q/K rows of `llama` models so that this is the right pairing. NeoX mode
    rotates (i, i + n_rot/2), the two halves, as Qwen2, Phi-3 and Gemma are trained."""
    half = cos.shape[1] if neox else 0
    _rope(x, positions, cos, sin, n_heads, x.shape[1] // n_heads if head_dim is None else head_dim, half)


def softcap_(x: np.ndarray, cap: float) -> None:
    """x = cap * tanh(x / cap) in place, in f32 as llama.cpp's ggml_scale, ggml_tanh, ggml_scale."""
    np.multiply(x, np.float32(1.0 / cap), out=x)
    np.tanh(x, out=x)
    np.multiply(x, np.float32(cap), out=x)


# error_model="numpy": exp_f32 clamps a NaN score (from a NaN or Inf that reached attention) to
# zero, so such a row sums to zero, and dividing by it must give Inf, as in C, not raise a
# ZeroDivisionError inside prange (which surfaces as a SystemError).
@nb.njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def _softmax_rows(scores, n_rows, start, m0, group, scale, softcap, window, p_lo, n_max):
    """Row i of scores (query vector m0 + i of a tile, at position pos = start + (m0 + i) // group)
    becomes softmax(scale * cap(scores[i, lo:pos + 1])) over the positions it sees: lo is 0, or
    pos - window + 1 for a sliding window (llama_hparams::is_masked_swa, standard type); zero
    elsewhere in p_lo .. n_max - 1. cap(s) = softcap * tanh(s / softcap) when softcap > 0 (as
    llama.cpp's build_attn_mha: scale by 1/cap, tanh, scale by cap, then soft_max_ext). As
    ggml's soft_max: scale, subtract the max, exp, sum in float64, multiply by the f32 inverse
    of the sum; then rounded to f16, as ggml's mul_mat(V, KQ) reads them against its f16 V
    cache."""
    inv_cap = np.float32(1.0 / softcap) if softcap > 0 else np.float32(0.0)
    cap = np.float32(softcap)
    # One pass per step, each a loop LLVM vectorizes (the exp, the sum and the rounding eight
    # at a time; a single loop doing all three stayed scalar, at 6 ns an element)
    for i in range(n_rows):
        row = scores[i]
        pos = start + (m0 + i) // group
        n = pos + 1
        lo = max(0, pos - window + 1) if window > 0 else 0
        seen = row[lo:n]
        if softcap > 0:
            for p in range(seen.size):
                seen[p] = np.float32(math.tanh(seen[p] * inv_cap)) * cap
        top = np.float32(-np.inf)
        for p in range(seen.size):
            s = seen[p] * scale
            seen[p] = s
            top = max(top, s)
        for p in range(seen.size):
            seen[p] = exp_f32(seen[p] - top)
        total = 0.0
        for p in range(seen.size):
            total += seen[p]
        inv = np.float32(1.0 / total)
        for p in range(seen.size):
            seen[p] = round_f16(seen[p] * inv)
        row[p_lo:lo] = 0.0
        row[n:n_max] = 0.0


@nb.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _attention_tile(q_flat, q_row0, q_stride, n_rows, k_flat, v_flat, kv_base, capacity, head_dim, n_kv_heads,
                    group, task, start, scale, softcap, window, out_flat, out_row0, out_stride):
    """Task `task` of one sequence's attention: KV head g = task % n_kv_heads and one tile of
    the TILE_ROWS query vectors that read it. The sequence's n_rows query rows start at flat
    offset q_row0 of q_flat, one every q_stride; its output rows likewise in out_flat; its keys
    and values for this layer start at kv_base of k_flat and v_flat (the layouts attention()
    describes)."""
    # The query vectors that read KV head g are m = t * group + i (row t, query head
    # g * group + i); tiles of TILE_ROWS of them share each K and V load.
    n_vectors = n_rows * group
    n_tiles = (n_vectors + TILE_ROWS - 1) // TILE_ROWS
    g = task % n_kv_heads
    # Causal tiles grow with their rows: pair light and heavy ones (0, last, 1, last - 1,
    # ...) so that prange's contiguous chunks get about equal work.
    j = task // n_kv_heads
    tile = j // 2 if j % 2 == 0 else n_tiles - 1 - j // 2
    m0 = tile * TILE_ROWS
    mr = min(TILE_ROWS, n_vectors - m0)
    n_max = start + (m0 + mr - 1) // group + 1  # positions the tile's last vector sees
    # the first position the tile's first vector sees (a sliding window starts later)
    p_lo = max(0, start + m0 // group - window + 1) if window > 0 else 0
    q_offs = np.zeros(TILE_ROWS, np.int64)
    out_offs = np.zeros(TILE_ROWS, np.int64)
    for i in range(mr):
        m = m0 + i
        h = g * group + m % group
        q_offs[i] = q_row0 + (m // group) * q_stride + h * head_dim
        out_offs[i] = out_row0 + (m // group) * out_stride + h * head_dim
    # ggml's mul_mat(K, Q) reads Q in K's type: the tile's query vectors rounded to f16 (without
    # it, SmolLM2's first attention output is 1e-4 of its size from llama.cpp's, with it 6e-7)
    buffer = np.empty(TILE_ROWS * (head_dim + n_max), np.float32)  # one allocation for both
    q_tile = buffer[: TILE_ROWS * head_dim]
    for i in range(mr):
        for d in range(head_dim):
            q_tile[i * head_dim + d] = round_f16(q_flat[q_offs[i] + d])
    s_flat = buffer[TILE_ROWS * head_dim :]
    scores = s_flat.reshape((TILE_ROWS, n_max))  # (vector, position); read from p_lo on
    width = TILE_COLS[mr]
    # scores = q_tile @ K[g] (K is stored transposed: (head_dim, position))
    for p0 in range(p_lo, n_max, width):
        tile_f16(
            mr, q_tile, 0, head_dim, 2 * head_dim, 3 * head_dim,
            k_flat, kv_base + g * head_dim * capacity + p0, capacity, head_dim,
            s_flat, p0, n_max + p0, 2 * n_max + p0, 3 * n_max + p0, min(width, n_max - p0),
        )
    _softmax_rows(scores, mr, start, m0, group, scale, softcap, window, p_lo, n_max)
    # out rows = probabilities @ V[g] ((position, head_dim)); zero weights outside a row's
    # positions add exact zeros
    for j0 in range(0, head_dim, width):
        tile_f16(
            mr, s_flat, p_lo, n_max + p_lo, 2 * n_max + p_lo, 3 * n_max + p_lo,
            v_flat, kv_base + g * capacity * head_dim + p_lo * head_dim + j0, head_dim, n_max - p_lo,
            out_flat, out_offs[0] + j0, out_offs[1] + j0, out_offs[2] + j0, out_offs[3] + j0,
            min(width, head_dim - j0),
        )


@nb.njit(cache=True, nogil=True, parallel=True, fastmath=FASTMATH)
def _attention(q, k_cache, v_cache, start, n_heads, scale, softcap, window, out):
    n_rows, q_dim = q.shape
    n_kv_heads, head_dim, capacity = k_cache.shape
    group = n_heads // n_kv_heads
    n_tiles = (n_rows * group + TILE_ROWS - 1) // TILE_ROWS
    q_flat, out_flat = q.reshape(-1), out.reshape(-1)
    k_flat, v_flat = k_cache.reshape(-1), v_cache.reshape(-1)
    for task in nb.prange(n_kv_heads * n_tiles):
        _attention_tile(q_flat, 0, q_dim, n_rows, k_flat, v_flat, 0, capacity, head_dim, n_kv_heads, group, task,
                        start, scale, softcap, window, out_flat, 0, q_dim)


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start: int, n_heads: int,
              scale: float | None = None, softcap: float = 0.0, window: int = 0) -> np.ndarray:
    """Causal grouped-query attention for T consecutive rows of one sequence.

    q (T, n_heads * head_dim) f32 holds positions start .. start + T - 1; k_cache
    (n_kv_heads, head_dim, capacity), keys transposed so that positions are contiguous, and
    v_cache (n_kv_heads, capacity, head_dim), both f16 bits (uint16), already hold those
    positions and all before them.
    Query head h reads KV head h // (n_heads // n_kv_heads). The products read the query and
    the softmax weights rounded to f16, as ggml's mul_mat(K, Q) and mul_mat(V, KQ) on an f16 cache
    do (ggml converts mul_mat's f32 operand to the other's type). Scores are multiplied by scale
    (default 1/sqrt(head_dim)) after soft-capping (softcap > 0); window > 0 limits each row to
    the last `window` positions, itself included. Returns (T, n_heads * head_dim)."""
    q = np.ascontiguousarray(q)
    out = np.empty_like(q)
    head_dim = k_cache.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    _attention(q, k_cache, v_cache, start, n_heads, np.float32(scale), np.float32(softcap), window, out)
    return out


@nb.njit(cache=True, nogil=True, parallel=True, fastmath=FASTMATH)
def _attention_segments(qkv, n_heads, k_caches, v_caches, layer, starts, lengths, scale, softcap, window, out):
    n_segments = starts.shape[0]
    n_cols = qkv.shape[1]
    _, n_kv_heads, head_dim, _ = k_caches[0].shape
    group = n_heads // n_kv_heads
    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    first_row = np.empty(n_segments, np.int64)
    first_task = np.empty(n_segments + 1, np.int64)  # segment s owns tasks first_task[s] .. first_task[s + 1] - 1
    row, n_tasks = 0, 0
    for s in range(n_segments):
        k_cache, v_cache = k_caches[s], v_caches[s]
        # the segment's keys and values into its cache, rounded to f16 as KVCache.store does;
        # a head's values in a loop of their own, contiguous both sides, so that LLVM converts
        # them eight at a time (8 decode rows: 7.6 us a layer against 12.9 with K and V in one loop)
        for t in range(lengths[s]):
            p = starts[s] + t
            src = qkv[row + t]
            for h in range(n_kv_heads):
                keys = src[q_dim + h * head_dim : q_dim + (h + 1) * head_dim]
                for d in range(head_dim):
                    k_cache[layer, h, d, p] = f16_bits(keys[d])
                values = src[q_dim + kv_dim + h * head_dim : q_dim + kv_dim + (h + 1) * head_dim]
                into = v_cache[layer, h, p]
                for d in range(head_dim):
                    into[d] = f16_bits(values[d])
        first_row[s] = row
        first_task[s] = n_tasks
        row += lengths[s]
        n_tasks += n_kv_heads * ((lengths[s] * group + TILE_ROWS - 1) // TILE_ROWS)
    first_task[n_segments] = n_tasks
    qkv_flat, out_flat = qkv.reshape(-1), out.reshape(-1)
    for task in nb.prange(n_tasks):
        s = np.searchsorted(first_task, task, side="right") - 1
        k_cache, v_cache = k_caches[s], v_caches[s]
        capacity = k_cache.shape[3]
        _attention_tile(qkv_flat, first_row[s] * n_cols, n_cols, lengths[s], k_cache.reshape(-1), v_cache.reshape(-1),
                        layer * n_kv_heads * head_dim * capacity, capacity, head_dim, n_kv_heads, group,
                        task - first_task[s], starts[s], scale, softcap, window, out_flat, first_row[s] * q_dim, q_dim)


def attention_segments(qkv: np.ndarray, n_heads: int, head_dim: int, k_caches, v_caches, layer: int,
                       starts: np.ndarray, lengths: np.ndarray, scale: float, softcap: float = 0.0,
                       window: int = 0) -> np.ndarray:
    """attention() for a batch of sequences in one call: store each segment's keys and values in
    its own cache, then attend, with threads over (segment, KV head, tile) tasks.

    qkv (T, (n_heads + 2 * n_kv_heads) * head_dim) f32 holds each row's query, key and value
    (after RoPE), the segments' rows one after another: segment s has lengths[s] rows at
    positions starts[s] .. starts[s] + lengths[s] - 1. k_caches[s] and v_caches[s] (a
    numba.typed.List each) are its session's KV cache arrays (KVCache.k and .v: (layer,
    n_kv_heads, head_dim, capacity) and (layer, n_kv_heads, capacity, head_dim) f16 bits),
    holding every earlier position and room for the new ones. Each output row is computed as
    attention() computes it for its segment alone. Returns (T, n_heads * head_dim)."""
    out = np.empty((qkv.shape[0], n_heads * head_dim), np.float32)
    _attention_segments(qkv, n_heads, k_caches, v_caches, layer, starts, lengths, np.float32(scale),
                        np.float32(softcap), window, out)
    return out


@nb.njit(inline="always", fastmath=FASTMATH)
def _swiglu_row(gate, up, u0, out, t):
    n = out.shape[1]
    gate, up, out = gate[t, :n], up[t, u0 : u0 + n], out[t]  # contiguous rows
    for j in range(n):
        g = gate[j]
        out[j] = g / (np.float32(1.0) + exp_f32(-g)) * up[j]


# ggml's GELU constants (ggml-cpu/vec.h)
_GELU_COEF_A = np.float32(0.044715)
_SQRT_2_OVER_PI = np.float32(0.79788456080286535587989211986876)


# Only contraction (fused multiply-adds), as GCC compiles ggml_gelu_f32 for a CPU with FMA:
# with the project's other flags, 82 of Gemma 3 270M's GeGLU outputs over 64 tokens differed
# from llama.cpp's (entries one f16 step apart), with these none.
_GELU_FASTMATH = {"contract"}


@nb.njit(inline="always", fastmath=_GELU_FASTMATH)
def _gelu_f16(h):
    """GELU (tanh form, f32) of an f16 value h, rounded to f16: one entry of ggml's table."""
    inner = _SQRT_2_OVER_PI * h * (np.float32(1.0) + _GELU_COEF_A * h * h)
    gelu = np.float32(0.5) * h * (np.float32(1.0) + np.float32(math.tanh(inner)))
    return round_f16(gelu)


@nb.njit(cache=True, fastmath=_GELU_FASTMATH)
def _fill_gelu_table(halves, table):
    for i in range(halves.shape[0]):
        table[i] = _gelu_f16(halves[i])


@functools.cache
def _gelu_table() -> np.ndarray:
    """(65536,) f32: _gelu_f16 of every f16 value, by its bits (ggml_table_gelu_f16); made on
    the first GeGLU."""
    table = np.empty(65536, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):  # the NaN and Inf entries, never read
        _fill_gelu_table(F16_TO_F32, table)
    return table


@nb.njit(inline="always", fastmath=FASTMATH)
def _geglu_row(gate, up, u0, out, t, table):
    """gelu(gate) * up as ggml_vec_geglu_f32 with GGML_GELU_FP16: gate rounded to f16, GELU (tanh
    form, f32) of that looked up in a table of f16 results; below -10 zero, above 10 the identity."""
    n = out.shape[1]
    gate, up, out = gate[t, :n], up[t, u0 : u0 + n], out[t]
    for j in range(n):
        g = gate[j]
        if g <= np.float32(-10.0):
            out[j] = np.float32(0.0)
        elif g >= np.float32(10.0):
            out[j] = g * up[j]
        else:
            out[j] = table[f16_bits(g)] * up[j]


# The kernels read row t's gate at gate[t, :n] and its up at up[t, u0:] of C-contiguous arrays,
# as 1-D slices, so that LLVM knows the columns are contiguous and vectorizes (Numba reads a
# column slice of a 2-D array, or a 2-D index plus an offset, element by element). error_model="numpy":
# a float division by zero gives inf, as in C, instead of Numba's check for ZeroDivisionError,
# whose branch keeps LLVM from vectorizing SwiGLU's division. With both, 8 rows of 1536 take
# 9 us instead of 54, the same bits.
@nb.njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def _gated(gate, up, u0, out, gelu_table):
    for t in range(out.shape[0]):
        if gelu_table.shape[0]:
            _geglu_row(gate, up, u0, out, t, gelu_table)
        else:
            _swiglu_row(gate, up, u0, out, t)


@nb.njit(cache=True, nogil=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def _gated_parallel(gate, up, u0, out, gelu_table):
    for t in nb.prange(out.shape[0]):
        if gelu_table.shape[0]:
            _geglu_row(gate, up, u0, out, t, gelu_table)
        else:
            _swiglu_row(gate, up, u0, out, t)


# Rows from which the gated activation (SwiGLU, GeGLU) is worth waking the threads for (a
# prefill chunk; tests/bench/bench_parallel_rows.py).
GATED_PARALLEL_ROWS = 32


def _gated_product(gate: np.ndarray, up: np.ndarray | None, gelu: bool) -> np.ndarray:
    gate = np.ascontiguousarray(gate)
    if up is None:  # gate holds gate and up side by side
        hidden_dim = gate.shape[1] // 2
        up, u0 = gate, hidden_dim
    else:
        hidden_dim = gate.shape[1]
        up, u0 = np.ascontiguousarray(up), 0
    out = np.empty((gate.shape[0], hidden_dim), np.float32)
    table = _gelu_table() if gelu else _NO_TABLE  # SwiGLU: an empty table
    (_gated_parallel if gate.shape[0] >= GATED_PARALLEL_ROWS else _gated)(gate, up, u0, out, table)
    return out


_NO_TABLE = np.empty(0, np.float32)


def swiglu(gate: np.ndarray, up: np.ndarray | None = None) -> np.ndarray:
    """silu(gate) * up, both (T, hidden_dim); or, without up, gate is (T, 2 * hidden_dim) with
    the gate's columns and then up's, as one product by stacked weights makes them (ggml_swiglu
    of one tensor). Each row is computed by the same code serially or in parallel, so the result
    does not depend on T or the thread count."""
    return _gated_product(gate, up, False)


def geglu(gate: np.ndarray, up: np.ndarray | None = None) -> np.ndarray:
    """gelu(gate) * up, GELU's tanh form as ggml computes it, with the shapes swiglu takes;
    serial or parallel by rows with the same code, as swiglu."""
    return _gated_product(gate, up, True)
