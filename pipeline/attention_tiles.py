"""Attention's products on the f16 KV cache, written as LLVM vector IR (pipeline/vector.py's
blocks): scores of query rows against cached keys, and weighted sums of cached values."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .vector import _F32, _HALF, _I16, _I32, _V8_F32, _V8_I16, _V8_I32, _call, _fma, _fma_np, _splat

# Attention's products on the f16 KV cache: C[i, :n] = sum over kk < k of A[i, kk] * B[kk, :n]
# with A f32, B f16 (as uint16 bits) and n <= TILE_COLS[rows of A]


TILE_ROWS = 4  # rows of A (and C) per call at most
# Columns of C per call, by its rows: each column of each row is a chain of fmas, each fma
# waiting four cycles for the one before, so a tile needs eight or more <8 x float> chains to
# keep both fma units busy: one or two rows take 32 columns, three 24, four 16 (more would not
# fit AVX2's 16 registers). A decode row of a model with three query heads per KV head (SmolLM2)
# is a tile of three rows: at 24 columns a tile takes 1.76 ns per row and column against 2.36
# at 16, and attention for 8 decode rows 10-14% less time (positions 70 to 1000).
TILE_COLS = (0, 32, 32, 24, 16)  # TILE_COLS[n_rows]


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

        def clamped_lanes(n_used):
            """Lane j of the last half reads column min(j, its last column): loop-invariant offsets."""
            last = builder.sub(n_cols, ir.Constant(intp, 8 * (n_used - 1) + 1))
            return [builder.select(builder.icmp_signed("<", ir.Constant(intp, j), last), ir.Constant(intp, j), last) for j in range(8)]

        def masked_load(pointer, mask, lanes):
            """The half's columns before n_cols, zeros after, read without a branch: a masked
            16-bit load is a test and a branch per lane on NEON (and AVX2), so each lane is loaded
            from a column inside B (past n_cols, the last one again) and a select zeroes those."""
            pointer = builder.bitcast(pointer, _I16.as_pointer())
            bits = ir.Constant(_V8_I16, ir.Undefined)
            for j, lane in enumerate(lanes):
                bits = builder.insert_element(bits, builder.load(builder.gep(pointer, [lane]), align=2), ir.Constant(_I32, j))
            return builder.select(mask, bits, ir.Constant(_V8_I16, [0] * 8))

        def plain_load(pointer, mask, lanes):
            return builder.load(builder.bitcast(pointer, _V8_I16.as_pointer()), align=2)

        def loop(n_used, last_masked):
            """The chains of the first n_used halves, the last one read masked or whole (a masked
            read takes eight lane loads: about twice the tile's time)."""
            lanes = clamped_lanes(n_used) if last_masked else None
            with cgutils.for_range(builder, k) as kk_loop:
                kk = kk_loop.index
                b_row = builder.gep(b_base, [builder.mul(kk, b_stride)])
                halves = []
                for h in range(n_used):
                    load = masked_load if last_masked and h == n_used - 1 else plain_load
                    bits = load(builder.gep(b_row, [ir.Constant(intp, 8 * h)]), masks[h], lanes)
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
