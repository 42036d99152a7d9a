"""Dot products of quantized weight rows with 8-bit activation rows, written as LLVM vector IR.

Numba types every integer operation on narrow integers as 64-bit (uint8 & uint8 is uint64),
so a plain loop over nibbles and int8 activations compiles to 64-bit lanes, four to a register.
Here the arithmetic is written once on LLVM vector types and the loop over a row's blocks is
emitted in IR, so nothing leaves vector registers between blocks.

Each block of 32 Q4_1 or Q8_0 weights is computed as in ggml-cpu's vec_dot_q4_1_q8_1 /
q8_0_q8_0 (AVX2 branch): the 32 integer products are summed in groups of four into eight int32 lanes
(lane k holds weights 4k .. 4k + 3), the lanes are converted to float and accumulated with one
fused multiply-add by the block's scale product, acc = fma(d_w * d_x, lanes, acc), and after
the last block the eight lanes are summed as ggml's hsum_float_8 does:
((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)). Q4_1 adds sum(m_w * s_x) over the blocks,
one scalar fma per block, where s_x = d_x * sum(q_x) is the activation block's sum.

The integer lanes are exact, so two instruction sequences give them, with the same bits:
  - "avx2": vpmaddubsw + vpmaddwd (ggml's mul_sum_us8_pairs / mul_sum_i8_pairs; signed weights
    use vpsignb to move their sign onto the activations), chosen when the host has AVX2;
  - "generic": widen to <32 x i32>, multiply, add four strided shuffles; LLVM lowers it to the
    target's SIMD (NEON on a 64-bit Raspberry Pi).
Everything after the lanes is the same IR for both, so the two give identical floats
(tests/test_quants.py compares them). Q4_0 is computed eight weight rows at a time instead (the
last section below), which is how caravan overtakes ggml's row-at-a-time kernels on it.

Every function takes token rows t, t + 1, ... of the activations against one weight row r: the
"_x4" forms unpack each weight block once for four token rows (prefill, batched decode). A
token row's result is the same expression whether computed alone or in a group of four, which
keeps a sequence's logits independent of the batch around it.

Each has a plain-numpy twin with the same name, which runs when Numba's JIT is disabled
(NUMBA_DISABLE_JIT=1, as one of the tests does); compiled code gets the IR through `overload`.
They trust their inputs: the public kernels in quants.py check shapes before calling them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic, overload

QK = 32  # weights per block

_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_F32 = ir.FloatType()
_V16_I8 = ir.VectorType(_I8, 16)
_V32_I8 = ir.VectorType(_I8, 32)
_V16_I16 = ir.VectorType(_I16, 16)
_V8_I32 = ir.VectorType(_I32, 8)
_V32_I32 = ir.VectorType(_I32, 32)
_V8_F32 = ir.VectorType(_F32, 8)


def host_has_avx2() -> bool:
    """Whether the code Numba generates may use AVX2: the CPU Numba compiles for (NUMBA_CPU_NAME
    and NUMBA_CPU_FEATURES when set, for portable caches) or else the host's."""
    if config.CPU_NAME:
        return "+avx2" in (config.CPU_FEATURES or "").split(",")
    return bool(llvm.get_host_cpu_features().get("avx2", False))


ISAS = ("avx2", "generic") if host_has_avx2() else ("generic",)
ISA = ISAS[0]  # the one the kernels use


# ---------------------------------------------------------------------------------------------
# IR building blocks


def _call(builder, name, return_type, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(return_type, [a.type for a in args]), name)
    return builder.call(fn, args)


def _splat(builder, scalar, vector_type):
    """A vector of `scalar` in every lane."""
    one = builder.insert_element(ir.Constant(vector_type, ir.Undefined), scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vector_type, ir.Undefined), ir.Constant(ir.VectorType(_I32, vector_type.count), [0] * vector_type.count))


def _load(builder, pointer, vector_type):
    """Unaligned load of `vector_type` at an i8 pointer."""
    return builder.load(builder.bitcast(pointer, vector_type.as_pointer()), align=1)


def _nibbles(builder, pointer):
    """16 packed bytes -> <32 x i8> of nibbles 0..15, in GGML's order: the low nibbles are
    weights 0..15, the high nibbles 16..31."""
    packed = _load(builder, pointer, _V16_I8)
    low = builder.and_(packed, ir.Constant(_V16_I8, [15] * 16))
    high = builder.lshr(packed, ir.Constant(_V16_I8, [4] * 16))
    return builder.shuffle_vector(low, high, ir.Constant(_V32_I32, list(range(32))))


