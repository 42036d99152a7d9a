"""Q4_0, Q4_1 and Q8_0: blocks of 32 weights, repacked eight rows to a group, against Q8
activation blocks.

Block layouts, from ggml-common.h (block size in weights, bytes per block):

    Q4_0: (32, 2 + 16)      d: f16, qs[16]: w[j] = d * ((qs[j] & 15) - 8), w[j+16] = d * ((qs[j] >> 4) - 8)
    Q4_1: (32, 2 + 2 + 16)  d: f16, m: f16, qs[16]: w[j] = d * (qs[j] & 15) + m, w[j+16] = d * (qs[j] >> 4) + m
    Q8_0: (32, 2 + 32)      d: f16, qs[32]: int8, w[j] = d * qs[j]

Repacked (PackedMatrix.arrays), the last group padded with zero rows:

    Q8_0: (qs u8 (groups, cols * 8), d u16 (groups, cols // 32 * 8))
    Q4_0: (qs u8 (groups, cols // 2 * 8), d u16 (groups, cols // 32 * 8))
    Q4_1: (qs u8 (groups, cols // 2 * 8), d u16 (groups, cols // 32 * 8), m u16 (same))

As in llama.cpp (ggml-cpu's `vec_dot_type`), the activations are quantized once per product to
8-bit blocks of 32 and the inner loops are integer dot products: Q8_0 activations for Q4_0 and
Q8_0 weights, Q8_1 (with the block sum, for the `m` term) for Q4_1.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numba as nb
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ..vector import (
    _F32,
    _I32,
    _V8_F32,
    _V8_HALF,
    _V8_I32,
    _V16_I16,
    _V32_I8,
    ISA,
    ISAS,
    QUAD_DOT_ISAS,
    _after,
    _byte_products,
    _call,
    _fma,
    _fma_np,
    _joined,
    _load,
    _load_f16x8,
    _pair_products,
    _pair_sums,
    _pair_sums_long,
    _quad_dot,
    _quad_sums,
    _row_pointer,
    _shuffle,
    _signed_weights,
    _splat,
)
from .activations import q8_blocks
from .base import F16_EXPONENT, F16_TO_F32, GROUP_ROWS, QK, Format, scale_arrays, with_unread_minima

# ---------------------------------------------------------------------------------------------
# Products eight weight rows at a time: the eight lanes of each vector are eight weight rows
#
# _pack_grouped stores Q4_0, Q4_1 and Q8_0 matrices in groups of GROUP_ROWS rows. For each block of
# 32 weights, the group's quants are interleaved four bytes at a time: byte 32c + 4k + i is quant
# byte 4c + i of row k's block (4-bit formats: c < 4, the low nibble is weight 4c + i and the
# high nibble weight 16 + 4c + i; Q8_0: c < 8, weight 4c + i). The rows' f16 scales (and Q4_1's
# minima) sit side by side, eight per block, in their own arrays: as many bytes as GGUF's.
#
# One vpmaddubsw of 32 such weights against four activation bytes repeated eight times gives
# row k's products in i16 lanes 2k and 2k + 1, and vpmaddwd against ones sums them into i32
# lane k; adding the chunks gives every row's whole-block integer sum(w * x), exactly (nibbles:
# eight chunks summed in i16, at most 8 * 2 * 15 * 127 = 30480; Q8_0: each chunk widened to
# i32 first, as 2 * 128 * 127 = 32512 leaves no room; its signed weights move their sign onto
# the activations with vpsignb, as ggml's mul_sum_i8_pairs does). Q4_0's weights are taken as
# their nibbles n = w + 8 and 8 * sum(x) is subtracted, still exact. Then one conversion and one
# fma per block serve eight rows:
#
#     acc = fma(d_w * d_x, float(sum(w * x)), acc)          (Q4_1 also: mins = fma(m_w, s_x, mins))
#
# and a row's result is acc (Q4_1: acc + mins), as ggml's repacked GEMMs (q4_0_8x8) and its
# ARM dot-product kernels order it: the block's integer sum is exact, so only the per-block
# float steps round. The integers are exact on every instruction set (pipeline/vector.py; the
# A76's sdot sums each row's four bytes of a chunk straight into its i32 lane, starting from
# Q4_0's -8 * sum(x)), and the float steps are the same IR, so all give the same bits; and a
# row's float steps are the same whichever rows share its group or its batch, so results do not
# depend on the batch.



@dataclass(frozen=True)
class GroupFormat:
    name: str
    block_bytes: int  # quant bytes of one block of one row: 16 for nibbles, 32 for Q8_0
    signed: bool  # int8 weights (Q8_0) rather than nibbles 0 .. 15
    zero_point: int  # subtracted from every stored nibble (Q4_0: 8)
    has_min: bool  # Q4_1's per-block minimum m


GROUP_FORMATS = {
    "q4_0": GroupFormat("q4_0", QK // 2, signed=False, zero_point=8, has_min=False),
    "q4_1": GroupFormat("q4_1", QK // 2, signed=False, zero_point=0, has_min=True),
    "q8_0": GroupFormat("q8_0", QK, signed=True, zero_point=0, has_min=False),
}


def _group_chunks(builder, block, fmt: GroupFormat, isa: str):
    """The block's weights for eight rows as (weights, offset of their 4 activations): 8 chunks."""
    chunks = []
    for c in range(fmt.block_bytes // 4):
        packed = _load(builder, builder.gep(block, [ir.Constant(_I32, 32 * c)]), _V32_I8)
        if fmt.signed:
            weights = _signed_weights(builder, packed, isa)
            chunks.append((weights, 4 * c))
        else:
            chunks.append((builder.and_(packed, ir.Constant(_V32_I8, [15] * 32)), 4 * c))
            chunks.append((builder.lshr(packed, ir.Constant(_V32_I8, [4] * 32)), QK // 2 + 4 * c))
    return chunks


def _block_sums(builder, chunks, x_block, fmt: GroupFormat, isa: str, x_sum):
    """<8 x i32>: each of the eight rows' exact sum over the block of w * x, from the stored
    weights (w + zero_point: zero_point * x_sum taken off; x_sum None without a zero point)."""
    if isa in QUAD_DOT_ISAS:  # one sdot per four rows and chunk, its activations a lane of one load
        words = _load(builder, x_block, _V8_I32)
        total = ir.Constant(_V8_I32, [0] * 8)
        if x_sum is not None:  # the chain starts from the zero point's term: no subtraction after
            total = _splat(builder, builder.mul(x_sum, ir.Constant(_I32, -fmt.zero_point)), _V8_I32)
        for weights, offset in chunks:
            total = _quad_dot(builder, total, weights, builder.bitcast(_shuffle(builder, words, [offset // 4] * 8), _V32_I8))
        return total
    # NEON, nibbles: each byte lane's products summed over the block (smlal: at most
    # 8 * 15 * 127, room in i16), each row's four lanes once at the end (saddlp, addp)
    nibbles_by_lane = isa == "neon" and not fmt.signed
    total = None
    for weights, offset in chunks:
        four = builder.load(builder.bitcast(builder.gep(x_block, [ir.Constant(_I32, offset)]), _I32.as_pointer()), align=1)
        acts = builder.bitcast(_splat(builder, four, _V8_I32), _V32_I8)
        if nibbles_by_lane:
            part = _byte_products(builder, weights, acts)
        else:
            part = _pair_products(builder, weights, acts, fmt.signed, isa)
            part = _pair_sums(builder, part, isa) if fmt.signed else part  # no room in i16 for more than one chunk
        total = part if total is None else builder.add(total, part)
    if nibbles_by_lane:
        total = _quad_sums(builder, _pair_sums_long(builder, total))
    elif not fmt.signed:
        total = _pair_sums(builder, total, isa)
    if x_sum is not None:
        total = builder.sub(total, _splat(builder, builder.mul(x_sum, ir.Constant(_I32, fmt.zero_point)), _V8_I32))
    return total



# Blocks per pass of the one-token form's loop over blocks, by instruction set: the dot-product
# path takes two, which halves the loop's own steps (tests/bench/count_instructions.py); each
# block's float steps stay in block order, so the bits do not change.
BLOCKS_PER_PASS = {"dotprod": 2}


class _GroupCode:
    """The IR of one call of a group product (eight weight rows of group g against n_tokens
    activation rows): the arguments as row pointers, one block's steps, the stores."""

    def __init__(self, fmt: GroupFormat, n_tokens: int, isa: str, context, builder, signature, args):
        self.fmt, self.isa, self.context, self.builder = fmt, isa, context, builder
        wq, wd, wm, g, xq, xd, xs, xn, out, t, n_valid = args
        wq_t, wd_t, wm_t, g_t, xq_t, xd_t, xs_t, xn_t, out_t, t_t, n_valid_t = signature.args
        intp = types.intp
        self.g = context.cast(builder, g, g_t, intp)
        t = context.cast(builder, t, t_t, intp)
        self.n_valid = builder.trunc(context.cast(builder, n_valid, n_valid_t, intp), _I32)
        self.rows = [builder.add(t, context.get_constant(intp, i)) for i in range(n_tokens)]
        self.w_group, _ = _row_pointer(context, builder, wq_t, wq, self.g)
        self.d_group, wd_ary = _row_pointer(context, builder, wd_t, wd, self.g)
        self.m_group, _ = _row_pointer(context, builder, wm_t, wm, self.g)
        self.n_blocks = builder.udiv(cgutils.unpack_tuple(builder, wd_ary.shape, 2)[1], context.get_constant(intp, GROUP_ROWS))
        self.x_rows = [_row_pointer(context, builder, xq_t, xq, i)[0] for i in self.rows]
        self.xd_rows, self.xs_rows = ([builder.bitcast(_row_pointer(context, builder, a_t, a, i)[0], _F32.as_pointer()) for i in self.rows]
                                      for a, a_t in ((xd, xd_t), (xs, xs_t)))
        self.xn_rows = [builder.bitcast(_row_pointer(context, builder, xn_t, xn, i)[0], _I32.as_pointer()) for i in self.rows]
        zero = ir.Constant(_V8_F32, [0.0] * 8)
        self.accs = [cgutils.alloca_once_value(builder, zero) for _ in self.rows]
        self.mins = [cgutils.alloca_once_value(builder, zero) for _ in self.rows]
        self.out, self.out_t = out, out_t

    def block(self, b, factors=None) -> list:
        """Block b of the eight rows against every token row, into the accumulators; returns each
        token row's integer sums. factors: what pair_factors() gave for b, else each is loaded
        where it is used."""
        builder, fmt, const = self.builder, self.fmt, lambda value: self.context.get_constant(types.intp, value)
        by_half = self.sums_by_half(b) if self.isa in QUAD_DOT_ISAS and len(self.rows) > 1 and fmt.has_min else None
        if by_half is None:
            chunks = _group_chunks(builder, builder.gep(self.w_group, [builder.mul(b, const(GROUP_ROWS * fmt.block_bytes))]), fmt, self.isa)
        if factors is None:
            w_scales = _load_f16x8(builder, builder.gep(self.d_group, [builder.mul(b, const(GROUP_ROWS * 2))]))
            if fmt.has_min:
                w_mins = _load_f16x8(builder, builder.gep(self.m_group, [builder.mul(b, const(GROUP_ROWS * 2))]))
        else:
            w_scales, w_mins, x_scales, x_totals = factors
        x_offset = builder.mul(b, const(QK))
        all_sums = []
        for i in range(len(self.rows)):
            if by_half is None:
                x_sum = builder.load(builder.gep(self.xn_rows[i], [b])) if fmt.zero_point else None
                sums = _block_sums(builder, chunks, builder.gep(self.x_rows[i], [x_offset]), fmt, self.isa, x_sum)
            else:
                sums = by_half[i]
            x_scale = builder.load(builder.gep(self.xd_rows[i], [b])) if factors is None else x_scales[i]
            scale = builder.fmul(w_scales, _splat(builder, x_scale, _V8_F32))
            builder.store(_fma(builder, scale, builder.sitofp(sums, _V8_F32), builder.load(self.accs[i])), self.accs[i])
            if fmt.has_min:
                x_total = _splat(builder, builder.load(builder.gep(self.xs_rows[i], [b])) if factors is None else x_totals[i], _V8_F32)
                builder.store(_fma(builder, w_mins, x_total, builder.load(self.mins[i])), self.mins[i])
            all_sums.append(sums)
        return all_sums

    def pair_factors(self, b) -> list:
        """The float factors of blocks b and b + 1, as block() takes them: each f16 field of both
        blocks in one load (ldp) and each token row's two activation scales (and d * sums) in
        one, loaded before the first block's integer work, so the pair shares its loads."""
        builder, const = self.builder, lambda value: self.context.get_constant(types.intp, value)

        def f16_pair(group):  # <8 x float> of block b, then of b + 1
            both = _load(builder, builder.gep(group, [builder.mul(b, const(GROUP_ROWS * 2))]), _V16_I16)
            return [builder.fpext(builder.bitcast(_shuffle(builder, both, range(8 * q, 8 * q + 8)), _V8_HALF), _V8_F32) for q in range(2)]

        def f32_pair(row):  # row[b], row[b + 1]
            both = builder.load(builder.bitcast(builder.gep(row, [b]), ir.VectorType(_F32, 2).as_pointer()), align=4)
            return [builder.extract_element(both, ir.Constant(_I32, q)) for q in range(2)]

        has_min = self.fmt.has_min
        scales, mins = f16_pair(self.d_group), (f16_pair(self.m_group) if has_min else [None, None])
        x_scales, x_totals = [f32_pair(row) for row in self.xd_rows], [f32_pair(row) for row in self.xs_rows] if has_min else None
        return [(scales[q], mins[q], [x[q] for x in x_scales], [x[q] for x in x_totals] if has_min else None) for q in range(2)]

    def sums_by_half(self, b) -> list:
        """Each token row's integer sums of block b, rows 0 .. 3 for every token row, then (after
        an empty asm, which repeats the loads: LLVM loads only the half each uses) rows 4 .. 7:
        the sdot path's four-token Q4_1, whose sixteen accumulators (sums and minima) leave too
        few registers for eight rows' weights at once."""
        builder, fmt, const = self.builder, self.fmt, lambda value: self.context.get_constant(types.intp, value)
        halves = []
        for h in range(2):
            chunks = _group_chunks(builder, builder.gep(self.w_group, [builder.mul(b, const(GROUP_ROWS * fmt.block_bytes))]), fmt, self.isa)
            x_sums = [builder.load(builder.gep(row, [b])) if fmt.zero_point else None for row in self.xn_rows]
            sums = [_block_sums(builder, chunks, builder.gep(x_row, [builder.mul(b, const(QK))]), fmt, self.isa, x_sum)
                    for x_row, x_sum in zip(self.x_rows, x_sums)]
            halves.append([_shuffle(builder, total, range(4 * h, 4 * h + 4)) for total in sums])
            if h == 0:
                _after(builder, halves[0])
        return [_joined(builder, pair) for pair in zip(*halves)]

    def store(self) -> None:
        """Each token row's acc (Q4_1: plus mins) into out[row, 8g : 8g + n_valid]."""
        builder, context, intp = self.builder, self.context, types.intp
        out_ary = context.make_array(self.out_t)(context, builder, self.out)
        first_col = builder.mul(self.g, context.get_constant(intp, GROUP_ROWS))
        mask = builder.icmp_unsigned("<", ir.Constant(_V8_I32, list(range(GROUP_ROWS))), _splat(builder, self.n_valid, _V8_I32))
        for i, row in enumerate(self.rows):
            result = builder.load(self.accs[i])
            if self.fmt.has_min:
                result = builder.fadd(result, builder.load(self.mins[i]))
            pointer = cgutils.get_item_pointer(context, builder, self.out_t, out_ary, [row, first_col], wraparound=False)
            _call(builder, "llvm.masked.store.v8f32.p0", ir.VoidType(), [result, pointer, ir.Constant(_I32, 4), mask])


def _codegen_group(fmt: GroupFormat, n_tokens: int, isa: str):
    def codegen(context, builder, signature, args):
        code = _GroupCode(fmt, n_tokens, isa, context, builder, signature, args)
        per_pass = BLOCKS_PER_PASS.get(isa, 1) if n_tokens == 1 else 1  # the four-token form's registers are full
        if per_pass == 1:
            with cgutils.for_range(builder, code.n_blocks) as loop:
                code.block(loop.index)
        else:
            step = context.get_constant(types.intp, per_pass)
            passes = builder.udiv(code.n_blocks, step)
            with cgutils.for_range(builder, passes) as loop:
                pair = code.pair_factors(builder.mul(loop.index, step))
                for q in range(per_pass):
                    sums = code.block(builder.add(builder.mul(loop.index, step), context.get_constant(types.intp, q)), pair[q])
                    if q + 1 < per_pass:  # one block's integers at a time: interleaved, they spill
                        _after(builder, sums)
            done = builder.mul(passes, step)
            with cgutils.for_range(builder, builder.sub(code.n_blocks, done)) as loop:  # the blocks left over
                code.block(builder.add(done, loop.index))
        code.store()
        return context.get_dummy_value()

    return codegen


def _make_group_intrinsic(fmt: GroupFormat, n_tokens: int, isa: str):
    codegen = _codegen_group(fmt, n_tokens, isa)

    def typer(typingctx, wq, wd, wm, g, xq, xd, xs, xn, out, t, n_valid):
        expected = ((wq, types.uint8), (wd, types.uint16), (wm, types.uint16), (xq, types.int8), (xd, types.float32),
                    (xs, types.float32), (xn, types.int32), (out, types.float32))
        for array, dtype in expected:
            if not (isinstance(array, types.Array) and array.ndim == 2 and array.layout == "C" and array.dtype == dtype):
                raise TypeError(f"{fmt.name} group product: expected a C-contiguous 2-D {dtype} array, got {array}")
        return types.none(wq, wd, wm, g, xq, xd, xs, xn, out, t, n_valid), codegen

    typer.__name__ = f"{fmt.name}_group_tokens{n_tokens}_{isa}"
    return intrinsic(typer)


# GROUP_INTRINSICS[(format, n_tokens, isa)]: every variant this host can run (tests compare the ISAs).
GROUP_INTRINSICS = {(name, n, isa): _make_group_intrinsic(fmt, n, isa) for name, fmt in GROUP_FORMATS.items() for n in (1, 4) for isa in ISAS}


def group_weights(fmt: GroupFormat, wq: np.ndarray, g: int) -> np.ndarray:
    """(8, n_blocks, 32) int64: the stored weights of row group g (nibbles, or int8 for Q8_0)."""
    n_chunks = fmt.block_bytes // 4
    n_blocks = wq.shape[1] // (GROUP_ROWS * fmt.block_bytes)
    grouped = wq[g].reshape(n_blocks, n_chunks, GROUP_ROWS, 4).transpose(2, 0, 1, 3).reshape(GROUP_ROWS, n_blocks, fmt.block_bytes)
    if fmt.signed:
        return grouped.view(np.int8).astype(np.int64)
    grouped = grouped.astype(np.int64)
    return np.concatenate((grouped & 15, grouped >> 4), axis=2)


def _group_np(fmt: GroupFormat, wq, wd, wm, g, xq, xd, xs, xn, out, t, n_tokens, n_valid):
    weights = group_weights(fmt, wq, g) - fmt.zero_point  # (8, n_blocks, 32)
    n_blocks = weights.shape[1]
    d_w = wd[g].view(np.float16).astype(np.float32).reshape(n_blocks, GROUP_ROWS)
    m_w = wm[g].view(np.float16).astype(np.float32).reshape(n_blocks, GROUP_ROWS)
    for i in range(t, t + n_tokens):
        sums = (weights * xq[i].reshape(n_blocks, QK).astype(np.int64)).sum(axis=2)  # (8, n_blocks), exact
        acc = np.zeros(GROUP_ROWS, np.float32)
        mins = np.zeros(GROUP_ROWS, np.float32)
        for b in range(n_blocks):
            acc = _fma_np(d_w[b] * xd[i, b], sums[:, b].astype(np.float32), acc)
            if fmt.has_min:
                mins = _fma_np(m_w[b], xs[i, b], mins)
        result = acc + mins if fmt.has_min else acc
        out[i, g * GROUP_ROWS : g * GROUP_ROWS + n_valid] = result[:n_valid]


def _group_function(name: str, n_tokens: int):
    """The public product for one format and token count: plain numpy when Numba's JIT is off,
    the intrinsic for this host's ISA in compiled code."""
    fmt = GROUP_FORMATS[name]

    def product(wq, wd, wm, g, xq, xd, xs, xn, out, t, n_valid):
        _group_np(fmt, wq, wd, wm, g, xq, xd, xs, xn, out, t, n_tokens, n_valid)

    product.__name__ = product.__qualname__ = f"{name}_group_tokens{n_tokens}"
    product.__doc__ = (f"out[t .. t + {n_tokens - 1}, 8g : 8g + n_valid] = rows 8g .. of a grouped {name.upper()} matrix "
                       "(wq (groups, n_blocks * 8 * block_bytes) u8, wd and wm (groups, n_blocks * 8) f16 bits) times "
                       "activation rows t .. (xq (T, cols) i8, xd (T, cols // 32) f32 scales, xs f32 d * sums, xn i32 sums).")
    kernel = GROUP_INTRINSICS[(name, n_tokens, ISA)]

    @overload(product, inline="always")
    def _compiled(wq, wd, wm, g, xq, xd, xs, xn, out, t, n_valid):
        return lambda wq, wd, wm, g, xq, xd, xs, xn, out, t, n_valid: kernel(wq, wd, wm, g, xq, xd, xs, xn, out, t, n_valid)

    return product


q4_0_group_tokens1, q4_0_group_tokens4 = _group_function("q4_0", 1), _group_function("q4_0", 4)
q4_1_group_tokens1, q4_1_group_tokens4 = _group_function("q4_1", 1), _group_function("q4_1", 4)
q8_0_group_tokens1, q8_0_group_tokens4 = _group_function("q8_0", 1), _group_function("q8_0", 4)


# ---------------------------------------------------------------------------------------------
# The compiled products: out (T, rows) = x (T, cols) @ W.T
#
# Each kernel walks groups of eight weight rows (prange) and, for each, token rows four at a
# time (the group's weights unpacked once for four activation rows: prefill and batched decode),
# then the rest one at a time; the products above compute a token row's sums with the same
# float operations either way, so a row's output does not depend on the batch around it. No
# fastmath here: the float work is all in the products' IR, in a fixed order.


def _grouped_matmul(tokens1, tokens4):
    """The compiled product of one format from its eight-row products; Numba's cache tells
    these kernels apart by the products they close over."""

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


matmul_q4_0 = _grouped_matmul(q4_0_group_tokens1, q4_0_group_tokens4)
matmul_q4_1 = _grouped_matmul(q4_1_group_tokens1, q4_1_group_tokens4)
matmul_q8_0 = _grouped_matmul(q8_0_group_tokens1, q8_0_group_tokens4)


# ---------------------------------------------------------------------------------------------
# Repacking from GGUF block bytes (load time, numpy) and row lookup (token embeddings)


def _pack_grouped(raw: np.ndarray, head: int, quant_bytes: int) -> tuple[int, int, tuple[np.ndarray, ...]]:
    """(rows, row bytes) GGUF blocks of `head` bytes of f16 fields (d, and Q4_1's m) then
    `quant_bytes` of quants -> groups of 8 rows as above: the quants interleaved four bytes at a
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


def _packed_nbytes_grouped(rows: int, cols: int, block_bytes: int) -> int:
    """GGUF's own bytes per block, over whole groups of 8 rows."""
    return -(-rows // GROUP_ROWS) * GROUP_ROWS * cols // QK * block_bytes


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



def _rows_group_format(arrays: tuple[np.ndarray, ...], cols: int, ids: np.ndarray, fmt) -> np.ndarray:
    """Rows `ids` of a Q4_0, Q4_1 or Q8_0 matrix (fmt: its GroupFormat) as f32."""
    out = np.empty((ids.shape[0], cols), np.float32)
    wq, wd, wm = with_unread_minima(arrays)
    _rows_grouped(wq, wd, wm, F16_TO_F32, fmt.block_bytes, fmt.signed, fmt.zero_point, fmt.has_min, ids, out)
    return out


def record(ttype: QT, scale_offsets: tuple[int, ...], kernel) -> Format:
    """The registry's record of Q4_0, Q4_1 or Q8_0, whose GGUF blocks start with the f16 fields
    at scale_offsets (d, and Q4_1's m)."""
    block_bytes = GGML_QUANT_SIZES[ttype][1]
    head = 2 * len(scale_offsets)
    return Format(ttype, scale_offsets, GROUP_ROWS, partial(_pack_grouped, head=head, quant_bytes=block_bytes - head),
                  partial(_packed_nbytes_grouped, block_bytes=block_bytes), kernel, with_unread_minima, q8_blocks,
                  partial(_rows_group_format, fmt=GROUP_FORMATS[ttype.name.lower()]), scale_arrays(scale_offsets),
                  F16_EXPONENT, "block scales")
