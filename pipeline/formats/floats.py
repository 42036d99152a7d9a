"""F32, F16 and BF16: rows of plain values.

F32 weights meet the activations as they are; F16 weights see activations rounded to f16, as
ggml_vec_dot_f16 does, and BF16 weights activations rounded to bf16, as ggml_vec_dot_bf16 does.
Stored as GGUF stores them (PackedMatrix.arrays: (values f32 (rows, cols),) or (bits u16
(rows, cols),)); BF16's layout is (1, 2), the top 16 bits of an f32.

BF16's product is LLVM vector IR in tiles of two weight rows by four token rows. Each (row,
token) has one <8 x float> accumulator; over chunks of 16 columns it takes the chunk's even
columns, then its odd ones, by fused multiply-adds (a weight becomes an f32 by a shift or a mask
of the 32-bit word that holds it and its neighbour; the activations come with each chunk's even
columns first, bf16_activations); then its lanes are summed in a fixed order, and a tail of
fewer than 16 columns is added one by one (ggml's AVX2 branch keeps four accumulators over
chunks of 32). A tile loads each activation vector once for both rows and widens each weight
vector once for four tokens; a token row alone (decode) takes eight weight rows at a time, so
that eight chains of fmas overlap. The steps of one (row, token) are the same in every tile
shape, so the result is too. Its products are float from the start, so one form serves every
instruction set.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ..numba_config import FASTMATH
from ..vector import _F32, _I16, _I32, _V8_F32, _V8_I32, _check, _const, _fma, _fma_np, _hsum, _hsum_np, _load, _row_pointer
from .base import F16_TO_F32, Format

# ---------------------------------------------------------------------------------------------
# F32 and F16 products: out (T, rows) = x (T, cols) @ W.T


@nb.njit(cache=True, nogil=True, parallel=True, fastmath=FASTMATH)
def matmul_f32(w, x, out):
    rows, cols = w.shape
    for r in nb.prange(rows):
        for t in range(x.shape[0]):
            acc = np.float32(0.0)
            for j in range(cols):
                acc += w[r, j] * x[t, j]
            out[t, r] = acc


@nb.njit(cache=True, nogil=True, parallel=True, fastmath=FASTMATH)
def matmul_f16(w, table, x16, out):
    rows, cols = w.shape
    for r in nb.prange(rows):
        for t in range(x16.shape[0]):
            acc = np.float32(0.0)
            for j in range(cols):
                acc += table[w[r, j]] * x16[t, j]
            out[t, r] = acc


def pack_f32(raw: np.ndarray) -> tuple[int, int, tuple[np.ndarray, ...]]:
    values = np.ascontiguousarray(raw, dtype=np.float32)
    return values.shape[0], values.shape[1], (values,)


def pack_f16(raw: np.ndarray) -> tuple[int, int, tuple[np.ndarray, ...]]:
    bits = np.ascontiguousarray(raw).view(np.uint16)
    return bits.shape[0], bits.shape[1], (bits,)


def rows_f32(arrays: tuple[np.ndarray, ...], cols: int, ids: np.ndarray) -> np.ndarray:
    return arrays[0][ids].copy()


def rows_f16(arrays: tuple[np.ndarray, ...], cols: int, ids: np.ndarray) -> np.ndarray:
    return F16_TO_F32[arrays[0][ids]]


# ---------------------------------------------------------------------------------------------
# BF16: w (rows, cols) u16 bits against x (T, cols) f32 already rounded to bf16, in tiles of
# up to BF16_TILE_ROWS weight rows times BF16_TILE_TOKENS token rows

BF16_CHUNK = 16  # columns per loop iteration: 8 32-bit words of each weight row
BF16_TILE_ROWS = 2  # weight rows per tile: each activation load serves both
BF16_TILE_TOKENS = 4  # token rows per tile: each widened weight vector serves all four
BF16_SINGLE_ROWS = 8  # weight rows per tile for a token row alone (decode): eight chains of fmas
# 2 rows x 4 tokens = 8 accumulators, 2 weight words, 2 widened weights and an activation: 13 of
# AVX2's 16 vector registers (3 x 4 and 4 x 3 tiles spill or stall, 2 x 3 and 2 x 5 ran slower).


def _widen_bf16(builder, pointer, odd: bool):
    """The even (odd) ones of 16 bf16 bit patterns at an i8* -> <8 x float>: each little-endian
    32-bit word holds columns 2l (low half) and 2l + 1 (high half), and a bf16 is the top half of
    an f32, so the even columns are the word shifted left by 16 and the odd ones the word with
    its low half cleared: one instruction per 8 weights, where widening 16-bit lanes takes two."""
    words = _load(builder, pointer, _V8_I32)
    if odd:
        return builder.bitcast(builder.and_(words, _const(_V8_I32, -65536)), _V8_F32)
    return builder.bitcast(builder.shl(words, _const(_V8_I32, 16)), _V8_F32)


def _codegen_bf16(n_rows: int, n_tokens: int):
    def codegen(context, builder, signature, args):
        w, r, x, t, out = args
        w_t, r_t, x_t, t_t, out_t = signature.args
        intp = context.get_value_type(types.intp)
        r = context.cast(builder, r, r_t, types.intp)
        t = context.cast(builder, t, t_t, types.intp)
        w_rows = [_row_pointer(context, builder, w_t, w, builder.add(r, ir.Constant(intp, j)))
                  for j in range(n_rows)]
        n_cols = cgutils.unpack_tuple(builder, w_rows[0][1].shape, 2)[1]
        w_rows = [pointer for pointer, _ in w_rows]
        x_rows = [builder.bitcast(_row_pointer(context, builder, x_t, x, builder.add(t, ir.Constant(intp, i)))[0], _F32.as_pointer())
                  for i in range(n_tokens)]
        zero = ir.Constant(_V8_F32, [0.0] * 8)
        accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(n_tokens)] for _ in range(n_rows)]
        n_chunks = builder.udiv(n_cols, ir.Constant(intp, BF16_CHUNK))
        with cgutils.for_range(builder, n_chunks) as loop:
            col = builder.mul(loop.index, ir.Constant(intp, BF16_CHUNK))
            w_offset = builder.mul(col, ir.Constant(intp, 2))
            for q in range(BF16_CHUNK // 8):  # the chunk's even columns, then its odd ones
                at = builder.add(col, ir.Constant(intp, 8 * q))
                weights = [_widen_bf16(builder, builder.gep(w_row, [w_offset]), odd=q == 1) for w_row in w_rows]
                for i in range(n_tokens):
                    acts = builder.load(builder.bitcast(builder.gep(x_rows[i], [at]), _V8_F32.as_pointer()), align=4)
                    for j in range(n_rows):
                        builder.store(_fma(builder, weights[j], acts, builder.load(accs[j][i])), accs[j][i])
        totals = []
        for j in range(n_rows):
            for i in range(n_tokens):
                totals.append(cgutils.alloca_once_value(builder, _hsum(builder, builder.load(accs[j][i]))))
        tail = builder.mul(n_chunks, ir.Constant(intp, BF16_CHUNK))
        with cgutils.for_range_slice(builder, tail, n_cols, ir.Constant(intp, 1), intp=intp) as (col, _):
            for j in range(n_rows):
                bits = builder.load(builder.gep(builder.bitcast(w_rows[j], _I16.as_pointer()), [col]))
                weight = builder.bitcast(builder.shl(builder.zext(bits, _I32), ir.Constant(_I32, 16)), _F32)
                for i in range(n_tokens):
                    act = builder.load(builder.gep(x_rows[i], [col]))
                    total = totals[j * n_tokens + i]
                    builder.store(_fma(builder, weight, act, builder.load(total)), total)
        out_ary = context.make_array(out_t)(context, builder, out)
        for j in range(n_rows):
            for i in range(n_tokens):
                index = [builder.add(t, ir.Constant(intp, i)), builder.add(r, ir.Constant(intp, j))]
                pointer = cgutils.get_item_pointer(context, builder, out_t, out_ary, index, wraparound=False)
                builder.store(builder.load(totals[j * n_tokens + i]), pointer)
        return context.get_dummy_value()

    return codegen


def _make_bf16_intrinsic(n_rows: int, n_tokens: int):
    codegen = _codegen_bf16(n_rows, n_tokens)

    def typer(typingctx, w, r, x, t, out):
        _check("bf16", (w, x, out), (types.uint16, types.float32, types.float32))
        return types.none(w, r, x, t, out), codegen

    typer.__name__ = f"bf16_rows{n_rows}_tokens{n_tokens}"
    return intrinsic(typer)



# BF16_TILES[(n_rows, n_tokens)]: BF16's tiles; its products are float from the start, so one
# form serves every ISA.
BF16_SHAPES = ((1, 1), (1, BF16_TILE_TOKENS), (BF16_SINGLE_ROWS, 1), (BF16_TILE_ROWS, BF16_TILE_TOKENS))
BF16_TILES = {shape: _make_bf16_intrinsic(*shape) for shape in BF16_SHAPES}


def _bf16_twin(w, r, x, t, out, n_rows, n_tokens):
    n_cols = w.shape[1]
    full = n_cols // BF16_CHUNK * BF16_CHUNK
    for row in range(r, r + n_rows):
        weights = (w[row].astype(np.uint32) << 16).view(np.float32)
        for i in range(t, t + n_tokens):
            acc = np.zeros(8, np.float32)
            for col in range(0, full, BF16_CHUNK):
                pairs = weights[col : col + BF16_CHUNK].reshape(8, 2)
                acc = _fma_np(pairs[:, 0], x[i, col : col + 8], acc)  # the chunk's even columns
                acc = _fma_np(pairs[:, 1], x[i, col + 8 : col + BF16_CHUNK], acc)  # its odd ones
            total = _hsum_np(acc)
            for j in range(full, n_cols):
                total = _fma_np(weights[j], x[i, j], total)
            out[i, row] = total



def _bf16_tile(n_rows: int, n_tokens: int):
    """The public BF16 tile: its numpy twin when Numba's JIT is off, the intrinsic in compiled code."""
    kernel = BF16_TILES[(n_rows, n_tokens)]

    def tile(w, r, x, t, out):
        _bf16_twin(w, r, x, t, out, n_rows, n_tokens)

    @overload(tile, inline="always")
    def _compiled(w, r, x, t, out):
        return lambda w, r, x, t, out: kernel(w, r, x, t, out)

    tile.__name__ = tile.__qualname__ = f"bf16_rows{n_rows}_tokens{n_tokens}"
    tile.__doc__ = (f"out[t .. t + {n_tokens - 1}, r .. r + {n_rows - 1}] = weight rows r .. of BF16 (bits (rows, cols) "
                    "u16) times token rows t .. of x (T, cols) f32 from formats.bf16_activations; each (row, token) "
                    "the same f32 steps whatever the tile.")
    return tile


