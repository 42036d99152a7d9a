"""LLVM vector IR building blocks, the instruction sets the kernels are written for, and the
scalar helpers compiled code shares (f16 rounding, a fused multiply-add, an exp that vectorizes).

Numba types every integer operation on narrow integers as 64-bit (uint8 & uint8 is uint64),
so a plain loop over nibbles and int8 activations compiles to 64-bit lanes, four to a register.
The kernels in pipeline/formats/ and attention_tiles.py write their arithmetic once on LLVM
vector types with the blocks here, so nothing leaves vector registers between blocks.

Integer work has one instruction sequence per instruction set in ISAS, all with the same exact
results:
  - "avx2": vpmaddubsw + vpmaddwd (signed weights use vpsignb to move their sign onto the
    activations), vcvtps2dq, chosen when the host has AVX2;
  - "dotprod": the Cortex-A76's (a Pi 5's) sdot, four byte products summed into each i32 lane,
    which is the grouped layout's four bytes per row; kernels that have it call _quad_dot, the
    rest take the NEON sequences; chosen only where the CPU reports the dotprod feature;
  - "neon": smull + addp / saddlp, fcvtns, on any aarch64 (a Pi 4's Cortex-A72);
  - "generic": widen and multiply in LLVM vectors, for any other target.
Everything after the integers is the same IR for all, so they give identical floats (the tests
compare every ISA the host runs; tests/test_isa_paths.py the ARM ones, under .ci/arm64).
Every ISA-specific sequence is in the section "Integer sequences by instruction set" below: a
new instruction set is a row of ISA_TABLE and a branch in each function there.
tests/bench/count_instructions.py counts each one's instructions per weight block.

Each public helper has a plain-numpy twin with the same name, which runs when Numba's JIT is
disabled (NUMBA_DISABLE_JIT=1, as one of the tests does); compiled code gets the IR through
`overload`.
"""

from __future__ import annotations

import platform

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic, overload

_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_F32 = ir.FloatType()
_V32_I8 = ir.VectorType(_I8, 32)
_V16_I16 = ir.VectorType(_I16, 16)
_V8_I32 = ir.VectorType(_I32, 8)
_V8_F32 = ir.VectorType(_F32, 8)
_V8_I8 = ir.VectorType(_I8, 8)
_V16_I8 = ir.VectorType(_I8, 16)
_V8_I16 = ir.VectorType(_I16, 8)
_V4_I32 = ir.VectorType(_I32, 4)
_V32_I16 = ir.VectorType(_I16, 32)
_V16_I32 = ir.VectorType(_I32, 16)
_V32_I32 = ir.VectorType(_I32, 32)
_HALF = ir.HalfType()
_V8_HALF = ir.VectorType(_HALF, 8)


# The machine names platform.machine() reports, as LLVM's target architectures.
_MACHINES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}


def cpu_features() -> frozenset[str]:
    """The features of the CPU Numba compiles for, as LLVM names them ("avx2", "neon", "dotprod"):
    NUMBA_CPU_FEATURES when NUMBA_CPU_NAME is set (portable caches, an emulated board), else the
    host's as LLVM reads them (on Linux aarch64 from /proc/cpuinfo: asimd is neon, asimddp dotprod)."""
    if config.CPU_NAME:
        return parse_cpu_features(config.CPU_FEATURES or "")
    return frozenset(name for name, on in llvm.get_host_cpu_features().items() if on)


def parse_cpu_features(text: str) -> frozenset[str]:
    """The features an LLVM feature string turns on ("+neon,+dotprod,-sve" -> neon, dotprod)."""
    return frozenset(f.strip()[1:] for f in text.split(",") if f.strip().startswith("+"))


# The instruction sets the integer sequences below are written for, the preferred first: each
# with the architecture it needs (None: any) and the CPU features it needs. An instruction the
# CPU lacks is never compiled in, so a Pi 4 (no dotprod) never meets an illegal instruction.
ISA_TABLE = (
    ("avx2", "x86_64", frozenset({"avx2"})),
    ("dotprod", "aarch64", frozenset({"dotprod"})),
    ("neon", "aarch64", frozenset()),  # AArch64's Advanced SIMD: in every 64-bit ARM Linux runs on
    ("generic", None, frozenset()),
)
QUAD_DOT_ISAS = ("dotprod",)  # the ISAs with _quad_dot: a 4-byte dot product per i32 lane


