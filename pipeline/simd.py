"""Vector dot products of one 32-weight block, written as LLVM vector IR for Numba kernels.

Numba types every integer operation on narrow integers as 64-bit (uint8 & uint8 is uint64),
so a plain loop over nibbles and int8 activations compiles to 64-bit lanes, four to a register,
at about 1.7 GB/s of weights on one core. Here the same arithmetic is written once on LLVM
vector types (<32 x i8> loads, widened to i32 lanes, one add-reduction), which LLVM lowers to
the target's SIMD: AVX2 on x86-64, NEON on a 64-bit Raspberry Pi. About 8 GB/s on one core of
CI's machine kind (measured with a 26 MB Q4_1 matrix, see tests/bench).

Each has a plain-numpy twin with the same name, which runs when Numba's JIT is disabled
(NUMBA_DISABLE_JIT=1, as one of the tests does); compiled code gets the IR version through
`overload`. Both functions take a C-contiguous array and an element offset for each operand; kernels
pass flat views (`arr.reshape(-1)`) and compute the offsets. They trust their inputs: the
public kernels in quants.py check shapes before calling them.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
import numpy as np
from numba.extending import intrinsic, overload

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_V16_I8 = ir.VectorType(_I8, 16)
_V32_I8 = ir.VectorType(_I8, 32)
_V32_I32 = ir.VectorType(_I32, 32)


def _load(context, builder, array_type, array, offset, vector_type):
    """Load `vector_type` from array[offset:] (unaligned)."""
    data = context.make_array(array_type)(context, builder, array).data
    pointer = builder.bitcast(builder.gep(data, [offset]), vector_type.as_pointer())
    return builder.load(pointer, align=1)


def _sum(builder, vector):
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_I32, [vector.type]), f"llvm.vector.reduce.add.v{vector.type.count}i32"
    )
    return builder.call(fn, [vector])


def _check(w, x, w_elem, x_elem):
    ok = (
        isinstance(w, types.Array)
        and isinstance(x, types.Array)
        and w.ndim == 1
        and x.ndim == 1
        and w.dtype == w_elem
        and x.dtype == x_elem
    )
    if not ok:
        raise TypeError(f"expected 1-D {w_elem} and {x_elem} arrays, got {w} and {x}")


@intrinsic
def _dot_q4_32_ir(typingctx, w, w_offset, x, x_offset):
    """sum(q[j] * x[j] for j < 32): q are the 32 unsigned nibbles of w[w_offset : w_offset + 16]
    in GGML's order (low nibbles are weights 0..15, high nibbles 16..31), x is int8. -> int32"""
    _check(w, x, types.uint8, types.int8)

    def codegen(context, builder, signature, args):
        w_arr, w_off, x_arr, x_off = args
        packed = _load(context, builder, signature.args[0], w_arr, w_off, _V16_I8)
        low = builder.and_(packed, ir.Constant(_V16_I8, [15] * 16))
        high = builder.lshr(packed, ir.Constant(_V16_I8, [4] * 16))
        nibbles = builder.shuffle_vector(low, high, ir.Constant(_V32_I32, list(range(32))))
        acts = _load(context, builder, signature.args[2], x_arr, x_off, _V32_I8)
        products = builder.mul(builder.zext(nibbles, _V32_I32), builder.sext(acts, _V32_I32))
        return _sum(builder, products)

    return types.int32(w, w_offset, x, x_offset), codegen


@intrinsic
def _dot_q8_32_ir(typingctx, w, w_offset, x, x_offset):
    """sum(w[w_offset + j] * x[x_offset + j] for j < 32), both int8. -> int32"""
    _check(w, x, types.int8, types.int8)

    def codegen(context, builder, signature, args):
        w_arr, w_off, x_arr, x_off = args
        weights = _load(context, builder, signature.args[0], w_arr, w_off, _V32_I8)
        acts = _load(context, builder, signature.args[2], x_arr, x_off, _V32_I8)
        products = builder.mul(builder.sext(weights, _V32_I32), builder.sext(acts, _V32_I32))
        return _sum(builder, products)

    return types.int32(w, w_offset, x, x_offset), codegen


