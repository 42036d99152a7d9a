"""LoRA adapters in llama.cpp's GGUF adapter format, applied as separate low-rank products.

The file, as llama.cpp's convert_lora_to_gguf.py writes it and src/llama-adapter.cpp reads it:

    general.type = "adapter", adapter.type = "lora", general.architecture = the base model's
    adapter.lora.alpha    f32; absent or 0: the scale is the user's scale alone
    for each adapted matrix W of GGUF shape [n_in, n_out] (row length first):
        "<W's name>.lora_a"   GGUF shape [n_in, rank]    numpy (rank, n_in)
        "<W's name>.lora_b"   GGUF shape [rank, n_out]   numpy (n_out, rank)
    "*_norm.weight" tensors (from mergekit) are skipped, as llama.cpp skips them.

Each product with an adapted W becomes, as in llama.cpp's build_lora_mm (src/llama-graph.cpp):

    y = W x;  then for each adapter in order:  y = y + (B (A x)) * scale
    scale = user_scale * alpha / rank   (llama_adapter_lora_weight::get_scale, in f32; rank is
                                         lora_b's ne[0]; alpha 0: user_scale)

A and B are multiplied with caravan's own kernels in the adapter's own formats (F32, F16, Q8_0:
convert_lora_to_gguf.py's --outtype), activations rounded or quantized as for any weight of
that format. The base weights are never changed: every segment of a batch names the adapters
its session uses (Segment.adapters), so sequences with different adapters share one batch, the
base weights are read once for all of them, and an adapter is chosen per request without
reloading anything. caravan adapts the transformer layers' matrices (attn_q, attn_k, attn_v,
attn_qkv, attn_output, ffn_gate, ffn_up, ffn_down); adapters of the token embedding or the output head
are refused.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .gguf_file import GGUFFile, TensorInfo, describe, tensor_view
from .model import ModelConfig, layer_tensor_shapes
from .quants import SUPPORTED_TYPES, Activations, PackedMatrix, matmul, non_finite_part, pack, supported_names

# attn_qkv and Phi-3's gate+up ffn_up are adapted whole, as llama.cpp's phi3 graph does (one
# build_lora_mm on the fused matrix)
ADAPTED = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
MAX_ADAPTERS_PER_ROW = 8  # adapters one session may stack
MAX_NAME = 128  # characters of an adapter name

_BASE_NAME = re.compile(r"blk\.(\d+)\.([a-z_]+)\.weight")


class LoraError(ValueError):
    """An adapter file, or a use of an adapter, that does not fit; the message says why."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not name.isprintable() or ":" in name:
        raise LoraError(f"adapter name {name!r} must have 1 to {MAX_NAME} printable characters and no ':'")
    return name