def _lanes_generic(builder, weights, acts, unsigned_weights):
    """<8 x i32>: lane k = sum(weights[j] * acts[j] for j in 4k .. 4k + 3)."""
    w32 = builder.zext(weights, _V32_I32) if unsigned_weights else builder.sext(weights, _V32_I32)
    products = builder.mul(w32, builder.sext(acts, _V32_I32))
    undef = ir.Constant(_V32_I32, ir.Undefined)
    parts = [builder.shuffle_vector(products, undef, ir.Constant(_V8_I32, list(range(i, 32, 4)))) for i in range(4)]
    return builder.add(builder.add(parts[0], parts[1]), builder.add(parts[2], parts[3]))


def _lanes_avx2(builder, weights, acts, unsigned_weights):
    """The same lanes as _lanes_generic with vpmaddubsw (u8 x s8 pairs into i16; at most
    2 * 255 * 127 in magnitude for nibbles and 2 * 128 * 127 for |int8|, so no saturation)
    and vpmaddwd against ones (i16 pairs into i32)."""
    if not unsigned_weights:  # ggml's mul_sum_i8_pairs: |w| times x with w's sign
        acts = _call(builder, "llvm.x86.avx2.psign.b", _V32_I8, [acts, weights])
        weights = _call(builder, "llvm.abs.v32i8", _V32_I8, [weights, ir.Constant(ir.IntType(1), 0)])
    pairs = _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16_I16, [weights, acts])
    return _call(builder, "llvm.x86.avx2.pmadd.wd", _V8_I32, [pairs, ir.Constant(_V16_I16, [1] * 16)])


def _hsum(builder, acc):
    """ggml's hsum_float_8 order: ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))."""
    undef = ir.Constant(_V8_F32, ir.Undefined)
    v4 = ir.VectorType(_F32, 4)
    quad = builder.fadd(
        builder.shuffle_vector(acc, undef, ir.Constant(ir.VectorType(_I32, 4), [0, 1, 2, 3])),
        builder.shuffle_vector(acc, undef, ir.Constant(ir.VectorType(_I32, 4), [4, 5, 6, 7])),
    )
    undef4 = ir.Constant(v4, ir.Undefined)
    pair = builder.fadd(
        builder.shuffle_vector(quad, undef4, ir.Constant(ir.VectorType(_I32, 2), [0, 1])),
        builder.shuffle_vector(quad, undef4, ir.Constant(ir.VectorType(_I32, 2), [2, 3])),
    )
    return builder.fadd(builder.extract_element(pair, ir.Constant(_I32, 0)), builder.extract_element(pair, ir.Constant(_I32, 1)))


def _fma(builder, a, b, c):
    suffix = f"v{a.type.count}f32" if isinstance(a.type, ir.VectorType) else "f32"
    return _call(builder, f"llvm.fma.{suffix}", a.type, [a, b, c])


# ---------------------------------------------------------------------------------------------
# Row dot products: one weight row against n_tokens activation rows


@dataclass(frozen=True)
class _Format:
    name: str
    qs_bytes: int  # bytes of weights per block in the repacked qs array
    unpack: Callable  # (builder, i8* to the block's qs) -> <32 x i8> weights
    unsigned: bool  # weights 0 .. 15 (Q4_1's nibbles) rather than signed int8
    has_m: bool  # Q4_1's per-block minimum


