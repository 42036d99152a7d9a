"""The worker: a gRPC servicer around a LocalStage, its weight cache and its health.

Compute runs under one lock per process (`_run`): Numba's workqueue threading layer aborts
when two Python threads run parallel kernels at once, and a gRPC server calls handlers from
many threads. The handler's own thread computes while holding it (a hand-off to a dedicated
thread cost each hop two more thread wake-ups), and sets Numba's thread count, which is per
calling thread, each time.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Callable

import hashlib

import grpc
import numba
import numpy as np
import psutil
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from caravan.pipeline.catalog import file_sha256
from caravan.pipeline.gguf_file import GGUFFile
from caravan.pipeline.lora import LoraAdapter
from caravan.pipeline.model import ModelConfig, OutputHead
from caravan.pipeline import warmup
from caravan.pipeline.prompt_cache import default_budget
from caravan.pipeline.speed import ms_per_layer
from caravan.pipeline.stage import KVCache, LayerRange, LocalStage, Segment, StageBatch
from caravan.proto import caravan_pb2 as pb
from caravan.proto import caravan_pb2_grpc as pb_grpc
from caravan.proto import auth, wire

from .relay import Links, LinkError, ResultStreams, check_chain
from .sessions import SessionCap, SessionOwners, is_chain, stream_owner
from .streams import POOL_THREADS, StreamGate, peer_address
from .weights import CachedLayers, RangeManifest, WeightCache, WeightError

log = logging.getLogger(__name__)

SERVICE = "caravan.v1.Stage"  # the name health reports READY under
MAX_ADAPTERS = 16  # LoRA adapters a node holds at once
MAX_ANNOUNCED = 1024  # (coordinator, layers) pairs remembered as logged, so each is logged once
VERSION = package_version("caravan")
# The node pings a coordinator's connection this often when idle: one that went silent
# (unplugged, frozen) loses its streams, and with them its sessions, a timeout later.
PEER_KEEPALIVE_MS = 5 * wire.KEEPALIVE_MS
# Bytes a stream may send ahead of what its handler has read: enough for a LAN's line rate at
# a few ms of round trip.
STREAM_WINDOW_BYTES = 1 << 20


@dataclass(frozen=True)
class NodeSettings:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    name: str = ""  # default: <hostname>-<port>
    threads: int | None = None  # compute threads (default: Numba's, all cores)
    cache_dir: Path = Path(".")
    model_path: Path | None = None  # a local copy of a model file: its layers need no transfer
    memory_limit: int | None = None  # bytes this node offers at most (runtime, layers, KV caches)
    token: str | None = None  # the cluster join token every Stage call must carry (None: no check)
    token_file: Path | None = None  # the file token was read from: read again when a call is refused
    tls: auth.TLSFiles | None = None  # mutual TLS: only clients with a certificate from tls.ca
    cache_budget: int | None = None  # bytes of finished sessions kept to copy (None: a share of what the layers leave free)


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    context.abort(wire.status_code(exc), str(exc))


class StageServicer(pb_grpc.StageServicer):
    def __init__(self, settings: NodeSettings, on_state: Callable[[int], None] = lambda state: None):
        self.settings = settings
        self.threads = settings.threads or numba.config.NUMBA_NUM_THREADS
        self._compute = threading.Lock()
        self._lock = threading.Lock()  # guards the fields below
        self._stage: LocalStage | None = None
        self._loaded: tuple[str, LayerRange, int, bool] | None = None  # (model sha256, layers, n_ctx, head)
        self._state = pb.NODE_STATE_IDLE
        self._error = ""
        self._benchmarks: dict[tuple, float] = {}
        self._on_state = on_state
        self.cache = WeightCache(settings.cache_dir)
        self.owners = SessionOwners()
        self._cap: SessionCap | None = None  # set with each load
        self.results = ResultStreams(on_end=self._release)
        self.streams = StreamGate()  # the server's interceptor: streams open, within their caps
        # Every Stage call must carry the cluster token: the server's first interceptor.
        self.token_check = auth.TokenCheck(settings.token, settings.token_file) if settings.token else None
        self.links = Links(lambda: self.token_check.token if self.token_check else None, settings.tls)
        self._announced: set[tuple[str, LayerRange]] = set()  # (coordinator, layers) logged
        self.node_id = _node_id(settings.cache_dir)
        self.local_file: GGUFFile | None = None
        self.local_sha256 = ""
        if settings.model_path is not None:
            self.local_file = GGUFFile(settings.model_path)
            self.local_sha256 = file_sha256(settings.model_path, settings.cache_dir)

    @property
    def state(self) -> int:
        return self._state

    def _set_state(self, state: int, error: str = "") -> None:
        with self._lock:
            self._state, self._error = state, error
        self._on_state(state)

    def _run(self, fn, *args):
        """Run fn while no other thread computes."""
        with self._compute:
            numba.set_num_threads(self.threads)
            return fn(*args)

    def close(self) -> None:
        """The node is stopping: end every Results stream (each coordinator hears it at once and
        re-plans) and the links to the next nodes of chains."""
        self.results.close()
        self.links.close()

    # --- Info and Benchmark -------------------------------------------------------------------

    def Info(self, request, context):
        mem = psutil.virtual_memory()
        with self._lock:
            stage, loaded, state, error = self._stage, self._loaded, self._state, self._error
        weights, kv = _held(stage)
        cached = stage.prompt_cache.stats() if stage else None
        reclaimable = cached.bytes if cached else 0  # the prompt cache gives way to live sessions
        info = pb.NodeInfo(
            protocol_version=wire.PROTOCOL_VERSION, version=VERSION, node_id=self.node_id,
            name=self.settings.name, memory_total=self._capped(mem.total),
            memory_available=max(0, self._capped(mem.available + weights + kv + reclaimable) - weights - kv),
            cores=os.cpu_count() or 1, threads=self.threads, architecture=platform.machine(),
            state=state, local_model_sha256=self.local_sha256, error=error,
            max_message_bytes=wire.MAX_MESSAGE_BYTES, rss_bytes=psutil.Process().memory_info().rss,
            weight_bytes=weights, kv_cache_bytes=kv, sessions=len(stage.sessions) if stage else 0,
        )
        if cached is not None:
            info.prompt_cache.CopyFrom(pb.PromptCacheInfo(
                sessions=cached.sessions, tokens=cached.tokens, bytes=cached.bytes, budget=cached.budget,
                hits=cached.hits, evictions=cached.evictions))
        if loaded is not None:
            info.model_sha256, info.layer_start, info.layer_stop = loaded[0], loaded[1].start, loaded[1].stop
        return info

    def _capped(self, n_bytes: int) -> int:
        limit = self.settings.memory_limit
        return n_bytes if limit is None else min(n_bytes, limit)

    def _room(self, held: int) -> int:
        """Bytes for layers and KV caches, counting as free the `held` bytes a new load lets go:
        what the machine has free, and within --memory-limit once the runtime is counted
        (without a limit the runtime is in use already, not in what the machine has free)."""
        room = psutil.virtual_memory().available + held
        limit = self.settings.memory_limit
        return room if limit is None else min(room, limit - wire.NODE_RUNTIME_BYTES)

    def _check_room(self, manifest: RangeManifest, kv_dim: int, n_ctx: int) -> None:
        """Refuse layers whose weights and one full KV cache would not fit (MemoryError)."""
        with self._lock:
            held = sum(_held(self._stage))
        weights = manifest.packed_bytes
        kv = KVCache.bytes_for(len(manifest.layers), kv_dim, n_ctx)
        room = self._room(held)
        if weights + kv <= room:
            return
        limit = self.settings.memory_limit
        if limit is not None and room == limit - wire.NODE_RUNTIME_BYTES:
            has = f"its --memory-limit is {limit >> 20} MiB, {wire.NODE_RUNTIME_BYTES >> 20} MiB of it for the runtime"
        else:
            has = f"it has {room >> 20} MiB free"
        raise MemoryError(
            f"layers {manifest.layers} need {(weights + kv) >> 20} MiB ({weights >> 20} MiB of "
            f"weights, {kv >> 20} MiB of KV cache for {n_ctx} tokens); {has}: give it fewer layers, a shorter "
            "context, or more memory")

    def Benchmark(self, request, context):
        try:
            config = wire.decode_config(request.config)
            ttype = wire.tensor_type(request.weight_type)
            key = (config, ttype)
            if key not in self._benchmarks:
                self._benchmarks[key] = self._run(_benchmark, config, ttype)
        except Exception as exc:  # noqa: BLE001  (mapped to a status; the node keeps serving)
            _abort(context, exc)
        return pb.BenchmarkReply(ms_per_layer=self._benchmarks[key])

    # --- loading ------------------------------------------------------------------------------

    def _manifest(self, request: pb.LoadRequest) -> tuple[ModelConfig, RangeManifest]:
        config = wire.decode_config(request.config)
        if not request.layer_start < request.layer_stop <= config.n_layers:
            raise WeightError(f"layer range [{request.layer_start}, {request.layer_stop}) is not within the model's {config.n_layers} layers")
        if not 1 < request.n_ctx <= config.context_length:
            raise WeightError(f"context size {request.n_ctx} is outside 2 to {config.context_length}")
        layers = LayerRange(request.layer_start, request.layer_stop)
        entries = [(t.name, t.type, tuple(t.shape), t.n_bytes) for t in request.tensors]
        manifest = RangeManifest.build(request.model_sha256, config, layers, entries, request.head)
        self._check_room(manifest, config.kv_dim, request.n_ctx)
        return config, manifest

    def _already_loaded(self, request: pb.LoadRequest) -> bool:
        with self._lock:
            return self._state == pb.NODE_STATE_READY and self._loaded == (
                request.model_sha256, LayerRange(request.layer_start, request.layer_stop), request.n_ctx, request.head)

    def Load(self, request, context):
        try:
            config, manifest = self._manifest(request)
            if self._already_loaded(request):
                self._announce(context, manifest.layers)
                return pb.LoadReply(ready=True, source="loaded")
            if self.local_file is not None and self.local_sha256 == manifest.model_sha256:
                source, origin = self.local_file, "local file"
            else:
                missing = self.cache.missing(manifest.model_sha256, manifest.layers)
                needs_head = manifest.head and self.cache.missing_head(manifest.model_sha256)
                if missing or needs_head:
                    return pb.LoadReply(needs_weights=True, missing_layers=missing, needs_head=needs_head)
                source, origin = self.cache.source(manifest.model_sha256, manifest.layers, manifest.head), "cache"
            self._load(source, config, manifest, request.n_ctx, origin)
            self._announce(context, manifest.layers)
        except Exception as exc:  # noqa: BLE001  (mapped to a status; the node keeps serving)
            _abort(context, exc)
        return pb.LoadReply(ready=True, source=origin)

    def PushWeights(self, request_iterator, context):
        writer = None
        try:
            header = wire.stream_header(request_iterator, "PushWeights", "the load request")
            config, manifest = self._manifest(header)
            try:
                writer = self.cache.receive(manifest, config, list(header.push_layers), header.push_head)
            except OSError as exc:
                raise OSError(f"cannot write the weight cache in {self.settings.cache_dir}: {exc.strerror or exc}") from None
            writer.finish(wire.receive_stream(request_iterator, f"the weight stream for layers {manifest.layers}", writer.write))
            received = writer.received
            writer = None
            log.info("received layers %s: %d bytes", list(header.push_layers), received)
            missing = self.cache.missing(manifest.model_sha256, manifest.layers)
            if missing or manifest.head and self.cache.missing_head(manifest.model_sha256):
                raise WeightError(f"layers {missing} of {manifest.layers} (or the head) are still missing after the push")
            self._load(self.cache.source(manifest.model_sha256, manifest.layers, manifest.head), config, manifest,
                       header.n_ctx, "pushed")
            self._announce(context, manifest.layers)
        except Exception as exc:  # noqa: BLE001
            if writer is not None:
                writer.abort()
            _abort(context, exc)
        return pb.LoadReply(ready=True, source="pushed", bytes_received=received)

    def _load(self, source: CachedLayers | GGUFFile, config: ModelConfig, manifest: RangeManifest,
              n_ctx: int, origin: str) -> None:
        self._set_state(pb.NODE_STATE_LOADING)
        with self._lock:
            self._stage, self._loaded = None, None  # free the old layers before loading new ones
        self.owners.clear()
        try:
            t0 = time.perf_counter()
            stage = self._run(_load_and_warm_up, source, config, manifest.layers, n_ctx, manifest.head)
        except Exception as exc:
            self._set_state(pb.NODE_STATE_FAILED, f"loading layers {manifest.layers} failed: {exc}")
            raise
        finally:
            if isinstance(source, CachedLayers):
                source.close()
        room = self._room(stage.weight_bytes) - stage.weight_bytes
        cap = SessionCap(KVCache.bytes_for(len(stage.layers), config.kv_dim, n_ctx), room, n_ctx)
        budget = self.settings.cache_budget
        stage.prompt_cache.set_budget(min(room, default_budget(room) if budget is None else budget))
        stage.prompt_cache.on_evict = self.owners.forget
        with self._lock:
            self._stage, self._loaded, self._cap = stage, (manifest.model_sha256, manifest.layers, n_ctx, manifest.head), cap
        self._set_state(pb.NODE_STATE_READY)
        log.info("layers %s ready (from %s) in %.2f s, for at most %d sessions, %d MiB of prompt cache",
                 manifest.layers, origin, time.perf_counter() - t0, cap.limit, stage.prompt_cache.budget >> 20)

    def _announce(self, context: grpc.ServicerContext | None, layers: LayerRange) -> None:
        """Log, once per coordinator connection and layer range, whom this node serves and with what."""
        peer = peer_address(context.peer()) if context is not None else "in this process"
        with self._lock:
            if (peer, layers) in self._announced:
                return
            if len(self._announced) >= MAX_ANNOUNCED:
                self._announced.clear()
            self._announced.add((peer, layers))
        log.info("serving coordinator %s with layers %s", peer, layers)

    # --- serving ------------------------------------------------------------------------------

    def Forward(self, request_iterator, context):
        stream = stream_owner()  # of the sessions of batches sent outside a chain
        try:
            for request in request_iterator:
                if not request.chain:
                    yield self._forward(request, stream)
                    continue
                try:
                    check_chain(request)
                except wire.WireError as exc:  # no next node to trust: the coordinator hears it here
                    self._deliver(request, pb.ForwardReply(id=request.id, error=pb.Error(
                        code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=f"node {self._name}: {exc}")))
                    continue
                self._pass_on(request, self._forward(request, request.chain))
        finally:  # the coordinator closed the stream or went away
            self._release(stream)

    def Results(self, request, context):
        yield from self.results.serve(request.chain, context)

    def _forward(self, request: pb.ForwardRequest, owner: str) -> pb.ForwardReply:
        if request.HasField("error"):  # an earlier node of the chain refused the batch
            return pb.ForwardReply(id=request.id, error=request.error)
        with self._lock:
            stage = self._stage
        try:
            if stage is None:
                raise wire.NotReadyError("no layers are loaded on this node")
            segments = wire.decode_segments(request.segments)
            rows = sum(s.length for s in segments)
            hidden = wire.decode_hidden(request.hidden, stage.config.dim, wire.MAX_BATCH_ROWS)
            if hidden.shape[0] != rows:
                raise wire.WireError(f"{hidden.shape[0]} hidden rows for segments of {rows} rows")
            # Everything that can be refused is checked before the stage makes any session's cache.
            reply_format = wire.check_format(request.reply_format or request.hidden.format, stage.config.dim)
            # Token ids are the chain's answer: only its last node gives them.
            argmax = request.reply_tokens and not request.relay
            t0 = time.perf_counter()
            out = self._run(self._forward_owned, stage, owner, StageBatch(segments, hidden, argmax))
            compute_us = int((time.perf_counter() - t0) * 1e6)
            if argmax:
                return pb.ForwardReply(id=request.id, tokens=pb.Tokens(ids=out.tolist()), compute_us=[compute_us])
            return pb.ForwardReply(id=request.id, hidden=wire.encode_hidden(out, reply_format), compute_us=[compute_us])
        except Exception as exc:  # noqa: BLE001  (one bad batch never ends the stream)
            if wire.status_code(exc) == grpc.StatusCode.INTERNAL:
                log.exception("forward failed")
            # In a chain the coordinator hears it from the last node: say which node refused.
            message = f"node {self._name}: {exc}" if request.chain else str(exc)
            return pb.ForwardReply(id=request.id, error=pb.Error(code=wire.status_code(exc).value[0], message=message))

    def _forward_owned(self, stage: LocalStage, owner: str, batch: StageBatch) -> np.ndarray:
        """Under the compute lock, so an owner's stream cannot end between the checks and the
        claim: the batch, its new sessions within the cap, its sessions then `owner`'s."""
        if is_chain(owner) and not self.results.is_open(owner):
            raise wire.ChainClosedError(f"chain {owner} has no results stream on this node (its coordinator closed "
                                        "it or went away): open one before its batches")
        new = {s.session_id for s in batch.segments} - stage.sessions.keys()
        self._make_room(stage, len(new))
        out = stage.forward(batch)
        self.owners.claim(owner, [s.session_id for s in batch.segments])
        return out

    def _make_room(self, stage: LocalStage, new: int) -> None:
        """Within the cap, `new` more live sessions: the prompt cache gives up, oldest first,
        what they and the live ones may grow to (the cap's room counts finished sessions kept)."""
        cap = self._session_cap()
        if new:
            stage.prompt_cache.shrink_to(cap.room - (len(stage.sessions) + new) * cap.session_bytes)
        cap.check(len(stage.sessions), new, self._name)

    def _session_cap(self) -> SessionCap:
        with self._lock:
            cap = self._cap
        assert cap is not None  # set before the stage is
        return cap

    def _release(self, owner: str) -> None:
        """End the sessions `owner` holds: its stream has ended."""
        with self._lock:
            stage = self._stage
        if stage is None:
            return
        ended = self._run(self._end_owned, stage, owner)
        if ended:
            log.info("%s ended: its %d sessions ended with it", owner, ended)

    def _end_owned(self, stage: LocalStage, owner: str) -> int:
        sessions = self.owners.release(owner)
        for session_id in sessions:
            stage.end_session(session_id)
        return len(sessions)

    def _pass_on(self, request: pb.ForwardRequest, reply: pb.ForwardReply) -> None:
        """A chain's batch, computed (or refused): on to the next node, or, from the last node,
        to the coordinator's Results stream."""
        compute_us = [*request.compute_us, *reply.compute_us]
        if not request.relay:
            reply.compute_us[:] = compute_us
            self._deliver(request, reply)
            return
        onward = pb.ForwardRequest(id=request.id, segments=request.segments, reply_format=request.reply_format,
                                   chain=request.chain, relay=request.relay[1:], compute_us=compute_us,
                                   reply_tokens=request.reply_tokens)
        if reply.HasField("error"):
            onward.error.CopyFrom(reply.error)
        else:
            onward.hidden.CopyFrom(reply.hidden)
        try:
            self.links.send(request.relay[0], onward)
        except LinkError as exc:
            # The coordinator listens for this on every node of the chain: it re-plans.
            error = pb.Error(code=grpc.StatusCode.UNAVAILABLE.value[0], message=str(exc))
            self._deliver(request, pb.ForwardReply(id=request.id, error=error))

    def _deliver(self, request: pb.ForwardRequest, reply: pb.ForwardReply) -> None:
        if not self.results.deliver(request.chain, reply):
            log.warning("chain %s: no results stream here (its coordinator went away); batch %d dropped",
                        request.chain[:64], request.id)

    @property
    def _name(self) -> str:
        return self.settings.name or f"{platform.node()}-{self.settings.port}"

    def EndSession(self, request, context):
        # Not behind the compute lock: only the batch running now delays it, never those waiting.
        with self._lock:
            stage = self._stage
        if stage is None:
            return pb.EndSessionReply()
        try:
            if request.keep:  # still its owner's: it ends with the owner's stream
                stage.retire_session(request.session_id, request.keep)
        except Exception as exc:  # noqa: BLE001  (mapped to a status by wire's one table)
            _abort(context, exc)
        finally:
            if not request.keep or request.session_id not in stage.prompt_cache:
                self.owners.forget(request.session_id)
                stage.end_session(request.session_id)
        return pb.EndSessionReply()

    def CopySession(self, request, context):
        try:
            wire.check_session_id(request.source)
            wire.check_session_id(request.target)
            with self._lock:
                stage = self._stage
            if stage is None:
                raise wire.NotReadyError("no layers are loaded on this node")
            self._run(self._copy_owned, stage, request.source, request.target, request.length)
        except Exception as exc:  # noqa: BLE001  (mapped to a status by wire's one table)
            _abort(context, exc)
        return pb.CopySessionReply()

    def _copy_owned(self, stage: LocalStage, source: str, target: str, length: int) -> None:
        """Under the compute lock: the copy, within the cap, owned by the source's owner."""
        self._make_room(stage, 0 if target in stage.sessions else 1)
        stage.copy_session(source, target, length)
        owner = self.owners.owner(source)
        if owner is not None:
            self.owners.claim(owner, [target])

    def LoadAdapter(self, request_iterator, context):
        try:
            header = wire.stream_header(request_iterator, "LoadAdapter", "the adapter header")
            with self._lock:
                stage = self._stage
            if stage is None:
                raise wire.NotReadyError("no layers are loaded on this node")
            if header.name not in stage.adapters and len(stage.adapters) >= MAX_ADAPTERS:
                raise wire.WireError(f"this node holds {MAX_ADAPTERS} adapters already")
            tensors = wire.decode_tensor_entries(header.tensors)
            expected = sum(t.n_bytes for t in tensors.values())
            available = self._capped(psutil.virtual_memory().available)
            if 2 * expected > available:  # the bytes, then the packed matrices
                raise MemoryError(f"adapter {header.name!r} needs {2 * expected >> 20} MiB; this node has "
                                  f"{available >> 20} MiB free")
            data, digest = bytearray(), hashlib.sha256()

            def take(piece: bytes) -> None:
                if len(data) + len(piece) > expected:
                    raise wire.WireError(f"adapter {header.name!r}: more bytes than declared ({expected})")
                data.extend(piece)
                digest.update(piece)

            sha256 = wire.receive_stream(request_iterator, f"the stream of adapter {header.name!r}", take)
            if len(data) != expected or sha256 != digest.hexdigest():
                raise wire.WireError(f"adapter {header.name!r}: {len(data)} of {expected} bytes, or a wrong sha256")
            adapter = LoraAdapter.received(header.name, header.alpha, header.arch, stage.config, tensors,
                                           bytes(data), stage.layers)
            self._run(stage.add_adapter, adapter)
            log.info("adapter %s: %d tensors of layers %s, %d bytes", header.name, len(tensors), stage.layers, expected)
        except Exception as exc:  # noqa: BLE001  (mapped to a status; the node keeps serving)
            _abort(context, exc)
        return pb.AdapterReply(bytes_received=expected)