def check_scale(scale: float) -> float:
    """A user scale as every stage sees it: rounded to f32 (llama.cpp's type for it), finite."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise LoraError(f"adapter scale must be a finite number, got {scale!r}")
    return float(np.float32(scale))


@dataclass(frozen=True)
class LoraPair:
    """The two tensors that adapt one base matrix."""

    base: str  # blk.N.<matrix>.weight
    layer: int
    a: TensorInfo  # GGUF shape [n_in, rank]
    b: TensorInfo  # GGUF shape [rank, n_out]

    @property
    def rank(self) -> int:
        return self.b.shape[0]


def check_tensors(tensors: dict[str, TensorInfo], config: ModelConfig, what: str) -> dict[str, LoraPair]:
    """Pair up `.lora_a` / `.lora_b` tensors and check each pair against the base model's
    matrix it adapts (names and shapes, as llama_adapter_lora_init does); base name -> pair."""
    halves: dict[str, dict[str, TensorInfo]] = {}
    for name, info in tensors.items():
        if name.endswith((".lora_a", ".lora_b")):
            halves.setdefault(name[: -len(".lora_a")], {})[name[-1]] = info
        elif not name.endswith("_norm.weight"):  # llama.cpp: "TODO: add support for norm vector"
            raise LoraError(f"{what}: tensor {name} is neither a .lora_a nor a .lora_b tensor")
    pairs = {}
    for base, half in halves.items():
        if set(half) != {"a", "b"}:
            raise LoraError(f"{what}: {base} has a lora_{next(iter(half))} tensor but no lora_{'b' if 'a' in half else 'a'}")
        match = _BASE_NAME.fullmatch(base)
        if base in ("token_embd.weight", "output.weight"):
            raise LoraError(f"{what}: adapts {base}; caravan applies adapters to the layers' matrices only "
                            f"({', '.join(ADAPTED)})")
        if not match or match[2] not in ADAPTED or int(match[1]) >= config.n_layers:
            raise LoraError(f"{what}: {base} does not exist in the base model (wrong base model?)")
        layer = int(match[1])
        if base not in (shapes := layer_tensor_shapes(config, layer)):  # e.g. attn_q where the model fuses attn_qkv
            raise LoraError(f"{what}: {base} does not exist in the base model (wrong base model?)")
        n_in, n_out = shapes[base]
        a, b = half["a"], half["b"]
        for info in (a, b):
            if info.type not in SUPPORTED_TYPES:
                raise LoraError(f"{what}: {info.name}: unsupported type {info.type.name} (supported: {supported_names()})")
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != n_in or b.shape[1] != n_out:
            raise LoraError(f"{what}: {base}: lora_a {list(a.shape)} and lora_b {list(b.shape)} do not fit the base "
                            f"matrix [{n_in}, {n_out}] (wrong base model?)")
        if a.shape[1] != b.shape[0] or not 0 < b.shape[0] <= n_in:
            raise LoraError(f"{what}: {base}: lora_a {list(a.shape)} and lora_b {list(b.shape)} disagree on the rank "
                            f"(or it is past {n_in})")
        pairs[base] = LoraPair(base, layer, a, b)
    return pairs


@dataclass(frozen=True)
class LoraWeight:
    """One adapted matrix's low-rank factors, packed for the kernels."""

    a: PackedMatrix  # (rank, n_in)
    b: PackedMatrix  # (n_out, rank)
    alpha: np.float32

    def scale(self, user_scale: float) -> np.float32:
        """llama_adapter_lora_weight::get_scale, in f32."""
        if self.alpha == 0:
            return np.float32(user_scale)
        return np.float32(user_scale) * self.alpha / np.float32(self.b.cols)


AdapterWeights = dict  # base tensor name -> LoraWeight: what one stage holds of one adapter


class LoraAdapter:
    """A checked adapter: its name, alpha and tensor pairs, and where their bytes are (a GGUF
    file on the coordinator, a received buffer on a node)."""

    def __init__(self, name: str, arch: str, alpha: float, pairs: dict[str, LoraPair], buffer):
        self.name = check_name(name)
        self.arch = arch  # general.architecture, the base model's
        self.alpha = np.float32(alpha)
        self.pairs = pairs
        self._buffer = buffer  # what TensorInfo offsets point into

    @classmethod
    def open(cls, path: str | os.PathLike[str], config: ModelConfig, name: str | None = None) -> "LoraAdapter":
        """Read and check an adapter file against the base model `config`."""
        gguf = GGUFFile(path)
        what = str(gguf.path)
        meta = gguf.metadata
        if meta.get("general.type") != "adapter":
            raise LoraError(f"{what}: not an adapter (general.type is {describe(meta.get('general.type'))}, "
                            "expected 'adapter'); give a LoRA adapter in llama.cpp's GGUF format")
        if meta.get("adapter.type") != "lora":
            raise LoraError(f"{what}: adapter.type is {describe(meta.get('adapter.type'))}; only 'lora' adapters are supported")
        if meta.get("general.architecture") != config.arch:
            raise LoraError(f"{what}: adapter for architecture {describe(meta.get('general.architecture'))}, "
                            f"the model is {config.arch!r}")
        if "adapter.alora.invocation_tokens" in meta:
            raise LoraError(f"{what}: activated LoRA (aLoRA) adapters are not supported")
        alpha = meta.get("adapter.lora.alpha", 0.0)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise LoraError(f"{what}: adapter.lora.alpha must be a finite number, got {describe(alpha)}")
        pairs = check_tensors(gguf.tensors, config, what)
        if not pairs:
            raise LoraError(f"{what}: the adapter holds no lora_a/lora_b tensors")
        return cls(name if name is not None else Path(path).stem, config.arch, alpha, pairs, gguf)

    @classmethod
    def received(cls, name: str, alpha: float, arch: str, config: ModelConfig, tensors: dict[str, TensorInfo],
                 buffer: bytes, layers: Iterable[int]) -> "LoraAdapter":
        """An adapter's tensors for some layers, as a node receives them (offsets into buffer)."""
        what = f"adapter {name!r}"
        if arch != config.arch:
            raise LoraError(f"{what} is for architecture {arch!r}, the model is {config.arch!r}")
        if not math.isfinite(alpha):
            raise LoraError(f"{what}: alpha must be finite")
        pairs = check_tensors(tensors, config, what)
        allowed = set(layers)
        outside = sorted({p.layer for p in pairs.values()} - allowed)
        if outside:
            raise LoraError(f"{what}: tensors of layers {outside[:3]} are not among this stage's layers")
        return cls(name, arch, alpha, pairs, buffer)

    def tensors_for(self, layers: Iterable[int]) -> list[TensorInfo]:
        """The lora_a and lora_b tensors of these layers, in file order of their base names."""
        wanted = set(layers)
        return [info for p in self.pairs.values() if p.layer in wanted for info in (p.a, p.b)]

    def tensor_bytes(self, info: TensorInfo) -> memoryview:
        if isinstance(self._buffer, GGUFFile):
            return self._buffer.tensor_bytes(info.name)
        return memoryview(self._buffer)[info.offset : info.offset + info.n_bytes]

    def _view(self, info: TensorInfo) -> np.ndarray:
        if isinstance(self._buffer, GGUFFile):
            return self._buffer.tensor_data(info.name)
        return tensor_view(self._buffer, info)

    def weights(self, layers: Iterable[int]) -> AdapterWeights:
        """The packed factors of every matrix this adapter adapts in `layers`."""
        wanted = set(layers)
        return {base: LoraWeight(self._packed(p.a), self._packed(p.b), self.alpha)
                for base, p in self.pairs.items() if p.layer in wanted}

    def _packed(self, info: TensorInfo) -> PackedMatrix:
        packed = pack(info.type, self._view(info), info.name)
        part = non_finite_part(packed)
        if part is not None:  # every adapted row would be NaN: refused when the adapter loads
            where = "" if part == "values" else f" in its {part}"
            raise LoraError(f"adapter {self.name!r}: {info.name}: non-finite values (NaN or Inf){where}; "
                            "the adapter file is damaged or was written wrongly")
        return packed


