"""How fast this machine runs one transformer layer of a given model shape.

Nodes run this before the planner places layers (DESIGN.md, "Placement"), on a synthetic
layer with the model's dimensions, block tensors and weight format: random block bytes with
small scales (random_blocks, which tests/bench/make_synthetic.py uses too), so it costs no
download and measures the same kernels the real layer will run.
"""

from __future__ import annotations

import time

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf.quants import quantize

from .model import LayerWeights, ModelConfig, layer_tensor_shapes
from .quants import FORMATS, SUPPORTED_TYPES, UnsupportedTypeError, supported_names
from .stage import LayerRange, LocalStage, Segment, StageBatch

# Per block format: the std of its stored integer q, uniform over its range, less any zero point
# (its f16 scale d and minimum, m or dmin, are where the format's record says).
_Q_STD = {
    QT.Q8_0: 73.9, QT.Q4_0: 4.61, QT.Q4_1: 4.61, QT.Q5_0: 9.23, QT.Q5_1: 9.23,
    QT.Q2_K: 1.12, QT.Q3_K: 2.29, QT.Q4_K: 4.61, QT.Q5_K: 9.23, QT.Q6_K: 18.5,
}


def _pack_q4_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """(..., 8) 6-bit scales and minima -> (..., 12) bytes, the inverse of formats.q4_k_scales."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    return np.concatenate((sc[..., :4] | (sc[..., 4:] >> 4) << 6, mn[..., :4] | (mn[..., 4:] >> 4) << 6,
                           (sc[..., 4:] & 15) | (mn[..., 4:] & 15) << 4), axis=-1)


def _pack_q3_k_scales(sc: np.ndarray) -> np.ndarray:
    """(..., 16) 6-bit scales -> (..., 12) bytes, the inverse of formats.q3_k_scales."""
    sc = sc.astype(np.uint8)
    high = sc >> 4  # (..., 16): bits 4..5 of scale 4m + i go to bits 2m of byte 8 + i
    packed_high = high[..., 0:4] | high[..., 4:8] << 2 | high[..., 8:12] << 4 | high[..., 12:16] << 6
    return np.concatenate((sc[..., :8] & 15 | (sc[..., 8:] & 15) << 4, packed_high), axis=-1)


def random_blocks(ttype: QT, rows: int, cols: int, rng: np.random.Generator, std: float) -> np.ndarray:
    """(rows, row_bytes) uint8: random blocks of a block format (or BF16) whose weights spread
    about `std` around zero: random quants, f16 scales sized for std, minima that centre each
    block, and K-quant sub-block scales drawn from the upper half of their range (of random sign
    where the format's scales are signed, so Q3_K's and Q6_K's quants, -4 .. 3 and -32 .. 31,
    centre on zero too)."""
    if ttype == QT.BF16:
        return quantize((rng.standard_normal((rows, cols)) * std).astype(np.float32), QT.BF16)
    q_std = _Q_STD[ttype]
    d_at, *minimum = FORMATS[ttype].scale_offsets
    block_size, type_size = GGML_QUANT_SIZES[ttype]
    blocks = rng.integers(0, 256, size=(rows, cols // block_size, type_size), dtype=np.uint8)
    sub = lambda low, high, n: rng.integers(low, high + 1, size=(rows, blocks.shape[1], n))  # noqa: E731
    sign = lambda n: rng.choice((-1, 1), size=(rows, blocks.shape[1], n))  # noqa: E731
    q_mean = 0.0  # mean of the stored q where a minimum centres it
    if ttype in (QT.Q4_1, QT.Q5_1):
        q_mean, scale = (7.5 if ttype == QT.Q4_1 else 15.5), 1.0
    elif ttype == QT.Q2_K:  # scales[16] at 0: scale nibble, minimum nibble
        blocks[:, :, :16] = sub(8, 15, 16) | sub(8, 15, 16) << 4
        q_mean, scale = 1.5, 11.5
    elif ttype == QT.Q3_K:  # scales[12] at 96: 16 6-bit values, 32 +- (16 .. 31)
        blocks[:, :, 96:108] = _pack_q3_k_scales(32 + sign(16) * sub(16, 31, 16))
        scale = 23.5
    elif ttype in (QT.Q4_K, QT.Q5_K):  # scales[12] at 4: 8 6-bit scales, 8 minima
        blocks[:, :, 4:16] = _pack_q4_k_scales(sub(32, 63, 8), sub(32, 63, 8))
        q_mean, scale = (7.5 if ttype == QT.Q4_K else 15.5), 47.5
    elif ttype == QT.Q6_K:  # scales[16] i8 at 192
        blocks[:, :, 192:208] = (sign(16) * sub(32, 127, 16)).astype(np.int8).view(np.uint8)
        scale = 79.5
    else:
        scale = 1.0
    d = std / (q_std * scale)
    blocks[:, :, d_at : d_at + 2] = np.frombuffer(np.float16(d).tobytes(), np.uint8)
    for min_at in minimum:
        # Q4_1/Q5_1 add m; K-quants subtract dmin * (a minimum, about as large as a scale)
        m = -q_mean * d if ttype in (QT.Q4_1, QT.Q5_1) else q_mean * d
        blocks[:, :, min_at : min_at + 2] = np.frombuffer(np.float16(m).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


def _synthetic_matrix(ttype: QT, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A (rows, cols) matrix as GGUF stores it (tensor_data's 2-D view): random values, or random
    block bytes with small scales."""
    if ttype == QT.F32:
        return rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
    if ttype == QT.F16:
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float16)
    return random_blocks(ttype, rows, cols, rng, 0.02)


