"""What every weight format shares: block and group sizes, the f16 table, and the record that
describes one format (the registry in __init__.py holds one per GGUF type)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

QK = 32  # weights per block of the 32-weight formats (Q4_0 .. Q8_0) and of Q8 activations
QK_K = 256  # weights per K-quant superblock (and Q8_K activation superblock)
GROUP_ROWS = 8  # weight rows stored together, one per lane of an <8 x i32> vector


def f16_to_f32_table() -> np.ndarray:
    """(65536,) f32: the value of every f16 bit pattern, made from the bits alone so every machine
    builds the same table without a floating-point exception. It is ggml's ggml_table_f32_f16 bit
    for bit (F16C's vcvtph2ps and ggml_compute_fp16_to_fp32 agree): a NaN keeps its sign and
    payload and comes out quiet, where numpy's cast leaves a signalling NaN signalling on x86 and
    quiets it on ARM with a RuntimeWarning."""
    h = np.arange(1 << 16, dtype=np.uint32)
    sign, exponent, mantissa = (h & 0x8000) << 16, (h >> 10) & 0x1F, h & 0x3FF
    normal = ((exponent + (127 - 15)) << 23) | (mantissa << 13)
    subnormal = (mantissa.astype(np.float32) * np.float32(2.0**-24)).view(np.uint32)  # exact: a power of 2 apart
    inf_nan = np.uint32(0x7F800000) | (mantissa << 13) | np.where(mantissa != 0, np.uint32(0x00400000), np.uint32(0))
    bits = np.select([exponent == 0, exponent == 31], [subnormal, inf_nan], normal)
    return (sign | bits).astype(np.uint32).view(np.float32)


# f16 -> f32 for every bit pattern: Numba has no float16, so compiled code decodes f16 through
# this table, as ggml does with its ggml_table_f32_f16.
F16_TO_F32 = f16_to_f32_table()


# A float whose exponent bits are all ones is an Inf or a NaN (IEEE 754): the masks, by width.
F16_EXPONENT, BF16_EXPONENT, F32_EXPONENT = 0x7C00, 0x7F80, 0x7F800000


@dataclass(frozen=True)
class Format:
    """How caravan stores and multiplies one GGUF tensor type."""

    type: QT
    scale_offsets: tuple[int, ...]  # byte offsets of a GGUF block's f16 fields (d, then m or dmin)
    group_rows: int  # rows pack() stores together (the arrays' first axis counts groups)
    pack: Callable  # (raw GGUF tensor_data (rows, row bytes)) -> (rows, cols, arrays)
    packed_nbytes: Callable  # (rows, cols) -> what pack() makes of them, without packing
    kernel: Callable  # the compiled product: kernel(*weights(arrays), *activations(acts), out)
    weights: Callable  # pack()'s arrays as kernel takes them
    activations: Callable  # (Activations) -> the form of x kernel reads: ggml's vec_dot_type
    dequantize_rows: Callable  # (arrays, cols, ids) -> (len(ids), cols) f32
    float_arrays: tuple[int, ...]  # which arrays hold floats (values, or block scales and minima)
    float_exponent: int  # the exponent mask of those floats: all ones is an Inf or a NaN
    floats_are: str  # what those floats are, for messages

    @property
    def block(self) -> tuple[int, int]:
        """(weights, bytes) of one GGUF block (gguf-py's GGML_QUANT_SIZES)."""
        return GGML_QUANT_SIZES[self.type]


def same_arrays(arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """pack()'s arrays as they are (formats whose kernel takes them so)."""
    return arrays


def with_unread_minima(arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """(wq, wd, wm) from a 32-weight block format's arrays: where it has no minima, d stands in
    (unread)."""
    return arrays[0], arrays[1], arrays[2] if len(arrays) > 2 else arrays[1]


def scale_arrays(scale_offsets: tuple[int, ...]) -> tuple[int, ...]:
    """Which of a grouped format's arrays hold its f16 scales (and minima): those after the quants."""
    return tuple(range(1, 1 + len(scale_offsets)))
