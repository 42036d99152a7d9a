"""Quantized weight formats and the Numba kernels that multiply by them without dequantizing.

Block layouts, from ggml-common.h (block size in weights, bytes per block):

    Q4_0: (32, 2 + 16)      d: f16, qs[16]: w[j] = d * ((qs[j] & 15) - 8), w[j+16] = d * ((qs[j] >> 4) - 8)
    Q4_1: (32, 2 + 2 + 16)  d: f16, m: f16, qs[16]: w[j] = d * (qs[j] & 15) + m, w[j+16] = d * (qs[j] >> 4) + m
    Q8_0: (32, 2 + 32)      d: f16, qs[32]: int8, w[j] = d * qs[j]
    F16, F32: plain rows

Q5_0, Q5_1, the K-quants (Q2_K .. Q6_K) and BF16 live in formats.py; the functions here hand
them over.

At load time each matrix is repacked once into contiguous arrays (nibbles or int8 values in one
array, the scales in another: widened to f32, or for Q4_0 kept as f16 and interleaved eight rows
at a time, see simd.py), so the kernels' hot loops read unit-stride memory with fixed trip
counts. The weights stay quantized.

As in llama.cpp (ggml-cpu's `vec_dot_type`), activations are quantized once per product to
8-bit blocks of 32 and the inner loops are integer dot products: Q8_0 activations for Q4_0 and
Q8_0 weights, Q8_1 (with the block sum, for the `m` term) for Q4_1. F16 weights see activations
rounded to f16, as ggml_vec_dot_f16 does. Matching ggml's choice keeps caravan's numbers close
to llama.cpp's, not only fast.

Every kernel runs `prange` over output rows only: each output element is summed by one thread
in one fixed order, so results do not depend on the thread count or on how many token rows are
in the batch (a sequence decodes to the same tokens alone or batched with others).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import numba as nb
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from . import formats
from .numba_config import FASTMATH
from .simd import (
    GROUP_FORMATS,
    GROUP_ROWS,
    q4_0_group_tokens1,
    q4_0_group_tokens4,
    q4_1_group_tokens1,
    q4_1_group_tokens4,
    q8_0_group_tokens1,
    q8_0_group_tokens4,
    quantize_block_q8,
    round_f16,
)

QK = 32  # weights per block, for every block format here


def f16_to_f32_table() -> np.ndarray:
    """(65536,) f32: the value of every f16 bit pattern, made from the bits alone so every machine
    builds the same table without a floating-point exception. It is ggml's ggml_table_f32_f16 bit
    for bit (F16C's vcvtph2ps and ggml_compute_fp16_to_fp32 agree): a NaN keeps its sign and
    payload and comes out quiet, where numpy's cast leaves a signalling NaN signalling on x86 and
    quiets it on ARM with a RuntimeWarning."""
    h = np.arange(1 << 16, dtype=np.uint32)
    sign, exponent, mantissa = (h & 0x8000) << 16, (h >> 10) & 0x1F, h & 0x3FF
    normal = ((exponent + (127 - 15)) << 23) | (mantissa << 13)
    subnormal = (mantissa.astype(np.float32) * np.float32(2.0**-24)).view(np.uint32)  # exact: a power of 2 apart
    inf_nan = np.uint32(0x7F800000) | (mantissa << 13) | np.where(mantissa != 0, np.uint32(0x00400000), np.uint32(0))
    bits = np.select([exponent == 0, exponent == 31], [subnormal, inf_nan], normal)
    return (sign | bits).astype(np.uint32).view(np.float32)


# f16 -> f32 for every bit pattern: Numba has no float16, so compiled code decodes f16 through
# this table, as ggml does with its ggml_table_f32_f16.
F16_TO_F32 = f16_to_f32_table()

class UnsupportedTypeError(ValueError):
    pass


def supported_names() -> str:
    return ", ".join(t.name for t in SUPPORTED_TYPES)


@dataclass(frozen=True)
class PackedMatrix:
    """A (rows, cols) weight matrix in one format, repacked for the kernels.

    arrays, by format:
        F32:  (values f32 (rows, cols),)
        F16:  (bits u16 (rows, cols),)
        Q8_0: (qs u8 (groups, cols * 8), d u16 (groups, cols // 32 * 8))
        Q4_0: (qs u8 (groups, cols // 2 * 8), d u16 (groups, cols // 32 * 8))
        Q4_1: (qs u8 (groups, cols // 2 * 8), d u16 (groups, cols // 32 * 8), m u16 (same))
    The block formats keep rows in groups of 8 (the last padded with zeros), interleaved as
    simd.py describes, with their f16 scales and minima as uint16 bits; the others as
    formats.py describes.
    """

    type: QT
    rows: int
    cols: int
    arrays: tuple[np.ndarray, ...]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    @property
    def group_rows(self) -> int:
        """Rows stored together (the arrays' first axis counts groups): 8 for block formats."""
        return FORMATS[self.type].group_rows

    def row_slice(self, start: int, stop: int) -> "PackedMatrix":
        """Rows [start, stop) as a view (no copy); grouped formats need whole groups."""
        group = self.group_rows
        if start % group or (stop % group and stop != self.rows):
            raise ValueError(f"rows {start}:{stop} of a {self.type.name} matrix split a group of {group}")
        first, last = start // group, -(-stop // group)
        return PackedMatrix(self.type, stop - start, self.cols, tuple(a[first:last] for a in self.arrays))


# ---------------------------------------------------------------------------------------------
# Repacking from GGUF block bytes (load time, numpy)


def pack(ttype: QT, raw: np.ndarray, name: str) -> PackedMatrix:
    """Repack a GGUF tensor (2-D view from GGUFFile.tensor_data) for the kernels."""
    if ttype not in FORMATS:
        raise UnsupportedTypeError(f"{name}: unsupported type {ttype.name} (supported: {supported_names()})")
    return PackedMatrix(ttype, *FORMATS[ttype].pack(raw))


def _pack_f32(raw: np.ndarray) -> tuple[int, int, tuple[np.ndarray, ...]]:
    values = np.ascontiguousarray(raw, dtype=np.float32)
    return values.shape[0], values.shape[1], (values,)


def _pack_f16(raw: np.ndarray) -> tuple[int, int, tuple[np.ndarray, ...]]:
    bits = np.ascontiguousarray(raw).view(np.uint16)
    return bits.shape[0], bits.shape[1], (bits,)


def _pack_grouped(raw: np.ndarray, head: int, quant_bytes: int) -> tuple[int, int, tuple[np.ndarray, ...]]:
    """(rows, row bytes) GGUF blocks of `head` bytes of f16 fields (d, and Q4_1's m) then
    `quant_bytes` of quants -> simd.py's groups of 8 rows: the quants interleaved four bytes at a
    time, then each f16 field eight rows side by side."""
    rows = raw.shape[0]
    n_blocks = raw.shape[1] // (head + quant_bytes)
    groups = -(-rows // GROUP_ROWS)
    padded = np.zeros((groups * GROUP_ROWS, n_blocks, head + quant_bytes), np.uint8)
    padded[:rows] = raw.reshape(rows, n_blocks, head + quant_bytes)
    by_group = padded.reshape(groups, GROUP_ROWS, n_blocks, head + quant_bytes)
    # (group, block, chunk c, row k, byte i) <- quant byte 4c + i of row k's block
    chunks = by_group[:, :, :, head:].reshape(groups, GROUP_ROWS, n_blocks, quant_bytes // 4, 4).transpose(0, 2, 3, 1, 4)
    qs = np.ascontiguousarray(chunks).reshape(groups, -1)
    fields = tuple(
        np.ascontiguousarray(by_group[:, :, :, at : at + 2].transpose(0, 2, 1, 3)).view(np.uint16).reshape(groups, n_blocks * GROUP_ROWS)
        for at in range(0, head, 2)
    )
    return rows, n_blocks * QK, (qs, *fields)


# A float whose exponent bits are all ones is an Inf or a NaN (IEEE 754): the masks, by format.
_F16_EXPONENT, _BF16_EXPONENT, _F32_EXPONENT = 0x7C00, 0x7F80, 0x7F800000
_CHECK_CHUNK = 1 << 20  # values checked at once: bounds the temporaries for a large tensor


def non_finite_part(m: PackedMatrix) -> str | None:
    """What of m holds a NaN or an Inf ("values" of a float format, "block scales" of a block
    format), or None. Only the float arrays are read (a block format's scales are a tenth or
    less of its bytes), as bits with a mask, a chunk at a time."""
    fmt = FORMATS[m.type]
    for index in fmt.float_arrays:
        bits = m.arrays[index]
        if _any_exponent_all_ones(bits.view(np.dtype(f"u{bits.itemsize}")), fmt.float_exponent):
            return fmt.floats_are
    return None


def _any_exponent_all_ones(bits: np.ndarray, mask: int) -> bool:
    flat = bits.reshape(-1)
    return any(np.any((flat[i : i + _CHECK_CHUNK] & mask) == mask) for i in range(0, flat.size, _CHECK_CHUNK))


def packed_nbytes(ttype: QT, rows: int, cols: int) -> int:
    """What pack() makes of a (rows, cols) matrix, without packing it (for memory plans before
    any weight is read)."""
    return FORMATS[ttype].packed_nbytes(rows, cols)


def _packed_nbytes_grouped(rows: int, cols: int, block_bytes: int) -> int:
    """GGUF's own bytes per block, over whole groups of 8 rows."""
    return -(-rows // GROUP_ROWS) * GROUP_ROWS * cols // QK * block_bytes


# ---------------------------------------------------------------------------------------------
# Activation quantization (per product, compiled)


@nb.njit(inline="always")
def _quantize_row_q8(x, qs, d, s, n, t):
    """Row t of x (T, K) f32 -> qs (T, K) i8, d (T, K//32) f32, s (T, K//32) f32 = d * sum(qs)
    and n (T, K//32) i32 = sum(qs): ggml's quantize_row_q8_0/q8_1, a block at a time in
    simd.py's IR (simd.quantize_block_q8 says how the scales are taken)."""
    for b in range(x.shape[1] // QK):
        quantize_block_q8(x, qs, d, s, n, t, b)


# No fastmath: the float work is simd.py's IR, in a fixed order.
@nb.njit(cache=True, nogil=True)
def _quantize_q8(x, qs, d, s, n):
    for t in range(x.shape[0]):
        _quantize_row_q8(x, qs, d, s, n, t)


@nb.njit(cache=True, nogil=True, parallel=True)
def _quantize_q8_parallel(x, qs, d, s, n):
    for t in nb.prange(x.shape[0]):
        _quantize_row_q8(x, qs, d, s, n, t)


# Rows from which quantizing is worth waking the threads for (a prefill chunk, not a decode
# batch: measured, 8 rows cost more in thread wake-ups than in work); each row is
# the same code either way.
PARALLEL_ROWS = 32


@nb.njit(cache=True, nogil=True)
def _round_to_f16(x, out):
    n_rows, n = x.shape
    for t in range(n_rows):
        for j in range(n):
            out[t, j] = round_f16(x[t, j])


class Activations:
    """One activation matrix x (T, K) f32 and its quantized forms, made on first use and shared
    by every product that reads the same x (Q, K and V; gate and up)."""

    __slots__ = ("x", "_q8", "_q8_sums", "_f16", "_forms")

    def __init__(self, x: np.ndarray):
        self.x = x
        self._q8 = None
        self._q8_sums = None
        self._f16 = None
        self._forms = {}

    def form(self, make):
        """make(x), made once (formats.py's Q8_K and bf16 activations)."""
        if make not in self._forms:
            self._forms[make] = make(self.x)
        return self._forms[make]

    def q8(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(qs, d, s) as _quantize_row_q8 makes them."""
        if self._q8 is None:
            n_rows, cols = self.x.shape
            qs = np.empty((n_rows, cols), np.int8)
            d = np.empty((n_rows, cols // QK), np.float32)
            s = np.empty((n_rows, cols // QK), np.float32)
            n = np.empty((n_rows, cols // QK), np.int32)
            (_quantize_q8_parallel if n_rows >= PARALLEL_ROWS else _quantize_q8)(self.x, qs, d, s, n)
            self._q8, self._q8_sums = (qs, d, s), n
        return self._q8

    def q8_sums(self) -> np.ndarray:
        """(T, K // 32) i32: each Q8 block's sum of its integers."""
        self.q8()
        return self._q8_sums

    def f16(self) -> np.ndarray:
        if self._f16 is None:
            self._f16 = np.empty_like(self.x)
            _round_to_f16(self.x, self._f16)
        return self._f16


# ---------------------------------------------------------------------------------------------
# Products: out (T, rows) = x (T, cols) @ W.T, one kernel per weight format


@nb.njit(cache=True, nogil=True, parallel=True, fastmath=FASTMATH)
def _matmul_f32(w, x, out):
    rows, cols = w.shape
    for r in nb.prange(rows):
        for t in range(x.shape[0]):
            acc = np.float32(0.0)
            for j in range(cols):
                acc += w[r, j] * x[t, j]
            out[t, r] = acc


@nb.njit(cache=True, nogil=True, parallel=True, fastmath=FASTMATH)
def _matmul_f16(w, table, x16, out):
    rows, cols = w.shape
    for r in nb.prange(rows):
        for t in range(x16.shape[0]):
            acc = np.float32(0.0)
            for j in range(cols):
                acc += table[w[r, j]] * x16[t, j]
            out[t, r] = acc


# Each kernel walks groups of eight weight rows (prange) and, for each, token rows four at a
# time (the group's weights unpacked once for four activation rows: prefill and batched decode),
# then the rest one at a time; simd.py computes a token row's sums with the same float
# operations either way, so a row's output does not depend on the batch around it. No fastmath
# here: the float work is all in simd.py's IR, in a fixed order.


def _grouped_matmul(tokens1, tokens4):
    """The compiled product of one grouped format, from its simd.py products (as formats.py
    makes its own); Numba's cache tells these kernels apart by the products they close over."""

    @nb.njit(cache=True, nogil=True, parallel=True)
    def kernel(wq, wd, wm, xq, xd, xs, xn, out):
        n_tokens, rows = out.shape
        n_quads = n_tokens // 4 * 4
        for g in nb.prange(wq.shape[0]):
            n_valid = min(GROUP_ROWS, rows - g * GROUP_ROWS)
            for t in range(0, n_quads, 4):
                tokens4(wq, wd, wm, g, xq, xd, xs, xn, out, t, n_valid)
            for t in range(n_quads, n_tokens):
                tokens1(wq, wd, wm, g, xq, xd, xs, xn, out, t, n_valid)

    return kernel


def with_unread_minima(arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """(wq, wd, wm) from a grouped block format's arrays: where it has no minima, d stands in
    (unread)."""
    return arrays[0], arrays[1], arrays[2] if len(arrays) > 2 else arrays[1]


def q8_blocks(acts: Activations) -> tuple[np.ndarray, ...]:
    """(qs, d, s, n): Q8_0 blocks with both block sums, Q8_1's d * sum(qs) and the integer sum."""
    return (*acts.q8(), acts.q8_sums())


def q8_0_blocks(acts: Activations) -> tuple[np.ndarray, ...]:
    """(qs, d, n): Q8_0 blocks with their integer sums (for a zero point)."""
    xq, xd, _ = acts.q8()
    return xq, xd, acts.q8_sums()


def q8_1_blocks(acts: Activations) -> tuple[np.ndarray, ...]:
    """(qs, d, s): Q8_1 blocks, s = d * sum(qs) (for a minimum m)."""
    return acts.q8()


def f16_rows(acts: Activations) -> tuple[np.ndarray]:
    return (acts.f16(),)


def f32_rows(acts: Activations) -> tuple[np.ndarray]:
    return (acts.x,)


def matmul(w: PackedMatrix, acts: Activations, out: np.ndarray | None = None) -> np.ndarray:
    """(T, cols) activations times W (rows, cols) transposed -> (T, rows) f32."""
    if out is None:
        out = np.empty((acts.x.shape[0], w.rows), np.float32)
    fmt = FORMATS[w.type]
    fmt.kernel(*fmt.weights(w.arrays), *fmt.activations(acts), out)
    return out


# ---------------------------------------------------------------------------------------------
# Row lookup (token embeddings): dequantize only the rows asked for


@nb.njit(cache=True, nogil=True)
def _rows_grouped(wq, wd, wm, table, block_bytes, signed, zero_point, has_min, ids, out):
    """Rows `ids` of a grouped block matrix as f32: w = d * (q - zero_point) [+ m]."""
    n_chunks = block_bytes // 4
    for i in range(ids.shape[0]):
        g, k = divmod(ids[i], GROUP_ROWS)
        for b in range(out.shape[1] // QK):
            d = table[wd[g, b * GROUP_ROWS + k]]
            m = table[wm[g, b * GROUP_ROWS + k]] if has_min else np.float32(0.0)
            base = b * GROUP_ROWS * block_bytes + k * 4
            for c in range(n_chunks):
                for j in range(4):
                    byte = np.int32(wq[g, base + c * 32 + j])
                    if signed:
                        out[i, b * QK + 4 * c + j] = d * np.float32(byte - 256 if byte > 127 else byte)
                    else:
                        out[i, b * QK + 4 * c + j] = d * np.float32((byte & 15) - zero_point) + m
                        out[i, b * QK + QK // 2 + 4 * c + j] = d * np.float32((byte >> 4) - zero_point) + m


def dequantize_rows(w: PackedMatrix, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` of W as f32 (len(ids), cols)."""
    return FORMATS[w.type].dequantize_rows(w.arrays, w.cols, np.asarray(ids, dtype=np.int64))


def _rows_f32(arrays: tuple[np.ndarray, ...], cols: int, ids: np.ndarray) -> np.ndarray:
    return arrays[0][ids].copy()


def _rows_f16(arrays: tuple[np.ndarray, ...], cols: int, ids: np.ndarray) -> np.ndarray:
    return F16_TO_F32[arrays[0][ids]]


def _rows_group_format(arrays: tuple[np.ndarray, ...], cols: int, ids: np.ndarray, fmt) -> np.ndarray:
    """Rows `ids` of a Q4_0, Q4_1 or Q8_0 matrix (fmt: its simd.GroupFormat) as f32."""
    out = np.empty((ids.shape[0], cols), np.float32)
    wq, wd, wm = with_unread_minima(arrays)
    _rows_grouped(wq, wd, wm, F16_TO_F32, fmt.block_bytes, fmt.signed, fmt.zero_point, fmt.has_min, ids, out)
    return out


# ---------------------------------------------------------------------------------------------
# The formats: one record per GGUF type, as gguf-py's _type_traits


@dataclass(frozen=True)
class Format:
    """How caravan stores and multiplies one GGUF tensor type."""

    type: QT
    scale_offsets: tuple[int, ...]  # byte offsets of a GGUF block's f16 fields (d, then m or dmin)
    group_rows: int  # rows pack() stores together (the arrays' first axis counts groups)
    pack: Callable  # (raw GGUF tensor_data (rows, row bytes)) -> (rows, cols, arrays)
    packed_nbytes: Callable  # (rows, cols) -> what pack() makes of them, without packing
    kernel: Callable  # the compiled product: kernel(*weights(arrays), *activations(acts), out)
    weights: Callable  # pack()'s arrays as kernel takes them
    activations: Callable  # (Activations) -> the form of x kernel reads: ggml's vec_dot_type
    dequantize_rows: Callable  # (arrays, cols, ids) -> (len(ids), cols) f32
    float_arrays: tuple[int, ...]  # which arrays hold floats (values, or block scales and minima)
    float_exponent: int  # the exponent mask of those floats: all ones is an Inf or a NaN
    floats_are: str  # what those floats are, for messages

    @property
    def block(self) -> tuple[int, int]:
        """(weights, bytes) of one GGUF block (gguf-py's GGML_QUANT_SIZES)."""
        return GGML_QUANT_SIZES[self.type]


def _identity(arrays):
    return arrays


def _float(ttype: QT, pack, kernel, weights, activations, rows, exponent: int) -> Format:
    """F32, F16, BF16: rows of plain values."""
    return Format(ttype, (), 1, pack, lambda rows_, cols: rows_ * cols * GGML_QUANT_SIZES[ttype][1], kernel, weights,
                  activations, rows, (0,), exponent, "values")


def _grouped(ttype: QT, scale_offsets: tuple[int, ...], kernel, activations) -> Format:
    """Q4_0, Q4_1, Q8_0: simd.py's groups of 8 rows, against Q8 activation blocks."""
    block_bytes = GGML_QUANT_SIZES[ttype][1]
    head = 2 * len(scale_offsets)
    return Format(ttype, scale_offsets, GROUP_ROWS, partial(_pack_grouped, head=head, quant_bytes=block_bytes - head),
                  partial(_packed_nbytes_grouped, block_bytes=block_bytes), kernel, with_unread_minima, activations,
                  partial(_rows_group_format, fmt=GROUP_FORMATS[ttype.name.lower()]),
                  tuple(range(1, 1 + len(scale_offsets))), _F16_EXPONENT, "block scales")


def _q5(ttype: QT, scale_offsets: tuple[int, ...], kernel, activations) -> Format:
    """Q5_0, Q5_1: formats.py's groups of 8 rows, against Q8 activation blocks."""
    return Format(ttype, scale_offsets, GROUP_ROWS, partial(formats.pack_q5, scale_offsets=scale_offsets),
                  partial(formats.packed_nbytes_q5, block_bytes=GGML_QUANT_SIZES[ttype][1]), kernel, with_unread_minima,
                  activations, formats.rows_q5, tuple(range(1, 1 + len(scale_offsets))), _F16_EXPONENT, "block scales")


def _k_quant(ttype: QT, scale_offsets: tuple[int, ...], kernel, quants, meta) -> Format:
    """The K-quants: formats.py's groups of 8 rows, against Q8_K superblocks; `quants` and
    `meta` read a GGUF block's integers and sub-block scales."""
    name = ttype.name.lower()
    pack_k = partial(formats.pack_k, name=name, block_bytes=GGML_QUANT_SIZES[ttype][1], quants=quants,
                     scale_offsets=scale_offsets, meta=meta)
    return Format(ttype, scale_offsets, GROUP_ROWS, pack_k, partial(formats.packed_nbytes_k, name=name), kernel,
                  formats.k_quant_weights, formats.q8_k_blocks, partial(formats.rows_k, name=name),
                  tuple(range(1, 1 + len(scale_offsets))), _F16_EXPONENT, "block scales")


FORMATS = {f.type: f for f in (
    _float(QT.F32, _pack_f32, _matmul_f32, _identity, f32_rows, _rows_f32, _F32_EXPONENT),
    _float(QT.F16, _pack_f16, _matmul_f16, lambda arrays: (arrays[0], F16_TO_F32), f16_rows, _rows_f16, _F16_EXPONENT),
    _grouped(QT.Q8_0, (0,), _grouped_matmul(q8_0_group_tokens1, q8_0_group_tokens4), q8_blocks),
    _grouped(QT.Q4_0, (0,), _grouped_matmul(q4_0_group_tokens1, q4_0_group_tokens4), q8_blocks),
    _grouped(QT.Q4_1, (0, 2), _grouped_matmul(q4_1_group_tokens1, q4_1_group_tokens4), q8_blocks),
    _q5(QT.Q5_0, (0,), formats.MATMUL_Q5_0, q8_0_blocks),
    _q5(QT.Q5_1, (0, 2), formats.MATMUL_Q5_1, q8_1_blocks),
    _k_quant(QT.Q2_K, (80, 82), formats.MATMUL_Q2_K, formats.quants_q2_k, formats.meta_q2_k),
    _k_quant(QT.Q3_K, (108,), formats.MATMUL_Q3_K, formats.quants_q3_k, formats.meta_q3_k),
    _k_quant(QT.Q4_K, (0, 2), formats.MATMUL_Q4_K, formats.quants_q4_k, formats.meta_q4_k),
    _k_quant(QT.Q5_K, (0, 2), formats.MATMUL_Q5_K, formats.quants_q5_k, formats.meta_q4_k),
    _k_quant(QT.Q6_K, (208,), formats.MATMUL_Q6_K, formats.quants_q6_k, formats.meta_q6_k),
    _float(QT.BF16, formats.pack_bf16, formats.matmul_bf16, _identity, formats.bf16_rows, formats.rows_bf16, _BF16_EXPONENT),
)}
SUPPORTED_TYPES = tuple(FORMATS)