_FORMATS = {
    "q8_0": _Format("q8_0", QK, lambda builder, pointer: _load(builder, pointer, _V32_I8), False, False),
    "q4_1": _Format("q4_1", QK // 2, _nibbles, True, True),
}


def _row_pointer(context, builder, array_type, array, row):
    """i8* to array[row, 0] of a C-contiguous 2-D array."""
    ary = context.make_array(array_type)(context, builder, array)
    zero = context.get_constant(types.intp, 0)
    pointer = cgutils.get_item_pointer(context, builder, array_type, ary, [row, zero], wraparound=False)
    return builder.bitcast(pointer, _I8.as_pointer()), ary


def _codegen_rows(fmt: _Format, n_tokens: int, isa: str):
    lanes = _lanes_avx2 if isa == "avx2" else _lanes_generic

    def codegen(context, builder, signature, args):
        if fmt.has_m:
            wq, wd, wm, r, xq, xd, xs, t = args
            wq_t, wd_t, wm_t, r_t, xq_t, xd_t, xs_t, t_t = signature.args
        else:
            wq, wd, r, xq, xd, t = args
            wq_t, wd_t, r_t, xq_t, xd_t, t_t = signature.args
        r = context.cast(builder, r, r_t, types.intp)
        t = context.cast(builder, t, t_t, types.intp)
        rows = [builder.add(t, context.get_constant(types.intp, i)) for i in range(n_tokens)]
        w_row, _ = _row_pointer(context, builder, wq_t, wq, r)
        wd_row, wd_ary = _row_pointer(context, builder, wd_t, wd, r)
        wd_row = builder.bitcast(wd_row, _F32.as_pointer())
        n_blocks = cgutils.unpack_tuple(builder, wd_ary.shape, 2)[1]
        x_rows = [_row_pointer(context, builder, xq_t, xq, i)[0] for i in rows]
        xd_rows = [builder.bitcast(_row_pointer(context, builder, xd_t, xd, i)[0], _F32.as_pointer()) for i in rows]
        if fmt.has_m:
            wm_row = builder.bitcast(_row_pointer(context, builder, wm_t, wm, r)[0], _F32.as_pointer())
            xs_rows = [builder.bitcast(_row_pointer(context, builder, xs_t, xs, i)[0], _F32.as_pointer()) for i in rows]
            summs = [cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0)) for _ in rows]
        accs = [cgutils.alloca_once_value(builder, ir.Constant(_V8_F32, [0.0] * 8)) for _ in rows]
        qs_bytes = context.get_constant(types.intp, fmt.qs_bytes)
        x_bytes = context.get_constant(types.intp, QK)
        with cgutils.for_range(builder, n_blocks) as loop:
            b = loop.index
            weights = fmt.unpack(builder, builder.gep(w_row, [builder.mul(b, qs_bytes)]))
            w_scale = builder.load(builder.gep(wd_row, [b]))
            if fmt.has_m:
                w_min = builder.load(builder.gep(wm_row, [b]))
            for i in range(n_tokens):
                acts = _load(builder, builder.gep(x_rows[i], [builder.mul(b, x_bytes)]), _V32_I8)
                sums = builder.sitofp(lanes(builder, weights, acts, fmt.unsigned), _V8_F32)
                scale = builder.fmul(w_scale, builder.load(builder.gep(xd_rows[i], [b])))
                builder.store(_fma(builder, _splat(builder, scale, _V8_F32), sums, builder.load(accs[i])), accs[i])
                if fmt.has_m:
                    x_sum = builder.load(builder.gep(xs_rows[i], [b]))
                    builder.store(_fma(builder, w_min, x_sum, builder.load(summs[i])), summs[i])
        results = []
        for i in range(n_tokens):
            total = _hsum(builder, builder.load(accs[i]))
            if fmt.has_m:
                total = builder.fadd(total, builder.load(summs[i]))
            results.append(total)
        if n_tokens == 1:
            return results[0]
        return context.make_tuple(builder, signature.return_type, results)

    return codegen


def _check(fmt: _Format, arrays, dtypes):
    for array, dtype in zip(arrays, dtypes):
        if not (isinstance(array, types.Array) and array.ndim == 2 and array.layout == "C" and array.dtype == dtype):
            raise TypeError(f"dot_{fmt.name}: expected a C-contiguous 2-D {dtype} array, got {array}")


def _make_intrinsic(fmt: _Format, n_tokens: int, isa: str):
    return_type = types.float32 if n_tokens == 1 else types.UniTuple(types.float32, n_tokens)
    codegen = _codegen_rows(fmt, n_tokens, isa)
    f32 = types.float32
    w_elem = types.int8 if fmt.name == "q8_0" else types.uint8
    if fmt.has_m:

        def typer(typingctx, wq, wd, wm, r, xq, xd, xs, t):
            _check(fmt, (wq, wd, wm, xq, xd, xs), (types.uint8, f32, f32, types.int8, f32, f32))
            return return_type(wq, wd, wm, r, xq, xd, xs, t), codegen

    else:

        def typer(typingctx, wq, wd, r, xq, xd, t):
            _check(fmt, (wq, wd, xq, xd), (w_elem, f32, types.int8, f32))
            return return_type(wq, wd, r, xq, xd, t), codegen

    typer.__name__ = f"dot_{fmt.name}_rows{n_tokens}_{isa}"
    return intrinsic(typer)


