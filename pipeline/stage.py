"""The one seam of caravan: a Stage runs a contiguous range of transformer layers.

`LocalStage` runs its layers in this process; a `RemoteStage` (coordinator/remote.py) sends
the same batch to a node, or to a chain of consecutive nodes that pass it on to each other
(one RemoteStage per chain). The generation loop sees only a list of stages, so one process
and a cluster give the same output.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass, replace
from typing import Callable, Protocol, Sequence

import numpy as np
from numba.typed import List

from .arena import WeightArena, room_for, room_in_file
from .lora import AdapterWeights, LoraAdapter, LoraRows
from .model import LayerWeights, ModelConfig, OutputHead, TensorSource
from .ops import attention_segments, geglu, rmsnorm, rope_, rope_tables, swiglu
from .prompt_cache import CacheStats, PromptCache
from .quants import Activations, PackedMatrix, matmul

log = logging.getLogger(__name__)


class StageError(ValueError):
    """A batch a stage cannot run (bad positions, unknown session, context full)."""


@dataclass(frozen=True)
class LayerRange:
    """Half-open [start, stop) range of layer indices."""

    start: int
    stop: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop:
            raise ValueError(f"layer range [{self.start}, {self.stop}) is empty or negative")

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __str__(self) -> str:
        return f"[{self.start}, {self.stop})"


@dataclass(frozen=True)
class Segment:
    """`length` consecutive rows of one session, at positions start .. start + length - 1."""

    session_id: str
    start: int
    length: int
    adapters: tuple[tuple[str, float], ...] = ()  # LoRA adapters (name, user scale) the session uses, in order


@dataclass(frozen=True)
class StageBatch:
    """Rows from one or more sessions: a prefill chunk is one long segment, batched decode is
    many segments of one row. hidden holds the segments' rows in order."""

    segments: tuple[Segment, ...]
    hidden: np.ndarray  # (sum of segment lengths, dim) f32
    # Answer with each row's greedy token id, (T,) int64, instead of its hidden state: only a
    # stage that holds the output head (Stage.holds_head), for sessions whose sampler takes the
    # argmax and nothing else (generate.Pipeline decides).
    argmax: bool = False

    def positions(self) -> np.ndarray:
        return np.concatenate([np.arange(s.start, s.start + s.length, dtype=np.int64) for s in self.segments])


@dataclass(frozen=True)
class StageStats:
    """What one place that runs layers holds: a LocalStage, or one node of a RemoteStage's chain.
    None: not known here (a node that was not asked, or did not answer)."""

    layers: LayerRange
    node: str = "local"  # the node's name; "local" in this process
    address: str | None = None  # the node's host:port; None in this process
    sessions: int | None = None  # sessions with a KV cache
    cached_positions: int | None = None  # positions cached, over every session
    kv_bytes: int | None = None  # held by the sessions' KV caches
    weight_bytes: int | None = None  # held by the layers' weights
    rss_bytes: int | None = None  # a node process's resident size
    hop_us: float | None = None  # a chain's median time per batch and node not spent computing
    prompt_cache: CacheStats | None = None  # finished sessions kept for later requests


class Stage(Protocol):
    """Everything a stage offers; the generation loop, metrics and bench use nothing else."""

    layers: LayerRange
    depth: int  # batches that can be computing at once: the nodes of a chain, 1 in this process
    holds_head: bool  # the last layers and the output head: answers a batch with argmax set with token ids

    def forward(self, batch: StageBatch) -> np.ndarray: ...  # (T, dim) f32 in -> (T, dim) f32 out, or (T,) ids
    def submit(self, batch: StageBatch) -> Callable[[], np.ndarray]: ...  # send now; the function waits for the output

    def end_session(self, session_id: str) -> None: ...
    def copy_session(self, source: str, target: str, length: int) -> None: ...  # target's cache = source's first `length` positions
    def retire_session(self, session_id: str, length: int) -> None: ...  # end it, keep its first `length` positions to copy

    def add_adapter(self, adapter: LoraAdapter) -> None: ...  # hold its matrices of this stage's layers

    def stats(self, ask_nodes: bool = True) -> list[StageStats]: ...  # one per node; no network call without ask_nodes
    def close(self) -> None: ...  # let go of sessions and connections; the stage is not used again


