"""Streams never take the threads that short calls and health checks need.

gRPC's synchronous server runs each call on a thread of its pool for the whole call, so an
open stream (Forward, Results, PushWeights, LoadAdapter, a health Watch) holds a thread even
while idle. The pool has MAX_STREAMS + SHORT_CALL_THREADS threads, and StreamGate refuses a
stream past MAX_STREAMS in all, or past MAX_STREAMS_PER_PEER from one host, with
RESOURCE_EXHAUSTED: whatever peers open, SHORT_CALL_THREADS threads are left for Info,
EndSession, CopySession, Load and health.
"""

from __future__ import annotations

import collections
import threading

import grpc

MAX_STREAMS = 64  # open at once, from every peer: a coordinator opens two per node of a chain
MAX_STREAMS_PER_PEER = 24  # from one host: room for a few coordinators and the node before in a chain
SHORT_CALL_THREADS = 16  # kept for calls that answer at once
POOL_THREADS = MAX_STREAMS + SHORT_CALL_THREADS


def peer_host(peer: str) -> str:
    """'ipv4:10.0.0.2:51234' -> 'ipv4:10.0.0.2', 'ipv6:[::1]:5000' -> 'ipv6:[::1]'; other forms as is."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in address:
        return f"{kind}:{address.rsplit(':', 1)[0]}"
    return peer


def peer_address(peer: str) -> str:
    """'ipv4:10.0.0.2:51234' -> '10.0.0.2:51234', 'ipv6:[::1]:5000' -> '[::1]:5000'; other forms as is."""
    kind, _, address = peer.partition(":")
    return address if kind in ("ipv4", "ipv6") else peer


class StreamGate(grpc.ServerInterceptor):
    """Counts the streaming calls running, in all and per peer host, and refuses one past a cap."""

    def __init__(self, max_streams: int = MAX_STREAMS, per_peer: int = MAX_STREAMS_PER_PEER):
        self.max_streams, self.per_peer = max_streams, per_peer
        self._lock = threading.Lock()
        self._open: collections.Counter[str] = collections.Counter()

    @property
    def open(self) -> int:
        with self._lock:
            return sum(self._open.values())

    def _enter(self, context: grpc.ServicerContext) -> str:
        host = peer_host(context.peer())
        with self._lock:
            total = sum(self._open.values())
            if total < self.max_streams and self._open[host] < self.per_peer:
                self._open[host] += 1
                return host
        if total >= self.max_streams:
            why = f"{total} streams are open, its most ({self.max_streams})"
        else:
            why = f"{host} has {self.per_peer} streams open, the most one host may"
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"this node serves no more streams: {why}; close idle ones")

    def _leave(self, host: str) -> None:
        with self._lock:
            self._open[host] -= 1
            if not self._open[host]:
                del self._open[host]

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        if handler.response_streaming:
            behaviour = handler.unary_stream or handler.stream_stream

            def gated_stream(request_or_iterator, context):
                host = self._enter(context)
                try:
                    yield from behaviour(request_or_iterator, context)
                finally:
                    self._leave(host)

            make = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
            return make(gated_stream, request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
        behaviour = handler.stream_unary

        def gated_call(request_iterator, context):
            host = self._enter(context)
            try:
                return behaviour(request_iterator, context)
            finally:
                self._leave(host)

        return grpc.stream_unary_rpc_method_handler(gated_call, request_deserializer=handler.request_deserializer,
                                                    response_serializer=handler.response_serializer)
