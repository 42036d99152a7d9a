"""A LLaMA-family model as GGUF describes it: its config, its layers' weights, and its head.

Weights keep their GGUF names (`attn_q`, `ffn_gate`, `token_embd`), as gguf-py's tensor map
defines them. What differs between families (Llama, Qwen2, Phi-3, Gemma 1-3) is data in
architectures.py; the metadata keys are llama.cpp's (llama_model::load_hparams and each
family's load_arch_hparams).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from gguf import GGMLQuantizationType as QT

from .architectures import ARCHITECTURES, BLOCK_TENSORS, SUPPORTED_ARCHITECTURES, Architecture
from .gguf_file import describe
from .quants import Activations, PackedMatrix, dequantize_rows, matmul, non_finite_part, pack
from .ops import rmsnorm, softcap_

log = logging.getLogger(__name__)

# GGUF rope.scaling.type values caravan runs: llama.cpp's "yarn" and "longrope" are not here yet.
SUPPORTED_ROPE_SCALING = ("none", "linear")


class ModelError(ValueError):
    """The model file is well-formed GGUF but not a model caravan can run; the message says why."""


class TensorSource(Protocol):
    """Where layer weights come from: a GGUF file, or tensors a node received."""

    def tensor_type(self, name: str) -> QT | None: ...  # None when absent
    def tensor_data(self, name: str) -> np.ndarray: ...  # as GGUFFile.tensor_data


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # general.architecture, a key of ARCHITECTURES
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
    rope_scale: float = 1.0  # rope.scaling.factor (linear scaling): angles are divided by it
    rope_theta_swa: float = 10000.0  # RoPE base of the sliding-window layers
    rope_freq_factors: tuple[float, ...] = ()  # rope_freqs.weight (Llama 3.1): pair i's angle / factor i
    sliding_window: int = 0  # a sliding layer's query at p sees positions p - window + 1 .. p; 0: none
    sliding_layers: tuple[bool, ...] = ()  # per layer: True where attention slides (empty when window is 0)
    attn_softcap: float = 0.0  # attention scores become cap * tanh(score / cap); 0: not capped
    final_softcap: float = 0.0  # logits become cap * tanh(logit / cap); 0: not capped
    layer_tensors: tuple[str, ...] = ()  # the block tensors each block has, in BLOCK_TENSORS order

    def __post_init__(self) -> None:
        if not self.layer_tensors and self.arch in ARCHITECTURES:  # a config written by hand: the required ones
            object.__setattr__(self, "layer_tensors", _layer_tensors(ARCHITECTURES[self.arch], None))

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def architecture(self) -> Architecture:
        return ARCHITECTURES[self.arch]

    @property
    def attn_scale(self) -> float:
        """What scores are multiplied by before softmax, in f32 as llama.cpp computes it: 1/sqrt(head
        width), or 1/sqrt(dim / heads) for the 27B Gemmas (llama.cpp's f_attention_scale, from
        gemma_pytorch's query_pre_attn_scalar)."""
        width = self.dim // self.n_heads if self.n_layers in self.architecture.big_attention_scale_layers else self.head_dim
        return float(np.float32(1.0) / np.sqrt(np.float32(width)))

    def is_sliding(self, layer: int) -> bool:
        return bool(self.sliding_layers) and self.sliding_layers[layer]

    def layer_rope(self, layer: int) -> tuple[float, float]:
        """(frequency base, frequency scale) of `layer`'s RoPE: sliding layers may have their own
        base and no scaling (llama_model::get_rope_freq_base / get_rope_freq_scale). The scale is
        1 / rope.scaling.factor in f32, as llama.cpp's rope_freq_scale_train."""
        scale = float(np.float32(1.0) / np.float32(self.rope_scale))
        if self.is_sliding(layer):
            return self.rope_theta_swa, 1.0 if self.architecture.swa_rope_unscaled else scale
        return self.rope_theta, scale

    @classmethod
    def from_dict(cls, fields: dict) -> "ModelConfig":
        """Back from dataclasses.asdict(config) after a JSON round trip (lists become tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

    @classmethod
    def from_metadata(cls, metadata: dict, vocab_size: int, block_tensors: Collection[str] | None = None,
                      rope_freqs: np.ndarray | None = None) -> "ModelConfig":
        """The config llama.cpp would read from these GGUF key/values. block_tensors: the names of
        block 0's tensors after "blk.0." (None: the architecture's required ones); rope_freqs: the
        rope_freqs.weight tensor, if the file has one."""
        keys = _MetadataKeys(metadata)
        arch, family = keys.arch, ARCHITECTURES[keys.arch]
        dim, n_heads, n_kv_heads, head_dim, n_rot = _attention_shape(keys)
        n_layers = keys.integer("block_count")
        if n_layers <= 0:
            raise ModelError(f"{arch}: n_layers must be positive, got {n_layers}")
        rope_scale = _rope_scale(keys)
        window, sliding = _sliding_window(keys, family, n_layers)
        attn_softcap, final_softcap = _softcaps(keys, family)
        config = cls(
            arch=arch,
            n_layers=n_layers,
            dim=dim,
            hidden_dim=keys.integer("feed_forward_length"),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            n_rot=n_rot,
            vocab_size=vocab_size,
            context_length=keys.integer("context_length", 2048),
            norm_eps=keys.number("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=(rope_theta := keys.number("rope.freq_base", 10000.0)),
            rope_scale=rope_scale,
            rope_theta_swa=keys.number("rope.freq_base_swa", family.rope_theta_swa or rope_theta),
            rope_freq_factors=_rope_freq_factors(rope_freqs, n_rot),
            sliding_window=window,
            sliding_layers=sliding,
            attn_softcap=attn_softcap,
            final_softcap=final_softcap,
            layer_tensors=_layer_tensors(family, block_tensors),
        )
        for field in ("dim", "hidden_dim", "context_length"):
            if getattr(config, field) <= 0:
                raise ModelError(f"{arch}: {field} must be positive, got {getattr(config, field)}")
        return config


class _MetadataKeys:
    """An architecture's GGUF keys ({arch}.name), read with llama.cpp's checks: a key of the wrong
    GGUF type is refused (llama_model_loader::get_key), and so are per-layer arrays."""

    def __init__(self, metadata: dict):
        arch = metadata.get("general.architecture")
        if not isinstance(arch, str) or arch not in ARCHITECTURES:
            raise ModelError(
                f"unknown architecture {describe(arch)} (general.architecture; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        self.metadata, self.arch = metadata, arch

    def get(self, name: str, default=None):
        """{arch}.name as stored, unchecked; default when absent."""
        return self.metadata.get(f"{self.arch}.{name}", default)

    def value(self, name: str, default=None):
        value = self.get(name, default)
        if value is None:
            raise ModelError(f"missing metadata key {self.arch}.{name}")
        if isinstance(value, np.ndarray):  # per-layer arrays (llama.cpp's get_key_or_arr)
            raise ModelError(f"{self.arch}.{name}: per-layer values are not supported")
        return value

    def integer(self, name: str, default=None) -> int:
        value = self.value(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ModelError(f"{self.arch}.{name}: expected an integer, got {describe(value)}")
        return int(value)

    def number(self, name: str, default: float) -> float:
        """A positive finite number."""
        value = self.value(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ModelError(f"{self.arch}.{name}: expected a number, got {describe(value)}")
        if not (math.isfinite(value) and value > 0):
            raise ModelError(f"{self.arch}.{name}: must be a positive finite number, got {value}")
        return float(value)


def _attention_shape(keys: _MetadataKeys) -> tuple[int, int, int, int, int]:
    """(dim, n_heads, n_kv_heads, head_dim, n_rot), checked to fit together."""
    arch = keys.arch
    dim = keys.integer("embedding_length")
    n_heads = keys.integer("attention.head_count")
    n_kv_heads = keys.integer("attention.head_count_kv", n_heads)
    if n_heads <= 0 or n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise ModelError(f"{arch}: head_count {n_heads} is not a positive multiple of head_count_kv {n_kv_heads}")
    head_dim = keys.integer("attention.key_length", dim // n_heads if dim % n_heads == 0 else 0)
    if head_dim <= 0 or head_dim % 2:
        raise ModelError(f"{arch}: head width {head_dim} must be positive and even")
    if keys.integer("attention.value_length", head_dim) != head_dim:
        raise ModelError(f"{arch}.attention.value_length must equal the key length {head_dim}")
    n_rot = keys.integer("rope.dimension_count", head_dim)
    if not 0 < n_rot <= head_dim or n_rot % 2:
        raise ModelError(f"{arch}.rope.dimension_count {n_rot} must be even and at most the head width {head_dim}")
    return dim, n_heads, n_kv_heads, head_dim, n_rot


def _rope_scale(keys: _MetadataKeys) -> float:
    """rope.scaling.factor for linear scaling (1.0 without); other scalings are refused."""
    arch = keys.arch
    scaling = keys.get("rope.scaling.type", "linear")
    if scaling not in SUPPORTED_ROPE_SCALING:
        raise ModelError(f"{arch}.rope.scaling.type {describe(scaling)} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ROPE_SCALING)})")
    rope_scale = keys.number("rope.scaling.factor", 1.0) if scaling == "linear" else 1.0
    attn_factor = keys.get("rope.scaling.attn_factor", 1.0)
    if not isinstance(attn_factor, (int, float, np.integer, np.floating)) or attn_factor != 1.0:
        raise ModelError(f"{arch}.rope.scaling.attn_factor {describe(attn_factor)} is not supported (only 1.0)")
    return rope_scale


def _sliding_window(keys: _MetadataKeys, family: Architecture, n_layers: int) -> tuple[int, tuple[bool, ...]]:
    """(window, which layers slide): (0, ()) for families llama.cpp runs without a window."""
    arch = keys.arch
    window, sliding = 0, ()
    if family.reads_sliding_window:
        window = keys.integer("attention.sliding_window", family.sliding_window)
    elif keys.get("attention.sliding_window"):
        log.warning("%s.attention.sliding_window is ignored: llama.cpp runs %s models without a sliding "
                    "window, and so does caravan", arch, arch)
    if window < 0:
        raise ModelError(f"{arch}.attention.sliding_window must not be negative, got {window}")
    if window:
        sliding = _sliding_layers(keys.get("attention.sliding_window_pattern", family.swa_period), n_layers, arch)
    return window, sliding


def _softcaps(keys: _MetadataKeys, family: Architecture) -> tuple[float, float]:
    """(attention softcap, final softcap), 0.0 where the family caps nothing."""
    attn_softcap = keys.number("attn_logit_softcapping", family.attn_softcap) if family.attn_softcap else 0.0
    final_softcap = family.final_softcap
    if family.reads_final_softcap and keys.get("final_logit_softcapping") not in (None, 0, 0.0):
        final_softcap = keys.number("final_logit_softcapping", family.final_softcap)
    return attn_softcap, final_softcap


def _sliding_layers(pattern, n_layers: int, arch: str) -> tuple[bool, ...]:
    """Which layers slide, from {arch}.attention.sliding_window_pattern: one bool per layer, or a
    period n where layer il slides iff il % n < n - 1, 0 meaning every layer
    (llama_model_base::load_swa_pattern, llama_hparams::set_swa_pattern)."""
    key = f"{arch}.attention.sliding_window_pattern"
    if isinstance(pattern, (list, np.ndarray)):
        values = list(pattern)
        if len(values) != n_layers or not all(isinstance(v, (bool, np.bool_)) for v in values):
            raise ModelError(f"{key}: expected a period or {n_layers} bools, got {describe(pattern)}")
        return tuple(bool(v) for v in values)
    if isinstance(pattern, bool) or not isinstance(pattern, (int, np.integer)) or pattern < 0:
        raise ModelError(f"{key}: expected a period or {n_layers} bools, got {describe(pattern)}")
    n = int(pattern)
    return tuple(n == 0 or layer % n < n - 1 for layer in range(n_layers))


def _rope_freq_factors(rope_freqs: np.ndarray | None, n_rot: int) -> tuple[float, ...]:
    if rope_freqs is None:
        return ()
    factors = np.asarray(rope_freqs, dtype=np.float32).reshape(-1)
    if factors.shape != (n_rot // 2,) or not np.all(np.isfinite(factors) & (factors > 0)):
        raise ModelError(f"rope_freqs.weight: expected {n_rot // 2} positive factors, got {describe(factors)}")
    return tuple(float(f) for f in factors)


def _layer_tensors(family: Architecture, present: Collection[str] | None) -> tuple[str, ...]:
    """The block tensors a model of this family has, given the names found in block 0: every
    required one (attn_qkv standing for Q, K and V where the family allows it), and the optional
    ones present. A tensor the family does not use is refused, as llama.cpp refuses it."""
    present = set(family.required if present is None else present)
    required = set(family.required)
    qkv = {"attn_q.weight", "attn_k.weight", "attn_v.weight"}
    if family.fused_qkv and "attn_qkv.weight" in present:
        required = (required - qkv) | {"attn_qkv.weight"}
    missing = [n for n in BLOCK_TENSORS if n in required and n not in present]
    if missing:
        raise ModelError(f"missing tensor blk.0.{missing[0]} (a {family.name} block has "
                         f"{', '.join(sorted(required))})")
    unknown = sorted(present - required - set(family.optional))
    if unknown:
        raise ModelError(f"blk.0.{unknown[0]}: not a tensor of a {family.name} block caravan can run "
                         f"(it uses {', '.join(sorted(required | set(family.optional)))})")
    return tuple(n for n in BLOCK_TENSORS if n in present)


def layer_tensor_shapes(config: "ModelConfig", layer: int) -> dict[str, tuple[int, ...]]:
    """GGUF name -> GGUF shape (row length first) of each tensor of block `layer`, in BLOCK_TENSORS order."""
    c = config
    up_rows = 2 * c.hidden_dim if c.architecture.fused_gate_up else c.hidden_dim
    shapes = {
        "attn_norm.weight": (c.dim,),
        "attn_qkv.weight": (c.dim, c.q_dim + 2 * c.kv_dim),
        "attn_q.weight": (c.dim, c.q_dim),
        "attn_q.bias": (c.q_dim,),
        "attn_k.weight": (c.dim, c.kv_dim),
        "attn_k.bias": (c.kv_dim,),
        "attn_v.weight": (c.dim, c.kv_dim),
        "attn_v.bias": (c.kv_dim,),
        "attn_q_norm.weight": (c.head_dim,),
        "attn_k_norm.weight": (c.head_dim,),
        "attn_output.weight": (c.q_dim, c.dim),
        "attn_output.bias": (c.dim,),
        "post_attention_norm.weight": (c.dim,),
        "ffn_norm.weight": (c.dim,),
        "ffn_gate.weight": (c.dim, c.hidden_dim),
        "ffn_up.weight": (c.dim, up_rows),
        "ffn_down.weight": (c.hidden_dim, c.dim),
        "post_ffw_norm.weight": (c.dim,),
    }
    return {f"blk.{layer}.{name}": shapes[name] for name in c.layer_tensors}


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
    part = non_finite_part(packed)
    if part is not None:  # every product by it would be NaN: say so at load, not as garbage text later
        where = "" if part == "values" else f" in its {part}"
        raise ModelError(f"{name}: non-finite values (NaN or Inf){where}; {_DAMAGED}")
    release = getattr(source, "release", None)  # a memory-mapped file: its pages were read to repack
    if release is not None and not any(np.may_share_memory(a, raw) for a in packed.arrays):
        release(name)  # the repacked copy is what runs: keep resident memory at one copy of the weights
    return packed


def _vector(source: TensorSource, name: str, length: int) -> np.ndarray:
    ttype = source.tensor_type(name)
    if ttype is None:
        raise ModelError(f"missing tensor {name}")
    if ttype != QT.F32:
        kind = "biases" if name.endswith(".bias") else "norm weights"
        raise ModelError(f"{name}: {kind} must be F32, got {ttype.name}")
    data = source.tensor_data(name)
    if data.shape != (length,):
        raise ModelError(f"{name}: shape {list(data.shape)}, expected [{length}]")
    if not np.isfinite(data).all():
        raise ModelError(f"{name}: non-finite values (NaN or Inf); {_DAMAGED}")
    return np.ascontiguousarray(data, dtype=np.float32)


_DAMAGED = "the model file is damaged or was written wrongly (download or convert it again)"


def _field(tensor_name: str) -> str:
    """LayerWeights field of a block tensor: attn_q.weight -> attn_q, attn_q.bias -> attn_q_bias."""
    base, kind = tensor_name.rsplit(".", 1)
    return base if kind == "weight" else f"{base}_{kind}"


@dataclass(frozen=True)
class LayerWeights:
    """One block's weights; what a family lacks is None. Shapes as (rows, cols) of the product."""

    attn_norm: np.ndarray  # (dim,)
    attn_output: PackedMatrix  # (dim, n_heads * head_dim)
    ffn_norm: np.ndarray  # (dim,)
    ffn_up: PackedMatrix  # (hidden_dim, dim); fused gate and up: (2 * hidden_dim, dim), gate rows first
    ffn_down: PackedMatrix  # (dim, hidden_dim)
    attn_q: PackedMatrix | None = None  # (n_heads * head_dim, dim); None where attn_qkv holds it
    attn_k: PackedMatrix | None = None  # (n_kv_heads * head_dim, dim)
    attn_v: PackedMatrix | None = None  # (n_kv_heads * head_dim, dim)
    attn_qkv: PackedMatrix | None = None  # (q_dim + 2 * kv_dim, dim): Q, K, V rows stacked
    attn_q_bias: np.ndarray | None = None  # (q_dim,)
    attn_k_bias: np.ndarray | None = None  # (kv_dim,)
    attn_v_bias: np.ndarray | None = None  # (kv_dim,)
    attn_q_norm: np.ndarray | None = None  # (head_dim,), applied to each query head
    attn_k_norm: np.ndarray | None = None  # (head_dim,)
    attn_output_bias: np.ndarray | None = None  # (dim,)
    post_attention_norm: np.ndarray | None = None  # (dim,)
    ffn_gate: PackedMatrix | None = None  # (hidden_dim, dim); None where ffn_up holds it
    post_ffw_norm: np.ndarray | None = None  # (dim,)

    @classmethod
    def load(cls, source: TensorSource, config: ModelConfig, layer: int) -> "LayerWeights":
        fields = {}
        for name, shape in layer_tensor_shapes(config, layer).items():
            tensor = name.split(".", 2)[2]
            if len(shape) == 1:
                fields[_field(tensor)] = _vector(source, name, shape[0])
            else:
                fields[_field(tensor)] = _tensor(source, name, shape[1], shape[0])
        return cls(**fields)

    @property
    def nbytes(self) -> int:
        parts = [getattr(self, f.name) for f in dataclasses.fields(self)]
        return sum(p.nbytes for p in parts if p is not None)