# BF16_PRODUCTS[(n_rows, n_tokens)]: the public tiles, full (BF16_TILE_ROWS, BF16_TILE_TOKENS),
# for a token row alone (BF16_SINGLE_ROWS, 1), and one row for the edges
BF16_PRODUCTS = {shape: _bf16_tile(*shape) for shape in BF16_SHAPES}


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
    BF16_CHUNK columns the even columns first, then the odd ones (the module's docstring says why)."""
    rounded = round_bf16(x)
    n_rows, n = rounded.shape
    full = n // BF16_CHUNK * BF16_CHUNK
    chunks = rounded[:, :full].reshape(n_rows, -1, BF16_CHUNK // 2, 2)
    rounded[:, :full] = chunks.transpose(0, 1, 3, 2).copy().reshape(n_rows, full)
    return rounded


def bf16_rows(acts) -> tuple[np.ndarray]:
    """BF16's activations: x rounded to bf16, as its tiles read it, made once per Activations."""
    return (acts.form(bf16_activations),)


def pack_bf16(raw: np.ndarray) -> tuple[int, int, tuple[np.ndarray, ...]]:
    """(rows, cols, (bits,)) of a BF16 tensor (2-D, as GGUFFile.tensor_data)."""
    bits = np.ascontiguousarray(raw).view(np.uint16).reshape(raw.shape[0], -1)
    return raw.shape[0], bits.shape[1], (bits,)


def rows_bf16(arrays: tuple[np.ndarray, ...], cols: int, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` of a BF16 matrix as f32 (len(ids), cols)."""
    return (arrays[0][ids].astype(np.uint32) << 16).view(np.float32)


def record(ttype: QT, pack, kernel, weights, activations, rows, exponent: int) -> Format:
    """The registry's record of F32, F16 or BF16: rows of plain values, each one float with this
    exponent mask."""
    size = GGML_QUANT_SIZES[ttype][1]
    return Format(ttype, (), 1, pack, lambda n_rows, cols: n_rows * cols * size, kernel, weights, activations, rows, (0,),
                  exponent, "values")


def f16_weights(arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """F16's bits and the table that decodes them (Numba has no float16)."""
    return arrays[0], F16_TO_F32