def isas_for(machine: str, features: frozenset[str]) -> tuple[str, ...]:
    """The instruction sets a CPU of `machine` (platform.machine()) with `features` runs, the
    preferred first."""
    arch = _MACHINES.get(machine.lower(), machine.lower())
    return tuple(name for name, needs_arch, needs in ISA_TABLE if needs_arch in (None, arch) and needs <= features)


def host_isas() -> tuple[str, ...]:
    """The instruction sets this host runs, the one the kernels use first."""
    return isas_for(platform.machine(), cpu_features())


ISAS = host_isas()  # every variant this host can run (the tests compare them)
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



def _check(name, arrays, dtypes):
    for array, dtype in zip(arrays, dtypes):
        if not (isinstance(array, types.Array) and array.ndim == 2 and array.layout == "C" and array.dtype == dtype):
            raise TypeError(f"{name}: expected a C-contiguous 2-D {dtype} array, got {array}")


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


def _load_f16x8(builder, pointer):
    """Eight f16 at an i8 pointer, as <8 x float> (vcvtph2ps on x86, fcvtl on ARM)."""
    return builder.fpext(builder.bitcast(_load(builder, pointer, _V8_I16), _V8_HALF), _V8_F32)


# ---------------------------------------------------------------------------------------------
# Integer sequences by instruction set


def _neon(builder, name, return_type, args):
    """An AArch64 NEON intrinsic (llvm.aarch64.neon.NAME) on 64- or 128-bit vectors."""
    return _call(builder, f"llvm.aarch64.neon.{name}", return_type, args)


def _quarters(builder, vector, width):
    """`vector` cut into consecutive pieces of `width` lanes."""
    return [_shuffle(builder, vector, range(i, i + width)) for i in range(0, vector.type.count, width)]


def _joined(builder, pieces):
    """Consecutive vectors of one type concatenated, pairwise (the inverse of _quarters)."""
    while len(pieces) > 1:
        pieces = [builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, 2 * a.type.count), list(range(2 * a.type.count))))
                  for a, b in zip(pieces[::2], pieces[1::2])]
    return pieces[0]


def _pair_products(builder, weights, acts, signed, isa):
    """<16 x i16>: lane m = weights[2m] * acts[2m] + weights[2m + 1] * acts[2m + 1], acts
    signed, weights nibbles 0 .. 31, K-quant units below 64 or (signed) int8; `weights` is |w| on
    AVX2 when signed."""
    if isa == "avx2":
        if signed:
            acts = _call(builder, "llvm.x86.avx2.psign.b", _V32_I8, [acts, weights[1]])
            weights = weights[0]
        return _call(builder, "llvm.x86.avx2.pmadd.ub.sw", _V16_I16, [weights, acts])
    if isa in ("neon", "dotprod"):  # smull per 8 bytes (weights below 128 are the same signed), addp
        products = [_neon(builder, "smull.v8i16", _V8_I16, [w, x]) for w, x in zip(_quarters(builder, weights, 8), _quarters(builder, acts, 8))]
        return _joined(builder, [_neon(builder, "addp.v8i16", _V8_I16, products[i : i + 2]) for i in (0, 2)])
    wide = builder.sext(weights, _V32_I16) if signed else builder.zext(weights, _V32_I16)
    products = builder.mul(wide, builder.sext(acts, _V32_I16))
    undef = ir.Constant(_V32_I16, ir.Undefined)
    even, odd = (builder.shuffle_vector(products, undef, ir.Constant(_V16_I32, list(range(i, 32, 2)))) for i in (0, 1))
    return builder.add(even, odd)


def _pair_sums(builder, pairs, isa):
    """<8 x i32>: lane k = pairs[2k] + pairs[2k + 1]."""
    if isa == "avx2":
        return _call(builder, "llvm.x86.avx2.pmadd.wd", _V8_I32, [pairs, ir.Constant(_V16_I16, [1] * 16)])
    if isa in ("neon", "dotprod"):
        return _pair_sums_long(builder, pairs)
    wide = builder.sext(pairs, _V16_I32)
    undef = ir.Constant(_V16_I32, ir.Undefined)
    even, odd = (builder.shuffle_vector(wide, undef, ir.Constant(_V8_I32, list(range(i, 16, 2)))) for i in (0, 1))
    return builder.add(even, odd)