class LoraRows:
    """Which rows of one batch use which adapters, made once per forward call of a stage from
    its segments: rows with the same adapters form one group, and each adapted product adds
    every group's deltas to its rows. Every kernel computes a row the same way whatever other
    rows it is given, so a row's result does not depend on the rest of its batch."""

    def __init__(self, segments: Sequence, loaded: dict[str, AdapterWeights]):
        by_choice: dict[tuple, list[int]] = {}
        row = 0
        for seg in segments:
            if seg.adapters:
                if len(seg.adapters) > MAX_ADAPTERS_PER_ROW:
                    raise LoraError(f"session {seg.session_id}: {len(seg.adapters)} adapters, at most {MAX_ADAPTERS_PER_ROW}")
                for name, _ in seg.adapters:
                    if name not in loaded:
                        raise LoraError(f"session {seg.session_id}: adapter {name!r} is not loaded on this stage")
                by_choice.setdefault(tuple(seg.adapters), []).extend(range(row, row + seg.length))
            row += seg.length
        self.groups = []  # (rows: slice or index array, [(AdapterWeights, user scale), ...])
        for choice, rows in by_choice.items():
            index = slice(None) if len(rows) == row else np.asarray(rows, dtype=np.int64)
            self.groups.append((index, [(loaded[name], scale) for name, scale in choice]))
        self._acts: tuple[Activations | None, list] = (None, [])

    def __bool__(self) -> bool:
        return bool(self.groups)

    def _inputs(self, acts: Activations) -> list[Activations]:
        """Each group's rows of acts (shared by the products that read the same acts: Q, K, V)."""
        if self._acts[0] is not acts:
            self._acts = (acts, [acts if isinstance(rows, slice) else Activations(acts.x[rows])
                                 for rows, _ in self.groups])
        return self._acts[1]

    def add(self, layer: int, acts: Activations, **outputs: np.ndarray) -> None:
        """outputs: matrix name (attn_q, ...) -> its product with acts (T, n_out), to which the
        adapters' deltas are added in place."""
        if not self.groups:
            return
        for (rows, chosen), x in zip(self.groups, self._inputs(acts)):
            for matrix, out in outputs.items():
                base = f"blk.{layer}.{matrix}.weight"
                for weights, user_scale in chosen:
                    w = weights.get(base)
                    if w is None:
                        continue
                    delta = matmul(w.b, Activations(matmul(w.a, x)))  # (rows, n_out)
                    delta *= w.scale(user_scale)
                    out[rows] += delta
