"""Products of quantized weights with 8-bit activations, the activations' quantizing to 8 bits,
attention's f16 tiles, and an exp that vectorizes, written as LLVM vector IR (or, for exp, as
arithmetic on two small intrinsics).

Numba types every integer operation on narrow integers as 64-bit (uint8 & uint8 is uint64),
so a plain loop over nibbles and int8 activations compiles to 64-bit lanes, four to a register.
Here the arithmetic is written once on LLVM vector types and the loop over a row's blocks is
emitted in IR, so nothing leaves vector registers between blocks.

Weight products run eight weight rows at a time, one row per vector lane (the section "Products
eight weight rows at a time" says how and why). Their integer work has two instruction
sequences with the same exact results:
  - "avx2": vpmaddubsw + vpmaddwd (signed weights use vpsignb to move their sign onto the
    activations), chosen when the host has AVX2;
  - "generic": widen and multiply in LLVM vectors; LLVM lowers it to the target's SIMD (NEON on
    a 64-bit Raspberry Pi).
Everything after the integers is the same IR for both, so the two give identical floats
(tests/test_quants.py compares them).

Each public function has a plain-numpy twin with the same name, which runs when Numba's JIT is
disabled (NUMBA_DISABLE_JIT=1, as one of the tests does); compiled code gets the IR through
`overload`. They trust their inputs: the public kernels in quants.py check shapes before
calling them.
"""

from __future__ import annotations

from dataclasses import dataclass

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
_V32_I8 = ir.VectorType(_I8, 32)
_V16_I16 = ir.VectorType(_I16, 16)
_V8_I32 = ir.VectorType(_I32, 8)
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


def _fma(builder, a, b, c):
    suffix = f"v{a.type.count}f32" if isinstance(a.type, ir.VectorType) else "f32"
    return _call(builder, f"llvm.fma.{suffix}", a.type, [a, b, c])


def _row_pointer(context, builder, array_type, array, row):
    """i8* to array[row, 0] of a C-contiguous 2-D array."""
    ary = context.make_array(array_type)(context, builder, array)
    zero = context.get_constant(types.intp, 0)
    pointer = cgutils.get_item_pointer(context, builder, array_type, ary, [row, zero], wraparound=False)
    return builder.bitcast(pointer, _I8.as_pointer()), ary


def _fma_np(a, b, c):
    """f32 fused multiply-add: the f32 product is exact in f64, one rounding to f64, then f32."""
    return (np.float64(a) * np.float64(b) + np.float64(c)).astype(np.float32) if np.ndim(c) else np.float32(np.float64(a) * np.float64(b) + np.float64(c))


# ---------------------------------------------------------------------------------------------
# Attention's products on the f16 KV cache: C[i, :n] = sum over kk < k of A[i, kk] * B[kk, :n]
# with A f32, B f16 (as uint16 bits) and n <= TILE_COLS[rows of A]; and rounding to f16


TILE_ROWS = 4  # rows of A (and C) per call at most
# Columns of C per call, by its rows: each column of each row is a chain of fmas, each fma
# waiting four cycles for the one before, so a tile needs eight or more <8 x float> chains to
# keep both fma units busy: one or two rows take 32 columns, three 24, four 16 (more would not
# fit AVX2's 16 registers). A decode row of a model with three query heads per KV head (SmolLM2)
# is a tile of three rows: at 24 columns a tile takes 1.76 ns per row and column against 2.36
# at 16, and attention for 8 decode rows 10-14% less time (positions 70 to 1000).
TILE_COLS = (0, 32, 32, 24, 16)  # TILE_COLS[n_rows]
_HALF = ir.HalfType()
_V8_I16 = ir.VectorType(_I16, 8)


