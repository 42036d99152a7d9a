"""The K-quants (Q2_K .. Q6_K): superblocks of 256 weights with 6-bit or 4-bit sub-block scales,
stored as spans.py lays them out, against Q8_K activation superblocks.

Block layouts, from ggml-common.h (block size in weights, bytes per block); d and dmin are f16,
i is a weight's index in its block:

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

Repacked (PackedMatrix.arrays) into groups of 8 rows (the last group padded with zero rows);
n_super = cols // 256:

    Q2_K, Q4_K, Q5_K: (quants u8 (groups, n_super * 8 * quant_bytes), d u16 (groups, n_super * 8),
                       dmin u16 (groups, n_super * 8), meta i8 (groups, n_super * 128))
    Q3_K, Q6_K:       (quants, d, meta)

Quants take what the file's do (quant_bytes per row and superblock: 64, 96, 128, 160, 192) and
the scales stay f16; only the 12 packed bytes of 6-bit scales of Q3_K, Q4_K and Q5_K become 16
plain ones. `meta`, per group and superblock: 128 bytes i8 of scales [sub-block][row] (Q3_K:
sc - 32; Q6_K as stored) and for Q4_K/Q5_K 8 scales then 8 minima per row ([8][8] each), Q2_K
its scale bytes as stored ([16][8], scale nibble and minimum nibble).

Chunks are summed in i16 as long as no sum can overflow (2 * u_max * 127 per chunk: 8 chunks of
Q4_K, 2 of Q6_K), then one vpmaddwd by the rows' scale of those weights gives each row's exact
int32 (the A76's sdot path sums a sub-block's chunks in i32 and multiplies by the scales after,
and Q4_K's and Q5_K's minima by each sub-block's x total; the same integers):

    total_k = sum over sub-blocks s of sc[k, s] * sum(u * x) - zero_point * sum_s sc[k, s] * bsum_s
    minima_k = sum_s m[k, s] * bsum_s                    (Q2_K, Q4_K, Q5_K; bsum: 16 x's summed)
    acc = fma(d_w * d_x, float(total), acc);  acc_min = fma(dmin_w * d_x, float(minima), acc_min)

per superblock, as ggml's vec_dot_q*_K_q8_K; the row's result is acc - acc_min. The integer sums
are exact (|sc * u * x| * 256 < 2**31), so the float steps alone fix the result, and they are
the same for a row whichever rows share its group or its batch.

The activations are ggml's block_q8_K (256, 4 + 256 + 32): d f32, qs[256] i8, bsums[16] i16, the
sum of each 16 qs.
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
    _V8_I8,
    _V8_I32,
    _V32_I8,
    _V16_I8,
    _V16_I16,
    _V8_I16,
    ISA,
    ISAS,
    QUAD_DOT_ISAS,
    _after,
    _bits,
    _broadcast4,
    _check,
    _const,
    _fma,
    _fma_np,
    _load,
    _load_f16x8,
    _pair_dot,
    _pair_products,
    _quad_dot,
    _row_pointer,
    _shuffle,
    _splat,
)
from .base import F16_EXPONENT, GROUP_ROWS, QK_K, Format, scale_arrays
from .spans import (
    NIBBLES_BIT,
    SPAN,
    _bit_planes,
    _decoded_groups,
    _f16_bits,
    _group_indices,
    _halves,
    _halves_np,
    _padded,
    _Spans,
    _store_rows,
    decode_quants,
    encode_quants,
    group_rows,
    ungroup_rows,
)

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

    def scale_bytes(self, builder, meta, s, loaded=None):
        """<8 x i8>: row k's scale of sub-block s in lane k; loaded: meta's 32 bytes holding it,
        if loaded already."""
        if loaded is None:
            eight = _meta_vector(builder, meta, 8 * s, _V8_I8)
        else:
            eight = _shuffle(builder, loaded, range(8 * (s % 4), 8 * (s % 4) + 8))
        return _bits(builder, eight, 0, 15) if self.meta_layout == "nibbles16" else eight

    def scales(self, builder, meta, s):
        """<16 x i16>: row k's scale of sub-block s in lanes 2k, 2k + 1."""
        return _dup8(builder, self.scale_bytes(builder, meta, s))

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


K_FORMATS = {
    "q2_k": _KFormat("q2_k", _Spans(2, None), 4, 0, True, "nibbles16"),
    "q3_k": _KFormat("q3_k", _Spans(2, "bit"), 4, 4, False, "signed16"),
    "q4_k": _KFormat("q4_k", _Spans(4, None), 8, 0, True, "units32"),
    "q5_k": _KFormat("q5_k", NIBBLES_BIT, 8, 0, True, "units32"),
    "q6_k": _KFormat("q6_k", _Spans(4, "pair"), 4, 32, False, "signed16"),
}
META_BYTES = 16  # bytes of scales (and minima) per row per superblock