def _benchmark(config: ModelConfig, ttype) -> float:
    """ms_per_layer, after compiling the format's kernels where this is their first run, saying so."""
    warmup.warm(config, warmup.cold_formats(config, [ttype]), announce=log.info)
    return ms_per_layer(config, ttype)


def _held(stage: LocalStage | None) -> tuple[int, int]:
    """(weight bytes, KV cache bytes) a stage holds."""
    if stage is None:
        return 0, 0
    return stage.weight_bytes, sum(c.nbytes for c in list(stage.sessions.values()))


def _load_and_warm_up(source, config: ModelConfig, layers: LayerRange, n_ctx: int, head: bool = False) -> LocalStage:
    """Load the layers (and the output head), then run a prefill and a decode step so every
    kernel is compiled (or read from Numba's cache) before the node says it is ready."""
    stage = LocalStage.load(source, config, layers, n_ctx)
    if head:
        stage.output = OutputHead(source, config)
    formats = warmup.layer_formats(source, config, layers.start)
    cold = warmup.cold_formats(config, formats)
    if cold:
        log.info("compiling kernels for %s, first run only", ", ".join(t.name for t in cold))
    rng = np.random.default_rng(0)
    rows = min(5, n_ctx - 1)
    for start, n in ((0, rows), (rows, 1)):
        hidden = rng.standard_normal((n, config.dim), dtype=np.float32)
        stage.forward(StageBatch((Segment("warm-up", start, n),), hidden, argmax=head))
    stage.end_session("warm-up")
    for ttype in formats:
        warmup.mark(config.arch, ttype)
    return stage