def _codegen_tile(n_rows: int):
    """Each C element is one chain of fused multiply-adds in kk order, whatever the tile's rows
    and columns, so a row's results do not depend on which rows share its tile. Columns past n
    are never written to C (masked stores), and read from B only where B goes on past them."""
    n_halves = TILE_COLS[n_rows] // 8  # <8 x float> vectors per row of C

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
        masks = [builder.icmp_signed("<", ir.Constant(_V8_I32, list(range(h * 8, h * 8 + 8))), limit) for h in range(n_halves)]
        accs = [[cgutils.alloca_once_value(builder, ir.Constant(_V8_F32, [0.0] * 8)) for _ in range(n_halves)] for _ in range(n_rows)]

        def masked_load(pointer, mask):
            pointer = builder.bitcast(pointer, _V8_I16.as_pointer())
            return _call(builder, "llvm.masked.load.v8i16.p0", _V8_I16, [pointer, ir.Constant(_I32, 2), mask, ir.Constant(_V8_I16, [0] * 8)])

        def plain_load(pointer, mask):
            return builder.load(builder.bitcast(pointer, _V8_I16.as_pointer()), align=2)

        def loop(n_used, last_masked):
            """The chains of the first n_used halves, the last one read masked or whole (AVX2
            has no masked 16-bit load: LLVM makes one a load per lane, twice the tile's time)."""
            with cgutils.for_range(builder, k) as kk_loop:
                kk = kk_loop.index
                b_row = builder.gep(b_base, [builder.mul(kk, b_stride)])
                halves = []
                for h in range(n_used):
                    load = masked_load if last_masked and h == n_used - 1 else plain_load
                    bits = load(builder.gep(b_row, [ir.Constant(intp, 8 * h)]), masks[h])
                    halves.append(builder.fpext(builder.bitcast(bits, ir.VectorType(_HALF, 8)), _V8_F32))
                for i in range(n_rows):
                    a_val = _splat(builder, builder.load(builder.gep(a_rows[i], [kk])), _V8_F32)
                    for h in range(n_used):
                        builder.store(_fma(builder, a_val, halves[h], builder.load(accs[i][h])), accs[i][h])

        # One loop per (halves used, last one read masked or whole), chosen once per call. A
        # partial last half is read whole when B goes on past it (its extra columns are computed,
        # never stored), masked only at the very end of B.
        n_used = builder.sdiv(builder.add(n_cols, ir.Constant(intp, 7)), ir.Constant(intp, 8))
        b_size = builder.extract_value(context.make_array(args_t[5])(context, builder, b).shape, 0)
        last_read = builder.add(builder.add(cast(6, b_off), builder.mul(builder.sub(k, ir.Constant(intp, 1)), b_stride)),
                                builder.mul(n_used, ir.Constant(intp, 8)))
        masked = builder.and_(builder.icmp_signed("!=", builder.srem(n_cols, ir.Constant(intp, 8)), ir.Constant(intp, 0)),
                              builder.icmp_signed(">", last_read, b_size))
        variants = [(used, last_masked) for used in range(1, n_halves + 1) for last_masked in (False, True)]

        def choose(i):
            used, last_masked = variants[i]
            if i == len(variants) - 1:
                loop(used, last_masked)
                return
            this = builder.and_(builder.icmp_signed("==", n_used, ir.Constant(intp, used)),
                                builder.icmp_signed("==", masked, ir.Constant(ir.IntType(1), int(last_masked))))
            with builder.if_else(this) as (then, otherwise):
                with then:
                    loop(used, last_masked)
                with otherwise:
                    choose(i + 1)

        choose(0)
        for i in range(n_rows):
            for h in range(n_halves):
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
    """For i < n_rows (1 .. 4) and col < n_cols (<= TILE_COLS[n_rows]), on flat arrays a and c (f32) and b
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


def _f16_function(plain, return_type, result):
    """A scalar f32 -> f16 conversion (to nearest, ties to even): `plain` when Numba's JIT is off,
    one fptrunc (an F16C or NEON conversion) and then result(builder, half) in compiled code."""

    @intrinsic
    def convert(typingctx, x):
        if x != types.float32:
            raise TypeError(f"{plain.__name__}: expected float32, got {x}")

        def codegen(context, builder, signature, args):
            return result(builder, builder.fptrunc(args[0], _HALF))

        return return_type(x), codegen

    @overload(plain, inline="always")
    def _compiled(x):
        return lambda x: convert(x)


def round_f16(x):
    """x (f32) rounded to the nearest f16 (ties to even), as f32; one F16C or NEON conversion
    each way, and LLVM vectorizes loops that call it."""
    return np.float32(np.float16(x))


def f16_bits(x):
    """x (f32) rounded to the nearest f16 (ties to even), as its bits (uint16): what numpy's
    astype(np.float16) stores, and ggml's f32 -> f16 copy into its KV cache."""
    return np.float32(x).astype(np.float16).view(np.uint16)


_f16_function(round_f16, types.float32, lambda builder, half: builder.fpext(half, _F32))
_f16_function(f16_bits, types.uint16, lambda builder, half: builder.bitcast(half, _I16))