# ---------------------------------------------------------------------------------------------
# K-quants: eight rows against Q8_K activations



def _quad_dot_scaled(builder, fmt: _KFormat, span, words, first, row_scales, totals):
    """totals (one <8 x i32> per token row) plus each row's scale (row_scales, i32) times its
    exact sum over the chunks first .. first + unit_chunks - 1 of the span (u * x): sdot, i32 all
    the way, so no run is cut short for room in i16. words: each token row's 32 activation bytes
    of the span."""
    quads = [ir.Constant(_V8_I32, [0] * 8)] * len(words)
    for c in range(first, first + fmt.unit_chunks):
        chunk = fmt.spans.chunk(builder, span, c)
        quads = [_quad_dot(builder, q, chunk, builder.bitcast(_shuffle(builder, w, [c] * 8), _V32_I8)) for q, w in zip(quads, words)]
    return [builder.add(total, builder.mul(q, row_scales)) for total, q in zip(totals, quads)]


def _quad_dot_spans(context, builder, fmt: _KFormat, block, meta, x_blocks):
    """Each token row's <8 x i32> total over the superblock at `block` of scale * sum(u * x), one
    span after another: an empty asm after each span's sums keeps LLVM's scheduler from
    interleaving the spans until the registers spill."""
    const = lambda value: context.get_constant(types.intp, value)  # noqa: E731
    totals = [ir.Constant(_V8_I32, [0] * 8)] * len(x_blocks)
    scale_vectors = {}  # the sub-blocks' scale bytes, 32 at a time (one ldp), loaded where first needed
    for p in range(QK_K // SPAN):
        span = builder.gep(block, [const(p * fmt.spans.vectors * 32)])
        words = [_load(builder, builder.gep(x_block, [const(p * SPAN)]), _V8_I32) for x_block in x_blocks]
        for first in range(0, 8, fmt.unit_chunks):
            s = (8 * p + first) // fmt.unit_chunks  # the sub-block
            if s // 4 not in scale_vectors:
                scale_vectors[s // 4] = _meta_vector(builder, meta, 32 * (s // 4), _V32_I8)
            row_scales = builder.sext(fmt.scale_bytes(builder, meta, s, scale_vectors[s // 4]), _V8_I32)
            totals = _quad_dot_scaled(builder, fmt, span, words, first, row_scales, totals)
        if p + 1 < QK_K // SPAN:
            _after(builder, totals)
    return totals


def _minima(builder, fmt: _KFormat, meta, bsums, bsum_pairs, isa):
    """<8 x i32>: each row's sum over its sub-blocks of minimum * (the sub-block's sum of x)."""
    if isa in QUAD_DOT_ISAS and fmt.meta_layout == "units32":
        # a 32-weight sub-block's two bsums added first (at most 32 * 127: still i16), then one
        # widening multiply-add per sub-block: smlal by lane
        both = _load(builder, bsums, _V16_I16)
        totals = builder.add(_shuffle(builder, both, range(0, 16, 2)), _shuffle(builder, both, range(1, 16, 2)))
        minima = ir.Constant(_V8_I32, [0] * 8)
        minima_bytes = [_meta_vector(builder, meta, 64 + 32 * j, _V32_I8) for j in range(2)]  # [sub-block][row], 32 at a time (one ldp)
        for p in range(8):
            m = builder.sext(builder.sext(_shuffle(builder, minima_bytes[p // 4], range(8 * (p % 4), 8 * (p % 4) + 8)), _V8_I16), _V8_I32)
            x_total = builder.sext(_shuffle(builder, totals, [p] * 8), _V8_I32)
            minima = builder.add(minima, builder.mul(m, x_total))
        return minima
    minima = None
    for p in range(8):
        term = _pair_dot(builder, fmt.pairs(builder, meta, p, True), bsum_pairs[p], isa)
        minima = term if minima is None else builder.add(minima, term)
    return minima


class _KCode:
    """The IR of one call of a K-quant product (eight weight rows of group g against n_tokens
    activation rows), built in steps: the arguments as row pointers, then per superblock the
    integer totals and their scaling into the accumulators, then the stores."""

    def __init__(self, fmt: _KFormat, n_tokens: int, isa: str, context, builder, signature, args):
        self.fmt, self.n_tokens, self.isa, self.context, self.builder = fmt, n_tokens, isa, context, builder
        wq, wd, wdmin, wmeta, _, xq, xd, xbs, out, _, _ = args  # wdmin: unread without minima
        wq_t, wd_t, wdmin_t, wmeta_t, _, xq_t, xd_t, xbs_t, out_t, _, _ = signature.args
        self.g, self.rows, self.n_valid = _group_indices(context, builder, signature, args, n_tokens)
        g, rows = self.g, self.rows
        self.w_group, _ = _row_pointer(context, builder, wq_t, wq, g)
        self.d_group, wd_ary = _row_pointer(context, builder, wd_t, wd, g)
        self.dmin_group = _row_pointer(context, builder, wdmin_t, wdmin, g)[0] if fmt.has_min else None
        self.meta_group, _ = _row_pointer(context, builder, wmeta_t, wmeta, g)
        self.n_super = builder.udiv(cgutils.unpack_tuple(builder, wd_ary.shape, 2)[1], self.const(GROUP_ROWS))
        self.x_rows = [_row_pointer(context, builder, xq_t, xq, i)[0] for i in rows]
        self.xd_rows = [builder.bitcast(_row_pointer(context, builder, xd_t, xd, i)[0], _F32.as_pointer()) for i in rows]
        self.xbs_rows = [_row_pointer(context, builder, xbs_t, xbs, i)[0] for i in rows]
        zero = ir.Constant(_V8_F32, [0.0] * 8)
        self.accs = [cgutils.alloca_once_value(builder, zero) for _ in rows]
        self.acc_mins = [cgutils.alloca_once_value(builder, zero) for _ in rows]
        self.out, self.out_t = out, out_t

    def const(self, value):
        return self.context.get_constant(types.intp, value)

    def superblock(self, b) -> None:
        """Superblock b of every row into the accumulators."""
        builder, const, fmt = self.builder, self.const, self.fmt
        block = builder.gep(self.w_group, [builder.mul(b, const(QK_K // SPAN * fmt.spans.vectors * 32))])
        meta = builder.gep(self.meta_group, [builder.mul(b, const(META_BYTES * GROUP_ROWS))])
        x_blocks = [builder.gep(x_row, [builder.mul(b, const(QK_K))]) for x_row in self.x_rows]
        totals = self._totals(block, meta, x_blocks)
        w_scales = _load_f16x8(builder, builder.gep(self.d_group, [builder.mul(b, const(2 * GROUP_ROWS))]))
        w_minima = None
        if fmt.has_min:
            w_minima = _load_f16x8(builder, builder.gep(self.dmin_group, [builder.mul(b, const(2 * GROUP_ROWS))]))
        for i in range(self.n_tokens):
            self._accumulate(i, b, meta, totals[i], w_scales, w_minima)

    def _totals(self, block, meta, x_blocks) -> list:
        """Per token row, <8 x i32>: each weight row's sum over sub-blocks of scale * sum(u * x)."""
        builder, const, fmt, isa, n_tokens = self.builder, self.const, self.fmt, self.isa, self.n_tokens
        if isa in QUAD_DOT_ISAS:
            return _quad_dot_spans(self.context, builder, fmt, block, meta, x_blocks)
        totals = [ir.Constant(_V8_I32, [0] * 8)] * n_tokens
        for p in range(QK_K // SPAN):
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
        return totals

    def _accumulate(self, i: int, b, meta, total, w_scales, w_minima) -> None:
        """Token row i's total (less the zero point's share) and minima, scaled, into its accumulators."""
        builder, fmt = self.builder, self.fmt
        bsums = builder.gep(self.xbs_rows[i], [builder.mul(b, self.const(2 * QK_K // 16))])
        bsum_pairs = [_broadcast4(builder, builder.gep(bsums, [self.const(4 * p)])) for p in range(8)]
        bsum_pairs = [builder.bitcast(v, _V16_I16) for v in bsum_pairs]
        if fmt.offset:
            correction = self._scaled_bsums(meta, bsum_pairs, False)
            total = builder.sub(total, builder.mul(correction, _const(_V8_I32, fmt.offset)))
        x_scale = _splat(builder, builder.load(builder.gep(self.xd_rows[i], [b])), _V8_F32)
        scale = builder.fmul(w_scales, x_scale)
        builder.store(_fma(builder, scale, builder.sitofp(total, _V8_F32), builder.load(self.accs[i])), self.accs[i])
        if fmt.has_min:
            minima = _minima(builder, fmt, meta, bsums, bsum_pairs, self.isa)
            min_scale = builder.fmul(w_minima, x_scale)
            builder.store(_fma(builder, min_scale, builder.sitofp(minima, _V8_F32), builder.load(self.acc_mins[i])),
                          self.acc_mins[i])

    def _scaled_bsums(self, meta, bsum_pairs, minima: bool):
        """<8 x i32>: per weight row, the sum over sub-blocks of its scale (minimum) * bsum."""
        total = None
        for p in range(8):
            term = _pair_dot(self.builder, self.fmt.pairs(self.builder, meta, p, minima), bsum_pairs[p], self.isa)
            total = term if total is None else self.builder.add(total, term)
        return total

    def store(self) -> None:
        """Each token row's acc (less acc_min) into out."""
        builder = self.builder
        results = []
        for i in range(self.n_tokens):
            result = builder.load(self.accs[i])
            results.append(builder.fsub(result, builder.load(self.acc_mins[i])) if self.fmt.has_min else result)
        _store_rows(self.context, builder, self.out_t, self.out, self.rows, self.g, self.n_valid, results)


def _codegen_k(fmt: _KFormat, n_tokens: int, isa: str):
    def codegen(context, builder, signature, args):
        code = _KCode(fmt, n_tokens, isa, context, builder, signature, args)
        with cgutils.for_range(builder, code.n_super) as loop:
            code.superblock(loop.index)
        code.store()
        return context.get_dummy_value()

    return codegen


def _make_k(fmt: _KFormat, n_tokens: int, isa: str):
    codegen = _codegen_k(fmt, n_tokens, isa)
    u8, i8, i16, u16, f32 = types.uint8, types.int8, types.int16, types.uint16, types.float32
    name = f"{fmt.name}_x8_tokens{n_tokens}_{isa}"

    def typer(typingctx, wq, wd, wdmin, wmeta, g, xq, xd, xbs, out, t, n_valid):
        _check(name, (wq, wd, wdmin, wmeta, xq, xd, xbs, out), (u8, u16, u16, i8, i8, f32, i16, f32))
        return types.none(wq, wd, wdmin, wmeta, g, xq, xd, xbs, out, t, n_valid), codegen

    typer.__name__ = name
    return intrinsic(typer)


# INTRINSICS[(format, n_tokens, isa)]: every variant this host can run (tests compare the ISAs).
INTRINSICS = {(name, n, isa): _make_k(fmt, n, isa) for n in (1, 4) for isa in ISAS for name, fmt in K_FORMATS.items()}


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



def _k_twin(name, wq, wd, wdmin, wmeta, g, xq, xd, xbs, out, t, n_valid, n_tokens):
    fmt = K_FORMATS[name]
    u = decode_quants(fmt.spans, wq[g : g + 1], QK_K).astype(np.int64)  # (8, n_super, 256)
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



def _product(name: str, n_tokens: int):
    """The public product for one format and token count: its numpy twin when Numba's JIT is
    off, the intrinsic for this host's ISA in compiled code. Arguments: wq, wd, wdmin, wmeta
    (where a format has no dmin, any u16 array, unread), g, xq, xd, xbs, out, t, n_valid:
    out[t .. t + n_tokens - 1, 8g : 8g + n_valid] = rows 8g .. times rows t .."""
    kernel = INTRINSICS[(name, n_tokens, ISA)]

    def product(wq, wd, wdmin, wmeta, g, xq, xd, xs, out, t, n_valid):
        _k_twin(name, wq, wd, wdmin, wmeta, g, xq, xd, xs, out, t, n_valid, n_tokens)

    @overload(product, inline="always")
    def _compiled(wq, wd, wdmin, wmeta, g, xq, xd, xs, out, t, n_valid):
        return lambda wq, wd, wdmin, wmeta, g, xq, xd, xs, out, t, n_valid: kernel(wq, wd, wdmin, wmeta, g, xq, xd, xs, out, t, n_valid)

    product.__name__ = product.__qualname__ = f"{name}_x8_tokens{n_tokens}"
    return product


q2_k_x8_tokens1, q2_k_x8_tokens4 = _product("q2_k", 1), _product("q2_k", 4)
q3_k_x8_tokens1, q3_k_x8_tokens4 = _product("q3_k", 1), _product("q3_k", 4)
q4_k_x8_tokens1, q4_k_x8_tokens4 = _product("q4_k", 1), _product("q4_k", 4)
q5_k_x8_tokens1, q5_k_x8_tokens4 = _product("q5_k", 1), _product("q5_k", 4)
q6_k_x8_tokens1, q6_k_x8_tokens4 = _product("q6_k", 1), _product("q6_k", 4)


def _grouped_matmul(tokens1, tokens4):
    """The compiled product of one format from its eight-row products: prange over groups of
    eight weight rows, token rows four at a time, then the rest one at a time (the same float
    operations either way). Numba's cache tells these kernels apart by the products they close
    over."""

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

    return kernel


matmul_q2_k = _grouped_matmul(q2_k_x8_tokens1, q2_k_x8_tokens4)
matmul_q3_k = _grouped_matmul(q3_k_x8_tokens1, q3_k_x8_tokens4)
matmul_q4_k = _grouped_matmul(q4_k_x8_tokens1, q4_k_x8_tokens4)
matmul_q5_k = _grouped_matmul(q5_k_x8_tokens1, q5_k_x8_tokens4)
matmul_q6_k = _grouped_matmul(q6_k_x8_tokens1, q6_k_x8_tokens4)


def k_quant_weights(arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """pack_k()'s arrays as the K-quant products take them: (wq, wd, wdmin, wmeta),
    d standing in (unread) where a format has no dmin."""
    wq, wd, wmeta = arrays[0], arrays[1], arrays[-1]
    return wq, wd, arrays[2] if len(arrays) == 4 else wd, wmeta


# ---------------------------------------------------------------------------------------------
# Activations (per product, compiled): Q8_K


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


# Rows from which Q8_K quantizing runs a thread per row: fewer than Q8_PARALLEL_ROWS, since a
# Q8_K row is a scalar loop several times the cost of a Q8 row in vector IR, so waking the
# threads pays off sooner (tests/bench/bench_parallel_rows.py).
Q8_K_PARALLEL_ROWS = 8


def quantize_q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (T, K) f32, K a multiple of 256 -> (qs (T, K) i8, d (T, K // 256) f32, bsums (T, K // 16) i16)."""
    n_rows, n = x.shape
    qs = np.empty((n_rows, n), np.int8)
    d = np.empty((n_rows, n // QK_K), np.float32)
    bsums = np.empty((n_rows, n // 16), np.int16)
    (_quantize_q8_k_parallel if n_rows >= Q8_K_PARALLEL_ROWS else _quantize_q8_k)(x, qs, d, bsums)
    return qs, d, bsums


def q8_k_blocks(acts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The K-quants' activations: Q8_K superblocks (qs, d, bsums), made once per Activations."""
    return acts.form(quantize_q8_k)


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
    return rows, blocks.shape[1] * QK_K, (encode_quants(K_FORMATS[name].spans, quants(blocks)), *scales, group_rows(meta(blocks)))


def packed_nbytes_k(rows: int, cols: int, name: str) -> int:
    """What pack_k() makes: rows padded to whole groups, quants as stored, f16 scales as stored,
    and the sub-block scales in 16 bytes per superblock."""
    fmt = K_FORMATS[name]
    return -(-rows // GROUP_ROWS) * GROUP_ROWS * cols // QK_K * (fmt.quant_bytes + META_BYTES + (4 if fmt.has_min else 2))


def rows_k(arrays: tuple[np.ndarray, ...], cols: int, ids: np.ndarray, name: str) -> np.ndarray:
    """Rows `ids` of a K-quant matrix as f32: d * sc * (u - zero point) [- dmin * mn]."""
    f32 = np.float32
    fmt = K_FORMATS[name]
    n = len(ids)
    groups, pick = _decoded_groups(ids)
    u = decode_quants(fmt.spans, arrays[0][groups], QK_K)[pick].reshape(n, -1, 16, 16)
    scales, minima = (None if m is None else m[pick].astype(f32)[..., None] for m in decode_meta(name, arrays[-1][groups]))
    d = _halves(arrays[1], groups, pick)[..., None, None]
    if not fmt.has_min:  # Q3_K: q = u - 4, scale sc - 32 (stored so); Q6_K: q = u - 32
        return ((d * scales) * (u - fmt.offset).astype(f32)).reshape(n, -1)
    dmin = _halves(arrays[2], groups, pick)[..., None, None]
    return ((d * scales) * u.astype(f32) - dmin * minima).reshape(n, -1)


def record(ttype: QT, scale_offsets: tuple[int, ...], kernel, quants, meta) -> Format:
    """The registry's record of a K-quant whose GGUF blocks hold the f16 fields at scale_offsets
    (d, and dmin where it has one); `quants` and `meta` read a block's integers and sub-block
    scales."""
    name = ttype.name.lower()
    pack = partial(pack_k, name=name, block_bytes=GGML_QUANT_SIZES[ttype][1], quants=quants, scale_offsets=scale_offsets,
                   meta=meta)
    return Format(ttype, scale_offsets, GROUP_ROWS, pack, partial(packed_nbytes_k, name=name), kernel, k_quant_weights,
                  q8_k_blocks, partial(rows_k, name=name), scale_arrays(scale_offsets), F16_EXPONENT, "block scales")
