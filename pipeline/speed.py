"""How fast this machine runs one transformer layer of a given model shape.

Nodes run this before the planner places layers (DESIGN.md, "Placement"), on a synthetic
layer with the model's dimensions, block tensors and weight format: random block bytes with
small scales, so it costs no download and measures the same kernels the real layer will run.
"""

from __future__ import annotations

import time

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from .model import LayerWeights, ModelConfig, layer_tensor_shapes
from .quants import SUPPORTED_TYPES, UnsupportedTypeError, supported_names
from .stage import LayerRange, LocalStage, Segment, StageBatch

# Byte offsets of the f16 scale fields at the start of each block (ggml-common.h layouts):
# Q8_0 and Q4_0 start with d; Q4_1 with d then m.
_SCALE_FIELDS = {QT.Q8_0: (0,), QT.Q4_0: (0,), QT.Q4_1: (0, 2)}


def _synthetic_matrix(ttype: QT, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A (rows, cols) matrix as GGUF stores it (tensor_data's 2-D view): random values, or random
    block bytes with small scales."""
    if ttype == QT.F32:
        return rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
    if ttype == QT.F16:
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float16)
    block_size, type_size = GGML_QUANT_SIZES[ttype]
    blocks = rng.integers(0, 256, size=(rows, cols // block_size, type_size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    for offset in _SCALE_FIELDS[ttype]:
        blocks[:, :, offset : offset + 2] = scale
    return blocks.reshape(rows, -1)


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
                self.tensors[name] = (weight_type, _synthetic_matrix(weight_type, shape[1], shape[0], rng))

    def tensor_type(self, name: str) -> QT | None:
        return self.tensors[name][0] if name in self.tensors else None

    def tensor_data(self, name: str) -> np.ndarray:
        return self.tensors[name][1]


def synthetic_layer(config: ModelConfig, weight_type: QT, seed: int = 0) -> LayerWeights:
    if weight_type not in SUPPORTED_TYPES:
        raise UnsupportedTypeError(f"unsupported weight type {weight_type.name} (supported: {supported_names()})")
    return LayerWeights.load(_SyntheticLayer(config, weight_type, seed), config, 0)


def ms_per_layer(config: ModelConfig, weight_type: QT, repeats: int = 7, context: int = 64) -> float:
    """Median milliseconds for one decode token through one layer, `context` tokens in."""
    layer = synthetic_layer(config, weight_type)
    stage = LocalStage(config, LayerRange(0, 1), [layer], n_ctx=context + repeats + 2)
    rng = np.random.default_rng(1)
    stage.forward(StageBatch((Segment("bench", 0, context),), rng.standard_normal((context, config.dim), np.float32)))
    times = []
    for i in range(repeats + 1):  # the first compiles (or loads from Numba's cache)
        x = rng.standard_normal((1, config.dim), np.float32)
        t0 = time.perf_counter()
        stage.forward(StageBatch((Segment("bench", context + i, 1),), x))
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]) * 1e3)