# ---------------------------------------------------------------------------------------------
# Activations to 8-bit blocks (ggml's quantize_row_q8_0 / q8_1) in vector IR
#
# Written as a Numba loop, a block's maximum |x| stays a chain of 32 scalar maxss (fast-math
# without nnan) and the sum of its integers runs in 64-bit lanes. Here a block is four
# <8 x float> loads: the maximum is taken on the values' bits with the sign cleared (the order of
# floats that are not NaN, as integers), and the integers are rounded (to nearest, ties to even),
# summed, narrowed and stored 32 at a time. 8 rows of 576: 2.0 us against the loop's 3.8; 128
# rows 25 against 53 (one thread); an 8-row decode step of SmolLM2 quantizes 0.3 ms less.
# The scales are what that loop compiled to under the project's fast-math flags, so every output
# is as before: d = amax * f32(1/127), and the integers x * (127 / amax), ggml's AVX2
# quantize_row_q8_0 (whose d divides by 127: rounded to f16 the two d differ only where they
# straddle an f16 step). A NaN in a block makes its d NaN; no integer is ever poison.

_INV_127 = np.float32(1.0) / np.float32(127.0)
_V32_I32 = ir.VectorType(_I32, 32)
_ABS_BITS = ir.Constant(_V8_I32, [0x7FFFFFFF] * 8)


def _round_to_int(builder, v, isa):
    """<8 x float> -> <8 x i32>, to nearest with ties to even; a NaN gives no poison."""
    if isa == "avx2":  # vcvtps2dq: the rounding mode's nearest-even; NaN -> 0x80000000
        return _call(builder, "llvm.x86.avx.cvt.ps2dq.256", _V8_I32, [v])
    rounded = _call(builder, "llvm.rint.v8f32", _V8_F32, [v])  # frintx on ARM
    return _call(builder, "llvm.fptosi.sat.v8i32.v8f32", _V8_I32, [rounded])  # NaN -> 0


def _codegen_quantize_block(isa: str):
    def codegen(context, builder, signature, args):
        x, qs, d, s, n, t, b = args
        x_t, qs_t, d_t, s_t, n_t, t_t, b_t = signature.args
        intp = types.intp
        t = context.cast(builder, t, t_t, intp)
        b = context.cast(builder, b, b_t, intp)
        x_row, _ = _row_pointer(context, builder, x_t, x, t)
        q_row, _ = _row_pointer(context, builder, qs_t, qs, t)
        x_block = builder.gep(x_row, [builder.mul(b, context.get_constant(intp, 4 * QK))])
        values = [_load(builder, builder.gep(x_block, [ir.Constant(_I32, 32 * k)]), _V8_F32) for k in range(4)]
        magnitudes = [builder.and_(builder.bitcast(v, _V8_I32), _ABS_BITS) for v in values]
        pairs = [_call(builder, "llvm.smax.v8i32", _V8_I32, magnitudes[i : i + 2]) for i in (0, 2)]
        top = _call(builder, "llvm.vector.reduce.smax.v8i32", _I32, [_call(builder, "llvm.smax.v8i32", _V8_I32, pairs)])
        amax = builder.bitcast(top, _F32)
        delta = builder.fmul(amax, ir.Constant(_F32, float(_INV_127)))
        positive = builder.fcmp_ordered(">", delta, ir.Constant(_F32, 0.0))
        inv = builder.select(positive, builder.fdiv(ir.Constant(_F32, 127.0), amax), ir.Constant(_F32, 0.0))
        scale = _splat(builder, inv, _V8_F32)
        ints = [_round_to_int(builder, builder.fmul(v, scale), isa) for v in values]
        both = [builder.shuffle_vector(ints[i], ints[i + 1], ir.Constant(ir.VectorType(_I32, 16), list(range(16)))) for i in (0, 2)]
        block = builder.shuffle_vector(both[0], both[1], ir.Constant(_V32_I32, list(range(32))))
        q_pointer = builder.gep(q_row, [builder.mul(b, context.get_constant(intp, QK))])
        builder.store(builder.trunc(block, _V32_I8), builder.bitcast(q_pointer, _V32_I8.as_pointer()), align=1)
        total = _call(builder, "llvm.vector.reduce.add.v8i32", _I32,
                      [builder.add(builder.add(ints[0], ints[1]), builder.add(ints[2], ints[3]))])
        for array, array_t, value in ((d, d_t, delta), (s, s_t, builder.fmul(delta, builder.sitofp(total, _F32))), (n, n_t, total)):
            if value.type == _F32:
                value = builder.fpext(builder.fptrunc(value, _HALF), _F32)
            ary = context.make_array(array_t)(context, builder, array)
            builder.store(value, cgutils.get_item_pointer(context, builder, array_t, ary, [t, b], wraparound=False))
        return context.get_dummy_value()

    return codegen