def head_tensor_shapes(config: "ModelConfig", tied: bool) -> dict[str, tuple[int, ...]]:
    """GGUF name -> GGUF shape of the output head's tensors: the final norm, then the output
    projection (the token embedding, where the model ties the two)."""
    output = "token_embd.weight" if tied else "output.weight"
    return {"output_norm.weight": (config.dim,), output: (config.dim, config.vocab_size)}


def ties_output(source: TensorSource) -> bool:
    """Many small models tie the output projection to the embedding (no output.weight)."""
    return source.tensor_type("output.weight") is None


class OutputHead:
    """The final norm and the output projection: the hidden states after the last layer to
    logits. The coordinator holds one; so does a last node the planner gives the head."""

    def __init__(self, source: TensorSource, config: ModelConfig, output: PackedMatrix | None = None):
        self.config = config
        self.output_norm = _vector(source, "output_norm.weight", config.dim)
        if output is None:
            name, (cols, rows) = list(head_tensor_shapes(config, ties_output(source)).items())[1]
            output = _tensor(source, name, rows, cols)
        self.output = output

    @property
    def nbytes(self) -> int:
        return self.output.nbytes + self.output_norm.nbytes

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """(T, dim) hidden states after the last layer -> (T, vocab_size) f32."""
        normed = rmsnorm(hidden, self.output_norm, self.config.norm_eps)
        logits = matmul(self.output, Activations(normed))
        if self.config.final_softcap:
            softcap_(logits, self.config.final_softcap)
        return logits

    def argmax(self, hidden: np.ndarray) -> np.ndarray:
        """(T, dim) -> (T,) int64: each row's greedy token as the sampler picks it (np.argmax:
        the first maximum, and the first NaN if any), refused where the sampler refuses."""
        logits = self.logits(hidden)  # (T, vocab)
        best = np.argmax(logits, axis=1)
        top = logits[np.arange(logits.shape[0]), best]
        if np.isnan(top).any() or (top == -np.inf).any():
            raise ModelError(f"logits of row {int(np.flatnonzero(~(top > -np.inf))[0])} are NaN or all -inf (the "
                             "model's activations overflowed, or its weights are damaged): no token can be chosen")
        return best.astype(np.int64)


class ModelHead:
    """What runs around the layers: token embedding in, final norm and output projection out."""

    def __init__(self, source: TensorSource, config: ModelConfig):
        self.config = config
        self.token_embd = _tensor(source, "token_embd.weight", config.vocab_size, config.dim)
        self.out = OutputHead(source, config, self.token_embd if ties_output(source) else None)
        self.output_norm, self.output = self.out.output_norm, self.out.output
        # Gemma's inp_scaled: ggml_scale by sqrtf(n_embd), in f32.
        self.embed_scale = np.float32(math.sqrt(config.dim)) if config.architecture.scale_embeddings else None

    def embed(self, token_ids: np.ndarray) -> np.ndarray:
        """(T,) ids -> (T, dim) f32."""
        x = dequantize_rows(self.token_embd, token_ids)
        if self.embed_scale is not None:
            x *= self.embed_scale
        return x

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """(T, dim) hidden states after the last layer -> (T, vocab_size) f32. Rows a last stage
        holding the head answered already, (T,) token ids (StageBatch.argmax), pass through:
        SequenceState.advance takes them as the greedy sampler's picks."""
        if hidden.ndim == 1:
            return hidden
        return self.out.logits(hidden)