def _node_id(cache_dir: Path) -> str:
    """A stable id for this node, kept in its cache directory."""
    path = Path(cache_dir) / "node-id"
    try:
        text = path.read_text().strip()
        if len(text) == 32:
            return text
    except OSError:
        pass
    node_id = uuid.uuid4().hex
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(node_id + "\n")
    except OSError as exc:
        log.warning("cannot keep the node id in %s: %s", path, exc)
    return node_id


class HealthReporter:
    """grpc.health.v1: the server is SERVING once started; the Stage service is SERVING only
    while layers are loaded and compiled."""

    def __init__(self):
        self.servicer = health.HealthServicer()
        self.servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        self.servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)

    def __call__(self, state: int) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if state == pb.NODE_STATE_READY else health_pb2.HealthCheckResponse.NOT_SERVING
        self.servicer.set(SERVICE, status)


def create_server(settings: NodeSettings, on_state: Callable[[int], None] = lambda state: None):
    """A started node server: returns (server, port, servicer). Binds settings.port (0: any free port)."""
    health_reporter = HealthReporter()

    def state_changed(state: int) -> None:
        health_reporter(state)
        on_state(state)

    servicer = StageServicer(settings, state_changed)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=POOL_THREADS, thread_name_prefix="caravan-grpc"),
        interceptors=[*([servicer.token_check] if servicer.token_check else []), servicer.streams],
        options=[
            ("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES),
            # Coordinators ping every 2 s to notice a dead node quickly: allow it.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
            ("grpc.http2.max_ping_strikes", 0),
            ("grpc.keepalive_time_ms", PEER_KEEPALIVE_MS),
            ("grpc.keepalive_timeout_ms", wire.KEEPALIVE_MS),
            ("grpc.http2.max_pings_without_data", 0),  # keep pinging a coordinator whose streams are idle
            ("grpc.http2.ping_timeout_ms", wire.KEEPALIVE_MS),
            # A fixed window per stream, not one grown by bandwidth probes: what a peer can make
            # the node buffer before a handler refuses its call (no token) stays this small.
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
        ],
    )
    pb_grpc.add_StageServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_reporter.servicer, server)
    try:
        address = f"{settings.host}:{settings.port}"
        if settings.tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, auth.server_credentials(settings.tls))
    except RuntimeError:
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {settings.host}:{settings.port} (address in use or not on this machine)")
    server.start()
    return server, port, servicer
