"""Products for Q5_0, Q5_1, the K-quants (Q2_K .. Q6_K) and BF16, written as LLVM vector IR.

formats.py holds the GGUF block layouts; this module holds how pack() stores them and the code
that reads that.

Q5_x and the K-quants are computed eight weight rows at a time, as simd.py's Q4_0: the eight i32
lanes of a vector are eight rows of a group (GROUP_ROWS, the last group padded with zero rows).
Every weight is stored as an unsigned integer u (Q5_0 and the K-quants with a zero point take
u = q + 16, q + 4 (Q3_K) or q + 32 (Q6_K) and subtract the zero point through the activations'
block sums). A chunk vector is 32 bytes u whose byte 4k + i is weight 4c + i of row k for
chunk c; one vpmaddubsw of it against the chunk's four activation bytes repeated eight times
gives row k's products in i16 lanes 2k and 2k + 1. Chunks are summed in i16 as long as no sum
can overflow (2 * u_max * 127 per chunk: 8 chunks of Q4_K, 4 of Q5_x, 2 of Q6_K), then one
vpmaddwd by the rows' scale of those weights (Q5_x: by ones) gives each row's exact int32:

    total_k = sum over sub-blocks s of sc[k, s] * sum(u * x) - zero_point * sum_s sc[k, s] * bsum_s
    minima_k = sum_s m[k, s] * bsum_s                    (Q2_K, Q4_K, Q5_K; bsum: 16 x's summed)
    acc = fma(d_w * d_x, float(total), acc);  acc_min = fma(dmin_w * d_x, float(minima), acc_min)

per superblock of 256 (K-quants, against Q8_K activations, as ggml's vec_dot_q*_K_q8_K), or per
block of 32 (Q5_0 against Q8_0, subtracting 16 * sum(x); Q5_1 against Q8_1, adding m * s_x as
ggml's vec_dot_q5_1_q8_1). The row's result is acc - acc_min (Q5_1: acc + the m terms), one
conversion and two fmas per block serving eight rows. The integer sums are exact (|sc * u * x| *
256 < 2**31), so the float steps alone fix the result, and they are the same for a row whichever
rows share its group or its batch.

Storage (pack), per group of 8 rows and block (32 weights for Q5_x, a 256-weight superblock for
the K-quants), each span of 32 weights (8 chunks c) as 32-byte vectors:

    Q4_K:       N0 N1 N2 N3              N_j: nibble c // 4 of N_(c % 4) holds u's bits 0..3
    Q5_0, Q5_1,
    Q5_K:       N0 N1 N2 N3 H            H: bit c holds u's bit 4
    Q6_K:       N0 N1 N2 N3 T0 T1        T_j: bits 2 (c % 4) .. of T_(c // 4) hold u's bits 4..5
    Q3_K:       L0 L1 H                  L_j: bits 2 (c % 4) .. of L_(c // 4) hold u's bits 0..1;
                                         H: bit c holds u's bit 2
    Q2_K:       L0 L1

so quants take what GGUF gives them. Then, per group and superblock, `meta`: 128 bytes i8 of
scales [sub-block][row] (Q3_K: sc - 32; Q6_K as stored) and for Q4_K/Q5_K 8 scales then 8
minima per row ([8][8] each), Q2_K its scale bytes as stored ([16][8], scale nibble and minimum
nibble); and the f16 scales d (dmin; Q5_1's m) as stored, [block][row] u16.

As in simd.py the integer lanes come from two instruction sequences with the same bits: AVX2
(vpmaddubsw, vpmaddwd) and generic vector IR that LLVM lowers to the target's SIMD (NEON on a
Raspberry Pi); the float steps are the same IR for both.

BF16 weights meet activations rounded to bf16, as ggml_vec_dot_bf16 does, in tiles of two
weight rows by four token rows. Each (row, token) has one <8 x float> accumulator; over chunks
of 16 columns it takes the chunk's even columns, then its odd ones, by fused multiply-adds (a
weight becomes an f32 by a shift or a mask of the 32-bit word that holds it and its neighbour;
the activations come with each chunk's even columns first, bf16_activations in formats.py);
then its lanes are summed in a fixed order, and a tail of fewer than 16 columns is added one by
one (ggml's AVX2 branch keeps four accumulators over chunks of 32). A tile loads each activation
vector once for both rows and widens each weight vector once for four tokens; a token row alone
(decode) takes eight weight rows at a time, so that eight chains of fmas overlap. The steps of
one (row, token) are the same in every tile shape, so the result is too.

Every function has a plain-numpy twin for NUMBA_DISABLE_JIT=1, and compiled code gets the IR
through `overload`. The "_tokens4" forms read each weight once for four token rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .simd import (
    _F32,
    _I8,
    _I16,
    _I32,
    _V8_F32,
    _V8_I32,
    _V16_I16,
    _V32_I8,
    GROUP_ROWS,
    ISA,
    ISAS,
    QK,
    _call,
    _fma,
    _fma_np,
    _load,
    _load_f16x8,
    _pair_products,
    _pair_sums,
    _row_pointer,
    _splat,
)

QK_K = 256  # weights per K-quant superblock
SPAN = 32  # weights per span of stored vectors (8 chunks of 4)

_V8_I8 = ir.VectorType(_I8, 8)
_V16_I8 = ir.VectorType(_I8, 16)
_V8_I16 = ir.VectorType(_I16, 8)
_V16_I32 = ir.VectorType(_I32, 16)


def _const(vector_type, value):
    return ir.Constant(vector_type, [value] * vector_type.count)


def _shuffle(builder, vector, indices):
    """vector's lanes at `indices` (a new vector of len(indices) lanes)."""
    undef = ir.Constant(vector.type, ir.Undefined)
    return builder.shuffle_vector(vector, undef, ir.Constant(ir.VectorType(_I32, len(indices)), list(indices)))


