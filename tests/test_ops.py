"""RMSNorm, RoPE (both pairings), attention (sliding windows, soft-capping), SwiGLU and GeGLU against the float64 formulas in tests/support/naive.py.

The kernels compute in f32 (with ggml's float64 sums where ggml has them), so each comparison
allows a few f32 ulps of the values involved; the tolerances below say where more is due.
"""

from __future__ import annotations

import ctypes
import mmap

import numba
import numpy as np
import pytest

from numba.typed import List

from caravan.pipeline import attention_tiles, vector
from caravan.pipeline.numba_config import FASTMATH
from caravan.pipeline.ops import attention, attention_segments, geglu, rmsnorm, rope_, rope_tables, softcap_, swiglu
from support import naive

F32_EPS = float(np.finfo(np.float32).eps)  # 2**-23


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# RMSNorm


@pytest.mark.parametrize("n_rows, dim", [(1, 64), (5, 96), (17, 576)], ids=["small", "T5", "T17"])
@pytest.mark.parametrize("scale", (1e-3, 1.0, 300.0), ids=lambda s: f"x{s:g}")
def test_rmsnorm(n_rows, dim, scale):
    x = randn(n_rows, dim, scale=scale)
    weight = 1.0 + randn(dim, seed=1, scale=0.1)
    got = rmsnorm(x, weight, 1e-5)
    assert got.shape == x.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, naive.rmsnorm(x, weight, 1e-5), rtol=4 * F32_EPS, atol=4 * F32_EPS)


def test_rmsnorm_zero_row_is_zero():
    x = np.zeros((2, 64), np.float32)
    x[1] = randn(64)
    got = rmsnorm(x, np.ones(64, np.float32), 1e-5)
    np.testing.assert_array_equal(got[0], 0.0)
    assert np.isfinite(got).all()


# ---------------------------------------------------------------------------------------------
# RoPE


