"""Talking to nodes: NodeClient for one node's control calls, RemoteStage for the hidden states.

A chain of nodes is one RemoteStage: the batch goes to the first node and each passes it on to
the next. It stands behind the same Stage interface as LocalStage (petals' RemoteSequential,
exo's Shard): the generation loop cannot tell them apart, and with f32 on the wire the
output is bit-identical.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence

import grpc
import numpy as np

from caravan.pipeline.gguf_file import GGUFFile
from caravan.pipeline.lora import LoraAdapter
from caravan.pipeline.model import ModelConfig, head_tensor_shapes, layer_tensor_shapes, ties_output
from caravan.pipeline.prompt_cache import CacheStats
from caravan.pipeline.stage import LayerRange, StageBatch, StageError, StageStats
from caravan.proto import caravan_pb2 as pb
from caravan.proto import caravan_pb2_grpc as pb_grpc
from caravan.proto import auth, wire

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
CONTROL_TIMEOUT_S = 60.0  # Info, Benchmark, EndSession
LOAD_TIMEOUT_S = 600.0  # loading and compiling a range on a Pi, or pushing it over Wi-Fi
PROBE_INTERVAL_S = 2.0  # while a long call runs, how often the node is asked whether it still answers


# Codes that mean the node is gone or stuck, not that it refused the request: the
# coordinator re-plans around it.
LOST = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})

FORWARD_TIMEOUT_S = 10.0  # a batch's deadline beyond what the node's measured speed predicts


class NodeError(RuntimeError):
    """A node could not be reached or refused a request; the message names the node."""

    def __init__(self, node: str, message: str, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN):
        super().__init__(f"node {node}: {message}")
        self.node = node
        self.code = code

    @property
    def lost(self) -> bool:
        return self.code in LOST


def _describe(exc: grpc.RpcError, token: str | None = None) -> tuple[str, grpc.StatusCode]:
    """What went wrong, in words, and its code; `token` is the cluster token that was sent."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        # gRPC's detail ends with the useful part: "...: Connection refused"
        return f"unreachable ({details.rsplit(': ', 1)[-1] if details else 'no connection'})", code
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "did not answer in time", code
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return auth.refused_token_advice(token, details), code
    return details or code.name, code