# INTRINSICS[(format, n_tokens, isa)]: every variant this host can run (tests compare the ISAs).
INTRINSICS = {(name, n, isa): _make_intrinsic(fmt, n, isa) for name, fmt in _FORMATS.items() for n in (1, 4) for isa in ISAS}


# ---------------------------------------------------------------------------------------------
# Plain-numpy twins (NUMBA_DISABLE_JIT=1) and the overloads compiled code uses instead


def _weights_np(fmt_name, wq, r, b):
    if fmt_name == "q8_0":
        return wq[r, b * QK : (b + 1) * QK].astype(np.int64)
    packed = wq[r, b * QK // 2 : (b + 1) * QK // 2].astype(np.int64)
    return np.concatenate((packed & 15, packed >> 4))


def _fma_np(a, b, c):
    """f32 fused multiply-add: the f32 product is exact in f64, one rounding to f64, then f32."""
    return (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32) if np.ndim(c) else np.float32(np.float64(a) * np.float64(b) + np.float64(c))


def _hsum_np(acc):
    f = np.float32
    return f(f(f(acc[0] + acc[4]) + f(acc[2] + acc[6])) + f(f(acc[1] + acc[5]) + f(acc[3] + acc[7])))


def _rows_np(fmt_name, wq, wd, wm, r, xq, xd, xs, t, n_tokens):
    results = []
    for i in range(t, t + n_tokens):
        acc = np.zeros(8, np.float32)
        summ = np.float32(0.0)
        for b in range(wd.shape[1]):
            products = _weights_np(fmt_name, wq, r, b) * xq[i, b * QK : (b + 1) * QK].astype(np.int64)
            sums = products.reshape(8, 4).sum(axis=1).astype(np.float32)
            acc = _fma_np(np.float32(wd[r, b] * xd[i, b]), sums, acc)
            if wm is not None:
                summ = _fma_np(wm[r, b], xs[i, b], summ)
        total = _hsum_np(acc)
        results.append(np.float32(total + summ) if wm is not None else total)
    return results[0] if n_tokens == 1 else tuple(results)


def dot_q8_0_rows1(wq, wd, r, xq, xd, t):
    """sum over blocks of weight row r of Q8_0 (qs (rows, cols) i8, d (rows, cols // 32) f32)
    times activation row t (qs (T, cols) i8, d (T, cols // 32) f32). -> f32"""
    return _rows_np("q8_0", wq, wd, None, r, xq, xd, None, t, 1)


def dot_q8_0_rows4(wq, wd, r, xq, xd, t):
    """dot_q8_0_rows1 for activation rows t .. t + 3. -> (f32,) * 4"""
    return _rows_np("q8_0", wq, wd, None, r, xq, xd, None, t, 4)


def dot_q4_1_rows1(wq, wd, wm, r, xq, xd, xs, t):
    """As dot_q8_0_rows1 for Q4_1 (qs (rows, cols // 2) u8), with m (rows, cols // 32) f32 and the activation block sums
    xs (T, cols // 32) f32."""
    return _rows_np("q4_1", wq, wd, wm, r, xq, xd, xs, t, 1)


def dot_q4_1_rows4(wq, wd, wm, r, xq, xd, xs, t):
    return _rows_np("q4_1", wq, wd, wm, r, xq, xd, xs, t, 4)


def _overload_with(fn, kernel, has_m):
    if has_m:

        @overload(fn, inline="always")
        def _compiled(wq, wd, wm, r, xq, xd, xs, t):
            return lambda wq, wd, wm, r, xq, xd, xs, t: kernel(wq, wd, wm, r, xq, xd, xs, t)

    else:

        @overload(fn, inline="always")
        def _compiled(wq, wd, r, xq, xd, t):
            return lambda wq, wd, r, xq, xd, t: kernel(wq, wd, r, xq, xd, t)


for _fn, _key in (
    (dot_q8_0_rows1, ("q8_0", 1)),
    (dot_q8_0_rows4, ("q8_0", 4)),
    (dot_q4_1_rows1, ("q4_1", 1)),
    (dot_q4_1_rows4, ("q4_1", 4)),
):
    _overload_with(_fn, INTRINSICS[_key + (ISA,)], _FORMATS[_key[0]].has_m)


# ---------------------------------------------------------------------------------------------
# Attention's products on the f16 KV cache: C[i, :n] = sum over kk < k of A[i, kk] * B[kk, :n]
# with A f32, B f16 (as uint16 bits) and n <= 16; and rounding to f16


TILE_COLS = 16  # two <8 x float> vectors per row of C
TILE_ROWS = 4  # rows of A (and C) per call at most
_HALF = ir.HalfType()
_V8_I16 = ir.VectorType(_I16, 8)


def _codegen_tile(n_rows: int):
    """Each C element is one chain of fused multiply-adds in kk order, whatever the tile's rows
    and columns, so a row's results do not depend on which rows share its tile. Columns past n
    are neither read from B nor written to C (masked loads and stores)."""

    def codegen(context, builder, signature, args):
        a, a0, a1, a2, a3, b, b_off, b_stride, k, c, c0, c1, c2, c3, n_cols = args
        intp = context.get_value_type(types.intp)
        args_t = signature.args

        def data(index, value, element):
            ary = context.make_array(args_t[index])(context, builder, value)
            return builder.bitcast(ary.data, element.as_pointer())

        def cast(index, value):
            return context.cast(builder, value, args_t[index], types.intp)

        a_data, b_data, c_data = data(0, a, _F32), data(5, b, _I16), data(9, c, _F32)
        a_rows = [builder.gep(a_data, [cast(1 + i, off)]) for i, off in enumerate((a0, a1, a2, a3)[:n_rows])]
        c_rows = [builder.gep(c_data, [cast(10 + i, off)]) for i, off in enumerate((c0, c1, c2, c3)[:n_rows])]
        b_base = builder.gep(b_data, [cast(6, b_off)])
        b_stride = cast(7, b_stride)
        k = cast(8, k)
        n_cols = cast(14, n_cols)
        limit = _splat(builder, builder.trunc(n_cols, _I32), _V8_I32)
        masks = [builder.icmp_signed("<", ir.Constant(_V8_I32, list(range(h * 8, h * 8 + 8))), limit) for h in range(2)]
        accs = [[cgutils.alloca_once_value(builder, ir.Constant(_V8_F32, [0.0] * 8)) for _ in range(2)] for _ in range(n_rows)]

        def masked_load(pointer, mask):
            pointer = builder.bitcast(pointer, _V8_I16.as_pointer())
            return _call(builder, "llvm.masked.load.v8i16.p0", _V8_I16, [pointer, ir.Constant(_I32, 2), mask, ir.Constant(_V8_I16, [0] * 8)])

        def plain_load(pointer, mask):
            return builder.load(builder.bitcast(pointer, _V8_I16.as_pointer()), align=2)

        def loop(load):
            with cgutils.for_range(builder, k) as kk_loop:
                kk = kk_loop.index
                b_row = builder.gep(b_base, [builder.mul(kk, b_stride)])
                halves = []
                for h in range(2):
                    bits = load(builder.gep(b_row, [ir.Constant(intp, 8 * h)]), masks[h])
                    halves.append(builder.fpext(builder.bitcast(bits, ir.VectorType(_HALF, 8)), _V8_F32))
                for i in range(n_rows):
                    a_val = _splat(builder, builder.load(builder.gep(a_rows[i], [kk])), _V8_F32)
                    for h in range(2):
                        builder.store(_fma(builder, a_val, halves[h], builder.load(accs[i][h])), accs[i][h])

        full = builder.icmp_signed("==", n_cols, ir.Constant(intp, TILE_COLS))
        with builder.if_else(full) as (then, otherwise):
            with then:
                loop(plain_load)
            with otherwise:
                loop(masked_load)
        for i in range(n_rows):
            for h in range(2):
                pointer = builder.bitcast(builder.gep(c_rows[i], [ir.Constant(intp, 8 * h)]), _V8_F32.as_pointer())
                _call(builder, "llvm.masked.store.v8f32.p0", ir.VoidType(), [builder.load(accs[i][h]), pointer, ir.Constant(_I32, 4), masks[h]])
        return context.get_dummy_value()

    return codegen


def _make_tile(n_rows: int):
    codegen = _codegen_tile(n_rows)

    def typer(typingctx, a, a0, a1, a2, a3, b, b_off, b_stride, k, c, c0, c1, c2, c3, n_cols):
        for array, dtype in ((a, types.float32), (b, types.uint16), (c, types.float32)):
            if not (isinstance(array, types.Array) and array.ndim == 1 and array.dtype == dtype):
                raise TypeError(f"tile_f16: expected a 1-D {dtype} array, got {array}")
        return types.none(a, a0, a1, a2, a3, b, b_off, b_stride, k, c, c0, c1, c2, c3, n_cols), codegen

    typer.__name__ = f"tile_f16_rows{n_rows}"
    return intrinsic(typer)


_tile1, _tile2, _tile3, _tile4 = (_make_tile(n) for n in range(1, TILE_ROWS + 1))


def tile_f16(n_rows, a, a0, a1, a2, a3, b, b_off, b_stride, k, c, c0, c1, c2, c3, n_cols):
    """For i < n_rows (1 .. 4) and col < n_cols (<= 16), on flat arrays a and c (f32) and b
    (f16 bits, uint16): c[c_i + col] = the fma chain over kk < k, in order, of
    a[a_i + kk] * b[b_off + kk * b_stride + col], where a_i and c_i are a0 .. a3 and c0 .. c3."""
    for a_i, c_i in list(zip((a0, a1, a2, a3), (c0, c1, c2, c3)))[:n_rows]:
        acc = np.zeros(n_cols, np.float32)
        for kk in range(k):
            row = b_off + kk * b_stride
            acc = _fma_np(a[a_i + kk], b[row : row + n_cols].view(np.float16).astype(np.float32), acc)
        c[c_i : c_i + n_cols] = acc


@overload(tile_f16, inline="always")
def _tile_f16_compiled(n_rows, a, a0, a1, a2, a3, b, b_off, b_stride, k, c, c0, c1, c2, c3, n_cols):
    def impl(n_rows, a, a0, a1, a2, a3, b, b_off, b_stride, k, c, c0, c1, c2, c3, n_cols):
        if n_rows == 4:
            _tile4(a, a0, a1, a2, a3, b, b_off, b_stride, k, c, c0, c1, c2, c3, n_cols)
        elif n_rows == 3:
            _tile3(a, a0, a1, a2, a3, b, b_off, b_stride, k, c, c0, c1, c2, c3, n_cols)
        elif n_rows == 2:
            _tile2(a, a0, a1, a2, a3, b, b_off, b_stride, k, c, c0, c1, c2, c3, n_cols)
        else:
            _tile1(a, a0, a1, a2, a3, b, b_off, b_stride, k, c, c0, c1, c2, c3, n_cols)

    return impl


@intrinsic
def _round_f16_ir(typingctx, x):
    if x != types.float32:
        raise TypeError(f"round_f16: expected float32, got {x}")

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], _HALF), _F32)

    return types.float32(x), codegen