def _make_quantize_intrinsic(isa: str):
    codegen = _codegen_quantize_block(isa)

    def typer(typingctx, x, qs, d, s, n, t, b):
        expected = ((x, types.float32), (qs, types.int8), (d, types.float32), (s, types.float32), (n, types.int32))
        for array, dtype in expected:
            if not (isinstance(array, types.Array) and array.ndim == 2 and array.layout == "C" and array.dtype == dtype):
                raise TypeError(f"quantize_block_q8: expected a C-contiguous 2-D {dtype} array, got {array}")
        return types.none(x, qs, d, s, n, t, b), codegen

    typer.__name__ = f"quantize_block_q8_{isa}"
    return intrinsic(typer)


# QUANTIZE_INTRINSICS[isa]: every variant this host can run (tests compare them).
QUANTIZE_INTRINSICS = {isa: _make_quantize_intrinsic(isa) for isa in ISAS}


def quantize_block_q8(x, qs, d, s, n, t, b):
    """Block b of row t of x (T, K) f32 to 8 bits: qs[t, 32b : 32b + 32] = round(x * 127 / amax),
    d[t, b] = amax * f32(1/127) and s[t, b] = d * sum(qs) (Q8_1's block sum) rounded to f16,
    n[t, b] = sum(qs); amax = max |x| over the block."""
    block = x[t, b * QK : (b + 1) * QK]
    amax = np.abs(block).max()  # NaN if the block holds one
    delta = np.float32(amax * _INV_127)
    inv = np.float32(np.float32(127.0) / amax) if delta > 0 else np.float32(0.0)
    with np.errstate(invalid="ignore"):
        ints = np.rint(block * inv)
    ints = np.where(np.isnan(ints), 0, ints).astype(np.int32)
    qs[t, b * QK : (b + 1) * QK] = ints.astype(np.int8)
    total = np.int32(ints.sum())
    with np.errstate(over="ignore"):  # past f16's 65504: inf, as ggml's block_q8_1 stores it
        d[t, b] = round_f16(delta)
        s[t, b] = round_f16(np.float32(delta * np.float32(total)))
    n[t, b] = total


@overload(quantize_block_q8, inline="always")
def _quantize_block_q8_compiled(x, qs, d, s, n, t, b):
    kernel = QUANTIZE_INTRINSICS[ISA]
    return lambda x, qs, d, s, n, t, b: kernel(x, qs, d, s, n, t, b)


# ---------------------------------------------------------------------------------------------
# exp in f32, in plain arithmetic that LLVM vectorizes
#
# A loop that calls math.exp makes one libm call per element (2.7 ns each here), which bounds
# SwiGLU and softmax. exp_f32 is the usual vector exp (Cody and Waite's range reduction and
# Cephes' expf polynomial; ggml's ggml_v_expf is one of the same kind): eight at a time in AVX2,
# within 2 ulp of the exact value. The reduction is written with explicit fused multiply-adds,
# which the project's "reassoc" flag cannot merge, so it stays exact.


@intrinsic
def _fma_f32_ir(typingctx, a, b, c):
    if not (a == b == c == types.float32):
        raise TypeError(f"fma_f32: expected float32 arguments, got {a}, {b}, {c}")

    def codegen(context, builder, signature, args):
        return _fma(builder, *args)

    return types.float32(a, b, c), codegen


def fma_f32(a, b, c):
    """a * b + c (f32) with one rounding."""
    return _fma_np(a, b, c)


@overload(fma_f32, inline="always")
def _fma_f32_compiled(a, b, c):
    return lambda a, b, c: _fma_f32_ir(a, b, c)


@intrinsic
def _f32_from_bits_ir(typingctx, bits):
    if not isinstance(bits, types.Integer):
        raise TypeError(f"f32_from_bits: expected an integer, got {bits}")

    def codegen(context, builder, signature, args):
        return builder.bitcast(context.cast(builder, args[0], bits, types.int32), _F32)

    return types.float32(bits), codegen


def f32_from_bits(bits):
    """The f32 whose IEEE bits are the low 32 bits of the integer `bits`."""
    return np.int32(bits).view(np.float32)


@overload(f32_from_bits, inline="always")
def _f32_from_bits_compiled(bits):
    return lambda bits: _f32_from_bits_ir(bits)


