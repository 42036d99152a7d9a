"""How fast this machine runs one transformer layer of a given model shape.

Nodes run this before the planner places layers (DESIGN.md, "Placement"), on a synthetic
layer with the model's dimensions and weight format: random block bytes with small scales,
so it costs no download and measures the same kernels the real layer will run.
"""

from __future__ import annotations

import time

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from .model import LayerWeights, ModelConfig
from .quants import SUPPORTED_TYPES, UnsupportedTypeError, pack, supported_names
from .stage import LayerRange, LocalStage, Segment, StageBatch

# Byte offsets of the f16 scale fields at the start of each block (ggml-common.h layouts):
# Q8_0 and Q4_0 start with d; Q4_1 with d then m.
_SCALE_FIELDS = {QT.Q8_0: (0,), QT.Q4_0: (0,), QT.Q4_1: (0, 2)}


def _synthetic_matrix(ttype: QT, rows: int, cols: int, rng: np.random.Generator):
    if ttype == QT.F32:
        return pack(ttype, rng.standard_normal((rows, cols), dtype=np.float32) * 0.02, "synthetic")
    if ttype == QT.F16:
        return pack(ttype, (rng.standard_normal((rows, cols)) * 0.02).astype(np.float16), "synthetic")
    block_size, type_size = GGML_QUANT_SIZES[ttype]
    blocks = rng.integers(0, 256, size=(rows, cols // block_size, type_size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    for offset in _SCALE_FIELDS[ttype]:
        blocks[:, :, offset : offset + 2] = scale
    return pack(ttype, blocks.reshape(rows, -1), "synthetic")


def synthetic_layer(config: ModelConfig, weight_type: QT, seed: int = 0) -> LayerWeights:
    if weight_type not in SUPPORTED_TYPES:
        raise UnsupportedTypeError(f"unsupported weight type {weight_type.name} (supported: {supported_names()})")
    c = config
    rng = np.random.default_rng(seed)
    q_dim = c.n_heads * c.head_dim
    mat = lambda rows, cols: _synthetic_matrix(weight_type, rows, cols, rng)  # noqa: E731
    return LayerWeights(
        attn_norm=np.ones(c.dim, np.float32),
        attn_q=mat(q_dim, c.dim),
        attn_k=mat(c.kv_dim, c.dim),
        attn_v=mat(c.kv_dim, c.dim),
        attn_output=mat(c.dim, q_dim),
        ffn_norm=np.ones(c.dim, np.float32),
        ffn_gate=mat(c.hidden_dim, c.dim),
        ffn_up=mat(c.hidden_dim, c.dim),
        ffn_down=mat(c.dim, c.hidden_dim),
    )


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