def round_f16(x):
    """x (f32) rounded to the nearest f16 (ties to even), as f32; one F16C or NEON conversion
    each way, and LLVM vectorizes loops that call it."""
    return np.float32(np.float16(x))


@overload(round_f16, inline="always")
def _round_f16_compiled(x):
    return lambda x: _round_f16_ir(x)


# ---------------------------------------------------------------------------------------------
# Q4_0 eight rows at a time: the eight lanes of each vector are eight weight rows
#
# pack() stores Q4_0 in groups of GROUP_ROWS rows: for each block, 4 x 32 bytes where byte
# 32c + 4k + i is byte 4c + i of row k's block (its low nibble is weight 4c + i, its high nibble
# weight 16 + 4c + i), then the eight rows' f16 scales side by side. One vpmaddubsw of 32 such
# nibbles against four activation bytes repeated eight times gives row k's products in i16
# lanes 2k and 2k + 1; eight of them summed in i16 (at most 8 * 2 * 15 * 127 = 30480, so no
# overflow) and one vpmaddwd give row k's whole block as an exact int32 in lane k. Weights are
# taken as their nibbles n = w + 8 (vpmaddubsw's unsigned side), and 8 * sum(x) is subtracted
# from the block's integer, still exact. Then one conversion and one fma per block serve
# eight rows: acc = fma(d_w * d_x, float(sum(w * x)), acc), as ggml's AArch64/AVX2 repacked
# GEMMs (q4_0_8x8) do. The float work of a row is the same sequence whichever of its group
# mates or batch neighbours are there, so results do not depend on the batch.