class NodeClient:
    def __init__(self, address: str, token: str | None = None, tls: auth.TLSFiles | None = None,
                 max_message_bytes: int = wire.MAX_MESSAGE_BYTES):
        self.address = address
        self.name = address  # replaced by the node's own name once Info answers
        self.token = token
        self.channel = auth.open_channel(address, tls, options=wire.client_options(max_message_bytes))
        self.stub = pb_grpc.StageStub(auth.with_token(self.channel, token))

    @property
    def label(self) -> str:
        return self.address if self.name == self.address else f"{self.name} ({self.address})"

    def error(self, exc: grpc.RpcError, doing: str) -> NodeError:
        message, code = _describe(exc, self.token)
        return NodeError(self.label, f"{doing}: {message}", code)

    def info(self, timeout: float = CONNECT_TIMEOUT_S) -> pb.NodeInfo:
        try:
            info = self.stub.Info(pb.InfoRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise self.error(exc, "asking for its info") from None
        if info.name:
            self.name = info.name
        if info.protocol_version != wire.PROTOCOL_VERSION:
            raise NodeError(self.label, f"speaks protocol {info.protocol_version} (caravan {info.version}); this "
                            f"coordinator speaks {wire.PROTOCOL_VERSION}: run the same caravan version on both")
        return info

    def round_trip_ms(self, repeats: int = 5) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.info()  # a frozen node fails here in seconds, not at the control deadline
            times.append(time.perf_counter() - t0)
        return float(np.median(times) * 1e3)

    def benchmark(self, config: ModelConfig, weight_type: int) -> float:
        request = pb.BenchmarkRequest(config=wire.encode_config(config), weight_type=weight_type)
        reply = self._finish(self.stub.Benchmark.future(request, timeout=CONTROL_TIMEOUT_S), "benchmarking its kernels")
        return reply.ms_per_layer

    def load(self, model: GGUFFile, model_sha256: str, config: ModelConfig, layers: LayerRange, n_ctx: int,
             on_bytes: Callable[[int], None] = lambda n: None, head: bool = False) -> pb.LoadReply:
        """Have the node load `layers` (and the output head, with `head`): from what it has if it
        can, else push exactly the tensors it lacks."""
        request = load_request(model, model_sha256, config, layers, n_ctx, head)
        doing = f"loading layers {layers}{' and the head' if head else ''}"
        reply = self._finish(self.stub.Load.future(request, timeout=LOAD_TIMEOUT_S), doing)
        if reply.needs_weights:
            request.push_layers.extend(reply.missing_layers)
            request.push_head = reply.needs_head
            chunks = _weight_chunks(model, request, on_bytes)
            reply = self._finish(self.stub.PushWeights.future(chunks, timeout=LOAD_TIMEOUT_S), doing)
        if not reply.ready:
            raise NodeError(self.label, f"{doing}: the node did not become ready")
        return reply

    def _finish(self, call: grpc.Future, doing: str):
        """The reply of a long call, asking the node every few seconds meanwhile whether it still
        answers: a node that froze or was cut off fails within seconds, not at the call's deadline,
        while a slow one (a Pi compiling its kernels) is left to finish."""
        try:
            while True:
                try:
                    return call.result(timeout=PROBE_INTERVAL_S)
                except grpc.FutureTimeoutError:
                    pass
                except grpc.RpcError as exc:
                    raise self.error(exc, doing) from None
                try:
                    self.stub.Info(pb.InfoRequest(), timeout=CONNECT_TIMEOUT_S)
                except grpc.RpcError as exc:
                    if exc.code() in LOST:
                        raise self.error(exc, f"{doing} (asked whether it still answers)") from None
        finally:
            call.cancel()  # nothing once it is done; else (lost node, Ctrl-C) the call ends here too

    def end_session(self, session_id: str, keep: int = 0) -> None:
        """End a session; keep > 0 keeps its first `keep` positions in the node's prompt cache."""
        try:
            self.stub.EndSession(pb.EndSessionRequest(session_id=session_id, keep=keep), timeout=CONNECT_TIMEOUT_S)
        except grpc.RpcError as exc:  # the session's cache dies with the node anyway
            log.warning("%s", self.error(exc, f"ending session {session_id}"))

    def copy_session(self, source: str, target: str, length: int) -> None:
        try:
            self.stub.CopySession(pb.CopySessionRequest(source=source, target=target, length=length),
                                  timeout=CONNECT_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise self.error(exc, f"copying session {source}") from None

    def close(self) -> None:
        self.channel.close()

    def load_adapter(self, adapter: LoraAdapter, layers: LayerRange) -> None:
        """Send the node a LoRA adapter's tensors of its layers (possibly none)."""
        try:
            self.stub.LoadAdapter(_adapter_chunks(adapter, layers), timeout=LOAD_TIMEOUT_S)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise NodeError(self.label, "does not take LoRA adapters: run the same caravan version on both",
                                exc.code()) from None
            raise self.error(exc, f"loading adapter {adapter.name!r}") from None


def _adapter_chunks(adapter: LoraAdapter, layers: LayerRange) -> Iterator[pb.AdapterChunk]:
    tensors = adapter.tensors_for(layers)
    header = pb.AdapterHeader(
        name=adapter.name, alpha=float(adapter.alpha), arch=adapter.arch,
        tensors=[pb.TensorEntry(name=t.name, type=int(t.type), shape=t.shape, n_bytes=t.n_bytes) for t in tensors])
    return wire.chunked_stream(pb.AdapterChunk, header, (adapter.tensor_bytes(info) for info in tensors))


def load_request(model: GGUFFile, model_sha256: str, config: ModelConfig, layers: LayerRange, n_ctx: int,
                 head: bool = False) -> pb.LoadRequest:
    names = [name for layer in layers for name in layer_tensor_shapes(config, layer)]
    if head:
        names += head_tensor_shapes(config, ties_output(model))
    tensors = []
    for name in names:
        info = model.tensors.get(name)
        if info is None:
            raise ValueError(f"{model.path}: missing tensor {name}")
        tensors.append(pb.TensorEntry(name=name, type=int(info.type), shape=info.shape, n_bytes=info.n_bytes))
    return pb.LoadRequest(model_sha256=model_sha256, config=wire.encode_config(config), layer_start=layers.start,
                          layer_stop=layers.stop, n_ctx=n_ctx, tensors=tensors, head=head)


def _weight_chunks(model: GGUFFile, request: pb.LoadRequest, on_bytes: Callable[[int], None]) -> Iterator[pb.WeightChunk]:
    """The header, the tensors of request.push_layers (then the head's, with push_head) straight
    from the memory-mapped file in 1 MiB pieces, then the sha256 of every byte sent."""
    prefixes = tuple(f"blk.{layer}." for layer in request.push_layers)
    blobs = (model.tensor_bytes(entry.name) for entry in request.tensors
             if entry.name.startswith(prefixes) or request.push_head and not entry.name.startswith("blk."))
    return wire.chunked_stream(pb.WeightChunk, request, blobs, on_bytes)


@dataclass(frozen=True)
class Part:
    """One node of a RemoteStage and the layers it holds."""

    client: NodeClient
    layers: LayerRange
    ms_per_layer: float = 0.0  # its measured speed, for the batch deadline


@dataclass
class _Waiting:
    deadline: float  # time.monotonic()
    reply: pb.ForwardReply | None = None


class RemoteStage:
    """Layers [start, stop) on one node, or on a chain of nodes (`then`: the nodes after the
    first, each holding the layers after the one before it).

    A batch goes to the first node with the addresses of the others; each node computes its
    layers and sends the batch on itself, and the last one answers on a Results stream this
    stage opened on it: N + 1 network crossings per batch instead of 2N (node/relay.py). Every
    node of the chain has a Results stream open, on which it reports the batches it could not
    send on; a thread per node watches it, and a stream that ends means the node is gone.

    Several threads may have batches in flight at once (the scheduler's lanes): while node 2
    works on one, node 1 works on the next. Answers come back in the order batches were sent;
    whichever caller is waiting reads the next one and hands it to its owner.

    Each batch has a deadline: FORWARD_TIMEOUT_S plus what the nodes' measured speed predicts
    for it, generously. A watchdog fails the stage when a batch is late, so a node that hangs
    fails like one that died, with a NodeError whose `lost` is true. A failed stage stays
    failed: the coordinator re-plans and opens new ones.
    """

    def __init__(self, client: NodeClient, layers: LayerRange, dim: int, wire_format: int = pb.WIRE_FORMAT_F32,
                 ms_per_layer: float = 0.0, timeout_s: float = FORWARD_TIMEOUT_S, then: Sequence[Part] = (),
                 head: bool = False, vocab_size: int = 0):
        self.parts = (Part(client, layers, ms_per_layer), *then)
        for a, b in zip(self.parts, self.parts[1:]):
            if a.layers.stop != b.layers.start:
                raise ValueError(f"a chain's layers must follow on: {a.layers} then {b.layers}")
        self.client = client
        self._head = head  # the last node holds the output head: it may answer with token ids
        self.layers = LayerRange(layers.start, self.parts[-1].layers.stop)
        self.dim = dim
        self.vocab_size = vocab_size  # checks the token ids a chain ending in the head answers with
        self.wire_format = wire_format
        self.timeout_s = timeout_s
        self.chain = uuid.uuid4().hex
        self._relay = [part.client.address for part in self.parts[1:]]
        self._ids = itertools.count(1)
        self._send = threading.Lock()  # ids go out in order
        self._cond = threading.Condition()  # guards the three below
        self._waiting: dict[int, _Waiting] = {}
        self._reading = False  # a caller is reading the next answer
        self._failed: NodeError | None = None  # set once: by a lost node, a late batch, or close()
        # Seconds per batch not spent computing (encoding, gRPC, network), per node of the chain,
        # for the last batches: what `caravan bench` reports as the hop.
        self.hop_s: collections.deque[float] = collections.deque(maxlen=1024)
        self.most_in_flight = 0  # the most batches sent and not yet answered at once, so far
        self._results: list = []
        try:
            for part in self.parts:
                self._results.append(self._open_results(part))
        except NodeError:
            for stream in self._results:
                stream.cancel()
            raise
        self._requests: queue.SimpleQueue[pb.ForwardRequest | None] = queue.SimpleQueue()
        self._sent = client.stub.Forward(iter(self._requests.get, None))
        for part, stream in zip(self.parts[:-1], self._results[:-1]):
            threading.Thread(target=self._watch_node, args=(part, stream), daemon=True,
                             name=f"caravan-results-{part.client.address}").start()
        threading.Thread(target=self._watch_deadlines, daemon=True, name=f"caravan-watchdog-{client.address}").start()

    @property
    def nodes(self) -> str:
        return ", ".join(part.client.label for part in self.parts)

    def _open_results(self, part: Part):
        stream = part.client.stub.Results(pb.ResultsRequest(chain=self.chain))
        late = threading.Event()

        def give_up() -> None:  # a node that accepts but never answers (frozen, or cut off)
            late.set()
            stream.cancel()

        timer = threading.Timer(CONNECT_TIMEOUT_S, give_up)
        timer.start()
        try:
            next(stream)  # id 0: registered, batches may come
        except (grpc.RpcError, StopIteration) as exc:
            if late.is_set():
                raise NodeError(part.client.label, "opening its results stream: did not answer in time",
                                grpc.StatusCode.DEADLINE_EXCEEDED) from None
            if isinstance(exc, grpc.RpcError):
                raise part.client.error(exc, "opening its results stream") from None
            raise NodeError(part.client.label, "ended its results stream at once", grpc.StatusCode.UNAVAILABLE) from None
        finally:
            timer.cancel()
        return stream

    def _batch_timeout(self, rows: int) -> float:
        # Ten times the decode speed per row is a loose bound for prefill rows too.
        return self.timeout_s + 10 * rows * sum(len(p.layers) * p.ms_per_layer for p in self.parts) / 1e3

    @property
    def holds_head(self) -> bool:
        return self._head

    @property
    def depth(self) -> int:
        """Nodes in the chain: how many batches can be computing at once."""
        return len(self.parts)

    def forward(self, batch: StageBatch) -> np.ndarray:
        return self.submit(batch)()

    def submit(self, batch: StageBatch) -> Callable[[], np.ndarray]:
        """Send the batch now; the function returned waits for its output. Batches go out in
        the order they are submitted, so one sequence's chunks can follow each other into the
        chain before the first comes back (Pipeline.prefill). Every function returned must be
        called: a batch whose answer nobody collects counts as late."""
        rows = batch.hidden.shape[0]
        if rows > wire.MAX_BATCH_ROWS:
            raise StageError(f"a batch of {rows} rows is more than a node takes ({wire.MAX_BATCH_ROWS})")
        if batch.argmax and not self.holds_head:
            raise StageError(f"nodes {self.nodes} hold no output head: they cannot answer with token ids")
        request = pb.ForwardRequest(
            segments=wire.encode_segments(batch.segments),
            hidden=wire.encode_hidden(batch.hidden, self.wire_format),
            reply_format=self.wire_format, chain=self.chain, relay=self._relay, reply_tokens=batch.argmax,
        )
        timeout = self._batch_timeout(rows)
        waiting = _Waiting(time.monotonic() + timeout)
        with self._send:
            with self._cond:
                if self._failed is not None:
                    raise self._failed
                request.id = next(self._ids)
                alone = not self._waiting  # no batch ahead of it: its time is its own
                self._waiting[request.id] = waiting
                self.most_in_flight = max(self.most_in_flight, len(self._waiting))
            t0 = time.perf_counter()
            self._requests.put(request)

        def result() -> np.ndarray:
            reply = self._wait(request.id, waiting)
            if alone:
                self.hop_s.append((time.perf_counter() - t0 - sum(reply.compute_us) * 1e-6) / len(self.parts))
            if reply.WhichOneof("result") == "error":
                code = wire.status_from_value(reply.error.code)
                if code == grpc.StatusCode.INVALID_ARGUMENT:  # the node names itself in a chain's errors
                    raise StageError(reply.error.message)
                raise NodeError(self.nodes, reply.error.message, code)
            try:
                if batch.argmax:
                    return wire.decode_tokens(reply, rows, self.vocab_size)
                return wire.decode_hidden(reply.hidden, self.dim, rows)
            except wire.WireError as exc:
                raise NodeError(self.parts[-1].client.label, f"sent a bad answer: {exc}") from None

        return result

    def _wait(self, request_id: int, waiting: _Waiting) -> pb.ForwardReply:
        """The answer to batch `request_id`: read by this caller, or by another that read it first."""
        with self._cond:
            while waiting.reply is None:
                if self._failed is not None:
                    self._waiting.pop(request_id, None)
                    raise self._failed
                if self._reading:
                    self._cond.wait()
                    continue
                self._reading = True
                self._cond.release()
                try:
                    reply, error = next(self._results[-1]), None
                except (grpc.RpcError, StopIteration) as exc:
                    reply, error = None, exc
                finally:
                    self._cond.acquire()
                    self._reading = False
                if reply is not None and reply.id in self._waiting:
                    self._waiting.pop(reply.id).reply = reply
                elif reply is not None:
                    self._fail(NodeError(self.parts[-1].client.label, f"answered batch {reply.id}, which is not in flight"))
                else:
                    self._fail(self._lost(self.parts[-1], error))
                self._cond.notify_all()
            return waiting.reply

    def _lost(self, part: Part, exc: BaseException) -> NodeError:
        message = _describe(exc, part.client.token)[0] if isinstance(exc, grpc.RpcError) else "the stream ended"
        return NodeError(part.client.label, f"layers {part.layers}: {message}", grpc.StatusCode.UNAVAILABLE)

    def _fail(self, error: NodeError) -> None:
        """The stage cannot go on: every batch in flight and every later one gets `error`."""
        with self._cond:
            if self._failed is not None:
                return
            self._failed = error
            self._cond.notify_all()
        for stream in self._results:  # wakes the caller that is reading
            stream.cancel()
        self._sent.cancel()

    def _watch_node(self, part: Part, stream) -> None:
        """A node before the last says only what it could not send on; its stream ends with it,
        or when the stage closes."""
        try:
            for reply in stream:
                message = reply.error.message if reply.WhichOneof("result") == "error" else f"answered batch {reply.id} out of turn"
                self._fail(NodeError(part.client.label, f"layers {part.layers}: {message}", grpc.StatusCode.UNAVAILABLE))
                return
            self._fail(self._lost(part, StopIteration()))
        except grpc.RpcError as exc:
            self._fail(self._lost(part, exc))

    def _watch_deadlines(self) -> None:
        while True:
            time.sleep(0.2)
            with self._cond:
                if self._failed is not None:
                    return
                late = min((w.deadline for w in self._waiting.values()), default=math.inf) < time.monotonic()
            if late:
                self._fail(NodeError(self.nodes, f"layers {self.layers}: no answer within the batch's deadline",
                                     grpc.StatusCode.DEADLINE_EXCEEDED))
                return

    def end_session(self, session_id: str) -> None:
        for part in self.parts:
            part.client.end_session(session_id)

    def copy_session(self, source: str, target: str, length: int) -> None:
        for part in self.parts:
            part.client.copy_session(source, target, length)

    def retire_session(self, session_id: str, length: int) -> None:
        for part in self.parts:
            part.client.end_session(session_id, keep=length)

    def add_adapter(self, adapter: LoraAdapter) -> None:
        for part in self.parts:
            part.client.load_adapter(adapter, part.layers)

    def stats(self, ask_nodes: bool = True) -> list[StageStats]:
        """One row per node of the chain; with ask_nodes, its counts from its Info (None where it
        does not answer)."""
        hop = list(self.hop_s)
        hop_us = round(float(np.median(hop)) * 1e6, 1) if hop else None
        rows = []
        for part in self.parts:
            row = StageStats(part.layers, part.client.name, part.client.address, hop_us=hop_us)
            if ask_nodes:
                try:
                    info = part.client.info()
                    cached = info.prompt_cache
                    row = replace(row, sessions=info.sessions, kv_bytes=info.kv_cache_bytes,
                                  weight_bytes=info.weight_bytes, rss_bytes=info.rss_bytes,
                                  prompt_cache=CacheStats(cached.sessions, cached.tokens, cached.bytes, cached.budget,
                                                          cached.hits, cached.evictions))
                except NodeError as exc:  # failover reports a node gone; who asked goes on
                    log.debug("%s", exc)
            rows.append(row)
        return rows

    def close(self) -> None:
        self._fail(NodeError(self.nodes, "the stage was closed", grpc.StatusCode.CANCELLED))
        self._requests.put(None)
