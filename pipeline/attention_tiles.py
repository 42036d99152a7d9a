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


class _TileCode:
    """The IR of one call of a tile of n_rows rows, built in steps: the arguments as pointers,
    the loops over kk (one per variant, chosen once per call), the masked stores of C."""

    def __init__(self, n_rows: int, context, builder, signature, args):
        a, a0, a1, a2, a3, b, b_off, b_stride, k, c, c0, c1, c2, c3, n_cols = args
        self.n_rows, self.n_halves = n_rows, TILE_COLS[n_rows] // 8  # n_halves: <8 x float> vectors per row of C
        self.context, self.builder, self.args_t = context, builder, signature.args
        self.intp = context.get_value_type(types.intp)
        a_data, b_data, c_data = self._data(0, a, _F32), self._data(5, b, _I16), self._data(9, c, _F32)
        self.a_rows = [builder.gep(a_data, [self._cast(1 + i, off)]) for i, off in enumerate((a0, a1, a2, a3)[:n_rows])]
        self.c_rows = [builder.gep(c_data, [self._cast(10 + i, off)]) for i, off in enumerate((c0, c1, c2, c3)[:n_rows])]
        self.b_base = builder.gep(b_data, [self._cast(6, b_off)])
        self.b_stride = self._cast(7, b_stride)
        self.k = self._cast(8, k)
        self.n_cols = self._cast(14, n_cols)
        limit = _splat(builder, builder.trunc(self.n_cols, _I32), _V8_I32)
        self.masks = [builder.icmp_signed("<", ir.Constant(_V8_I32, list(range(h * 8, h * 8 + 8))), limit)
                      for h in range(self.n_halves)]
        self.accs = [[cgutils.alloca_once_value(builder, ir.Constant(_V8_F32, [0.0] * 8)) for _ in range(self.n_halves)]
                     for _ in range(n_rows)]
        self.b, self.b_off = b, b_off

    def _data(self, index, value, element):
        ary = self.context.make_array(self.args_t[index])(self.context, self.builder, value)
        return self.builder.bitcast(ary.data, element.as_pointer())

    def _cast(self, index, value):
        return self.context.cast(self.builder, value, self.args_t[index], types.intp)

    def _clamped_lanes(self, n_used: int):
        """Lane j of the last half reads column min(j, its last column): loop-invariant offsets."""
        builder, intp = self.builder, self.intp
        last = builder.sub(self.n_cols, ir.Constant(intp, 8 * (n_used - 1) + 1))
        return [builder.select(builder.icmp_signed("<", ir.Constant(intp, j), last), ir.Constant(intp, j), last)
                for j in range(8)]

    def _load_b(self, pointer, mask, lanes):
        """A half of B's row; with `lanes`, its columns before n_cols and zeros after, read without
        a branch: a masked 16-bit load is a test and a branch per lane on NEON (and AVX2), so each
        lane is loaded from a column inside B (past n_cols, the last one again) and a select zeroes those."""
        builder = self.builder
        if lanes is None:
            return builder.load(builder.bitcast(pointer, _V8_I16.as_pointer()), align=2)
        pointer = builder.bitcast(pointer, _I16.as_pointer())
        bits = ir.Constant(_V8_I16, ir.Undefined)
        for j, lane in enumerate(lanes):
            bits = builder.insert_element(bits, builder.load(builder.gep(pointer, [lane]), align=2), ir.Constant(_I32, j))
        return builder.select(mask, bits, ir.Constant(_V8_I16, [0] * 8))

    def loop(self, n_used: int, last_masked: bool) -> None:
        """The chains of the first n_used halves, the last one read masked or whole (a masked
        read takes eight lane loads: about twice the tile's time)."""
        builder = self.builder
        lanes = self._clamped_lanes(n_used) if last_masked else None
        with cgutils.for_range(builder, self.k) as kk_loop:
            kk = kk_loop.index
            b_row = builder.gep(self.b_base, [builder.mul(kk, self.b_stride)])
            halves = []
            for h in range(n_used):
                bits = self._load_b(builder.gep(b_row, [ir.Constant(self.intp, 8 * h)]), self.masks[h],
                                    lanes if h == n_used - 1 else None)
                halves.append(builder.fpext(builder.bitcast(bits, ir.VectorType(_HALF, 8)), _V8_F32))
            for i in range(self.n_rows):
                a_val = _splat(builder, builder.load(builder.gep(self.a_rows[i], [kk])), _V8_F32)
                for h in range(n_used):
                    builder.store(_fma(builder, a_val, halves[h], builder.load(self.accs[i][h])), self.accs[i][h])

    def loops(self) -> None:
        """One loop per (halves used, last one read masked or whole), chosen once per call. A
        partial last half is read whole when B goes on past it (its extra columns are computed,
        never stored), masked only at the very end of B."""
        builder, intp, n_cols = self.builder, self.intp, self.n_cols
        n_used = builder.sdiv(builder.add(n_cols, ir.Constant(intp, 7)), ir.Constant(intp, 8))
        b_size = builder.extract_value(self.context.make_array(self.args_t[5])(self.context, builder, self.b).shape, 0)
        last_row = builder.add(self._cast(6, self.b_off), builder.mul(builder.sub(self.k, ir.Constant(intp, 1)), self.b_stride))
        last_read = builder.add(last_row, builder.mul(n_used, ir.Constant(intp, 8)))
        masked = builder.and_(builder.icmp_signed("!=", builder.srem(n_cols, ir.Constant(intp, 8)), ir.Constant(intp, 0)),
                              builder.icmp_signed(">", last_read, b_size))
        variants = [(used, last_masked) for used in range(1, self.n_halves + 1) for last_masked in (False, True)]
        self._choose(variants, 0, n_used, masked)

    def _choose(self, variants, i: int, n_used, masked) -> None:
        """Variant i's loop if it is the one (the last variant without asking), else the next."""
        builder, intp = self.builder, self.intp
        used, last_masked = variants[i]
        if i == len(variants) - 1:
            self.loop(used, last_masked)
            return
        this = builder.and_(builder.icmp_signed("==", n_used, ir.Constant(intp, used)),
                            builder.icmp_signed("==", masked, ir.Constant(ir.IntType(1), int(last_masked))))
        with builder.if_else(this) as (then, otherwise):
            with then:
                self.loop(used, last_masked)
            with otherwise:
                self._choose(variants, i + 1, n_used, masked)

    def store(self) -> None:
        """C's columns below n_cols, by masked stores."""
        builder = self.builder
        for i in range(self.n_rows):
            for h in range(self.n_halves):
                pointer = builder.bitcast(builder.gep(self.c_rows[i], [ir.Constant(self.intp, 8 * h)]), _V8_F32.as_pointer())
                _call(builder, "llvm.masked.store.v8f32.p0", ir.VoidType(),
                      [builder.load(self.accs[i][h]), pointer, ir.Constant(_I32, 4), self.masks[h]])


def _codegen_tile(n_rows: int):
    """Each C element is one chain of fused multiply-adds in kk order, whatever the tile's rows
    and columns, so a row's results do not depend on which rows share its tile. Columns past n
    are never written to C (masked stores), and read from B only where B goes on past them."""

    def codegen(context, builder, signature, args):
        tile = _TileCode(n_rows, context, builder, signature, args)
        tile.loops()
        tile.store()
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
