"""Pipelines of LocalStages over the tiny seeded models, and the prompts and sampler the stage
and scheduler tests drive them with."""

from __future__ import annotations

import numpy as np

from caravan.pipeline.generate import Pipeline
from caravan.pipeline.gguf_file import GGUFFile
from caravan.pipeline.model import ModelConfig, ModelHead
from caravan.pipeline.sampler import Sampler, SamplingParams
from caravan.pipeline.stage import LayerRange, LocalStage

N_CTX = 256


def build(path, splits=None, n_ctx: int = N_CTX) -> Pipeline:
    """A pipeline of LocalStages over `splits` (layer counts, in order; default one stage)."""
    gguf = GGUFFile(path)
    config = ModelConfig.from_metadata(gguf.metadata, gguf.tensors["token_embd.weight"].n_rows)
    splits = splits or [config.n_layers]
    stages, start = [], 0
    for n in splits:
        stages.append(LocalStage.load(gguf, config, LayerRange(start, start + n), n_ctx))
        start += n
    return Pipeline(ModelHead(gguf, config), stages, n_ctx)


def prompt(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 299, n)  # 299 is <|endoftext|>


def greedy() -> Sampler:
    return Sampler(SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0))