class KVCache:
    """Keys and values of one session for a stage's layers, grown by doubling up to n_ctx.

    Stored as f16 (bits in uint16 arrays), llama.cpp's default cache type: half the memory of
    f32, and the rounding llama.cpp's attention sees. Keys are transposed, so that attention's
    scores read positions contiguously (ops.py)."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, n_ctx: int, initial: int = 64):
        self.n_ctx = n_ctx
        capacity = min(initial, n_ctx)
        self.k = np.zeros((n_layers, n_kv_heads, head_dim, capacity), np.uint16)  # (layer, kv head, head_dim, position)
        self.v = np.zeros((n_layers, n_kv_heads, capacity, head_dim), np.uint16)  # (layer, kv head, position, head_dim)
        self.length = 0  # positions 0 .. length - 1 are filled

    @property
    def capacity(self) -> int:
        return self.v.shape[2]

    @staticmethod
    def bytes_for(n_layers: int, kv_dim: int, n_positions: int) -> int:
        """What one session's cache holds when full: keys and values, f16."""
        return 2 * n_layers * kv_dim * n_positions * 2

    def reserve(self, n_positions: int) -> None:
        capacity = self.capacity
        if n_positions <= capacity:
            return
        while capacity < n_positions:
            capacity *= 2
        capacity = min(capacity, self.n_ctx)
        k = np.zeros(self.k.shape[:3] + (capacity,), np.uint16)
        k[..., : self.capacity] = self.k
        v = np.zeros(self.v.shape[:2] + (capacity, self.v.shape[3]), np.uint16)
        v[:, :, : self.capacity] = self.v
        self.k, self.v = k, v

    def store(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """k and v (T, n_kv_heads * head_dim) f32 at positions start .. start + T - 1, rounded to
        f16 (to nearest, ties to even, as ggml's f32 -> f16 copy)."""
        n_rows = k.shape[0]
        n_kv_heads, head_dim = self.v.shape[1], self.v.shape[3]
        k_bits = k.astype(np.float16).view(np.uint16).reshape(n_rows, n_kv_heads, head_dim)
        v_bits = v.astype(np.float16).view(np.uint16).reshape(n_rows, n_kv_heads, head_dim)
        self.k[layer, :, :, start : start + n_rows] = k_bits.transpose(1, 2, 0)
        self.v[layer, :, start : start + n_rows] = v_bits.transpose(1, 0, 2)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def nbytes_for(self, n_positions: int) -> int:
        """What a copy of the first n_positions takes (trimmed)."""
        return self.nbytes // self.capacity * n_positions

    def trimmed(self, length: int) -> "KVCache":
        """A copy of positions 0 .. length - 1, its arrays exactly that long."""
        n_layers, n_kv_heads, head_dim = self.k.shape[:3]
        copy = KVCache(n_layers, n_kv_heads, head_dim, self.n_ctx, initial=length)
        copy.k[...] = self.k[..., :length]
        copy.v[...] = self.v[:, :, :length]
        copy.length = length
        return copy


def stack_rows(mats: Sequence[PackedMatrix], arena: WeightArena) -> tuple[PackedMatrix | None, list[PackedMatrix]]:
    """Matrices of one type and width stacked into one in the arena (their rows in order), and
    each as a view of its rows there, so the stack costs no memory; (None, the matrices copied
    to the arena) when types differ. One product by the stack reads the activations once and
    launches one kernel where there were several (Q, K and V; gate and up); every output row is
    the same sum as before."""
    first = mats[0]
    if any(m.type != first.type or m.cols != first.cols for m in mats) or any(m.rows % first.group_rows for m in mats[:-1]):
        return None, [arena.copy(m) for m in mats]  # only whole groups of rows of one type stack
    arrays = tuple(arena.concatenate([m.arrays[i] for m in mats]) for i in range(len(first.arrays)))
    stacked = PackedMatrix(first.type, sum(m.rows for m in mats), first.cols, arrays)
    views, row = [], 0
    for m in mats:
        views.append(stacked.row_slice(row, row + m.rows))
        row += m.rows
    return stacked, views


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim). Repacking weights
    allocates and frees large temporaries, which glibc keeps for reuse: without this a process
    that just loaded a 1.1B model stays resident at 1.0 GiB instead of 0.7 (measured)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): nothing to hand back this way
        return
    libc.malloc_trim(0)


class _ReadOnDemand(Sequence[LayerWeights]):
    """A range's layers, each read from the source when asked for and not kept."""

    def __init__(self, source: TensorSource, config: ModelConfig, layers: LayerRange):
        self.source, self.config, self.layers = source, config, layers

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i):
        if not 0 <= i < len(self.layers):
            raise IndexError(i)
        return LayerWeights.load(self.source, self.config, self.layers.start + i)