_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693359375)  # ln 2 = _LN2_HI + _LN2_LO; _LN2_HI has 9 bits, so n * _LN2_HI is exact
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_MIN = np.float32(-87.33654)  # below: e**x is under the smallest normal f32; returns 0
_EXP_MAX = np.float32(88.0)  # above: clamped (2**127 is the largest scale the bits below can make)
# exp(r) = 1 + r + r**2 * P(r) for |r| <= ln(2) / 2: Cephes' expf coefficients, highest first
_P0, _P1, _P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_P3, _P4, _P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)


def exp_f32(x):
    """e**x for f32 x, as f32 within 2 ulp; 0 below -87.34, and x clamped to 88 above.
    x = n ln 2 + r with |r| <= ln(2) / 2, e**x = 2**n e**r: 2**n made from its exponent bits,
    e**r from a degree-7 polynomial."""
    x = min(max(np.float32(x), _EXP_MIN - np.float32(1.0)), _EXP_MAX)  # within the range the bits below can make
    n = np.floor(x * _LOG2E + np.float32(0.5))
    r = fma_f32(-n, _LN2_HI, x)
    r = fma_f32(-n, _LN2_LO, r)
    p = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
    e = (np.float32(1.0) + r + r * r * p) * f32_from_bits(np.int32(n + np.float32(127.0)) << np.int32(23))
    return e if x > _EXP_MIN else np.float32(0.0)


@overload(exp_f32, inline="always")
def _exp_f32_compiled(x):
    return exp_f32


# ---------------------------------------------------------------------------------------------
# Products eight weight rows at a time: the eight lanes of each vector are eight weight rows
#
# pack() stores Q4_0, Q4_1 and Q8_0 matrices in groups of GROUP_ROWS rows. For each block of
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
# float steps round. The integers are exact on both instruction sets ("generic": widen and
# multiply in LLVM vectors, lowered to NEON on a Raspberry Pi), and the float steps are the same
# IR, so both give the same bits; and a row's float steps are the same whichever rows share its
# group or its batch, so results do not depend on the batch.

GROUP_ROWS = 8
_V16_I32 = ir.VectorType(_I32, 16)
_V32_I16 = ir.VectorType(_I16, 32)
_V8_HALF = ir.VectorType(ir.HalfType(), 8)


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


def _pair_products(builder, weights, acts, signed, isa):
    """<16 x i16>: lane m = weights[2m] * acts[2m] + weights[2m + 1] * acts[2m + 1], acts
    signed, weights nibbles 0 .. 15 or (signed) int8; `weights` is |w| on AVX2 when signed."""
    if isa == "avx2":
        if signed:
            acts = _call(builder, "llvm.x86.avx2.psign.b", _V32_I8, [acts, weights[1]])
            weights = weights[0]
        return _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16_I16, [weights, acts])
    wide = builder.sext(weights, _V32_I16) if signed else builder.zext(weights, _V32_I16)
    products = builder.mul(wide, builder.sext(acts, _V32_I16))
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