def _dot_rows(context, builder, signature, weights, x_arr, x_off, x_stride):
    """weights (<32 x i32>) against 32 int8 activations at x_off + i * x_stride, i < 4."""
    sums = []
    for i in range(4):
        offset = builder.add(x_off, builder.mul(x_stride, ir.Constant(x_stride.type, i)))
        acts = _load(context, builder, signature.args[2], x_arr, offset, _V32_I8)
        sums.append(_sum(builder, builder.mul(weights, builder.sext(acts, _V32_I32))))
    return context.make_tuple(builder, signature.return_type, sums)


@intrinsic
def _dot_q4_32x4_ir(typingctx, w, w_offset, x, x_offset, x_stride):
    _check(w, x, types.uint8, types.int8)

    def codegen(context, builder, signature, args):
        w_arr, w_off, x_arr, x_off, x_stride = args
        packed = _load(context, builder, signature.args[0], w_arr, w_off, _V16_I8)
        low = builder.and_(packed, ir.Constant(_V16_I8, [15] * 16))
        high = builder.lshr(packed, ir.Constant(_V16_I8, [4] * 16))
        nibbles = builder.zext(builder.shuffle_vector(low, high, ir.Constant(_V32_I32, list(range(32)))), _V32_I32)
        return _dot_rows(context, builder, signature, nibbles, x_arr, x_off, x_stride)

    return types.UniTuple(types.int32, 4)(w, w_offset, x, x_offset, x_stride), codegen


@intrinsic
def _dot_q8_32x4_ir(typingctx, w, w_offset, x, x_offset, x_stride):
    _check(w, x, types.int8, types.int8)

    def codegen(context, builder, signature, args):
        w_arr, w_off, x_arr, x_off, x_stride = args
        weights = builder.sext(_load(context, builder, signature.args[0], w_arr, w_off, _V32_I8), _V32_I32)
        return _dot_rows(context, builder, signature, weights, x_arr, x_off, x_stride)

    return types.UniTuple(types.int32, 4)(w, w_offset, x, x_offset, x_stride), codegen


def dot_q4_32(w, w_offset, x, x_offset):
    packed = w[w_offset : w_offset + 16].astype(np.int32)
    nibbles = np.concatenate((packed & 15, packed >> 4))
    return np.int32(np.dot(nibbles, x[x_offset : x_offset + 32].astype(np.int32)))


def dot_q8_32(w, w_offset, x, x_offset):
    return np.int32(np.dot(w[w_offset : w_offset + 32].astype(np.int32), x[x_offset : x_offset + 32].astype(np.int32)))


@overload(dot_q4_32, inline="always")
def _dot_q4_32_compiled(w, w_offset, x, x_offset):
    return lambda w, w_offset, x, x_offset: _dot_q4_32_ir(w, w_offset, x, x_offset)


@overload(dot_q8_32, inline="always")
def _dot_q8_32_compiled(w, w_offset, x, x_offset):
    return lambda w, w_offset, x, x_offset: _dot_q8_32_ir(w, w_offset, x, x_offset)


def dot_q4_32x4(w, w_offset, x, x_offset, x_stride):
    """dot_q4_32 against four activation blocks x_stride apart: one unpack for four rows, as
    prefill and batched decode use it. -> (int32,) * 4"""
    return tuple(dot_q4_32(w, w_offset, x, x_offset + i * x_stride) for i in range(4))


def dot_q8_32x4(w, w_offset, x, x_offset, x_stride):
    return tuple(dot_q8_32(w, w_offset, x, x_offset + i * x_stride) for i in range(4))


@overload(dot_q4_32x4, inline="always")
def _dot_q4_32x4_compiled(w, w_offset, x, x_offset, x_stride):
    return lambda w, w_offset, x, x_offset, x_stride: _dot_q4_32x4_ir(w, w_offset, x, x_offset, x_stride)


@overload(dot_q8_32x4, inline="always")
def _dot_q8_32x4_compiled(w, w_offset, x, x_offset, x_stride):
    return lambda w, w_offset, x, x_offset, x_stride: _dot_q8_32x4_ir(w, w_offset, x, x_offset, x_stride)