GROUP_ROWS = 8
Q4_0_GROUP_BYTES = 4 * 32  # nibble bytes of one block of a group
_V16_I32 = ir.VectorType(_I32, 16)
_V32_I16 = ir.VectorType(_I16, 32)
_V8_HALF = ir.VectorType(ir.HalfType(), 8)


def _pair_products(builder, weights, acts, isa):
    """<16 x i16>: lane m = weights[2m] * acts[2m] + weights[2m + 1] * acts[2m + 1], weights
    unsigned 0 .. 15 and acts signed."""
    if isa == "avx2":
        return _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16_I16, [weights, acts])
    products = builder.mul(builder.zext(weights, _V32_I16), builder.sext(acts, _V32_I16))
    undef = ir.Constant(_V32_I16, ir.Undefined)
    even, odd = (builder.shuffle_vector(products, undef, ir.Constant(_V16_I32, list(range(i, 32, 2)))) for i in (0, 1))
    return builder.add(even, odd)


def _pair_sums(builder, pairs, isa):
    """<8 x i32>: lane k = pairs[2k] + pairs[2k + 1]."""
    if isa == "avx2":
        return _call(builder, "llvm.x86.avx2.pmadd.wd", _V8_I32, [pairs, ir.Constant(_V16_I16, [1] * 16)])
    wide = builder.sext(pairs, _V16_I32)
    undef = ir.Constant(_V16_I32, ir.Undefined)
    even, odd = (builder.shuffle_vector(wide, undef, ir.Constant(_V8_I32, list(range(i, 16, 2)))) for i in (0, 1))
    return builder.add(even, odd)