def _group_chunks(builder, block, fmt: GroupFormat, isa: str):
    """The block's weights for eight rows as (weights, offset of their 4 activations): 8 chunks."""
    chunks = []
    for c in range(fmt.block_bytes // 4):
        packed = _load(builder, builder.gep(block, [ir.Constant(_I32, 32 * c)]), _V32_I8)
        if fmt.signed:
            weights = (_call(builder, "llvm.abs.v32i8", _V32_I8, [packed, ir.Constant(ir.IntType(1), 0)]), packed) if isa == "avx2" else packed
            chunks.append((weights, 4 * c))
        else:
            chunks.append((builder.and_(packed, ir.Constant(_V32_I8, [15] * 32)), 4 * c))
            chunks.append((builder.lshr(packed, ir.Constant(_V32_I8, [4] * 32)), QK // 2 + 4 * c))
    return chunks


def _block_sums(builder, chunks, x_block, fmt: GroupFormat, isa: str):
    """<8 x i32>: each of the eight rows' exact sum over the block of (stored weight) * x."""
    total = None
    for weights, offset in chunks:
        four = builder.load(builder.bitcast(builder.gep(x_block, [ir.Constant(_I32, offset)]), _I32.as_pointer()), align=1)
        acts = builder.bitcast(_splat(builder, four, _V8_I32), _V32_I8)
        part = _pair_products(builder, weights, acts, fmt.signed, isa)
        if fmt.signed:  # no room in i16 for more than one chunk
            part = _pair_sums(builder, part, isa)
        total = part if total is None else builder.add(total, part)
    return total if fmt.signed else _pair_sums(builder, total, isa)


def _load_f16x8(builder, pointer):
    """Eight f16 at an i8 pointer, as <8 x float> (vcvtph2ps on x86, fcvtl on ARM)."""
    return builder.fpext(builder.bitcast(_load(builder, pointer, _V8_I16), _V8_HALF), _V8_F32)


def _codegen_group(fmt: GroupFormat, n_tokens: int, isa: str):
    def codegen(context, builder, signature, args):
        wq, wd, wm, g, xq, xd, xs, xn, out, t, n_valid = args
        wq_t, wd_t, wm_t, g_t, xq_t, xd_t, xs_t, xn_t, out_t, t_t, n_valid_t = signature.args
        intp = types.intp
        g = context.cast(builder, g, g_t, intp)
        t = context.cast(builder, t, t_t, intp)
        n_valid = builder.trunc(context.cast(builder, n_valid, n_valid_t, intp), _I32)
        rows = [builder.add(t, context.get_constant(intp, i)) for i in range(n_tokens)]
        w_group, _ = _row_pointer(context, builder, wq_t, wq, g)
        d_group, wd_ary = _row_pointer(context, builder, wd_t, wd, g)
        m_group, _ = _row_pointer(context, builder, wm_t, wm, g)
        n_blocks = builder.udiv(cgutils.unpack_tuple(builder, wd_ary.shape, 2)[1], context.get_constant(intp, GROUP_ROWS))
        x_rows = [_row_pointer(context, builder, xq_t, xq, i)[0] for i in rows]
        xd_rows, xs_rows = ([builder.bitcast(_row_pointer(context, builder, a_t, a, i)[0], _F32.as_pointer()) for i in rows] for a, a_t in ((xd, xd_t), (xs, xs_t)))
        xn_rows = [builder.bitcast(_row_pointer(context, builder, xn_t, xn, i)[0], _I32.as_pointer()) for i in rows]
        zero = ir.Constant(_V8_F32, [0.0] * 8)
        accs = [cgutils.alloca_once_value(builder, zero) for _ in rows]
        mins = [cgutils.alloca_once_value(builder, zero) for _ in rows]
        group_bytes = context.get_constant(intp, GROUP_ROWS * fmt.block_bytes)
        scale_bytes = context.get_constant(intp, GROUP_ROWS * 2)
        with cgutils.for_range(builder, n_blocks) as loop:
            b = loop.index
            chunks = _group_chunks(builder, builder.gep(w_group, [builder.mul(b, group_bytes)]), fmt, isa)
            w_scales = _load_f16x8(builder, builder.gep(d_group, [builder.mul(b, scale_bytes)]))
            if fmt.has_min:
                w_mins = _load_f16x8(builder, builder.gep(m_group, [builder.mul(b, scale_bytes)]))
            x_offset = builder.mul(b, context.get_constant(intp, QK))
            for i in range(n_tokens):
                sums = _block_sums(builder, chunks, builder.gep(x_rows[i], [x_offset]), fmt, isa)
                if fmt.zero_point:
                    x_sum = builder.load(builder.gep(xn_rows[i], [b]))
                    sums = builder.sub(sums, _splat(builder, builder.mul(x_sum, ir.Constant(_I32, fmt.zero_point)), _V8_I32))
                scale = builder.fmul(w_scales, _splat(builder, builder.load(builder.gep(xd_rows[i], [b])), _V8_F32))
                builder.store(_fma(builder, scale, builder.sitofp(sums, _V8_F32), builder.load(accs[i])), accs[i])
                if fmt.has_min:
                    x_total = _splat(builder, builder.load(builder.gep(xs_rows[i], [b])), _V8_F32)
                    builder.store(_fma(builder, w_mins, x_total, builder.load(mins[i])), mins[i])
        out_ary = context.make_array(out_t)(context, builder, out)
        first_col = builder.mul(g, context.get_constant(intp, GROUP_ROWS))
        mask = builder.icmp_unsigned("<", ir.Constant(_V8_I32, list(range(GROUP_ROWS))), _splat(builder, n_valid, _V8_I32))
        for i in range(n_tokens):
            result = builder.load(accs[i])
            if fmt.has_min:
                result = builder.fadd(result, builder.load(mins[i]))
            pointer = cgutils.get_item_pointer(context, builder, out_t, out_ary, [rows[i], first_col], wraparound=False)
            _call(builder, "llvm.masked.store.v8f32.p0", ir.VoidType(), [result, pointer, ir.Constant(_I32, 4), mask])
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
