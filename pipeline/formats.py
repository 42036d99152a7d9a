"""Q5_0, Q5_1, the K-quants (Q2_K .. Q6_K) and BF16: the rest of what Q4_K_M and Q5_K_M files hold.

quants.py dispatches these types here (pack, matmul, dequantize_rows, packed_nbytes). Block
layouts, from ggml-common.h (block size in weights, bytes per block); d, dmin and m are f16,
i is a weight's index in its block:

    Q5_0: (32, 2 + 4 + 16)       d, qh: u32, qs[16]
          q_i = (qs[i % 16] >> 4 (i // 16)) & 15 | ((qh >> i) & 1) << 4;   w_i = d * (q_i - 16)
    Q5_1: (32, 2 + 2 + 4 + 16)   d, m, qh, qs as Q5_0;   w_i = d * q_i + m
    Q2_K: (256, 16 + 64 + 2 + 2)  scales[16], qs[64], d, dmin;   i = 128n + 32j + l (n < 2, j < 4, l < 32)
          q_i = (qs[32n + l] >> 2j) & 3;   w_i = d * (scales[i // 16] & 15) * q_i - dmin * (scales[i // 16] >> 4)
    Q3_K: (256, 32 + 64 + 12 + 2) hmask[32], qs[64], scales[12], d;   i = 128n + 32j + l
          q_i = (qs[32n + l] >> 2j) & 3 - (0 if (hmask[l] >> (4n + j)) & 1 else 4);   w_i = d * (sc[i // 16] - 32) * q_i
          sc[k] = (scales[k % 8] >> 4 (k // 8)) & 15 | ((scales[8 + k % 4] >> 2 (k // 4)) & 3) << 4
    Q4_K: (256, 2 + 2 + 12 + 128) d, dmin, scales[12], qs[128];   i = 64c + 32h + l (c < 4, h < 2)
          q_i = (qs[32c + l] >> 4h) & 15;   w_i = d * sc[i // 32] * q_i - dmin * mn[i // 32]
          k < 4: sc[k] = scales[k] & 63, mn[k] = scales[k + 4] & 63
          k >= 4: sc[k] = scales[k + 4] & 15 | (scales[k - 4] >> 6) << 4, mn[k] = scales[k + 4] >> 4 | (scales[k] >> 6) << 4
    Q5_K: (256, 2 + 2 + 12 + 32 + 128) d, dmin, scales as Q4_K, qh[32], qs[128]
          q_i = Q4_K's q_i | ((qh[l] >> (2c + h)) & 1) << 4;   w_i as Q4_K
    Q6_K: (256, 128 + 64 + 16 + 2) ql[128], qh[64], scales[16]: i8, d;   i = 128n + 32k + l (k < 4)
          q_i = (ql[64n + 32 (k % 2) + l] >> 4 (k // 2)) & 15 | ((qh[32n + l] >> 2k) & 3) << 4;   w_i = d * scales[i // 16] * (q_i - 32)
    BF16: (1, 2)                 the top 16 bits of an f32

Repacked at load time (PackedMatrix.arrays) into groups of 8 rows, as simd_formats.py lays
them out (the last group padded with zero rows); n_blocks = cols // 32, n_super = cols // 256:

    Q5_0: (quants u8 (groups, n_blocks * 160), d f16 bits u16 (groups, n_blocks * 8))
    Q5_1: (quants, d, m f16 bits u16 (groups, n_blocks * 8))
    Q2_K, Q4_K, Q5_K: (quants u8 (groups, n_super * 8 * quant_bytes), d u16 (groups, n_super * 8),
                       dmin u16 (groups, n_super * 8), meta i8 (groups, n_super * 128))
    Q3_K, Q6_K:       (quants, d, meta)
    BF16: (bits u16 (rows, cols),)

Quants take what the file's do (quant_bytes per row and superblock: 64, 96, 128, 160, 192) and
the scales stay f16; only the 12 packed bytes of 6-bit scales of Q3_K, Q4_K and Q5_K become 16
plain ones.

Activations are rounded as ggml-cpu's `vec_dot_type` for each format, so the products match
llama.cpp's closely: Q8_0 blocks for Q5_0, Q8_1 (with block sums) for Q5_1, bf16 for BF16, and
for the K-quants Q8_K, ggml's block_q8_K (256, 4 + 256 + 32): d f32, qs[256] i8, bsums[16] i16,
the sum of each 16 qs. Every kernel runs `prange` over groups of output rows only, so results
depend neither on the thread count nor on the batch.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from .simd import GROUP_ROWS
from .simd_formats import (
    BF16_CHUNK,
    BF16_PRODUCTS,
    BF16_SINGLE_ROWS,
    BF16_TILE_ROWS,
    BF16_TILE_TOKENS,
    K_FORMATS,
    META_BYTES,
    QK,
    QK_K,
    decode_meta,
    decode_quants,
    encode_quants,
    group_rows,
    q2_k_x8_tokens1,
    q2_k_x8_tokens4,
    q3_k_x8_tokens1,
    q3_k_x8_tokens4,
    q4_k_x8_tokens1,
    q4_k_x8_tokens4,
    q5_0_x8_tokens1,
    q5_0_x8_tokens4,
    q5_1_x8_tokens1,
    q5_1_x8_tokens4,
    q5_k_x8_tokens1,
    q5_k_x8_tokens4,
    q6_k_x8_tokens1,
    q6_k_x8_tokens4,
    ungroup_rows,
)



# ---------------------------------------------------------------------------------------------
# Repacking from GGUF block bytes (load time, numpy)


def q3_k_scales(scales: np.ndarray) -> np.ndarray:
    """(..., 12) packed Q3_K scales -> (..., 16) int32 in 0 .. 63 (the layout's sc[k])."""
    s = scales.astype(np.int32)
    k = np.arange(16)
    return ((s[..., k % 8] >> (4 * (k // 8))) & 15) | (((s[..., 8 + k % 4] >> (2 * (k // 4))) & 3) << 4)


def q4_k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., 12) packed Q4_K/Q5_K scales -> (sc, mn), each (..., 8) int32 in 0 .. 63."""
    s = scales.astype(np.int32)
    low, high = np.arange(4), np.arange(4, 8)
    sc = np.concatenate((s[..., low] & 63, (s[..., high + 4] & 15) | ((s[..., high - 4] >> 6) << 4)), axis=-1)
    mn = np.concatenate((s[..., low + 4] & 63, (s[..., high + 4] >> 4) | ((s[..., high] >> 6) << 4)), axis=-1)
    return sc, mn


def _bit_planes(planes: np.ndarray, shifts, mask: int) -> np.ndarray:
    """(..., 32) bytes -> (..., len(shifts) * 32): (byte >> shift) & mask for each shift in turn."""
    values = planes.astype(np.int32)[..., None, :] >> np.array(shifts).reshape(-1, 1)
    return (values & mask).reshape(*planes.shape[:-1], -1)


def quants_q5(blocks: np.ndarray, head: int) -> np.ndarray:
    """(rows, n_blocks, block_bytes) Q5_0/Q5_1 blocks (`head` bytes of d, and m, before qh) ->
    (rows, n_blocks, 32) int32 u: each weight's stored integer."""
    qs = blocks[..., head + 4 :].astype(np.int32)
    qh = blocks[..., head : head + 4].copy().view("<u4").astype(np.int64)  # (rows, n_blocks, 1)
    return np.concatenate((qs & 15, qs >> 4), axis=-1) | (((qh >> np.arange(32)) & 1) << 4).astype(np.int32)


_TWO_BIT = [0, 2, 4, 6]


def quants_q2_k(blocks: np.ndarray) -> np.ndarray:
    """(rows, n_super, 84) -> (rows, n_super, 256) u: qs[64] at 16, weight 128n + 32j + l is bits 2j of qs[32n + l]."""
    rows, n_super = blocks.shape[:2]
    return _bit_planes(blocks[..., 16:80].reshape(rows, n_super, 2, 32), _TWO_BIT, 3).reshape(rows, n_super, QK_K)


def quants_q3_k(blocks: np.ndarray) -> np.ndarray:
    """(rows, n_super, 110) -> u = q + 4: hmask[32] at 0, qs[64] at 32; the third bit is bit (4n + j) of hmask[l]."""
    rows, n_super = blocks.shape[:2]
    low = _bit_planes(blocks[..., 32:96].reshape(rows, n_super, 2, 32), _TWO_BIT, 3).reshape(rows, n_super, QK_K)
    return low | (_bit_planes(blocks[..., 0:32], range(8), 1) << 2)


def _nibbles_k(blocks: np.ndarray, start: int) -> np.ndarray:
    """qs[128] at `start`: weight 64c + 32h + l is nibble h of qs[32c + l]."""
    rows, n_super = blocks.shape[:2]
    return _bit_planes(blocks[..., start : start + 128].reshape(rows, n_super, 4, 32), [0, 4], 15).reshape(rows, n_super, QK_K)


def quants_q4_k(blocks: np.ndarray) -> np.ndarray:
    """(rows, n_super, 144) -> u: qs[128] at 16."""
    return _nibbles_k(blocks, 16)


def quants_q5_k(blocks: np.ndarray) -> np.ndarray:
    """(rows, n_super, 176) -> u: qs[128] at 48 after qh[32], whose bit (2c + h) of qh[l] is u's bit 4."""
    return _nibbles_k(blocks, 48) | (_bit_planes(blocks[..., 16:48], range(8), 1) << 4)


def quants_q6_k(blocks: np.ndarray) -> np.ndarray:
    """(rows, n_super, 210) -> u = q + 32: ql[128] at 0, qh[64] at 128; weight 128n + 32k + l."""
    rows, n_super = blocks.shape[:2]
    ql = blocks[..., :128].astype(np.int32).reshape(rows, n_super, 2, 1, 2, 32)  # (half n, -, k % 2, l)
    low = ((ql >> np.array([0, 4]).reshape(2, 1, 1)) & 15).reshape(rows, n_super, 2, 4, 32)
    high = _bit_planes(blocks[..., 128:192].reshape(rows, n_super, 2, 32), _TWO_BIT, 3).reshape(rows, n_super, 2, 4, 32)
    return (low | (high << 4)).reshape(rows, n_super, QK_K)


def _f16_bits(blocks: np.ndarray, start: int) -> np.ndarray:
    """(rows, n, block_bytes) uint8 -> the f16 at byte `start` of each block, as bits (rows, n, 1)."""
    return np.ascontiguousarray(blocks[..., start : start + 2]).view(np.uint16)


def _padded(values: np.ndarray) -> np.ndarray:
    """values with zero rows appended up to a multiple of GROUP_ROWS rows."""
    rows = values.shape[0]
    extra = -rows % GROUP_ROWS
    if extra == 0:
        return values
    return np.concatenate((values, np.zeros((extra, *values.shape[1:]), values.dtype)))


def pack_bf16(raw: np.ndarray) -> tuple[int, int, tuple[np.ndarray, ...]]:
    """(rows, cols, (bits,)) of a BF16 tensor (2-D, as GGUFFile.tensor_data)."""
    bits = np.ascontiguousarray(raw).view(np.uint16).reshape(raw.shape[0], -1)
    return raw.shape[0], bits.shape[1], (bits,)


def pack_q5(raw: np.ndarray, scale_offsets: tuple[int, ...]) -> tuple[int, int, tuple[np.ndarray, ...]]:
    """(rows, cols, (quants, d[, m])) of a Q5_0 or Q5_1 tensor whose blocks hold f16 fields at
    `scale_offsets` (d, and Q5_1's m) before qh."""
    rows = raw.shape[0]
    head = 2 * len(scale_offsets)
    blocks = _padded(raw.reshape(rows, -1, head + 4 + QK // 2))
    quants = encode_quants("q5", quants_q5(blocks, head))
    return rows, blocks.shape[1] * QK, (quants, *(group_rows(_f16_bits(blocks, at)) for at in scale_offsets))


def meta_q2_k(blocks: np.ndarray) -> np.ndarray:
    """scales[16] at 0, kept as they are (scale and minimum nibbles)."""
    return blocks[..., :16].view(np.int8)


def meta_q3_k(blocks: np.ndarray) -> np.ndarray:
    """scales[12] at 96: the 16 6-bit scales, less 32."""
    return (q3_k_scales(blocks[..., 96:108]) - 32).astype(np.int8)


def meta_q4_k(blocks: np.ndarray) -> np.ndarray:
    """scales[12] at 4 (Q4_K and Q5_K): 8 scales, then 8 minima."""
    sc, mn = q4_k_scales(blocks[..., 4:16])
    return np.concatenate((sc, mn), axis=-1).astype(np.int8)


def meta_q6_k(blocks: np.ndarray) -> np.ndarray:
    """scales[16] i8 at 192, as stored."""
    return blocks[..., 192:208].view(np.int8)


def pack_k(raw: np.ndarray, name: str, block_bytes: int, quants, scale_offsets: tuple[int, ...], meta):
    """(rows, cols, (quants, d[, dmin], meta)) of a K-quant tensor: `quants` and `meta` read a
    block's integers and sub-block scales, its f16 d (and dmin) are at `scale_offsets`."""
    rows = raw.shape[0]
    blocks = _padded(raw.reshape(rows, -1, block_bytes))
    scales = tuple(group_rows(_f16_bits(blocks, at)) for at in scale_offsets)
    return rows, blocks.shape[1] * QK_K, (encode_quants(name, quants(blocks)), *scales, group_rows(meta(blocks)))


def packed_nbytes_q5(rows: int, cols: int, block_bytes: int) -> int:
    """What pack_q5() makes: rows padded to whole groups, blocks as stored."""
    return -(-rows // GROUP_ROWS) * GROUP_ROWS * cols // QK * block_bytes


def packed_nbytes_k(rows: int, cols: int, name: str) -> int:
    """What pack_k() makes: rows padded to whole groups, quants as stored, f16 scales as stored,
    and the sub-block scales in 16 bytes per superblock."""
    fmt = K_FORMATS[name]
    return -(-rows // GROUP_ROWS) * GROUP_ROWS * cols // QK_K * (fmt.quant_bytes + META_BYTES + (4 if fmt.has_min else 2))


# ---------------------------------------------------------------------------------------------
# Activations (per product, compiled): Q8_K and bf16


@nb.njit(inline="always")
def _quantize_row_q8_k(x, qs, d, bsums, t):
    """Row t of x (T, K) f32 -> qs (T, K) i8, d (T, K // 256) f32, bsums (T, K // 16) i16.

    ggml's quantize_row_q8_K_ref: v = the value of largest magnitude (the first one), scale
    -127 / v, q = min(127, round(x * scale)) (ties to even), d = 1 / scale."""
    for b in range(x.shape[1] // QK_K):
        start = b * QK_K
        amax = np.float32(0.0)
        vmax = np.float32(0.0)
        for j in range(QK_K):
            v = x[t, start + j]
            if abs(v) > amax:
                amax = abs(v)
                vmax = v
        if amax == 0:
            d[t, b] = 0
            for j in range(QK_K):
                qs[t, start + j] = 0
            for k in range(QK_K // 16):
                bsums[t, b * 16 + k] = 0
            continue
        iscale = np.float32(-127.0) / vmax
        for k in range(QK_K // 16):
            total = 0
            for j in range(start + 16 * k, start + 16 * k + 16):
                q = min(127, np.int32(np.rint(iscale * x[t, j])))
                qs[t, j] = q
                total += q
            bsums[t, b * 16 + k] = total
        d[t, b] = np.float32(1.0) / iscale


# error_model="numpy": an Inf activation (activations that overflowed) makes a scale of -0, and
# its inverse must be Inf, as in C, not a ZeroDivisionError out of a product.
@nb.njit(cache=True, nogil=True, error_model="numpy")
def _quantize_q8_k(x, qs, d, bsums):
    for t in range(x.shape[0]):
        _quantize_row_q8_k(x, qs, d, bsums, t)


@nb.njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _quantize_q8_k_parallel(x, qs, d, bsums):
    for t in nb.prange(x.shape[0]):
        _quantize_row_q8_k(x, qs, d, bsums, t)


PARALLEL_ROWS = 8  # as quants.PARALLEL_ROWS: a prefill chunk quantizes its rows in parallel


def quantize_q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (T, K) f32, K a multiple of 256 -> (qs (T, K) i8, d (T, K // 256) f32, bsums (T, K // 16) i16)."""
    n_rows, n = x.shape
    qs = np.empty((n_rows, n), np.int8)
    d = np.empty((n_rows, n // QK_K), np.float32)
    bsums = np.empty((n_rows, n // 16), np.int16)
    (_quantize_q8_k_parallel if n_rows >= PARALLEL_ROWS else _quantize_q8_k)(x, qs, d, bsums)
    return qs, d, bsums


@nb.njit(cache=True, nogil=True)
def _round_bf16(bits, out):
    """ggml's GGML_FP32_TO_BF16 on f32 bit patterns: NaN stays NaN (made quiet), everything
    else rounds to the nearest bf16, ties to even; out gets the bf16 back as f32 bits."""
    n_rows, n = bits.shape
    for t in range(n_rows):
        for j in range(n):
            u = np.uint32(bits[t, j])
            if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
                top = (u >> np.uint32(16)) | np.uint32(64)
            else:
                top = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            out[t, j] = np.uint32(top) << np.uint32(16)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """x (T, K) f32 rounded to bf16, as f32 (T, K)."""
    out = np.empty(x.shape, np.uint32)
    _round_bf16(np.ascontiguousarray(x, dtype=np.float32).view(np.uint32), out)
    return out.view(np.float32)


def bf16_activations(x: np.ndarray) -> np.ndarray:
    """x (T, K) f32 as BF16's tiles read it: rounded to bf16, and in each whole chunk of
    BF16_CHUNK columns the even columns first, then the odd ones (simd_formats.py says why)."""
    rounded = round_bf16(x)
    n_rows, n = rounded.shape
    full = n // BF16_CHUNK * BF16_CHUNK
    chunks = rounded[:, :full].reshape(n_rows, -1, BF16_CHUNK // 2, 2)
    rounded[:, :full] = chunks.transpose(0, 1, 3, 2).copy().reshape(n_rows, full)
    return rounded


# ---------------------------------------------------------------------------------------------
# Products: out (T, rows) = x (T, cols) @ W.T. As in quants.py, token rows four at a time, then
# the rest one at a time, with the same float operations either way; eight weight rows at a
# time except for BF16.


def _grouped_matmul(tokens1, tokens4, k_quant: bool):
    """The compiled product of one grouped format, from its simd_formats products: prange over
    groups of eight weight rows. Numba's cache tells these kernels apart by the products they
    close over."""
    if k_quant:

        @nb.njit(cache=True, nogil=True, parallel=True)
        def kernel(wq, wd, wdmin, wmeta, xq, xd, xs, out):
            n_tokens, rows = out.shape
            n_quads = n_tokens // 4 * 4
            for g in nb.prange(wq.shape[0]):
                n_valid = min(GROUP_ROWS, rows - g * GROUP_ROWS)
                for t in range(0, n_quads, 4):
                    tokens4(wq, wd, wdmin, wmeta, g, xq, xd, xs, out, t, n_valid)
                for t in range(n_quads, n_tokens):
                    tokens1(wq, wd, wdmin, wmeta, g, xq, xd, xs, out, t, n_valid)

    else:

        @nb.njit(cache=True, nogil=True, parallel=True)
        def kernel(wq, wd, wm, xq, xd, xs, out):
            n_tokens, rows = out.shape
            n_quads = n_tokens // 4 * 4
            for g in nb.prange(wq.shape[0]):
                n_valid = min(GROUP_ROWS, rows - g * GROUP_ROWS)
                for t in range(0, n_quads, 4):
                    tokens4(wq, wd, wm, g, xq, xd, xs, out, t, n_valid)
                for t in range(n_quads, n_tokens):
                    tokens1(wq, wd, wm, g, xq, xd, xs, out, t, n_valid)

    return kernel


# The compiled products, by format: kernel(*weights, *activations, out); BF16's is matmul_bf16
MATMUL_Q5_0 = _grouped_matmul(q5_0_x8_tokens1, q5_0_x8_tokens4, False)
MATMUL_Q5_1 = _grouped_matmul(q5_1_x8_tokens1, q5_1_x8_tokens4, False)
MATMUL_Q2_K = _grouped_matmul(q2_k_x8_tokens1, q2_k_x8_tokens4, True)
MATMUL_Q3_K = _grouped_matmul(q3_k_x8_tokens1, q3_k_x8_tokens4, True)
MATMUL_Q4_K = _grouped_matmul(q4_k_x8_tokens1, q4_k_x8_tokens4, True)
MATMUL_Q5_K = _grouped_matmul(q5_k_x8_tokens1, q5_k_x8_tokens4, True)
MATMUL_Q6_K = _grouped_matmul(q6_k_x8_tokens1, q6_k_x8_tokens4, True)


def k_quant_weights(arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """pack_k()'s arrays as simd_formats' K-quant products take them: (wq, wd, wdmin, wmeta),
    d standing in (unread) where a format has no dmin."""
    wq, wd, wmeta = arrays[0], arrays[1], arrays[-1]
    return wq, wd, arrays[2] if len(arrays) == 4 else wd, wmeta


def q8_k_blocks(acts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The K-quants' activations: Q8_K superblocks (qs, d, bsums), made once per Activations."""
    return acts.form(quantize_q8_k)


def bf16_rows(acts) -> tuple[np.ndarray]:
    """BF16's activations: x rounded to bf16, as its tiles read it, made once per Activations."""
    return (acts.form(bf16_activations),)


# BF16: prange over blocks of BF16_BLOCK_ROWS weight rows (16 rows of 2048 columns: 64 KiB, in
# L2), and within a block, token rows four at a time across the block's rows two at a time, so
# the four activation rows (32 KiB at 2048 columns) are read from L1 for every pair of rows and
# from memory once per block, not once per row. The remaining token rows go one at a time.
BF16_BLOCK_ROWS = 16


_bf16_tile = BF16_PRODUCTS[BF16_TILE_ROWS, BF16_TILE_TOKENS]
_bf16_tile_row = BF16_PRODUCTS[1, BF16_TILE_TOKENS]  # the block's last row, where it has an odd count
_bf16_tile_token = BF16_PRODUCTS[BF16_SINGLE_ROWS, 1]  # the token rows past the last whole tile
_bf16_tile_one = BF16_PRODUCTS[1, 1]


@nb.njit(cache=True, nogil=True, parallel=True)
def matmul_bf16(w, x, out):
    n_tokens = x.shape[0]
    rows = w.shape[0]
    tiled = n_tokens // BF16_TILE_TOKENS * BF16_TILE_TOKENS
    for block in nb.prange((rows + BF16_BLOCK_ROWS - 1) // BF16_BLOCK_ROWS):
        first = block * BF16_BLOCK_ROWS
        last = min(rows, first + BF16_BLOCK_ROWS)
        pairs_end = first + (last - first) // BF16_TILE_ROWS * BF16_TILE_ROWS
        for t in range(0, tiled, BF16_TILE_TOKENS):
            for r in range(first, pairs_end, BF16_TILE_ROWS):
                _bf16_tile(w, r, x, t, out)
            for r in range(pairs_end, last):
                _bf16_tile_row(w, r, x, t, out)
        quads_end = first + (last - first) // BF16_SINGLE_ROWS * BF16_SINGLE_ROWS
        for t in range(tiled, n_tokens):
            for r in range(first, quads_end, BF16_SINGLE_ROWS):
                _bf16_tile_token(w, r, x, t, out)
            for r in range(quads_end, last):
                _bf16_tile_one(w, r, x, t, out)


# ---------------------------------------------------------------------------------------------
# Row lookup (token embeddings), in numpy with gguf-py's float steps, so rows equal
# gguf.quants.dequantize exactly


def rows_bf16(arrays: tuple[np.ndarray, ...], cols: int, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` of a BF16 matrix as f32 (len(ids), cols)."""
    return (arrays[0][ids].astype(np.uint32) << 16).view(np.float32)


def _decoded_groups(ids: np.ndarray):
    """(the row groups holding `ids`, sorted; each id's row among those groups' rows)."""
    groups, inverse = np.unique(ids // GROUP_ROWS, return_inverse=True)
    return groups, inverse.reshape(-1) * GROUP_ROWS + ids % GROUP_ROWS


def _halves(bits: np.ndarray, groups: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """Grouped f16 bits (groups, n_blocks * 8) -> the picked rows' f32 (len(pick), n_blocks)."""
    return ungroup_rows(bits[groups], 1)[pick][..., 0].view(np.float16).astype(np.float32)


def rows_q5(arrays: tuple[np.ndarray, ...], cols: int, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` of a Q5_0 (w = d * (u - 16)) or Q5_1 (w = d * u + m) matrix as f32."""
    f32 = np.float32
    groups, pick = _decoded_groups(ids)
    u = decode_quants("q5", arrays[0][groups], QK)[pick]
    d = _halves(arrays[1], groups, pick)[..., None]
    if len(arrays) == 2:
        return (d * (u - 16).astype(f32)).reshape(len(ids), -1)
    return (d * u.astype(f32) + _halves(arrays[2], groups, pick)[..., None]).reshape(len(ids), -1)


def rows_k(arrays: tuple[np.ndarray, ...], cols: int, ids: np.ndarray, name: str) -> np.ndarray:
    """Rows `ids` of a K-quant matrix as f32: d * sc * (u - zero point) [- dmin * mn]."""
    f32 = np.float32
    fmt = K_FORMATS[name]
    n = len(ids)
    groups, pick = _decoded_groups(ids)
    u = decode_quants(name, arrays[0][groups], QK_K)[pick].reshape(n, -1, 16, 16)
    scales, minima = (None if m is None else m[pick].astype(f32)[..., None] for m in decode_meta(name, arrays[-1][groups]))
    d = _halves(arrays[1], groups, pick)[..., None, None]
    if not fmt.has_min:  # Q3_K: q = u - 4, scale sc - 32 (stored so); Q6_K: q = u - 32
        return ((d * scales) * (u - fmt.offset).astype(f32)).reshape(n, -1)
    dmin = _halves(arrays[2], groups, pick)[..., None, None]
    return ((d * scales) * u.astype(f32) - dmin * minima).reshape(n, -1)
