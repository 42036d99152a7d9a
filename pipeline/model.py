"""A LLaMA-family model as GGUF describes it: its config, its layers' weights, and its head.

Weights keep their GGUF names (`attn_q`, `ffn_gate`, `token_embd`), as gguf-py's tensor map
defines them for the `llama` architecture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from gguf import GGMLQuantizationType as QT

from .gguf_file import describe
from .quants import Activations, PackedMatrix, dequantize_rows, matmul, pack
from .ops import rmsnorm

SUPPORTED_ARCHITECTURES = ("llama",)

# The tensors of one transformer block, by their GGUF names (blk.N.<name>.weight).
LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")



class ModelError(ValueError):
    """The model file is well-formed GGUF but not a model caravan can run; the message says why."""


class TensorSource(Protocol):
    """Where layer weights come from: a GGUF file, or tensors a node received."""

    def tensor_type(self, name: str) -> QT | None: ...  # None when absent
    def tensor_data(self, name: str) -> np.ndarray: ...  # as GGUFFile.tensor_data


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # general.architecture
    n_layers: int  # transformer blocks
    dim: int  # residual stream width (embedding_length)
    hidden_dim: int  # FFN inner width (feed_forward_length)
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (GQA when fewer than n_heads)
    head_dim: int  # width of one head
    n_rot: int  # leading dimensions of each head that RoPE rotates
    vocab_size: int
    context_length: int  # what the model was trained for
    norm_eps: float  # RMSNorm epsilon
    rope_theta: float  # RoPE frequency base

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @classmethod
    def from_metadata(cls, metadata: dict, vocab_size: int) -> "ModelConfig":
        arch = metadata.get("general.architecture")
        if not isinstance(arch, str) or arch not in SUPPORTED_ARCHITECTURES:
            raise ModelError(
                f"unknown architecture {describe(arch)} (general.architecture; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )

        def key(name: str, default=None):
            value = metadata.get(f"{arch}.{name}", default)
            if value is None:
                raise ModelError(f"missing metadata key {arch}.{name}")
            if isinstance(value, np.ndarray):  # per-layer arrays are not supported for llama
                raise ModelError(f"{arch}.{name}: per-layer values are not supported")
            return value

        # llama.cpp refuses a key of the wrong GGUF type too (llama_model_loader::get_key).
        def int_key(name: str, default=None) -> int:
            value = key(name, default)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ModelError(f"{arch}.{name}: expected an integer, got {describe(value)}")
            return int(value)

        def float_key(name: str, default: float) -> float:
            value = key(name, default)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ModelError(f"{arch}.{name}: expected a number, got {describe(value)}")
            if not (math.isfinite(value) and value > 0):
                raise ModelError(f"{arch}.{name}: must be a positive finite number, got {value}")
            return float(value)

        dim = int_key("embedding_length")
        n_heads = int_key("attention.head_count")
        n_kv_heads = int_key("attention.head_count_kv", n_heads)
        if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
            raise ModelError(f"{arch}: head_count {n_heads} is not a positive multiple of head_count_kv {n_kv_heads}")
        head_dim = int_key("attention.key_length", dim // n_heads if dim % n_heads == 0 else 0)
        if head_dim <= 0 or head_dim % 2:
            raise ModelError(f"{arch}: head width {head_dim} must be positive and even")
        n_rot = int_key("rope.dimension_count", head_dim)
        if not 0 < n_rot <= head_dim or n_rot % 2:
            raise ModelError(f"{arch}.rope.dimension_count {n_rot} must be even and at most the head width {head_dim}")
        config = cls(
            arch=arch,
            n_layers=int_key("block_count"),
            dim=dim,
            hidden_dim=int_key("feed_forward_length"),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            n_rot=n_rot,
            vocab_size=vocab_size,
            context_length=int_key("context_length", 2048),
            norm_eps=float_key("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=float_key("rope.freq_base", 10000.0),
        )
        for field in ("n_layers", "dim", "hidden_dim", "context_length"):
            if getattr(config, field) <= 0:
                raise ModelError(f"{arch}: {field} must be positive, got {getattr(config, field)}")
        return config


def layer_tensor_shapes(config: "ModelConfig", layer: int) -> dict[str, tuple[int, ...]]:
    """GGUF name -> GGUF shape (row length first) of each tensor of block `layer`, in LAYER_TENSORS order."""
    c = config
    q_dim = c.n_heads * c.head_dim
    shapes = {
        "attn_norm": (c.dim,),
        "attn_q": (c.dim, q_dim),
        "attn_k": (c.dim, c.kv_dim),
        "attn_v": (c.dim, c.kv_dim),
        "attn_output": (q_dim, c.dim),
        "ffn_norm": (c.dim,),
        "ffn_gate": (c.dim, c.hidden_dim),
        "ffn_up": (c.dim, c.hidden_dim),
        "ffn_down": (c.hidden_dim, c.dim),
    }
    return {f"blk.{layer}.{name}.weight": shapes[name] for name in LAYER_TENSORS}


def _tensor(source: TensorSource, name: str, rows: int, cols: int) -> PackedMatrix:
    ttype = source.tensor_type(name)
    if ttype is None:
        raise ModelError(f"missing tensor {name}")
    raw = source.tensor_data(name)
    if raw.ndim != 2:
        raise ModelError(f"{name}: expected a matrix, got {raw.ndim} dimension(s)")
    packed = pack(ttype, raw, name)
    if packed.rows != rows or packed.cols != cols:
        raise ModelError(f"{name}: shape [{packed.cols}, {packed.rows}], expected [{cols}, {rows}] (GGUF order)")
    return packed


def _vector(source: TensorSource, name: str, length: int) -> np.ndarray:
    ttype = source.tensor_type(name)
    if ttype is None:
        raise ModelError(f"missing tensor {name}")
    if ttype != QT.F32:
        raise ModelError(f"{name}: norm weights must be F32, got {ttype.name}")
    data = source.tensor_data(name)
    if data.shape != (length,):
        raise ModelError(f"{name}: shape {list(data.shape)}, expected [{length}]")
    return np.ascontiguousarray(data, dtype=np.float32)


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: np.ndarray  # (dim,)
    attn_q: PackedMatrix  # (n_heads * head_dim, dim)
    attn_k: PackedMatrix  # (n_kv_heads * head_dim, dim)
    attn_v: PackedMatrix  # (n_kv_heads * head_dim, dim)
    attn_output: PackedMatrix  # (dim, n_heads * head_dim)
    ffn_norm: np.ndarray  # (dim,)
    ffn_gate: PackedMatrix  # (hidden_dim, dim)
    ffn_up: PackedMatrix  # (hidden_dim, dim)
    ffn_down: PackedMatrix  # (dim, hidden_dim)

    @classmethod
    def load(cls, source: TensorSource, config: ModelConfig, layer: int) -> "LayerWeights":
        c = config
        p = f"blk.{layer}."
        q_dim = c.n_heads * c.head_dim
        return cls(
            attn_norm=_vector(source, p + "attn_norm.weight", c.dim),
            attn_q=_tensor(source, p + "attn_q.weight", q_dim, c.dim),
            attn_k=_tensor(source, p + "attn_k.weight", c.kv_dim, c.dim),
            attn_v=_tensor(source, p + "attn_v.weight", c.kv_dim, c.dim),
            attn_output=_tensor(source, p + "attn_output.weight", c.dim, q_dim),
            ffn_norm=_vector(source, p + "ffn_norm.weight", c.dim),
            ffn_gate=_tensor(source, p + "ffn_gate.weight", c.hidden_dim, c.dim),
            ffn_up=_tensor(source, p + "ffn_up.weight", c.hidden_dim, c.dim),
            ffn_down=_tensor(source, p + "ffn_down.weight", c.dim, c.hidden_dim),
        )

    @property
    def nbytes(self) -> int:
        mats = (self.attn_q, self.attn_k, self.attn_v, self.attn_output, self.ffn_gate, self.ffn_up, self.ffn_down)
        return sum(m.nbytes for m in mats) + self.attn_norm.nbytes + self.ffn_norm.nbytes


class ModelHead:
    """What runs around the layers: token embedding in, final norm and output projection out."""

    def __init__(self, source: TensorSource, config: ModelConfig):
        self.config = config
        self.token_embd = _tensor(source, "token_embd.weight", config.vocab_size, config.dim)
        self.output_norm = _vector(source, "output_norm.weight", config.dim)
        # Many small models tie the output projection to the embedding (no output.weight).
        if source.tensor_type("output.weight") is None:
            self.output = self.token_embd
        else:
            self.output = _tensor(source, "output.weight", config.vocab_size, config.dim)

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        """(T,) ids -> (T, dim) f32."""
        return dequantize_rows(self.token_embd, token_ids)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """(T, dim) hidden states after the last layer -> (T, vocab_size) f32."""
        normed = rmsnorm(hidden, self.output_norm, self.config.norm_eps)
        return matmul(self.output, Activations(normed))