class _BatchRows:
    """What every layer's attention needs of one batch, made once per forward call."""

    __slots__ = ("positions", "starts", "lengths", "k_caches", "v_caches", "lora", "q_scale", "kq_scale")

    def __init__(self, batch: StageBatch, caches: tuple[List, List], lora: LoraRows | None, config: ModelConfig):
        self.positions = batch.positions()  # (T,) each row's position
        self.starts = np.array([seg.start for seg in batch.segments], dtype=np.int64)  # (segments,)
        self.lengths = np.array([seg.length for seg in batch.segments], dtype=np.int64)  # (segments,)
        self.k_caches, self.v_caches = caches  # each segment's KVCache.k and .v
        self.lora = lora
        # Gemma and Phi-3 scale Q before attention and the scores not at all; the others scale the scores
        scale_q = config.architecture.scale_q
        self.q_scale = np.float32(config.attn_scale) if scale_q else None
        self.kq_scale = 1.0 if scale_q else config.attn_scale


class LocalStage:
    """Layers [start, stop) of a model, run in this process, with a KV cache per session."""

    def __init__(self, config: ModelConfig, layers: LayerRange, weights: Sequence[LayerWeights], n_ctx: int,
                 arena: WeightArena | None = None):
        if len(weights) != len(layers):
            raise ValueError(f"{len(weights)} layer weights for layer range {layers}")
        self.config = config
        self.layers = layers
        self.weights = []
        self.qkv = []  # per layer: Q, K and V rows in one matrix (the file's attn_qkv, or stacked), or None
        self.gate_up = []  # per layer: gate and up rows in one matrix, or None (types differ)
        # Every matrix is copied into one block of memory (arena.py: huge pages), layer by layer.
        if arena is None:
            arena = WeightArena(room_for(m for w in weights for m in (
                w.attn_q, w.attn_k, w.attn_v, w.attn_qkv, w.attn_output, w.ffn_gate, w.ffn_up, w.ffn_down)))
        for w in weights:
            w = replace(w, attn_output=arena.copy(w.attn_output), ffn_down=arena.copy(w.ffn_down))
            if w.attn_qkv is not None:
                qkv = arena.copy(w.attn_qkv)
                w = replace(w, attn_qkv=qkv)
            else:
                qkv, (q, k, v) = stack_rows([w.attn_q, w.attn_k, w.attn_v], arena)
                w = replace(w, attn_q=q, attn_k=k, attn_v=v)
            if w.ffn_gate is None:  # the file stacks them already (Phi-3)
                gate_up = arena.copy(w.ffn_up)
                w = replace(w, ffn_up=gate_up)
            else:
                gate_up, (gate, up) = stack_rows([w.ffn_gate, w.ffn_up], arena)
                w = replace(w, ffn_gate=gate, ffn_up=up)
            self.weights.append(w)
            self.qkv.append(qkv)
            self.gate_up.append(gate_up)
        self.n_ctx = n_ctx
        # RoPE tables per distinct (base, scale) among the layers (Gemma 3 has two)
        tables: dict[tuple[float, float], tuple[np.ndarray, np.ndarray]] = {}
        self.rope = []
        for layer in layers:
            base, scale = config.layer_rope(layer)
            if (base, scale) not in tables:
                tables[base, scale] = rope_tables(n_ctx, config.n_rot, base, scale, config.rope_freq_factors)
            self.rope.append(tables[base, scale])
        self.window = [config.sliding_window if config.is_sliding(layer) else 0 for layer in layers]
        self.sessions: dict[str, KVCache] = {}
        self.prompt_cache = PromptCache()  # retired sessions; budget 0 (keeps none) unless set
        self.adapters: dict[str, AdapterWeights] = {}  # LoRA adapter name -> its matrices in these layers
        self.output: OutputHead | None = None  # set on the model's last layers to answer argmax batches
        self._lock = threading.Lock()  # one batch at a time: the scheduler's lanes may call at once
        self._lists: tuple[tuple[int, ...], List, List] | None = None  # see _cache_lists

    @classmethod
    def load(cls, source: TensorSource, config: ModelConfig, layers: LayerRange, n_ctx: int) -> "LocalStage":
        if layers.stop > config.n_layers:
            raise ValueError(f"layer range {layers} is past the model's {config.n_layers} layers")
        # Each layer is read, copied into the arena and let go before the next is read, so
        # loading holds one layer twice, never the whole range (peak resident size loading a
        # 1.1B model: 775 MiB, 1,052 when every layer was read first); then the heap's freed
        # pages go back.
        arena = WeightArena(room_in_file(source, config, layers))
        stage = cls(config, layers, _ReadOnDemand(source, config, layers), n_ctx, arena)
        return_freed_memory()
        return stage

    @property
    def weight_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights) + (self.output.nbytes if self.output is not None else 0)

    depth = 1  # one batch computes at a time here

    @property
    def holds_head(self) -> bool:
        return self.output is not None

    def submit(self, batch: StageBatch) -> Callable[[], np.ndarray]:
        """forward(batch) now; the function returned gives its output."""
        out = self.forward(batch)
        return lambda: out

    def stats(self, ask_nodes: bool = True) -> list[StageStats]:
        caches = list(self.sessions.values())  # not under the lock: /health must not wait for a batch
        return [StageStats(self.layers, sessions=len(caches), cached_positions=sum(c.length for c in caches),
                           kv_bytes=sum(c.nbytes for c in caches), weight_bytes=self.weight_bytes,
                           prompt_cache=self.prompt_cache.stats())]

    def close(self) -> None:
        with self._lock:
            self.sessions.clear()
            self._lists = None

    def end_session(self, session_id: str) -> None:
        with self._lock:
            self.sessions.pop(session_id, None)
            self.prompt_cache.pop(session_id)
            self._lists = None  # they may hold this session's arrays

    def retire_session(self, session_id: str, length: int) -> None:
        """End the session but keep its first `length` positions (those the caller accepted) in
        the prompt cache, within its budget, for later sessions to copy from."""
        with self._lock:
            cache = self.sessions.pop(session_id, None)
            self._lists = None
            if cache is None:
                return
            if not 0 <= length <= cache.length:
                raise StageError(f"session {session_id} caches {cache.length} positions, cannot keep {length}; "
                                 "it was ended")
            self.prompt_cache.put(session_id, cache, length)

    def copy_session(self, source: str, target: str, length: int) -> None:
        """Start session `target` with a copy of the first `length` cached positions of `source`
        (llama.cpp's llama_memory_seq_cp): samples of one prompt share its prefill."""
        with self._lock:
            self._copy_session(source, target, length)

    def _copy_session(self, source: str, target: str, length: int) -> None:
        cache = self.sessions.get(source) or self.prompt_cache.get(source)
        if cache is None:
            raise StageError(f"session {source} is unknown here")
        if not 0 < length <= cache.length:
            raise StageError(f"session {source} caches {cache.length} positions, cannot copy {length}")
        if target in self.sessions:
            raise StageError(f"session {target} exists already")
        self.sessions[target] = cache.trimmed(length)

    def add_adapter(self, adapter: LoraAdapter) -> None:
        """Hold a LoRA adapter's matrices of these layers (none, when it adapts none of them)."""
        self.adapters[adapter.name] = adapter.weights(self.layers)

    def _check(self, seg: Segment) -> None:
        if seg.length <= 0 or seg.start < 0:
            raise StageError(f"session {seg.session_id}: empty or negative segment")
        if seg.start + seg.length > self.n_ctx:
            raise StageError(
                f"session {seg.session_id}: position {seg.start + seg.length - 1} is past the context size {self.n_ctx}"
            )
        cache = self.sessions.get(seg.session_id)
        if cache is None and seg.start != 0:
            raise StageError(f"session {seg.session_id} is unknown here and does not start at position 0")
        if cache is not None and seg.start > cache.length:
            raise StageError(
                f"session {seg.session_id}: segment starts at {seg.start} but only {cache.length} positions are cached"
            )

    def _check_batch(self, batch: StageBatch) -> np.ndarray:
        """The batch's rows as a (T, dim) f32 copy, the residual stream, once everything that can
        be refused is checked: a refused batch leaves nothing behind."""
        c = self.config
        segments = batch.segments
        if not segments:
            raise StageError("empty batch")
        if batch.argmax and self.output is None:
            raise StageError(f"layers {self.layers} hold no output head: they cannot answer with token ids "
                             "(load the head with the model's last layers, or ask for hidden states)")
        if len({seg.session_id for seg in segments}) != len(segments):
            raise StageError("a batch holds at most one segment per session")
        for seg in segments:
            self._check(seg)
        x = np.array(batch.hidden, dtype=np.float32, copy=True)  # (T, dim)
        if x.ndim != 2 or x.shape[1] != c.dim or x.shape[0] != sum(s.length for s in segments):
            raise StageError(f"hidden state of shape {x.shape} does not match the batch's segments and dim {c.dim}")
        if not np.isfinite(x).all():  # kernels would give its session garbage
            raise StageError(f"{self._sessions_of(batch, x)}: the hidden state given to layers {self.layers} holds NaN or Inf")
        return x

    @staticmethod
    def _sessions_of(batch: StageBatch, x: np.ndarray) -> str:
        """'session a, b': the sessions whose rows of x (T, dim) hold a NaN or an Inf."""
        bad = ~np.isfinite(x).all(axis=1)
        names, row = [], 0
        for seg in batch.segments:
            if bad[row : row + seg.length].any():
                names.append(seg.session_id)
            row += seg.length
        return f"session {', '.join(names)}"

    def _caches(self, segments: Sequence[Segment]) -> list[KVCache]:
        """The KV cache of each segment's session (checked by _check_batch), made or grown to fit."""
        caches = []
        for seg in segments:
            cache = self.sessions.get(seg.session_id)
            if cache is None:
                cache = self.sessions[seg.session_id] = KVCache(
                    len(self.layers), self.config.n_kv_heads, self.config.head_dim, self.n_ctx
                )
            cache.reserve(seg.start + seg.length)
            caches.append(cache)
        return caches

    def forward(self, batch: StageBatch) -> np.ndarray:
        with self._lock:
            x = self._check_batch(batch)
            lora = LoraRows(batch.segments, self.adapters)  # checked before any cache changes
            cached = {seg.session_id: self.sessions[seg.session_id].length
                      for seg in batch.segments if seg.session_id in self.sessions}
            try:
                out = self._forward(batch, x, lora, self._caches(batch.segments))
                if not np.isfinite(out).all():  # checked input, so these layers overflowed
                    raise StageError(f"{self._sessions_of(batch, out)}: the hidden state became NaN or Inf in layers "
                                     f"{self.layers} (the model's activations overflowed); the batch was not kept")
                if batch.argmax:
                    out = self.output.argmax(out)  # (T,) the rows' greedy tokens
            except BaseException:
                self._forget(batch.segments, cached)
                raise
            for seg in batch.segments:
                self.sessions[seg.session_id].length = seg.start + seg.length
            return out

    def _forget(self, segments: Sequence[Segment], cached: dict[str, int]) -> None:
        """Undo a failed batch: the sessions it started go, and the others keep only the
        positions before their segment (the batch may have overwritten the rest)."""
        for seg in segments:
            if seg.session_id not in cached:
                self.sessions.pop(seg.session_id, None)
            elif seg.session_id in self.sessions:
                self.sessions[seg.session_id].length = min(cached[seg.session_id], seg.start)
        self._lists = None  # they may hold the arrays of sessions gone

    def _cache_lists(self, caches: list[KVCache]) -> tuple[List, List]:
        """The caches' key and value arrays as the typed lists attention takes. Making them costs
        about 5 us an array, so the last batch's are kept: consecutive decode steps of the same
        sequences reuse them. The key is the arrays' ids, which cannot be reused while the kept
        lists hold the arrays."""
        key = tuple(id(cache.k) for cache in caches) + tuple(id(cache.v) for cache in caches)
        if self._lists is None or self._lists[0] != key:
            self._lists = key, List([cache.k for cache in caches]), List([cache.v for cache in caches])
        return self._lists[1], self._lists[2]

    def _forward(self, batch: StageBatch, x: np.ndarray, lora: LoraRows, caches: list[KVCache]) -> np.ndarray:
        """x (T, dim), the residual stream, through the layers, in place; caches: each segment's."""
        rows = _BatchRows(batch, self._cache_lists(caches), lora or None, self.config)  # None: no adapters to add
        for li, w in enumerate(self.weights):
            x += self._attention(li, w, x, rows)
            x += self._ffn(li, w, x, rows.lora)
        return x

    def _attention(self, li: int, w: LayerWeights, x: np.ndarray, rows: _BatchRows) -> np.ndarray:
        """Layer li's attention block: what it adds to the residual stream x (T, dim)."""
        c = self.config
        acts = Activations(rmsnorm(x, w.attn_norm, c.norm_eps))  # (T, dim) normed input
        qkv = self._qkv(li, w, acts, rows.lora)  # (T, q_dim + 2 * kv_dim): each row's Q, K and V
        q, k, v = qkv[:, : c.q_dim], qkv[:, c.q_dim : c.q_dim + c.kv_dim], qkv[:, c.q_dim + c.kv_dim :]  # views
        if w.attn_q_bias is not None:  # Q, K and V biases, where the file has them
            q += w.attn_q_bias
            k += w.attn_k_bias
            v += w.attn_v_bias
        if w.attn_q_norm is not None:  # per head, over head_dim (Gemma 3)
            q[...] = rmsnorm(q.reshape(-1, c.head_dim), w.attn_q_norm, c.norm_eps).reshape(q.shape)
            k[...] = rmsnorm(k.reshape(-1, c.head_dim), w.attn_k_norm, c.norm_eps).reshape(k.shape)
        cos, sin = self.rope[li]
        rope_(qkv, rows.positions, cos, sin, c.n_heads + c.n_kv_heads, c.architecture.rope_neox,
              c.head_dim)  # Q and K, side by side
        if rows.q_scale is not None:  # Gemma and Phi-3 scale Q, not the scores
            q *= rows.q_scale
        attn = attention_segments(qkv, c.n_heads, c.head_dim, rows.k_caches, rows.v_caches, li, rows.starts, rows.lengths,
                                  rows.kq_scale, c.attn_softcap, self.window[li])  # (T, q_dim); stores K and V first
        out = self._project(li, Activations(attn), rows.lora, w.attn_output, ("attn_output",))  # (T, dim)
        if w.attn_output_bias is not None:  # output bias, where the file has one
            out += w.attn_output_bias
        if w.post_attention_norm is not None:  # norm of the block's output (Gemma 2, 3)
            out = rmsnorm(out, w.post_attention_norm, c.norm_eps)
        return out

    def _qkv(self, li: int, w: LayerWeights, acts: Activations, lora: LoraRows | None) -> np.ndarray:
        """Each row's Q, K and V side by side (T, q_dim + 2 * kv_dim), with the adapters' terms."""
        if w.attn_qkv is not None:  # the file's own fused matrix: adapters see it whole
            return self._project(li, acts, lora, w.attn_qkv, ("attn_qkv",))
        if self.qkv[li] is not None:  # Q, K and V stacked: one product
            return self._project(li, acts, lora, self.qkv[li], ("attn_q", "attn_k", "attn_v"))
        return np.concatenate([self._project(li, acts, lora, w.attn_q, ("attn_q",)),  # three types: three products
                               self._project(li, acts, lora, w.attn_k, ("attn_k",)),
                               self._project(li, acts, lora, w.attn_v, ("attn_v",))], axis=1)

    def _ffn(self, li: int, w: LayerWeights, x: np.ndarray, lora: LoraRows | None) -> np.ndarray:
        """Layer li's feed-forward block: what it adds to the residual stream x (T, dim)."""
        c = self.config
        glu = geglu if c.architecture.gelu else swiglu
        acts = Activations(rmsnorm(x, w.ffn_norm, c.norm_eps))  # (T, dim) normed input
        if w.ffn_gate is None:  # the file's ffn_up holds gate and up (Phi-3): adapters see it whole
            h = glu(self._project(li, acts, lora, w.ffn_up, ("ffn_up",)))  # (T, hidden_dim)
        elif self.gate_up[li] is not None:  # gate and up stacked: one product
            h = glu(self._project(li, acts, lora, self.gate_up[li], ("ffn_gate", "ffn_up")))
        else:  # gate and up of two types: two products
            h = glu(self._project(li, acts, lora, w.ffn_gate, ("ffn_gate",)),
                    self._project(li, acts, lora, w.ffn_up, ("ffn_up",)))
        out = self._project(li, Activations(h), lora, w.ffn_down, ("ffn_down",))  # (T, dim)
        if w.post_ffw_norm is not None:  # norm of the block's output (Gemma 2, 3)
            out = rmsnorm(out, w.post_ffw_norm, c.norm_eps)
        return out

    def _project(self, li: int, acts: Activations, lora: LoraRows | None, matrix: PackedMatrix,
                 names: tuple[str, ...]) -> np.ndarray:
        """acts (T, n_in) times `matrix` (T, its rows), plus each LoRA adapter's term for the
        matrices of layer li it holds: `names`, the file's, in row order (several when stacked)."""
        out = matmul(matrix, acts)
        if lora is not None:
            row = 0
            for name in names:
                n_rows = out.shape[1] if len(names) == 1 else getattr(self.weights[li], name).rows
                lora.add(self.layers.start + li, acts, **{name: out[:, row : row + n_rows]})
                row += n_rows
        return out
