"""How Q5_0, Q5_1 and the K-quants store their quants: eight weight rows to a group, each span
of 32 weights as a few 32-byte vectors that hold the quants' bits as the file does, and the
helpers their kernels share.

Every weight is stored as an unsigned integer u (Q5_0 and the K-quants with a zero point take
u = q + 16, q + 4 (Q3_K) or q + 32 (Q6_K) and subtract the zero point through the activations'
block sums). A chunk vector is 32 bytes u whose byte 4k + i is weight 4c + i of row k for
chunk c; one vpmaddubsw of it against the chunk's four activation bytes repeated eight times
gives row k's products in i16 lanes 2k and 2k + 1.

Storage, per group of 8 rows and block (32 weights for Q5_x, a 256-weight superblock for the
K-quants), each span of 32 weights (8 chunks c) as 32-byte vectors:

    Q4_K:       N0 N1 N2 N3              N_j: nibble c // 4 of N_(c % 4) holds u's bits 0..3
    Q5_0, Q5_1,
    Q5_K:       N0 N1 N2 N3 H            H: bit c holds u's bit 4
    Q6_K:       N0 N1 N2 N3 T0 T1        T_j: bits 2 (c % 4) .. of T_(c // 4) hold u's bits 4..5
    Q3_K:       L0 L1 H                  L_j: bits 2 (c % 4) .. of L_(c // 4) hold u's bits 0..1;
                                         H: bit c holds u's bit 2
    Q2_K:       L0 L1

so quants take what GGUF gives them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils

from ..vector import _I32, _V8_I32, _V32_I8, _bits, _call, _const, _load, _splat
from .base import GROUP_ROWS

SPAN = 32  # weights per span of stored vectors (8 chunks of 4)


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


NIBBLES_BIT = _Spans(4, "bit")  # Q5_0, Q5_1 and Q5_K: four nibble vectors and one of fifth bits


def encode_quants(spans: _Spans, u: np.ndarray) -> np.ndarray:
    """(rows, n_blocks, W) u (rows a multiple of 8) -> (groups, bytes) as the kernels read them."""
    stored = spans.encode(group_chunks(u))
    return stored.reshape(stored.shape[0], -1)


def decode_quants(spans: _Spans, wq: np.ndarray, width: int) -> np.ndarray:
    """(groups, bytes) -> (groups * 8, n_blocks, width) int32 u: encode_quants undone."""
    stored = wq.reshape(wq.shape[0], -1, width // SPAN, spans.vectors, 32)
    return ungroup_chunks(spans.decode(stored))


# ---------------------------------------------------------------------------------------------
# Repacking from GGUF blocks and reading rows back (numpy)


def _bit_planes(planes: np.ndarray, shifts, mask: int) -> np.ndarray:
    """(..., 32) bytes -> (..., len(shifts) * 32): (byte >> shift) & mask for each shift in turn."""
    values = planes.astype(np.int32)[..., None, :] >> np.array(shifts).reshape(-1, 1)
    return (values & mask).reshape(*planes.shape[:-1], -1)



def _f16_bits(blocks: np.ndarray, start: int) -> np.ndarray:
    """(rows, n, block_bytes) uint8 -> the f16 at byte `start` of each block, as bits (rows, n, 1)."""
    return np.ascontiguousarray(blocks[..., start : start + 2]).view(np.uint16)


def _padded(values: np.ndarray) -> np.ndarray:
    """values with zero rows appended up to a multiple of GROUP_ROWS rows."""
    rows = values.shape[0]
    extra = -rows % GROUP_ROWS
    if extra == 0:
        return values
    return np.concatenate((values, np.zeros((extra, *values.shape[1:]), values.dtype)))


def _decoded_groups(ids: np.ndarray):
    """(the row groups holding `ids`, sorted; each id's row among those groups' rows)."""
    groups, inverse = np.unique(ids // GROUP_ROWS, return_inverse=True)
    return groups, inverse.reshape(-1) * GROUP_ROWS + ids % GROUP_ROWS


def _halves(bits: np.ndarray, groups: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """Grouped f16 bits (groups, n_blocks * 8) -> the picked rows' f32 (len(pick), n_blocks)."""
    return ungroup_rows(bits[groups], 1)[pick][..., 0].view(np.float16).astype(np.float32)


def _halves_np(bits: np.ndarray, g: int) -> np.ndarray:
    """(groups, n_blocks * 8) f16 bits -> (n_blocks, 8) f32 of group g."""
    return bits[g].view(np.float16).astype(np.float32).reshape(-1, GROUP_ROWS)



# ---------------------------------------------------------------------------------------------
# The kernels' shared steps


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