def _bits(builder, vector, shift, mask):
    """(vector >> shift) & mask, lane by lane, unsigned."""
    if shift:
        vector = builder.lshr(vector, _const(vector.type, shift))
    return builder.and_(vector, _const(vector.type, mask))


def _pair_dot(builder, pairs, multipliers, isa):
    """<8 x i32>: lane k = pairs[2k] * multipliers[2k] + pairs[2k + 1] * multipliers[2k + 1] (vpmaddwd)."""
    if isa == "avx2":
        return _call(builder, "llvm.x86.avx2.pmadd.wd", _V8_I32, [pairs, multipliers])
    products = builder.mul(builder.sext(pairs, _V16_I32), builder.sext(multipliers, _V16_I32))
    return builder.add(_shuffle(builder, products, range(0, 16, 2)), _shuffle(builder, products, range(1, 16, 2)))


def _broadcast4(builder, pointer):
    """The 4 bytes at an i8* repeated eight times: <32 x i8> (vpbroadcastd)."""
    four = builder.load(builder.bitcast(pointer, _I32.as_pointer()), align=1)
    return builder.bitcast(_splat(builder, four, _V8_I32), _V32_I8)


def _hsum(builder, acc):
    """<8 x float> -> float in ggml's hsum_float_8 order: ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))."""
    quad = builder.fadd(_shuffle(builder, acc, [0, 1, 2, 3]), _shuffle(builder, acc, [4, 5, 6, 7]))
    pair = builder.fadd(_shuffle(builder, quad, [0, 1]), _shuffle(builder, quad, [2, 3]))
    return builder.fadd(builder.extract_element(pair, ir.Constant(_I32, 0)), builder.extract_element(pair, ir.Constant(_I32, 1)))


def _hsum_np(acc):
    f = np.float32
    return f(f(f(acc[0] + acc[4]) + f(acc[2] + acc[6])) + f(f(acc[1] + acc[5]) + f(acc[3] + acc[7])))


# ---------------------------------------------------------------------------------------------
# Storage of the quants: spans of 8 chunks