def _codegen_q4_0x8(n_tokens: int, isa: str):
    def codegen(context, builder, signature, args):
        wq, wd, g, xq, xd, xn, out, t, n_valid = args
        wq_t, wd_t, g_t, xq_t, xd_t, xn_t, out_t, t_t, n_valid_t = signature.args
        intp = types.intp
        g = context.cast(builder, g, g_t, intp)
        t = context.cast(builder, t, t_t, intp)
        n_valid = builder.trunc(context.cast(builder, n_valid, n_valid_t, intp), _I32)
        rows = [builder.add(t, context.get_constant(intp, i)) for i in range(n_tokens)]
        w_group, _ = _row_pointer(context, builder, wq_t, wq, g)
        d_group, wd_ary = _row_pointer(context, builder, wd_t, wd, g)
        n_blocks = builder.udiv(cgutils.unpack_tuple(builder, wd_ary.shape, 2)[1], context.get_constant(intp, GROUP_ROWS))
        x_rows = [_row_pointer(context, builder, xq_t, xq, i)[0] for i in rows]
        xd_rows = [builder.bitcast(_row_pointer(context, builder, xd_t, xd, i)[0], _F32.as_pointer()) for i in rows]
        xn_rows = [builder.bitcast(_row_pointer(context, builder, xn_t, xn, i)[0], _I32.as_pointer()) for i in rows]
        accs = [cgutils.alloca_once_value(builder, ir.Constant(_V8_F32, [0.0] * 8)) for _ in rows]
        with cgutils.for_range(builder, n_blocks) as loop:
            b = loop.index
            block = builder.gep(w_group, [builder.mul(b, context.get_constant(intp, Q4_0_GROUP_BYTES))])
            chunks = []  # (nibbles of 8 rows x 4 weights, offset of those 4 weights in the block)
            for c in range(4):
                packed = _load(builder, builder.gep(block, [context.get_constant(intp, 32 * c)]), _V32_I8)
                chunks.append((builder.and_(packed, ir.Constant(_V32_I8, [15] * 32)), 4 * c))
                chunks.append((builder.lshr(packed, ir.Constant(_V32_I8, [4] * 32)), 16 + 4 * c))
            scale_bits = _load(builder, builder.gep(d_group, [builder.mul(b, context.get_constant(intp, 2 * GROUP_ROWS))]), _V8_I16)
            w_scales = builder.fpext(builder.bitcast(scale_bits, _V8_HALF), _V8_F32)
            x_offset = builder.mul(b, context.get_constant(intp, QK))
            for i in range(n_tokens):
                x_block = builder.gep(x_rows[i], [x_offset])
                pairs = None
                for nibbles, offset in chunks:
                    four = builder.load(builder.bitcast(builder.gep(x_block, [context.get_constant(intp, offset)]), _I32.as_pointer()), align=1)
                    acts = builder.bitcast(_splat(builder, four, _V8_I32), _V32_I8)
                    product = _pair_products(builder, nibbles, acts, isa)
                    pairs = product if pairs is None else builder.add(pairs, product)
                offset_sum = builder.shl(builder.load(builder.gep(xn_rows[i], [b])), ir.Constant(_I32, 3))  # 8 * sum(x)
                sums = builder.sub(_pair_sums(builder, pairs, isa), _splat(builder, offset_sum, _V8_I32))
                scale = builder.fmul(w_scales, _splat(builder, builder.load(builder.gep(xd_rows[i], [b])), _V8_F32))
                builder.store(_fma(builder, scale, builder.sitofp(sums, _V8_F32), builder.load(accs[i])), accs[i])
        out_ary = context.make_array(out_t)(context, builder, out)
        first_col = builder.mul(g, context.get_constant(intp, GROUP_ROWS))
        lanes = ir.Constant(_V8_I32, list(range(GROUP_ROWS)))
        mask = builder.icmp_unsigned("<", lanes, _splat(builder, n_valid, _V8_I32))
        for i in range(n_tokens):
            pointer = cgutils.get_item_pointer(context, builder, out_t, out_ary, [rows[i], first_col], wraparound=False)
            _call(builder, "llvm.masked.store.v8f32.p0", ir.VoidType(), [builder.load(accs[i]), pointer, ir.Constant(_I32, 4), mask])
        return context.get_dummy_value()

    return codegen