def _pair_dot(builder, pairs, multipliers, isa):
    """<8 x i32>: lane k = pairs[2k] * multipliers[2k] + pairs[2k + 1] * multipliers[2k + 1] (vpmaddwd)."""
    if isa == "avx2":
        return _call(builder, "llvm.x86.avx2.pmadd.wd", _V8_I32, [pairs, multipliers])
    if isa in ("neon", "dotprod"):  # smull per 4 lanes, addp
        products = [_neon(builder, "smull.v4i32", _V4_I32, [p, m]) for p, m in zip(_quarters(builder, pairs, 4), _quarters(builder, multipliers, 4))]
        return _joined(builder, [_neon(builder, "addp.v4i32", _V4_I32, products[i : i + 2]) for i in (0, 2)])
    products = builder.mul(builder.sext(pairs, _V16_I32), builder.sext(multipliers, _V16_I32))
    return builder.add(_shuffle(builder, products, range(0, 16, 2)), _shuffle(builder, products, range(1, 16, 2)))


def _quad_dot(builder, acc, weights, acts):
    """<8 x i32>: acc plus, in lane k, sum over i < 4 of weights[4k + i] * acts[4k + i], both
    int8 (nibbles and K-quant units are below 128, so the same signed): sdot, on QUAD_DOT_ISAS only."""
    halves = zip(_quarters(builder, acc, 4), _quarters(builder, weights, 16), _quarters(builder, acts, 16))
    return _joined(builder, [_neon(builder, "sdot.v4i32.v16i8", _V4_I32, list(args)) for args in halves])


def _after(builder, vectors):
    """An empty asm that reads `vectors` (i32 vectors, as 128-bit NEON registers) and has a
    side effect: what computes them stays before it and the loads after it stay after, so LLVM's
    scheduler cannot interleave two blocks' integer work (on QUAD_DOT_ISAS only)."""
    halves = [half for vector in vectors for half in _quarters(builder, vector, 4)]
    builder.asm(ir.FunctionType(ir.VoidType(), [h.type for h in halves]), "", ",".join(["w"] * len(halves)), halves, side_effect=True)


def _byte_products(builder, weights, acts):
    """<32 x i16>: weights[j] * acts[j], both int8 (NEON: smull per 8 bytes, smlal where added to
    a sum)."""
    return builder.mul(builder.sext(weights, _V32_I16), builder.sext(acts, _V32_I16))


def _quad_sums(builder, pair_sums):
    """<8 x i32>: lane k = pair_sums[2k] + pair_sums[2k + 1] of a <16 x i32> (addp)."""
    halves = _quarters(builder, pair_sums, 4)
    return _joined(builder, [_neon(builder, "addp.v4i32", _V4_I32, halves[i : i + 2]) for i in (0, 2)])


def _pair_sums_long(builder, products):
    """i32 lane m = products[2m] + products[2m + 1], from 16 or 32 lanes of i16 (NEON's saddlp)."""
    return _joined(builder, [_neon(builder, "saddlp.v4i32.v8i16", _V4_I32, [q]) for q in _quarters(builder, products, 8)])


def _signed_weights(builder, packed, isa):
    """<32 x i8> int8 weights as _pair_products takes them when signed: AVX2 (|w|, w), for
    vpmaddubsw's unsigned operand and vpsignb; the others w."""
    if isa == "avx2":
        return _call(builder, "llvm.abs.v32i8", _V32_I8, [packed, ir.Constant(ir.IntType(1), 0)]), packed
    return packed


def _round_to_int(builder, v, isa):
    """<8 x float> -> <8 x i32>, to nearest with ties to even; a NaN gives no poison."""
    if isa == "avx2":  # vcvtps2dq: the rounding mode's nearest-even; NaN -> 0x80000000
        return _call(builder, "llvm.x86.avx.cvt.ps2dq.256", _V8_I32, [v])
    if isa in ("neon", "dotprod"):  # fcvtns: nearest-even, saturating, NaN -> 0, as below
        return _joined(builder, [_neon(builder, "fcvtns.v4i32.v4f32", _V4_I32, [half]) for half in _quarters(builder, v, 4)])
    rounded = _call(builder, "llvm.rint.v8f32", _V8_F32, [v])  # frintx on ARM
    return _call(builder, "llvm.fptosi.sat.v8i32.v8f32", _V8_I32, [rounded])  # NaN -> 0



# ---------------------------------------------------------------------------------------------
# f16 rounding


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