@dataclass(frozen=True)
class _Spans:
    low_bits: int  # 4: nibble vectors N0..N3; 2: two-bit vectors L0, L1
    high: str | None  # "bit": one vector H with u's next bit; "pair": T0, T1 with its next two

    @property
    def vectors(self) -> int:
        return (4 if self.low_bits == 4 else 2) + {None: 0, "bit": 1, "pair": 2}[self.high]

    @property
    def u_max(self) -> int:
        return (1 << (self.low_bits + {None: 0, "bit": 1, "pair": 2}[self.high])) - 1

    def chunk(self, builder, span, c):
        """<32 x i8> u of chunk c of the span at i8* `span`."""

        def vector(j):
            return _load(builder, builder.gep(span, [ir.Constant(_I32, 32 * j)]), _V32_I8)

        if self.low_bits == 4:
            low, n_low = _bits(builder, vector(c % 4), 4 * (c // 4), 15), 4
        else:
            low, n_low = _bits(builder, vector(c // 4), 2 * (c % 4), 3), 2
        if self.high is None:
            return low
        if self.high == "bit":
            high = _bits(builder, vector(n_low), c, 1)
        else:
            high = _bits(builder, vector(n_low + c // 4), 2 * (c % 4), 3)
        return builder.or_(low, builder.shl(high, _const(_V32_I8, self.low_bits)))

    def encode(self, cv: np.ndarray) -> np.ndarray:
        """(..., 8 chunks, 32) u -> (..., vectors, 32) u8, as chunk() reads them."""
        cv = cv.astype(np.uint8)
        out = []
        if self.low_bits == 4:
            out += [(cv[..., j, :] & 15) | (cv[..., 4 + j, :] & 15) << 4 for j in range(4)]
        else:
            out += [sum((cv[..., 4 * j + c, :] & 3) << (2 * c) for c in range(4)).astype(np.uint8) for j in range(2)]
        high = cv >> self.low_bits
        if self.high == "bit":
            out.append(sum((high[..., c, :] & 1) << c for c in range(8)).astype(np.uint8))
        elif self.high == "pair":
            out += [sum((high[..., 4 * j + c, :] & 3) << (2 * c) for c in range(4)).astype(np.uint8) for j in range(2)]
        return np.stack(out, axis=-2)

    def decode(self, vectors: np.ndarray) -> np.ndarray:
        """(..., vectors, 32) u8 -> (..., 8 chunks, 32) int32 u: chunk() in numpy."""
        v = vectors.astype(np.int32)
        c = np.arange(8).reshape(8, 1)
        if self.low_bits == 4:
            low, n_low = (v[..., c[:, 0] % 4, :] >> (4 * (c // 4))) & 15, 4
        else:
            low, n_low = (v[..., c[:, 0] // 4, :] >> (2 * (c % 4))) & 3, 2
        if self.high == "bit":
            low = low | (((v[..., n_low : n_low + 1, :] >> c) & 1) << self.low_bits)
        elif self.high == "pair":
            low = low | (((v[..., n_low + c[:, 0] // 4, :] >> (2 * (c % 4))) & 3) << self.low_bits)
        return low


def group_chunks(u: np.ndarray) -> np.ndarray:
    """(rows, n_blocks, W) u, rows a multiple of 8 -> (groups, n_blocks, W // 32 spans, 8 chunks,
    32): byte 4k + i of chunk c of span p is weight 32p + 4c + i of row k of the group."""
    rows, n_blocks, width = u.shape
    by_group = u.reshape(rows // GROUP_ROWS, GROUP_ROWS, n_blocks, width // SPAN, 8, 4)
    return np.ascontiguousarray(by_group.transpose(0, 2, 3, 4, 1, 5)).reshape(rows // GROUP_ROWS, n_blocks, width // SPAN, 8, 32)


def ungroup_chunks(chunks: np.ndarray) -> np.ndarray:
    """The inverse of group_chunks: -> (groups * 8, n_blocks, W)."""
    groups, n_blocks, spans = chunks.shape[:3]
    by_row = chunks.reshape(groups, n_blocks, spans, 8, GROUP_ROWS, 4).transpose(0, 4, 1, 2, 3, 5)
    return by_row.reshape(groups * GROUP_ROWS, n_blocks, spans * SPAN)


def group_rows(values: np.ndarray) -> np.ndarray:
    """(rows, n_blocks, m) -> (groups, n_blocks * m * 8): [block][m][row] per group (meta and
    scales), rows a multiple of 8."""
    rows, n_blocks, m = values.shape
    by_group = values.reshape(rows // GROUP_ROWS, GROUP_ROWS, n_blocks, m).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(by_group).reshape(rows // GROUP_ROWS, -1)


def ungroup_rows(grouped: np.ndarray, m: int) -> np.ndarray:
    """The inverse of group_rows: (groups, n_blocks * m * 8) -> (groups * 8, n_blocks, m)."""
    groups = grouped.shape[0]
    by_group = grouped.reshape(groups, -1, m, GROUP_ROWS).transpose(0, 3, 1, 2)
    return by_group.reshape(groups * GROUP_ROWS, -1, m)


# ---------------------------------------------------------------------------------------------
# The formats: spans, and for the K-quants their scales and minima in `meta`


def _dup8(builder, eight):
    """<8 x i8> a -> <16 x i16> (a0, a0, a1, a1, ...): one value per row for both i16 lanes."""
    return builder.sext(_shuffle(builder, eight, [k // 2 for k in range(16)]), _V16_I16)


def _pair16(builder, sixteen):
    """<16 x i8> (a0 .. a7, b0 .. b7) -> <16 x i16> (a0, b0, a1, b1, ...)."""
    return builder.sext(_shuffle(builder, sixteen, [8 * (m % 2) + m // 2 for m in range(16)]), _V16_I16)


def _meta_vector(builder, meta, offset, vector_type):
    return _load(builder, builder.gep(meta, [ir.Constant(_I32, offset)]), vector_type)


@dataclass(frozen=True)
class _KFormat:
    name: str
    spans: _Spans
    unit_chunks: int  # chunks per scale: 4 (16 weights) or 8 (Q4_K, Q5_K: 32)
    offset: int  # zero point subtracted from u (Q3_K 4, Q6_K 32)
    has_min: bool  # dmin and minima (Q2_K, Q4_K, Q5_K)
    meta_layout: str  # "signed16" (Q3_K, Q6_K), "units32" (Q4_K, Q5_K), "nibbles16" (Q2_K)

    def scales(self, builder, meta, s):
        """<16 x i16>: row k's scale of sub-block s in lanes 2k, 2k + 1."""
        eight = _meta_vector(builder, meta, 8 * s, _V8_I8)
        if self.meta_layout == "nibbles16":
            eight = _bits(builder, eight, 0, 15)
        return _dup8(builder, eight)

    def pairs(self, builder, meta, p, minima):
        """<16 x i16>: row k's two scales (minima) of the 16-weight sub-blocks 2p, 2p + 1 in lanes
        2k, 2k + 1, to multiply the activation block sums bsum_2p, bsum_2p+1."""
        if self.meta_layout == "units32":  # one scale (minimum) per 32 weights: sub-block p
            return _dup8(builder, _meta_vector(builder, meta, (64 if minima else 0) + 8 * p, _V8_I8))
        sixteen = _meta_vector(builder, meta, 16 * p, _V16_I8)
        if self.meta_layout == "nibbles16":
            sixteen = _bits(builder, sixteen, 4 if minima else 0, 15)
        return _pair16(builder, sixteen)

    @property
    def run_chunks(self) -> int:
        """Chunks whose pair products sum in i16 without overflow (|x| <= 127 in Q8_K)."""
        return min(self.unit_chunks, 32767 // (2 * self.spans.u_max * 127))

    @property
    def quant_bytes(self) -> int:
        """Bytes of quants per row per superblock."""
        return QK_K // SPAN * self.spans.vectors * 32 // GROUP_ROWS


_NIBBLES_BIT = _Spans(4, "bit")
K_FORMATS = {
    "q2_k": _KFormat("q2_k", _Spans(2, None), 4, 0, True, "nibbles16"),
    "q3_k": _KFormat("q3_k", _Spans(2, "bit"), 4, 4, False, "signed16"),
    "q4_k": _KFormat("q4_k", _Spans(4, None), 8, 0, True, "units32"),
    "q5_k": _KFormat("q5_k", _NIBBLES_BIT, 8, 0, True, "units32"),
    "q6_k": _KFormat("q6_k", _Spans(4, "pair"), 4, 32, False, "signed16"),
}
META_BYTES = 16  # bytes of scales (and minima) per row per superblock
Q5_GROUP_BYTES = _NIBBLES_BIT.vectors * 32  # one span per block of 32


# ---------------------------------------------------------------------------------------------
# K-quants: eight rows against Q8_K activations


def _store_rows(context, builder, out_t, out, rows, g, n_valid, results):
    """out[rows[i], 8g : 8g + n_valid] = results[i] (masked: the last group may be partial)."""
    intp = types.intp
    out_ary = context.make_array(out_t)(context, builder, out)
    first_col = builder.mul(g, context.get_constant(intp, GROUP_ROWS))
    mask = builder.icmp_unsigned("<", ir.Constant(_V8_I32, list(range(GROUP_ROWS))), _splat(builder, n_valid, _V8_I32))
    for row, result in zip(rows, results):
        pointer = cgutils.get_item_pointer(context, builder, out_t, out_ary, [row, first_col], wraparound=False)
        _call(builder, "llvm.masked.store.v8f32.p0", ir.VoidType(), [result, pointer, ir.Constant(_I32, 4), mask])


def _group_indices(context, builder, signature, args, n_tokens):
    """(g, [t, t + 1, .. t + n_tokens - 1], n_valid as i32) from an eight-row product's
    arguments (..., g, xq, xd, xs, out, t, n_valid)."""
    intp = types.intp
    g, t, n_valid = (context.cast(builder, args[i], signature.args[i], intp) for i in (-7, -2, -1))
    rows = [builder.add(t, context.get_constant(intp, i)) for i in range(n_tokens)]
    return g, rows, builder.trunc(n_valid, _I32)


def _codegen_k(fmt: _KFormat, n_tokens: int, isa: str):
    spans = QK_K // SPAN
    block_bytes = spans * fmt.spans.vectors * 32

    def codegen(context, builder, signature, args):
        wq, wd, wdmin, wmeta, _, xq, xd, xbs, out, _, _ = args  # wdmin: unread without minima
        wq_t, wd_t, wdmin_t, wmeta_t, _, xq_t, xd_t, xbs_t, out_t, _, _ = signature.args
        const = lambda value: context.get_constant(types.intp, value)  # noqa: E731
        g, rows, n_valid = _group_indices(context, builder, signature, args, n_tokens)
        w_group, _ = _row_pointer(context, builder, wq_t, wq, g)
        d_group, wd_ary = _row_pointer(context, builder, wd_t, wd, g)
        dmin_group = _row_pointer(context, builder, wdmin_t, wdmin, g)[0] if fmt.has_min else None
        meta_group, _ = _row_pointer(context, builder, wmeta_t, wmeta, g)
        n_super = builder.udiv(cgutils.unpack_tuple(builder, wd_ary.shape, 2)[1], const(GROUP_ROWS))
        x_rows = [_row_pointer(context, builder, xq_t, xq, i)[0] for i in rows]
        xd_rows = [builder.bitcast(_row_pointer(context, builder, xd_t, xd, i)[0], _F32.as_pointer()) for i in rows]
        xbs_rows = [_row_pointer(context, builder, xbs_t, xbs, i)[0] for i in rows]
        zero = ir.Constant(_V8_F32, [0.0] * 8)
        accs = [cgutils.alloca_once_value(builder, zero) for _ in rows]
        acc_mins = [cgutils.alloca_once_value(builder, zero) for _ in rows]
        with cgutils.for_range(builder, n_super) as loop:
            b = loop.index
            block = builder.gep(w_group, [builder.mul(b, const(block_bytes))])
            meta = builder.gep(meta_group, [builder.mul(b, const(META_BYTES * GROUP_ROWS))])
            x_blocks = [builder.gep(x_row, [builder.mul(b, const(QK_K))]) for x_row in x_rows]
            totals = [ir.Constant(_V8_I32, [0] * 8)] * n_tokens
            for p in range(spans):
                span = builder.gep(block, [const(p * fmt.spans.vectors * 32)])
                for first in range(0, 8, fmt.unit_chunks):
                    scales = fmt.scales(builder, meta, (8 * p + first) // fmt.unit_chunks)
                    for run in range(first, first + fmt.unit_chunks, fmt.run_chunks):
                        # chunk by chunk, each decoded once for every token row: few live vectors
                        pairs = [None] * n_tokens
                        for c in range(run, run + fmt.run_chunks):
                            chunk = fmt.spans.chunk(builder, span, c)
                            for i in range(n_tokens):
                                acts = _broadcast4(builder, builder.gep(x_blocks[i], [const(SPAN * p + 4 * c)]))
                                product = _pair_products(builder, chunk, acts, False, isa)
                                pairs[i] = product if pairs[i] is None else builder.add(pairs[i], product)
                        for i in range(n_tokens):
                            totals[i] = builder.add(totals[i], _pair_dot(builder, pairs[i], scales, isa))
            w_scales = _load_f16x8(builder, builder.gep(d_group, [builder.mul(b, const(2 * GROUP_ROWS))]))
            if fmt.has_min:
                w_minima = _load_f16x8(builder, builder.gep(dmin_group, [builder.mul(b, const(2 * GROUP_ROWS))]))
            for i in range(n_tokens):
                bsums = builder.gep(xbs_rows[i], [builder.mul(b, const(2 * QK_K // 16))])
                bsum_pairs = [_broadcast4(builder, builder.gep(bsums, [const(4 * p)])) for p in range(8)]
                bsum_pairs = [builder.bitcast(v, _V16_I16) for v in bsum_pairs]
                total = totals[i]
                if fmt.offset:
                    correction = None
                    for p in range(8):
                        term = _pair_dot(builder, fmt.pairs(builder, meta, p, False), bsum_pairs[p], isa)
                        correction = term if correction is None else builder.add(correction, term)
                    total = builder.sub(total, builder.mul(correction, _const(_V8_I32, fmt.offset)))
                x_scale = _splat(builder, builder.load(builder.gep(xd_rows[i], [b])), _V8_F32)
                scale = builder.fmul(w_scales, x_scale)
                builder.store(_fma(builder, scale, builder.sitofp(total, _V8_F32), builder.load(accs[i])), accs[i])
                if fmt.has_min:
                    minima = None
                    for p in range(8):
                        term = _pair_dot(builder, fmt.pairs(builder, meta, p, True), bsum_pairs[p], isa)
                        minima = term if minima is None else builder.add(minima, term)
                    min_scale = builder.fmul(w_minima, x_scale)
                    builder.store(_fma(builder, min_scale, builder.sitofp(minima, _V8_F32), builder.load(acc_mins[i])), acc_mins[i])
        results = []
        for i in range(n_tokens):
            result = builder.load(accs[i])
            results.append(builder.fsub(result, builder.load(acc_mins[i])) if fmt.has_min else result)
        _store_rows(context, builder, out_t, out, rows, g, n_valid, results)
        return context.get_dummy_value()

    return codegen


def _check(name, arrays, dtypes):
    for array, dtype in zip(arrays, dtypes):
        if not (isinstance(array, types.Array) and array.ndim == 2 and array.layout == "C" and array.dtype == dtype):
            raise TypeError(f"{name}: expected a C-contiguous 2-D {dtype} array, got {array}")


def _make_k(fmt: _KFormat, n_tokens: int, isa: str):
    codegen = _codegen_k(fmt, n_tokens, isa)
    u8, i8, i16, u16, f32 = types.uint8, types.int8, types.int16, types.uint16, types.float32
    name = f"{fmt.name}_x8_tokens{n_tokens}_{isa}"

    def typer(typingctx, wq, wd, wdmin, wmeta, g, xq, xd, xbs, out, t, n_valid):
        _check(name, (wq, wd, wdmin, wmeta, xq, xd, xbs, out), (u8, u16, u16, i8, i8, f32, i16, f32))
        return types.none(wq, wd, wdmin, wmeta, g, xq, xd, xbs, out, t, n_valid), codegen

    typer.__name__ = name
    return intrinsic(typer)


# ---------------------------------------------------------------------------------------------
# Q5_0 and Q5_1: eight rows against Q8_0 / Q8_1 activations, a block of 32 at a time


def _codegen_q5(has_m: bool, n_tokens: int, isa: str):
    run = 32767 // (2 * _NIBBLES_BIT.u_max * 127)  # 4 chunks

    def codegen(context, builder, signature, args):
        # Q5_0: wm unread, xs the i32 block sums of x; Q5_1: xs the f32 d * sums (Q8_1)
        wq, wd, wm, _, xq, xd, xs, out, _, _ = args
        wq_t, wd_t, wm_t, _, xq_t, xd_t, xs_t, out_t, _, _ = signature.args
        const = lambda value: context.get_constant(types.intp, value)  # noqa: E731
        g, rows, n_valid = _group_indices(context, builder, signature, args, n_tokens)
        w_group, _ = _row_pointer(context, builder, wq_t, wq, g)
        d_group, wd_ary = _row_pointer(context, builder, wd_t, wd, g)
        m_group = _row_pointer(context, builder, wm_t, wm, g)[0] if has_m else None
        n_blocks = builder.udiv(cgutils.unpack_tuple(builder, wd_ary.shape, 2)[1], const(GROUP_ROWS))
        x_rows = [_row_pointer(context, builder, xq_t, xq, i)[0] for i in rows]
        xd_rows = [builder.bitcast(_row_pointer(context, builder, xd_t, xd, i)[0], _F32.as_pointer()) for i in rows]
        sum_type = _F32 if has_m else _I32
        xs_rows = [builder.bitcast(_row_pointer(context, builder, xs_t, xs, i)[0], sum_type.as_pointer()) for i in rows]
        zero = ir.Constant(_V8_F32, [0.0] * 8)
        accs = [cgutils.alloca_once_value(builder, zero) for _ in rows]
        acc_ms = [cgutils.alloca_once_value(builder, zero) for _ in rows]
        with cgutils.for_range(builder, n_blocks) as loop:
            b = loop.index
            span = builder.gep(w_group, [builder.mul(b, const(Q5_GROUP_BYTES))])
            chunks = [_NIBBLES_BIT.chunk(builder, span, c) for c in range(8)]
            w_scales = _load_f16x8(builder, builder.gep(d_group, [builder.mul(b, const(2 * GROUP_ROWS))]))
            if has_m:
                w_minima = _load_f16x8(builder, builder.gep(m_group, [builder.mul(b, const(2 * GROUP_ROWS))]))
            for i in range(n_tokens):
                x_block = builder.gep(x_rows[i], [builder.mul(b, const(QK))])
                total = None
                for first in range(0, 8, run):
                    pairs = None
                    for c in range(first, first + run):
                        product = _pair_products(builder, chunks[c], _broadcast4(builder, builder.gep(x_block, [const(4 * c)])), False, isa)
                        pairs = product if pairs is None else builder.add(pairs, product)
                    term = _pair_sums(builder, pairs, isa)
                    total = term if total is None else builder.add(total, term)
                x_sum = builder.load(builder.gep(xs_rows[i], [b]))
                if not has_m:  # w = u - 16
                    total = builder.sub(total, _splat(builder, builder.shl(x_sum, ir.Constant(_I32, 4)), _V8_I32))
                scale = builder.fmul(w_scales, _splat(builder, builder.load(builder.gep(xd_rows[i], [b])), _V8_F32))
                builder.store(_fma(builder, scale, builder.sitofp(total, _V8_F32), builder.load(accs[i])), accs[i])
                if has_m:
                    builder.store(_fma(builder, w_minima, _splat(builder, x_sum, _V8_F32), builder.load(acc_ms[i])), acc_ms[i])
        results = []
        for i in range(n_tokens):
            result = builder.load(accs[i])
            results.append(builder.fadd(result, builder.load(acc_ms[i])) if has_m else result)
        _store_rows(context, builder, out_t, out, rows, g, n_valid, results)
        return context.get_dummy_value()

    return codegen


def _make_q5(has_m: bool, n_tokens: int, isa: str):
    codegen = _codegen_q5(has_m, n_tokens, isa)
    u8, i8, u16, f32 = types.uint8, types.int8, types.uint16, types.float32
    sums = types.float32 if has_m else types.int32
    name = f"q5_{int(has_m)}_x8_tokens{n_tokens}_{isa}"

    def typer(typingctx, wq, wd, wm, g, xq, xd, xs, out, t, n_valid):
        _check(name, (wq, wd, wm, xq, xd, xs, out), (u8, u16, u16, i8, f32, sums, f32))
        return types.none(wq, wd, wm, g, xq, xd, xs, out, t, n_valid), codegen

    typer.__name__ = name
    return intrinsic(typer)


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


# INTRINSICS[(format, n_tokens, isa)]: every variant this host can run (tests compare the ISAs).
INTRINSICS = {}
for _n in (1, 4):
    for _isa in ISAS:
        INTRINSICS[("q5_0", _n, _isa)] = _make_q5(False, _n, _isa)
        INTRINSICS[("q5_1", _n, _isa)] = _make_q5(True, _n, _isa)
        for _name, _fmt in K_FORMATS.items():
            INTRINSICS[(_name, _n, _isa)] = _make_k(_fmt, _n, _isa)
# BF16_TILES[(n_rows, n_tokens)]: BF16's tiles; its products are float from the start, so one
# form serves every ISA.
BF16_SHAPES = ((1, 1), (1, BF16_TILE_TOKENS), (BF16_SINGLE_ROWS, 1), (BF16_TILE_ROWS, BF16_TILE_TOKENS))
BF16_TILES = {shape: _make_bf16_intrinsic(*shape) for shape in BF16_SHAPES}


# ---------------------------------------------------------------------------------------------
# Repacking (formats.py's pack and row lookup) and the plain-numpy twins


def encode_quants(name: str, u: np.ndarray) -> np.ndarray:
    """(rows, n_blocks, W) u (rows a multiple of 8) -> (groups, bytes) as the kernels read them."""
    spans = K_FORMATS[name].spans if name in K_FORMATS else _NIBBLES_BIT
    stored = spans.encode(group_chunks(u))
    return stored.reshape(stored.shape[0], -1)


def decode_quants(name: str, wq: np.ndarray, width: int) -> np.ndarray:
    """(groups, bytes) -> (groups * 8, n_blocks, width) int32 u: encode_quants undone."""
    spans = K_FORMATS[name].spans if name in K_FORMATS else _NIBBLES_BIT
    stored = wq.reshape(wq.shape[0], -1, width // SPAN, spans.vectors, 32)
    return ungroup_chunks(spans.decode(stored))


def decode_meta(name: str, wmeta: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(groups, n_super * 128) i8 -> (scales, minima or None), each (groups * 8, n_super, 16)
    int32, one per 16 weights."""
    fmt = K_FORMATS[name]
    if fmt.meta_layout == "units32":
        both = ungroup_rows(wmeta, 16).astype(np.int32)
        return np.repeat(both[..., :8], 2, axis=-1), np.repeat(both[..., 8:], 2, axis=-1)
    values = ungroup_rows(wmeta, 16).astype(np.int32)
    if fmt.meta_layout == "nibbles16":
        values = values & 255
        return values & 15, values >> 4
    return values, None


def _halves_np(bits: np.ndarray, g: int) -> np.ndarray:
    """(groups, n_blocks * 8) f16 bits -> (n_blocks, 8) f32 of group g."""
    return bits[g].view(np.float16).astype(np.float32).reshape(-1, GROUP_ROWS)


def _k_twin(name, wq, wd, wdmin, wmeta, g, xq, xd, xbs, out, t, n_valid, n_tokens):
    fmt = K_FORMATS[name]
    u = decode_quants(name, wq[g : g + 1], QK_K).astype(np.int64)  # (8, n_super, 256)
    scales, minima = decode_meta(name, wmeta[g : g + 1])
    d_w = _halves_np(wd, g)
    dmin_w = _halves_np(wdmin, g) if fmt.has_min else None
    n_super = u.shape[1]
    for i in range(t, t + n_tokens):
        acc, acc_min = np.zeros(GROUP_ROWS, np.float32), np.zeros(GROUP_ROWS, np.float32)
        for b in range(n_super):
            x = xq[i, b * QK_K : (b + 1) * QK_K].astype(np.int64)
            bsums = xbs[i, b * 16 : (b + 1) * 16].astype(np.int64)
            dots = (u[:, b] * x).reshape(GROUP_ROWS, 16, 16).sum(axis=2)  # (8, 16) exact
            total = (dots * scales[:, b]).sum(axis=1) - fmt.offset * (scales[:, b] * bsums).sum(axis=1)
            acc = _fma_np(d_w[b] * xd[i, b], total.astype(np.float32), acc)
            if minima is not None:
                acc_min = _fma_np(dmin_w[b] * xd[i, b], (minima[:, b] * bsums).sum(axis=1).astype(np.float32), acc_min)
        result = acc - acc_min if minima is not None else acc
        out[i, g * GROUP_ROWS : g * GROUP_ROWS + n_valid] = result[:n_valid]


def _q5_twin(name, wq, wd, wm, g, xq, xd, xs, out, t, n_valid, n_tokens):
    u = decode_quants("q5", wq[g : g + 1], QK).astype(np.int64)  # (8, n_blocks, 32)
    d_w = _halves_np(wd, g)
    m_w = _halves_np(wm, g) if name == "q5_1" else None
    for i in range(t, t + n_tokens):
        acc, acc_m = np.zeros(GROUP_ROWS, np.float32), np.zeros(GROUP_ROWS, np.float32)
        for b in range(u.shape[1]):
            total = (u[:, b] * xq[i, b * QK : (b + 1) * QK].astype(np.int64)).sum(axis=1)
            if m_w is None:
                total = total - 16 * int(xs[i, b])
            acc = _fma_np(d_w[b] * xd[i, b], total.astype(np.float32), acc)
            if m_w is not None:
                acc_m = _fma_np(m_w[b], xs[i, b], acc_m)
        result = acc + acc_m if m_w is not None else acc
        out[i, g * GROUP_ROWS : g * GROUP_ROWS + n_valid] = result[:n_valid]


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


def _product(name: str, n_tokens: int):
    """The public product for one format and token count: its numpy twin when Numba's JIT is
    off, the intrinsic for this host's ISA in compiled code. Arguments: the weight arrays (K-quants:
    wq, wd, wdmin, wmeta; Q5_x: wq, wd, wm; an unread one may be any of its dtype), g, the
    activation arrays (xq, xd, and xbs / Q5_0's i32 block sums / Q5_1's f32 block sums), out,
    t, n_valid: out[t .. t + n_tokens - 1, 8g : 8g + n_valid] = rows 8g .. times rows t .."""
    kernel = INTRINSICS[(name, n_tokens, ISA)]
    if name in K_FORMATS:

        def product(wq, wd, wdmin, wmeta, g, xq, xd, xs, out, t, n_valid):
            _k_twin(name, wq, wd, wdmin, wmeta, g, xq, xd, xs, out, t, n_valid, n_tokens)

        @overload(product, inline="always")
        def _compiled(wq, wd, wdmin, wmeta, g, xq, xd, xs, out, t, n_valid):
            return lambda wq, wd, wdmin, wmeta, g, xq, xd, xs, out, t, n_valid: kernel(wq, wd, wdmin, wmeta, g, xq, xd, xs, out, t, n_valid)

    else:

        def product(wq, wd, wm, g, xq, xd, xs, out, t, n_valid):
            _q5_twin(name, wq, wd, wm, g, xq, xd, xs, out, t, n_valid, n_tokens)

        @overload(product, inline="always")
        def _compiled(wq, wd, wm, g, xq, xd, xs, out, t, n_valid):
            return lambda wq, wd, wm, g, xq, xd, xs, out, t, n_valid: kernel(wq, wd, wm, g, xq, xd, xs, out, t, n_valid)

    product.__name__ = product.__qualname__ = f"{name}_x8_tokens{n_tokens}"
    return product


q5_0_x8_tokens1, q5_0_x8_tokens4 = _product("q5_0", 1), _product("q5_0", 4)
q5_1_x8_tokens1, q5_1_x8_tokens4 = _product("q5_1", 1), _product("q5_1", 4)
q2_k_x8_tokens1, q2_k_x8_tokens4 = _product("q2_k", 1), _product("q2_k", 4)
q3_k_x8_tokens1, q3_k_x8_tokens4 = _product("q3_k", 1), _product("q3_k", 4)
q4_k_x8_tokens1, q4_k_x8_tokens4 = _product("q4_k", 1), _product("q4_k", 4)
q5_k_x8_tokens1, q5_k_x8_tokens4 = _product("q5_k", 1), _product("q5_k", 4)
q6_k_x8_tokens1, q6_k_x8_tokens4 = _product("q6_k", 1), _product("q6_k", 4)


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