def _make_q4_0x8(n_tokens: int, isa: str):
    codegen = _codegen_q4_0x8(n_tokens, isa)

    def typer(typingctx, wq, wd, g, xq, xd, xn, out, t, n_valid):
        expected = ((wq, types.uint8), (wd, types.uint16), (xq, types.int8), (xd, types.float32), (xn, types.int32), (out, types.float32))
        for array, dtype in expected:
            if not (isinstance(array, types.Array) and array.ndim == 2 and array.layout == "C" and array.dtype == dtype):
                raise TypeError(f"q4_0x8: expected a C-contiguous 2-D {dtype} array, got {array}")
        return types.none(wq, wd, g, xq, xd, xn, out, t, n_valid), codegen

    typer.__name__ = f"q4_0x8_tokens{n_tokens}_{isa}"
    return intrinsic(typer)


Q4_0X8 = {(n, isa): _make_q4_0x8(n, isa) for n in (1, 4) for isa in ISAS}


def q4_0x8_unpack(wq: np.ndarray, g: int) -> np.ndarray:
    """(8, n_blocks, 32) int64 weights of row group g, from the layout above."""
    n_blocks = wq.shape[1] // Q4_0_GROUP_BYTES
    grouped = wq[g].reshape(n_blocks, 4, GROUP_ROWS, 4).transpose(2, 0, 1, 3).reshape(GROUP_ROWS, n_blocks, 16).astype(np.int64)
    return np.concatenate((grouped & 15, grouped >> 4), axis=2) - 8


def q4_0x8_tokens1(wq, wd, g, xq, xd, xn, out, t, n_valid):
    """out[t, 8g : 8g + n_valid] = rows 8g .. of a grouped Q4_0 matrix (wq (groups, n_blocks *
    128) u8, wd (groups, n_blocks * 8) f16 bits) times activation row t (xq (T, cols) i8, xd
    (T, cols // 32) f32, xn (T, cols // 32) i32 block sums of xq)."""
    weights = q4_0x8_unpack(wq, g)
    n_blocks = weights.shape[1]
    d_w = wd[g].view(np.float16).astype(np.float32).reshape(n_blocks, GROUP_ROWS)
    for i in range(t, t + 1):
        x = xq[i].reshape(n_blocks, QK).astype(np.int64)
        sums = (weights * x).sum(axis=2)  # (8, n_blocks), exact
        acc = np.zeros(GROUP_ROWS, np.float32)
        for b in range(n_blocks):
            acc = _fma_np(d_w[b] * xd[i, b], sums[:, b].astype(np.float32), acc)
        out[i, g * GROUP_ROWS : g * GROUP_ROWS + n_valid] = acc[:n_valid]


def q4_0x8_tokens4(wq, wd, g, xq, xd, xn, out, t, n_valid):
    """q4_0x8_tokens1 for activation rows t .. t + 3."""
    for i in range(t, t + 4):
        q4_0x8_tokens1(wq, wd, g, xq, xd, xn, out, i, n_valid)


for _fn, _n in ((q4_0x8_tokens1, 1), (q4_0x8_tokens4, 4)):

    def _register(fn, kernel):
        @overload(fn, inline="always")
        def _compiled(wq, wd, g, xq, xd, xn, out, t, n_valid):
            return lambda wq, wd, g, xq, xd, xn, out, t, n_valid: kernel(wq, wd, g, xq, xd, xn, out, t, n_valid)

    _register(_fn, Q4_0X8[(_n, ISA)])
