"""The activation side of every product: Q8 blocks (ggml's quantize_row_q8_0 / q8_1) in vector
IR, f16 rounding, the Activations object that makes each form once per input, and the forms the
formats' records name (ggml-cpu's `vec_dot_type`: what each weight format's kernel reads).

The K-quants' Q8_K superblocks and BF16's bf16 rows are made in kquants.py and floats.py, next
to the only kernels that read them, and kept by Activations.form.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ..vector import (
    _F32,
    _HALF,
    _I32,
    _V8_F32,
    _V8_I32,
    _V32_I8,
    _V32_I32,
    ISA,
    ISAS,
    _call,
    _load,
    _round_to_int,
    _row_pointer,
    _splat,
    round_f16,
)
from .base import QK

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
_ABS_BITS = ir.Constant(_V8_I32, [0x7FFFFFFF] * 8)


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
# Activation quantization (per product, compiled) and the Activations that keep its results


@nb.njit(inline="always")
def _quantize_row_q8(x, qs, d, s, n, t):
    """Row t of x (T, K) f32 -> qs (T, K) i8, d (T, K//32) f32, s (T, K//32) f32 = d * sum(qs)
    and n (T, K//32) i32 = sum(qs): ggml's quantize_row_q8_0/q8_1, a block at a time in
    vector IR (quantize_block_q8 says how the scales are taken)."""
    for b in range(x.shape[1] // QK):
        quantize_block_q8(x, qs, d, s, n, t, b)


# No fastmath: the float work is quantize_block_q8's IR, in a fixed order.
@nb.njit(cache=True, nogil=True)
def _quantize_q8(x, qs, d, s, n):
    for t in range(x.shape[0]):
        _quantize_row_q8(x, qs, d, s, n, t)


@nb.njit(cache=True, nogil=True, parallel=True)
def _quantize_q8_parallel(x, qs, d, s, n):
    for t in nb.prange(x.shape[0]):
        _quantize_row_q8(x, qs, d, s, n, t)


# Rows from which quantizing is worth waking the threads for (a prefill chunk, not a decode
# batch: 8 rows cost more in thread wake-ups than in work, tests/bench/bench_parallel_rows.py);
# each row is the same code either way.
Q8_PARALLEL_ROWS = 32


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
        """make(x), made once (the K-quants' Q8_K and BF16's bf16 activations)."""
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
            (_quantize_q8_parallel if n_rows >= Q8_PARALLEL_ROWS else _quantize_q8)(self.x, qs, d, s, n)
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
# The forms of x the kernels read, as the formats' records name them


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
