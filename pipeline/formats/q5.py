"""Q5_0 and Q5_1: blocks of 32 weights with a fifth bit, stored as spans.py lays them out,
against Q8_0 / Q8_1 activation blocks.

Block layouts, from ggml-common.h (block size in weights, bytes per block); d and m are f16,
i is a weight's index in its block:

    Q5_0: (32, 2 + 4 + 16)       d, qh: u32, qs[16]
          q_i = (qs[i % 16] >> 4 (i // 16)) & 15 | ((qh >> i) & 1) << 4;   w_i = d * (q_i - 16)
    Q5_1: (32, 2 + 2 + 4 + 16)   d, m, qh, qs as Q5_0;   w_i = d * q_i + m

Repacked (PackedMatrix.arrays) into groups of 8 rows, n_blocks = cols // 32:

    Q5_0: (quants u8 (groups, n_blocks * 160), d f16 bits u16 (groups, n_blocks * 8))
    Q5_1: (quants, d, m f16 bits u16 (groups, n_blocks * 8))

Per block, eight rows at a time: chunks summed in i16 four at a time (2 * 31 * 127 per pair
product), then one vpmaddwd by ones gives each row's exact int32 sum(u * x); Q5_0 subtracts
16 * sum(x), Q5_1 adds m * s_x as ggml's vec_dot_q5_1_q8_1:

    acc = fma(d_w * d_x, float(total), acc)          (Q5_1 also: acc_m = fma(m_w, s_x, acc_m))
"""

from __future__ import annotations

from functools import partial

import numba as nb
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ..vector import _F32, _I32, _V8_F32, _V8_I32, ISA, ISAS, _broadcast4, _check, _fma, _fma_np, _load_f16x8, _pair_products, _pair_sums, _row_pointer, _splat
from .base import F16_EXPONENT, GROUP_ROWS, QK, Format, scale_arrays, with_unread_minima
from .spans import (
    NIBBLES_BIT,
    _decoded_groups,
    _f16_bits,
    _group_indices,
    _halves,
    _halves_np,
    _padded,
    _store_rows,
    decode_quants,
    encode_quants,
    group_rows,
)

Q5_GROUP_BYTES = NIBBLES_BIT.vectors * 32  # one span per block of 32


# ---------------------------------------------------------------------------------------------
# Q5_0 and Q5_1: eight rows against Q8_0 / Q8_1 activations, a block of 32 at a time


def _codegen_q5(has_m: bool, n_tokens: int, isa: str):
    run = 32767 // (2 * NIBBLES_BIT.u_max * 127)  # 4 chunks

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
            chunks = [NIBBLES_BIT.chunk(builder, span, c) for c in range(8)]
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


# INTRINSICS[(format, n_tokens, isa)]: every variant this host can run (tests compare the ISAs).
INTRINSICS = {(f"q5_{int(has_m)}", n, isa): _make_q5(has_m, n, isa) for n in (1, 4) for isa in ISAS for has_m in (False, True)}


def _q5_twin(name, wq, wd, wm, g, xq, xd, xs, out, t, n_valid, n_tokens):
    u = decode_quants(NIBBLES_BIT, wq[g : g + 1], QK).astype(np.int64)  # (8, n_blocks, 32)
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



def _product(name: str, n_tokens: int):
    """The public product for one format and token count: its numpy twin when Numba's JIT is
    off, the intrinsic for this host's ISA in compiled code. Arguments: wq, wd, wm (Q5_0: any
    u16 array, unread), g, xq, xd, Q5_0's i32 / Q5_1's f32 block sums, out, t, n_valid:
    out[t .. t + n_tokens - 1, 8g : 8g + n_valid] = rows 8g .. times rows t .."""
    kernel = INTRINSICS[(name, n_tokens, ISA)]

    def product(wq, wd, wm, g, xq, xd, xs, out, t, n_valid):
        _q5_twin(name, wq, wd, wm, g, xq, xd, xs, out, t, n_valid, n_tokens)

    @overload(product, inline="always")
    def _compiled(wq, wd, wm, g, xq, xd, xs, out, t, n_valid):
        return lambda wq, wd, wm, g, xq, xd, xs, out, t, n_valid: kernel(wq, wd, wm, g, xq, xd, xs, out, t, n_valid)

    product.__name__ = product.__qualname__ = f"{name}_x8_tokens{n_tokens}"
    return product