# llama.cpp's quantizer stores a matrix whose rows do not split into 256-weight superblocks in
# another type (llama_tensor_get_type; Gemma 3 270M's 640-wide rows in its Q4_K_M file): a K-quant
# model's synthetic layer does the same. llama.cpp's IQ4_NL, which caravan does not run, stands
# in as Q4_0.
_ROW_FALLBACK = {QT.Q2_K: QT.Q4_0, QT.Q3_K: QT.Q4_0, QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}


class _SyntheticLayer:
    """A TensorSource for one block of the config's shape: matrices of weight_type, norm
    weights of ones, biases of zeros."""

    def __init__(self, config: ModelConfig, weight_type: QT, seed: int):
        rng = np.random.default_rng(seed)
        self.tensors = {}
        for name, shape in layer_tensor_shapes(config, 0).items():
            if len(shape) == 1:
                self.tensors[name] = (QT.F32, np.full(shape, 0.0 if name.endswith(".bias") else 1.0, np.float32))
            else:
                ttype = weight_type if shape[0] % GGML_QUANT_SIZES[weight_type][0] == 0 else _ROW_FALLBACK[weight_type]
                self.tensors[name] = (ttype, _synthetic_matrix(ttype, shape[1], shape[0], rng))

    def tensor_type(self, name: str) -> QT | None:
        return self.tensors[name][0] if name in self.tensors else None

    def tensor_data(self, name: str) -> np.ndarray:
        return self.tensors[name][1]


def synthetic_layer(config: ModelConfig, weight_type: QT, seed: int = 0) -> LayerWeights:
    if weight_type not in SUPPORTED_TYPES:
        raise UnsupportedTypeError(f"unsupported weight type {weight_type.name} (supported: {supported_names()})")
    return LayerWeights.load(_SyntheticLayer(config, weight_type, seed), config, 0)


def ms_per_layer(config: ModelConfig, weight_type: QT, repeats: int = 7, context: int = 64, rows: int = 1) -> float:
    """Median milliseconds for one decode step of `rows` rows of one sequence (a token and its
    draft, when rows > 1) through one layer, `context` tokens in."""
    layer = synthetic_layer(config, weight_type)
    stage = LocalStage(config, LayerRange(0, 1), [layer], n_ctx=context + (repeats + 1) * rows + 1)
    rng = np.random.default_rng(1)
    stage.forward(StageBatch((Segment("bench", 0, context),), rng.standard_normal((context, config.dim), np.float32)))
    times = []
    for i in range(repeats + 1):  # the first compiles (or loads from Numba's cache)
        x = rng.standard_normal((rows, config.dim), np.float32)
        t0 = time.perf_counter()
        stage.forward(StageBatch((Segment("bench", context + i * rows, rows),), x))
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]) * 1e3)
