"""The weight formats: one record per GGUF tensor type, as gguf-py's _type_traits, and the
kernels grouped by family.

    base.py         the record (Format), block and group sizes, the f16 table
    activations.py  Activations and the forms of x the kernels read (Q8 blocks, f16, f32)
    floats.py       F32, F16, BF16
    legacy.py       Q4_0, Q4_1, Q8_0: 32-weight blocks interleaved eight rows to a group
    q5.py           Q5_0, Q5_1: 32-weight blocks stored as spans
    kquants.py      Q2_K .. Q6_K: 256-weight superblocks stored as spans, Q8_K activations
    spans.py        the span storage Q5_x and the K-quants share
The vector IR blocks and the instruction sets are in pipeline/vector.py.

At load time each matrix is repacked once (its record's pack) into contiguous arrays, so the
kernels' hot loops read unit-stride memory with fixed trip counts; the weights stay quantized.
Every kernel runs `prange` over output rows only: each output element is summed by one thread
in one fixed order, so results depend neither on the thread count nor on how many token rows
are in the batch (a sequence decodes to the same tokens alone or batched with others).

Adding a format: its kernels, pack and row lookup in a family's file (or a new one) with a
record() that fills a Format; one line in FORMATS below. tests/test_formats.py then runs it
through every test it parametrizes over the registry (dequantization against gguf-py,
packed_nbytes, non_finite_part, products against float64, batch, threads, instruction sets);
its product needs a float64 reference in tests/support/naive.py, and a block format the spread
of its integers in speed.py's _Q_STD (the node benchmark's random blocks).
"""

from __future__ import annotations

from gguf import GGMLQuantizationType as QT

from . import floats, kquants, legacy, q5
from .activations import f16_rows, f32_rows, q8_0_blocks, q8_1_blocks
from .base import BF16_EXPONENT, F16_EXPONENT, F32_EXPONENT, Format, same_arrays

FORMATS: dict[QT, Format] = {f.type: f for f in (
    floats.record(QT.F32, floats.pack_f32, floats.matmul_f32, same_arrays, f32_rows, floats.rows_f32, F32_EXPONENT),
    floats.record(QT.F16, floats.pack_f16, floats.matmul_f16, floats.f16_weights, f16_rows, floats.rows_f16, F16_EXPONENT),
    legacy.record(QT.Q8_0, (0,), legacy.matmul_q8_0),
    legacy.record(QT.Q4_0, (0,), legacy.matmul_q4_0),
    legacy.record(QT.Q4_1, (0, 2), legacy.matmul_q4_1),
    q5.record(QT.Q5_0, (0,), q5.matmul_q5_0, q8_0_blocks),
    q5.record(QT.Q5_1, (0, 2), q5.matmul_q5_1, q8_1_blocks),
    kquants.record(QT.Q2_K, (80, 82), kquants.matmul_q2_k, kquants.quants_q2_k, kquants.meta_q2_k),
    kquants.record(QT.Q3_K, (108,), kquants.matmul_q3_k, kquants.quants_q3_k, kquants.meta_q3_k),
    kquants.record(QT.Q4_K, (0, 2), kquants.matmul_q4_k, kquants.quants_q4_k, kquants.meta_q4_k),
    kquants.record(QT.Q5_K, (0, 2), kquants.matmul_q5_k, kquants.quants_q5_k, kquants.meta_q4_k),
    kquants.record(QT.Q6_K, (208,), kquants.matmul_q6_k, kquants.quants_q6_k, kquants.meta_q6_k),
    floats.record(QT.BF16, floats.pack_bf16, floats.matmul_bf16, same_arrays, floats.bf16_rows, floats.rows_bf16, BF16_EXPONENT),
)}
SUPPORTED_TYPES = tuple(FORMATS)