q5_0_x8_tokens1, q5_0_x8_tokens4 = _product("q5_0", 1), _product("q5_0", 4)
q5_1_x8_tokens1, q5_1_x8_tokens4 = _product("q5_1", 1), _product("q5_1", 4)


def _grouped_matmul(tokens1, tokens4):
    """The compiled product of one format from its eight-row products: prange over groups of
    eight weight rows, token rows four at a time, then the rest one at a time (the same float
    operations either way). Numba's cache tells these kernels apart by the products they close
    over."""

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


matmul_q5_0 = _grouped_matmul(q5_0_x8_tokens1, q5_0_x8_tokens4)
matmul_q5_1 = _grouped_matmul(q5_1_x8_tokens1, q5_1_x8_tokens4)


# ---------------------------------------------------------------------------------------------
# Repacking from GGUF block bytes (load time) and row lookup (token embeddings), in numpy with
# gguf-py's float steps, so rows equal gguf.quants.dequantize exactly


def quants_q5(blocks: np.ndarray, head: int) -> np.ndarray:
    """(rows, n_blocks, block_bytes) Q5_0/Q5_1 blocks (`head` bytes of d, and m, before qh) ->
    (rows, n_blocks, 32) int32 u: each weight's stored integer."""
    qs = blocks[..., head + 4 :].astype(np.int32)
    qh = blocks[..., head : head + 4].copy().view("<u4").astype(np.int64)  # (rows, n_blocks, 1)
    return np.concatenate((qs & 15, qs >> 4), axis=-1) | (((qh >> np.arange(32)) & 1) << 4).astype(np.int32)


def pack_q5(raw: np.ndarray, scale_offsets: tuple[int, ...]) -> tuple[int, int, tuple[np.ndarray, ...]]:
    """(rows, cols, (quants, d[, m])) of a Q5_0 or Q5_1 tensor whose blocks hold f16 fields at
    `scale_offsets` (d, and Q5_1's m) before qh."""
    rows = raw.shape[0]
    head = 2 * len(scale_offsets)
    blocks = _padded(raw.reshape(rows, -1, head + 4 + QK // 2))
    quants = encode_quants(NIBBLES_BIT, quants_q5(blocks, head))
    return rows, blocks.shape[1] * QK, (quants, *(group_rows(_f16_bits(blocks, at)) for at in scale_offsets))


def packed_nbytes_q5(rows: int, cols: int, block_bytes: int) -> int:
    """What pack_q5() makes: rows padded to whole groups, blocks as stored."""
    return -(-rows // GROUP_ROWS) * GROUP_ROWS * cols // QK * block_bytes


def rows_q5(arrays: tuple[np.ndarray, ...], cols: int, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` of a Q5_0 (w = d * (u - 16)) or Q5_1 (w = d * u + m) matrix as f32."""
    f32 = np.float32
    groups, pick = _decoded_groups(ids)
    u = decode_quants(NIBBLES_BIT, arrays[0][groups], QK)[pick]
    d = _halves(arrays[1], groups, pick)[..., None]
    if len(arrays) == 2:
        return (d * (u - 16).astype(f32)).reshape(len(ids), -1)
    return (d * u.astype(f32) + _halves(arrays[2], groups, pick)[..., None]).reshape(len(ids), -1)


def record(ttype: QT, scale_offsets: tuple[int, ...], kernel, activations) -> Format:
    """The registry's record of Q5_0 or Q5_1, whose GGUF blocks start with the f16 fields at
    scale_offsets (d, and Q5_1's m)."""
    return Format(ttype, scale_offsets, GROUP_ROWS, partial(pack_q5, scale_offsets=scale_offsets),
                  partial(packed_nbytes_q5, block_bytes=GGML_QUANT_SIZES[ttype][1]), kernel, with_unread_minima,
                  activations, rows_q5, scale_arrays(scale_offsets), F16_EXPONENT, "block scales")
