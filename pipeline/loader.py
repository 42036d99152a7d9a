"""Open a GGUF model for the coordinator: config, tokenizer, chat template and head."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from gguf import GGMLQuantizationType as QT

from .architectures import GLOBAL_TENSORS
from .chat_template import ChatTemplate, ChatTemplateError
from .generate import Pipeline
from .gguf_file import GGUFFile
from .grammar import Grammars
from .model import ModelConfig, ModelError, ModelHead
from .stage import LayerRange, LocalStage
from .tokenizer import Tokenizer

DEFAULT_CTX = 2048  # like llama.cpp's older default: a Pi's memory, not the model's maximum


@dataclass
class LoadedModel:
    file: GGUFFile
    config: ModelConfig
    tokenizer: Tokenizer
    chat_template: ChatTemplate
    head: ModelHead

    @functools.cached_property
    def grammars(self) -> Grammars:
        """Structured output's view of the vocabulary, built once on first use."""
        return Grammars(self.tokenizer)

    @property
    def name(self) -> str:
        return str(self.file.metadata.get("general.name") or self.file.path.stem)

    def context_size(self, requested: int | None) -> int:
        """The context to run with: the request (or DEFAULT_CTX), at most what the model was trained for."""
        n_ctx = requested or DEFAULT_CTX
        if n_ctx <= 0:
            raise ValueError(f"context size must be positive, got {n_ctx}")
        return min(n_ctx, self.config.context_length)

    def check_chat_template(self) -> None:
        """Render a two-message conversation once (ChatTemplateError naming the file if the
        template cannot), so a template that runs away fails at load rather than at a request."""
        try:
            self.chat_template.check()
        except ChatTemplateError as exc:
            raise ChatTemplateError(f"{self.file.path}: its chat template cannot render a two-message "
                                    f"conversation: {exc}") from exc

    def local_pipeline(self, n_ctx: int | None = None) -> Pipeline:
        """Every layer in this process: [LocalStage(0, n_layers)]."""
        n_ctx = self.context_size(n_ctx)
        stage = LocalStage.load(self.file, self.config, LayerRange(0, self.config.n_layers), n_ctx)
        return Pipeline(self.head, [stage], n_ctx)


def model_config(gguf: GGUFFile, vocab_size: int) -> ModelConfig:
    """The config of a model file: its metadata, the tensors of its first block, its RoPE
    frequency factors; every other block must hold tensors of the same names."""
    block_tensors = {name[len("blk.0."):] for name in gguf.tensors if name.startswith("blk.0.")}
    rope_freqs = gguf.tensor_data("rope_freqs.weight") if "rope_freqs.weight" in gguf.tensors else None
    if rope_freqs is not None and gguf.tensors["rope_freqs.weight"].type != QT.F32:
        raise ModelError("rope_freqs.weight: expected F32 factors, got "
                         f"{gguf.tensors['rope_freqs.weight'].type.name}")
    config = ModelConfig.from_metadata(gguf.metadata, vocab_size, block_tensors, rope_freqs)
    if rope_freqs is not None and not config.architecture.rope_freqs:
        raise ModelError(f"rope_freqs.weight: {config.arch} models have no RoPE frequency factors (llama.cpp "
                         "reads them for llama only)")
    known = set(config.layer_tensors)
    for name in gguf.tensors:
        if not name.startswith("blk.") and name not in GLOBAL_TENSORS:
            raise ModelError(f"{name}: not a tensor caravan can run ({config.arch} models have "
                             f"{', '.join(GLOBAL_TENSORS)} and blk.N.*; LongRoPE's rope_factors_* are not supported)")
        if name.startswith("blk."):
            _, index, tensor = name.split(".", 2)
            if not index.isdigit() or int(index) >= config.n_layers or tensor not in known:
                raise ModelError(f"{name}: not a tensor of this {config.arch} model's {config.n_layers} blocks "
                                 f"(block 0 has {', '.join(config.layer_tensors)})")
    return config


def load_model(path: str | os.PathLike[str]) -> LoadedModel:
    """Parse and check the file, build the tokenizer and head. Layer weights load per stage."""
    gguf = GGUFFile(path)
    tokenizer = Tokenizer.from_metadata(gguf.metadata)
    embd = gguf.tensors.get("token_embd.weight")
    if embd is None:
        raise ModelError(f"{path}: missing tensor token_embd.weight")
    n_vocab_rows = embd.n_rows
    if n_vocab_rows != tokenizer.vocab_size:
        raise ModelError(
            f"{path}: vocabulary of {tokenizer.vocab_size} tokens does not match token_embd.weight's {n_vocab_rows} rows"
        )
    config = model_config(gguf, n_vocab_rows)
    source = gguf.metadata.get("tokenizer.chat_template")
    bos = tokenizer.token_text(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
    eos = tokenizer.token_text(tokenizer.eos_id) if tokenizer.eos_id is not None else ""
    if isinstance(source, str) and source:
        template = ChatTemplate(source, bos, eos)
    else:
        template = ChatTemplate.fallback(gguf.metadata.get("tokenizer.ggml.tokens", []))
    head = ModelHead(gguf, config)
    return LoadedModel(gguf, config, tokenizer, template, head)
