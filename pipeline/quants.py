"""Quantized weight matrices and their products, over the formats' registry (pipeline/formats/).

A PackedMatrix is one (rows, cols) matrix in one GGUF format, repacked for that format's kernels;
pack, matmul and dequantize_rows look its format up in FORMATS and do what its record says.
Activations keep the forms of one activation matrix that the products read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QT

from .formats import FORMATS, SUPPORTED_TYPES
from .formats.activations import Activations
from .formats.base import F16_TO_F32

__all__ = [
    "F16_TO_F32",
    "FORMATS",
    "SUPPORTED_TYPES",
    "Activations",
    "PackedMatrix",
    "UnsupportedTypeError",
    "dequantize_rows",
    "matmul",
    "non_finite_part",
    "pack",
    "packed_nbytes",
    "supported_names",
]


class UnsupportedTypeError(ValueError):
    pass


def supported_names() -> str:
    return ", ".join(t.name for t in SUPPORTED_TYPES)


@dataclass(frozen=True)
class PackedMatrix:
    """A (rows, cols) weight matrix in one format, repacked for the kernels.

    arrays, by format:
        F32:  (values f32 (rows, cols),)
        F16:  (bits u16 (rows, cols),)
        Q8_0: (qs u8 (groups, cols * 8), d u16 (groups, cols // 32 * 8))
        Q4_0: (qs u8 (groups, cols // 2 * 8), d u16 (groups, cols // 32 * 8))
        Q4_1: (qs u8 (groups, cols // 2 * 8), d u16 (groups, cols // 32 * 8), m u16 (same))
    The block formats keep rows in groups of 8 (the last padded with zeros), interleaved as
    formats/legacy.py describes, with their f16 scales and minima as uint16 bits; the others as
    their files in pipeline/formats/ describe.
    """

    type: QT
    rows: int
    cols: int
    arrays: tuple[np.ndarray, ...]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    @property
    def group_rows(self) -> int:
        """Rows stored together (the arrays' first axis counts groups): 8 for block formats."""
        return FORMATS[self.type].group_rows

    def row_slice(self, start: int, stop: int) -> "PackedMatrix":
        """Rows [start, stop) as a view (no copy); grouped formats need whole groups."""
        group = self.group_rows
        if start % group or (stop % group and stop != self.rows):
            raise ValueError(f"rows {start}:{stop} of a {self.type.name} matrix split a group of {group}")
        first, last = start // group, -(-stop // group)
        return PackedMatrix(self.type, stop - start, self.cols, tuple(a[first:last] for a in self.arrays))




def pack(ttype: QT, raw: np.ndarray, name: str) -> PackedMatrix:
    """Repack a GGUF tensor (2-D view from GGUFFile.tensor_data) for the kernels."""
    if ttype not in FORMATS:
        raise UnsupportedTypeError(f"{name}: unsupported type {ttype.name} (supported: {supported_names()})")
    return PackedMatrix(ttype, *FORMATS[ttype].pack(raw))


_CHECK_CHUNK = 1 << 20  # values checked at once: bounds the temporaries for a large tensor


def non_finite_part(m: PackedMatrix) -> str | None:
    """What of m holds a NaN or an Inf ("values" of a float format, "block scales" of a block
    format), or None. Only the float arrays are read (a block format's scales are a tenth or
    less of its bytes), as bits with a mask, a chunk at a time."""
    fmt = FORMATS[m.type]
    for index in fmt.float_arrays:
        bits = m.arrays[index]
        if _any_exponent_all_ones(bits.view(np.dtype(f"u{bits.itemsize}")), fmt.float_exponent):
            return fmt.floats_are
    return None


def _any_exponent_all_ones(bits: np.ndarray, mask: int) -> bool:
    flat = bits.reshape(-1)
    return any(np.any((flat[i : i + _CHECK_CHUNK] & mask) == mask) for i in range(0, flat.size, _CHECK_CHUNK))


def packed_nbytes(ttype: QT, rows: int, cols: int) -> int:
    """What pack() makes of a (rows, cols) matrix, without packing it (for memory plans before
    any weight is read)."""
    return FORMATS[ttype].packed_nbytes(rows, cols)



def matmul(w: PackedMatrix, acts: Activations, out: np.ndarray | None = None) -> np.ndarray:
    """(T, cols) activations times W (rows, cols) transposed -> (T, rows) f32."""
    if out is None:
        out = np.empty((acts.x.shape[0], w.rows), np.float32)
    fmt = FORMATS[w.type]
    fmt.kernel(*fmt.weights(w.arrays), *fmt.activations(acts), out)
    return out


def dequantize_rows(w: PackedMatrix, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` of W as f32 (len(ids), cols)."""
    return FORMATS[w.type].dequantize_rows(w.arrays, w.cols, np.asarray(ids, dtype=np.int64))
