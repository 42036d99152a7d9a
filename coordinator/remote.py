"""Talking to one node: NodeClient for its control calls, RemoteStage for the hidden states.

RemoteStage stands behind the same Stage interface as LocalStage (petals' RemoteSequential,
exo's Shard): the generation loop cannot tell them apart, and with f32 on the wire the
output is bit-identical.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import queue
import threading
import time
from typing import Callable, Iterator

import grpc
import numpy as np

from caravan.pipeline.gguf_file import GGUFFile
from caravan.pipeline.lora import LoraAdapter
from caravan.pipeline.model import ModelConfig, layer_tensor_shapes
from caravan.pipeline.stage import LayerRange, StageBatch, StageError
from caravan.proto import caravan_pb2 as pb
from caravan.proto import caravan_pb2_grpc as pb_grpc
from caravan.proto import auth, wire

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
CONTROL_TIMEOUT_S = 60.0  # Info, Benchmark, EndSession
LOAD_TIMEOUT_S = 600.0  # loading and compiling a range on a Pi, or pushing it over Wi-Fi


# Codes that mean the node is gone or stuck, not that it refused the request: the
# coordinator re-plans around it.
LOST = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})

# Every call keeps its connection checked: a node that stops answering pings (unplugged,
# frozen) is noticed within KEEPALIVE_MS * 2 even while no batch is in flight.
KEEPALIVE_MS = 2000
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


def _describe(exc: grpc.RpcError) -> tuple[str, grpc.StatusCode]:
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        # gRPC's detail ends with the useful part: "...: Connection refused"
        return f"unreachable ({details.rsplit(': ', 1)[-1] if details else 'no connection'})", code
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "did not answer in time", code
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return "refused this coordinator's cluster token (give both the same --token-file)", code
    return details or code.name, code


class NodeClient:
    def __init__(self, address: str, token: str | None = None, tls: auth.TLSFiles | None = None,
                 max_message_bytes: int = wire.MAX_MESSAGE_BYTES):
        self.address = address
        self.name = address  # replaced by the node's own name once Info answers
        self.channel = auth.open_channel(address, tls, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", KEEPALIVE_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_MS),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ])
        self.stub = pb_grpc.StageStub(auth.with_token(self.channel, token))

    @property
    def label(self) -> str:
        return self.address if self.name == self.address else f"{self.name} ({self.address})"

    def error(self, exc: grpc.RpcError, doing: str) -> NodeError:
        message, code = _describe(exc)
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
            self.info(CONTROL_TIMEOUT_S)
            times.append(time.perf_counter() - t0)
        return float(np.median(times) * 1e3)

    def benchmark(self, config: ModelConfig, weight_type: int) -> float:
        try:
            reply = self.stub.Benchmark(pb.BenchmarkRequest(config=wire.encode_config(config), weight_type=weight_type),
                                        timeout=CONTROL_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise self.error(exc, "benchmarking its kernels") from None
        return reply.ms_per_layer

    def load(self, model: GGUFFile, model_sha256: str, config: ModelConfig, layers: LayerRange, n_ctx: int,
             on_bytes: Callable[[int], None] = lambda n: None) -> pb.LoadReply:
        """Have the node load `layers`: from what it has if it can, else push exactly those tensors."""
        request = load_request(model, model_sha256, config, layers, n_ctx)
        doing = f"loading layers {layers}"
        try:
            reply = self.stub.Load(request, timeout=LOAD_TIMEOUT_S)
            if reply.needs_weights:
                request.push_layers.extend(reply.missing_layers)
                reply = self.stub.PushWeights(_weight_chunks(model, request, on_bytes), timeout=LOAD_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise self.error(exc, doing) from None
        if not reply.ready:
            raise NodeError(self.label, f"{doing}: the node did not become ready")
        return reply

    def end_session(self, session_id: str) -> None:
        try:
            self.stub.EndSession(pb.EndSessionRequest(session_id=session_id), timeout=CONNECT_TIMEOUT_S)
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
    yield pb.AdapterChunk(header=pb.AdapterHeader(
        name=adapter.name, alpha=float(adapter.alpha), arch=adapter.arch,
        tensors=[pb.TensorEntry(name=t.name, type=int(t.type), shape=t.shape, n_bytes=t.n_bytes) for t in tensors]))
    digest = hashlib.sha256()
    for info in tensors:
        data = adapter.tensor_bytes(info)
        for start in range(0, len(data), wire.WEIGHT_CHUNK_BYTES):
            piece = bytes(data[start : start + wire.WEIGHT_CHUNK_BYTES])
            digest.update(piece)
            yield pb.AdapterChunk(data=piece)
    yield pb.AdapterChunk(sha256=digest.hexdigest())


def load_request(model: GGUFFile, model_sha256: str, config: ModelConfig, layers: LayerRange, n_ctx: int) -> pb.LoadRequest:
    tensors = []
    for layer in layers:
        for name in layer_tensor_shapes(config, layer):
            info = model.tensors.get(name)
            if info is None:
                raise ValueError(f"{model.path}: missing tensor {name}")
            tensors.append(pb.TensorEntry(name=name, type=int(info.type), shape=info.shape, n_bytes=info.n_bytes))
    return pb.LoadRequest(model_sha256=model_sha256, config=wire.encode_config(config), layer_start=layers.start,
                          layer_stop=layers.stop, n_ctx=n_ctx, tensors=tensors)


def _weight_chunks(model: GGUFFile, request: pb.LoadRequest, on_bytes: Callable[[int], None]) -> Iterator[pb.WeightChunk]:
    """The header, the tensors of request.push_layers straight from the memory-mapped file in
    1 MiB pieces, then the sha256 of every byte sent."""
    yield pb.WeightChunk(header=request)
    digest = hashlib.sha256()
    prefixes = tuple(f"blk.{layer}." for layer in request.push_layers)
    for entry in request.tensors:
        if not entry.name.startswith(prefixes):
            continue
        data = model.tensor_bytes(entry.name)
        for start in range(0, len(data), wire.WEIGHT_CHUNK_BYTES):
            piece = bytes(data[start : start + wire.WEIGHT_CHUNK_BYTES])
            digest.update(piece)
            on_bytes(len(piece))
            yield pb.WeightChunk(data=piece)
    yield pb.WeightChunk(sha256=digest.hexdigest())


class RemoteStage:
    """Layers [start, stop) on a node, over one long-lived Forward stream.

    Each batch has a deadline: FORWARD_TIMEOUT_S plus what the node's measured speed predicts
    for it, generously. A watchdog thread cancels the stream when a batch is late, so a node
    that hangs fails like one that died, with a NodeError whose `lost` is true.
    """

    def __init__(self, client: NodeClient, layers: LayerRange, dim: int, wire_format: int = pb.WIRE_FORMAT_F32,
                 ms_per_layer: float = 0.0, timeout_s: float = FORWARD_TIMEOUT_S):
        self.client = client
        self.layers = layers
        self.dim = dim
        self.wire_format = wire_format
        self.timeout_s = timeout_s
        self.ms_per_layer = ms_per_layer
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # one batch in flight per stage: replies come back in order
        self._requests: queue.Queue[pb.ForwardRequest | None] = queue.Queue()
        self._replies = client.stub.Forward(iter(self._requests.get, None))
        # Seconds per round trip not spent computing on the node (encoding, gRPC, network),
        # for the last batches: what `caravan bench` reports as the hop.
        self.hop_s: collections.deque[float] = collections.deque(maxlen=1024)
        self._deadline = 0.0  # time.monotonic() by which the batch in flight must be answered; 0: none
        self._timed_out = False
        self._closed = threading.Event()
        threading.Thread(target=self._watch, name=f"caravan-watchdog-{client.address}", daemon=True).start()

    def _watch(self) -> None:
        while not self._closed.wait(0.2):
            deadline = self._deadline
            if deadline and time.monotonic() > deadline:
                self._timed_out = True
                self._replies.cancel()
                return

    def _batch_timeout(self, rows: int) -> float:
        # Ten times the decode speed per row is a loose bound for prefill rows too.
        return self.timeout_s + 10 * rows * len(self.layers) * self.ms_per_layer / 1e3

    def forward(self, batch: StageBatch) -> np.ndarray:
        rows = batch.hidden.shape[0]
        if rows > wire.MAX_BATCH_ROWS:
            raise StageError(f"a batch of {rows} rows is more than a node takes ({wire.MAX_BATCH_ROWS})")
        request = pb.ForwardRequest(
            id=next(self._ids),
            segments=wire.encode_segments(batch.segments),
            hidden=wire.encode_hidden(batch.hidden, self.wire_format),
            reply_format=self.wire_format,
        )
        with self._lock:
            timeout = self._batch_timeout(rows)
            t0 = time.perf_counter()
            self._deadline = time.monotonic() + timeout
            self._requests.put(request)
            try:
                reply = next(self._replies)
                self.hop_s.append(time.perf_counter() - t0 - reply.compute_us * 1e-6)
            except (grpc.RpcError, StopIteration) as exc:
                if self._timed_out:
                    raise NodeError(self.client.label, f"layers {self.layers}: no answer within {timeout:.1f} s",
                                    grpc.StatusCode.DEADLINE_EXCEEDED) from None
                message = _describe(exc)[0] if isinstance(exc, grpc.RpcError) else "the stream ended"
                raise NodeError(self.client.label, f"layers {self.layers}: {message}", grpc.StatusCode.UNAVAILABLE) from None
            finally:
                self._deadline = 0.0
        if reply.id != request.id:
            raise NodeError(self.client.label, f"answered batch {reply.id}, expected {request.id}")
        if reply.WhichOneof("result") == "error":
            code = wire.status_from_value(reply.error.code)
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise StageError(f"node {self.client.label}: {reply.error.message}")
            raise NodeError(self.client.label, reply.error.message, code)
        try:
            return wire.decode_hidden(reply.hidden, self.dim, rows)
        except wire.WireError as exc:
            raise NodeError(self.client.label, f"sent a bad hidden state: {exc}") from None

    def end_session(self, session_id: str) -> None:
        self.client.end_session(session_id)

    def copy_session(self, source: str, target: str, length: int) -> None:
        self.client.copy_session(source, target, length)

    def add_adapter(self, adapter: LoraAdapter) -> None:
        self.client.load_adapter(adapter, self.layers)

    def close(self) -> None:
        self._closed.set()
        self._requests.put(None)
        self._replies.cancel()