@pytest.mark.parametrize("n_rot", (8, 16, 64), ids=lambda n: f"rot{n}")
def test_rope_tables(n_rot):
    """cos/sin of pos * base**(-2i/n_rot). The angles are built by repeated f32 products, as
    ggml_rope does, so angle i at position p is off by about p * i * 2**-24 (<= 4.9e-4 here);
    observed ~1e-5."""
    cos, sin = rope_tables(256, n_rot, 10000.0)
    assert cos.shape == sin.shape == (256, n_rot // 2) and cos.dtype == np.float32
    angles = np.arange(256)[:, None] * 10000.0 ** (-2.0 * np.arange(n_rot // 2) / n_rot)
    np.testing.assert_allclose(cos, np.cos(angles), rtol=0, atol=1e-4)
    np.testing.assert_allclose(sin, np.sin(angles), rtol=0, atol=1e-4)
    np.testing.assert_array_equal(cos[0], 1.0)
    np.testing.assert_array_equal(sin[0], 0.0)


@pytest.mark.parametrize(
    "n_heads, head_dim, n_rot",
    [(4, 16, 16), (2, 16, 8), (3, 64, 64), (4, 64, 32)],
    ids=["small", "partial", "hd64", "partial64"],
)
def test_rope(n_heads, head_dim, n_rot):
    """Adjacent pairs (2i, 2i+1) of the first n_rot dims of each head rotate; with n_rot <
    head_dim (a table narrower than the head) the rest of each head is untouched, bit for bit."""
    x = randn(17, n_heads * head_dim, scale=2.0)
    positions = np.random.default_rng(4).integers(0, 256, 17)
    positions[:3] = [0, 1, 255]
    cos, sin = rope_tables(256, n_rot, 10000.0)
    got = x.copy()
    assert rope_(got, positions, cos, sin, n_heads) is None  # in place
    expected = naive.rope(x, positions, n_heads, n_rot, 10000.0)
    # The table's angle error (see test_rope_tables) times |x|.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(x).max())
    heads, x_heads = got.reshape(17, n_heads, head_dim), x.reshape(17, n_heads, head_dim)
    np.testing.assert_array_equal(heads[:, :, n_rot:], x_heads[:, :, n_rot:])
    np.testing.assert_array_equal(got[0], x[0])  # position 0 is the identity
    # A rotation keeps each pair's length.
    pair_len = lambda a: np.hypot(a[:, :, 0:n_rot:2], a[:, :, 1:n_rot:2])  # noqa: E731
    np.testing.assert_allclose(pair_len(heads), pair_len(x_heads), rtol=8 * F32_EPS)


def test_rope_row_by_row_equals_batch():
    x = randn(9, 64, scale=2.0)
    positions = np.arange(30, 39)
    cos, sin = rope_tables(64, 16, 10000.0)
    together = x.copy()
    rope_(together, positions, cos, sin, 4)
    for t in range(9):
        alone = x[t : t + 1].copy()
        rope_(alone, positions[t : t + 1], cos, sin, 4)
        np.testing.assert_array_equal(together[t : t + 1], alone)


# ---------------------------------------------------------------------------------------------
# Attention


def f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def cache_layout(k: np.ndarray, v: np.ndarray, n_kv_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """k and v (positions, n_kv_heads * head_dim) f32 -> the KV cache's layout and type: keys
    (n_kv_heads, head_dim, positions), values (n_kv_heads, positions, head_dim), f16 bits."""
    heads_k = k.astype(np.float16).view(np.uint16).reshape(k.shape[0], n_kv_heads, -1)
    heads_v = v.astype(np.float16).view(np.uint16).reshape(v.shape[0], n_kv_heads, -1)
    return np.ascontiguousarray(heads_k.transpose(1, 2, 0)), np.ascontiguousarray(heads_v.transpose(1, 0, 2))


@pytest.mark.parametrize(
    "n_heads, n_kv_heads, head_dim, start, n_rows",
    [
        (4, 2, 16, 0, 1),  # the first token: attends to itself only
        (4, 2, 16, 0, 7),  # causal prefill, GQA
        (4, 2, 16, 11, 1),  # decode with a cache
        (4, 2, 16, 11, 5),  # a prefill chunk after cached positions
        (4, 4, 16, 3, 4),  # multi-head
        (8, 1, 8, 6, 3),  # multi-query
        (3, 3, 64, 40, 17),  # wide heads, long context
    ],
    ids=["first", "prefill-gqa", "decode-gqa", "chunk-gqa", "mha", "mqa", "hd64"],
)
def test_attention(n_heads, n_kv_heads, head_dim, start, n_rows):
    """Positions past start + T are NaN in the cache: reading them would poison the output."""
    kv_dim = n_kv_heads * head_dim
    q = randn(n_rows, n_heads * head_dim, seed=1)
    k_cache = np.full((start + n_rows + 5, kv_dim), np.nan, np.float32)
    v_cache = np.full_like(k_cache, np.nan)
    k_cache[: start + n_rows] = randn(start + n_rows, kv_dim, seed=2, scale=2.0)
    v_cache[: start + n_rows] = randn(start + n_rows, kv_dim, seed=3)
    got = attention(q, *cache_layout(k_cache, v_cache, n_kv_heads), start, n_heads)
    assert got.shape == q.shape and got.dtype == np.float32
    expected = naive.attention(q, f16(k_cache), f16(v_cache), start, n_heads, n_kv_heads, f16_operands=True)
    naive.assert_attention_close(got, expected, np.abs(f16(v_cache[: start + n_rows])).max())


def test_attention_first_position_returns_v():
    """With one position the softmax weight is 1: the output is V (per KV group), exactly."""
    q = randn(1, 4 * 16, seed=1)
    k = randn(1, 2 * 16, seed=2)
    v = randn(1, 2 * 16, seed=3)
    got = attention(q, *cache_layout(k, v, 2), 0, 4).reshape(4, 16)
    v_heads = f16(v).reshape(2, 16)
    np.testing.assert_array_equal(got, v_heads[[0, 0, 1, 1]])


@pytest.mark.parametrize("n_heads, n_kv_heads, head_dim", [(9, 3, 64), (4, 2, 16), (8, 1, 8)], ids=["gqa3", "gqa2", "mqa"])
def test_attention_rows_alone_equal_rows_together(n_heads, n_kv_heads, head_dim):
    """Each row computed alone (as in decode) equals the same row in a chunk, bit for bit:
    query vectors share tiles in different company but each output sums in one fixed order."""
    start, n_rows = 13, 23
    kv_dim = n_kv_heads * head_dim
    q = randn(n_rows, n_heads * head_dim, seed=1)
    k, v = cache_layout(randn(start + n_rows, kv_dim, seed=2), randn(start + n_rows, kv_dim, seed=3), n_kv_heads)
    together = attention(q, k, v, start, n_heads)
    for t in range(n_rows):
        np.testing.assert_array_equal(attention(q[t : t + 1], k, v, start + t, n_heads), together[t : t + 1])


def test_attention_thread_count_invariant():
    q = randn(37, 9 * 64, seed=1)
    k, v = cache_layout(randn(50, 3 * 64, seed=2), randn(50, 3 * 64, seed=3), 3)
    before = numba.get_num_threads()
    try:
        results = []
        for n in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(n)
            results.append(attention(q, k, v, 13, 9))
    finally:
        numba.set_num_threads(before)
    for other in results[1:]:
        np.testing.assert_array_equal(results[0], other)


@pytest.mark.parametrize("softcap, window", [(0.0, 0), (3.0, 6)], ids=["plain", "softcap-window"])
def test_attention_segments_equal_each_segment_alone(softcap, window):
    """A batch of ragged segments (decode rows at different positions, a prefill chunk, a first
    token), each with its own cache of its own capacity, in one call: every output row equals
    attention() on its segment alone, bit for bit, and each cache gets the segment's keys and
    values exactly as KVCache.store writes them. Cache positions past a segment are NaN."""
    from caravan.pipeline.stage import KVCache

    n_layers, layer, n_heads, n_kv_heads, head_dim = 3, 1, 9, 3, 64
    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim
    segments = [(13, 1), (40, 1), (5, 17), (0, 1), (70, 1), (0, 6)]  # (start, length)
    n_rows = sum(n for _, n in segments)
    qkv = randn(n_rows, q_dim + 2 * kv_dim, seed=4)
    caches, expected_caches, alone = [], [], []
    row = 0
    for i, (start, n) in enumerate(segments):
        cache = KVCache(n_layers, n_kv_heads, head_dim, 256, initial=start + n + 3 * i)
        nan = np.float16(np.nan).view(np.uint16)
        cache.k[...] = nan
        cache.v[...] = nan
        if start:
            cache.store(layer, 0, randn(start, kv_dim, seed=10 + i, scale=2.0), randn(start, kv_dim, seed=20 + i))
        expected = KVCache(n_layers, n_kv_heads, head_dim, 256, initial=cache.capacity)
        expected.k[...], expected.v[...] = cache.k, cache.v
        rows = qkv[row : row + n]
        expected.store(layer, start, rows[:, q_dim : q_dim + kv_dim], rows[:, q_dim + kv_dim :])
        alone.append(attention(rows[:, :q_dim], expected.k[layer], expected.v[layer], start, n_heads, 0.125,
                               softcap, window))
        caches.append(cache)
        expected_caches.append(expected)
        row += n
    starts = np.array([s for s, _ in segments], dtype=np.int64)
    lengths = np.array([n for _, n in segments], dtype=np.int64)
    got = attention_segments(qkv, n_heads, head_dim, List([c.k for c in caches]), List([c.v for c in caches]), layer,
                             starts, lengths, 0.125, softcap, window)
    np.testing.assert_array_equal(got, np.concatenate(alone))
    for cache, expected in zip(caches, expected_caches):
        np.testing.assert_array_equal(cache.k, expected.k)
        np.testing.assert_array_equal(cache.v, expected.v)


def test_rope_of_q_and_k_side_by_side():
    """One call over rows of Q, K and V turns Q's and K's heads as two calls on each alone, and
    leaves V as it was."""
    n_heads, n_kv_heads, head_dim, positions = 4, 2, 16, np.array([3, 0, 9])
    cos, sin = rope_tables(16, head_dim, 10000.0)
    qkv = randn(3, (n_heads + 2 * n_kv_heads) * head_dim)
    q, k = qkv[:, : n_heads * head_dim].copy(), qkv[:, n_heads * head_dim : (n_heads + n_kv_heads) * head_dim].copy()
    rope_(q, positions, cos, sin, n_heads)
    rope_(k, positions, cos, sin, n_kv_heads)
    got = qkv.copy()
    rope_(got, positions, cos, sin, n_heads + n_kv_heads, head_dim=head_dim)
    np.testing.assert_array_equal(got, np.concatenate([q, k, qkv[:, (n_heads + n_kv_heads) * head_dim :]], axis=1))


def test_attention_large_scores_stay_finite():
    """Scores in the thousands: the max is subtracted before exp (no overflow to inf/NaN)."""
    q = randn(3, 64, seed=1, scale=100.0)
    k = randn(3, 64, seed=2, scale=100.0)
    v = randn(3, 64, seed=3)
    got = attention(q, *cache_layout(k, v, 4), 0, 4)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, naive.attention(q, f16(k), f16(v), 0, 4, 4, f16_operands=True), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Attention's f16 tiles


def _tile_numpy(n_rows, a, b, b_off, b_stride, k, c, n_cols):
    attention_tiles.tile_f16(n_rows, a, 0, 40, 80, 120, b, b_off, b_stride, k, c, 0, 40, 80, 120, n_cols)


_tile = numba.njit(_tile_numpy)


def _before_a_guard_page(n_items: int) -> np.ndarray:
    """A uint16 array whose last item is the last byte pair before a page nothing may read: a
    read past its end faults."""
    page = mmap.PAGESIZE
    size = (2 * n_items + page - 1) // page * page + page
    region = mmap.mmap(-1, size)
    start = ctypes.addressof(ctypes.c_char.from_buffer(region))
    assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(start + size - page), page, 0) == 0  # PROT_NONE
    return np.frombuffer(region, np.uint16, count=n_items, offset=size - page - 2 * n_items)


@pytest.mark.parametrize("n_rows", (1, 2, 3, 4))
@pytest.mark.parametrize("b_goes_on", (True, False), ids=("B-goes-on", "B-ends-at-the-tile"))
def test_tile_f16_every_width(n_rows, b_goes_on):
    """Compiled tiles against their numpy twin (the same fma chains), bit for bit, at every
    column count: a partial last half is read whole where B goes on past it (here with NaN bits
    in the columns after the tile, which must not reach C) and masked where B ends (here at a
    page that faults when read)."""
    rng = np.random.default_rng(n_rows)
    a = randn(160, seed=n_rows)
    k, stride = 37, 48
    for n_cols in range(1, attention_tiles.TILE_COLS[n_rows] + 1):
        b = _before_a_guard_page(k * stride)
        b[:] = rng.integers(0, 0x7BFF, k * stride).astype(np.uint16) | (rng.integers(0, 2, k * stride).astype(np.uint16) << 15)
        b_off = stride - (n_cols + 8 if b_goes_on else n_cols)  # the last row ends after the tile, or with it
        b_2d = b.reshape(k, stride)
        b_2d[:, b_off + n_cols :] = 0x7E00  # NaN
        got, want = np.full(160, -1.0, np.float32), np.full(160, -1.0, np.float32)
        _tile(n_rows, a, b, b_off, stride, k, got, n_cols)
        _tile_numpy(n_rows, a, b, b_off, stride, k, want, n_cols)
        assert np.array_equal(got, want), n_cols
        for i in range(n_rows):  # written exactly where asked
            assert np.isfinite(got[40 * i : 40 * i + n_cols]).all() and (got[40 * i + n_cols : 40 * (i + 1)] == -1.0).all()


# ---------------------------------------------------------------------------------------------
# exp, as SwiGLU and softmax compute it


@numba.njit(fastmath=FASTMATH)  # the flags the ops compile with
def _exp_f32_loop(x, out):
    for i in range(x.shape[0]):  # LLVM vectorizes this loop: the vector code is what the ops run
        out[i] = vector.exp_f32(x[i])


@numba.njit(fastmath=FASTMATH)
def _exp_f32_one(x):
    return vector.exp_f32(x)


def test_exp_f32_within_two_ulp():
    x = np.concatenate([np.linspace(-87.3, 88.0, 1_000_001, dtype=np.float32), randn(1000, seed=3)])
    got = np.empty_like(x)
    _exp_f32_loop(x, got)
    exact = np.exp(x.astype(np.float64))
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert (np.abs(got - exact) / ulp).max() <= 2.0
    # one element at a time, as in a loop's scalar remainder, gives the same bits
    assert all(_exp_f32_one(v) == g for v, g in zip(x[::9_973], got[::9_973]))


def test_exp_f32_ends_of_the_range():
    x = np.array([-np.inf, -1e4, -87.5, 0.0, 88.0, 89.0, 1e4], np.float32)
    got = np.empty_like(x)
    _exp_f32_loop(x, got)
    assert got[:3].tolist() == [0.0, 0.0, 0.0] and got[3] == 1.0
    assert np.isfinite(got).all() and got[4] == got[5] == got[6]  # clamped at 88: never inf


# ---------------------------------------------------------------------------------------------
# SwiGLU


@pytest.mark.parametrize("n_rows, hidden_dim", [(1, 96), (17, 1536)], ids=["small", "T17"])
def test_swiglu(n_rows, hidden_dim):
    gate = randn(n_rows, hidden_dim, seed=1, scale=4.0)
    up = randn(n_rows, hidden_dim, seed=2)
    got = swiglu(gate, up)
    assert got.shape == gate.shape and got.dtype == np.float32
    # exp may be the fast approximation ("afn" in the project's fastmath set): a few ulps.
    np.testing.assert_allclose(got, naive.swiglu(gate, up), rtol=1e-5, atol=1e-6)


def test_swiglu_extremes():
    gate = np.array([[-1000.0, -100.0, -20.0, 0.0, 20.0, 100.0, 1000.0, 3e38]], np.float32)
    up = np.ones_like(gate)
    got = swiglu(gate, up)
    assert np.isfinite(got).all()
    with np.errstate(over="ignore"):
        np.testing.assert_allclose(got, naive.swiglu(gate, up), rtol=1e-6, atol=1e-30)


# ---------------------------------------------------------------------------------------------
# What the other families add: NeoX RoPE with scaling, windows and caps, GeGLU


@pytest.mark.parametrize("n_rot", (16, 8), ids=["full", "partial"])
def test_rope_neox_with_scale_and_factors(n_rot):
    n_heads, head_dim, positions = 3, 16, np.array([0, 1, 5, 63])
    x = randn(len(positions), n_heads * head_dim)
    factors = tuple(np.linspace(1.0, 8.0, n_rot // 2).astype(np.float32).tolist())
    cos, sin = rope_tables(64, n_rot, 10000.0, 0.25, factors)
    got = x.copy()
    rope_(got, positions, cos, sin, n_heads, neox=True)
    expected = naive.rope(x, positions, n_heads, n_rot, 10000.0, neox=True, freq_scale=0.25, freq_factors=factors)
    # angles up to 63 radians carry f32 rounding of about 64 ulps of their size
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("softcap, window", [(0.0, 4), (2.0, 0), (3.0, 6)], ids=["window", "softcap", "both"])
@pytest.mark.parametrize("start, n_rows", [(0, 9), (11, 1), (7, 5)], ids=["prefill", "decode", "chunk"])
def test_attention_window_and_softcap(softcap, window, start, n_rows):
    n_heads, n_kv_heads, head_dim = 4, 2, 16
    kv_dim = n_kv_heads * head_dim
    q = randn(n_rows, n_heads * head_dim, seed=1)
    k = randn(start + n_rows, kv_dim, seed=2, scale=2.0)
    v = randn(start + n_rows, kv_dim, seed=3)
    got = attention(q, *cache_layout(k, v, n_kv_heads), start, n_heads, 0.5, softcap, window)
    expected = naive.attention(q, f16(k), f16(v), start, n_heads, n_kv_heads, f16_operands=True, scale=0.5,
                               softcap=softcap, window=window)
    naive.assert_attention_close(got, expected, np.abs(f16(v)).max())


def test_windowed_rows_alone_equal_rows_together():
    start, n_rows, n_heads = 5, 19, 4
    q = randn(n_rows, n_heads * 16, seed=1)
    k, v = cache_layout(randn(start + n_rows, 32, seed=2), randn(start + n_rows, 32, seed=3), 2)
    together = attention(q, k, v, start, n_heads, None, 0.0, 6)
    for t in range(n_rows):
        np.testing.assert_array_equal(attention(q[t : t + 1], k, v, start + t, n_heads, None, 0.0, 6),
                                      together[t : t + 1])


def test_softcap():
    x = np.array([[-1000.0, -3.0, 0.0, 0.5, 30.0]], np.float32)
    softcap_(x, 5.0)
    np.testing.assert_allclose(x, 5.0 * np.tanh(np.array([[-200.0, -0.6, 0.0, 0.1, 6.0]])), rtol=2e-7, atol=1e-7)


@pytest.mark.parametrize("n_rows", (1, 17), ids=["row", "T17"])
def test_geglu_is_ggml_gelu_through_its_f16_table(n_rows):
    gate = randn(n_rows, 256, seed=1, scale=4.0)
    gate[0, :4] = (-12.0, -10.0, 10.0, 11.0)
    up = randn(n_rows, 256, seed=2)
    got = geglu(gate, up)
    # the kernel's f32 GELU and the float64 one can fall on either side of an f16 rounding
    # midpoint: one f16 step (2**-10 relative, 2**-24 among subnormals) apart at most
    np.testing.assert_allclose(got, naive.geglu(gate, up, f16_table=True), rtol=2**-10, atol=2**-24 * 8)
    # the f16 table costs up to 2**-11 relative against the exact GELU
    np.testing.assert_allclose(got, naive.geglu(gate, up), rtol=2e-3, atol=2e-3)
