"""Chains: each node sends a batch's output on to the next node itself, and the last one
answers the coordinator. A token through N nodes then crosses the network N + 1 times
instead of 2N, the data flow of DESIGN.md ("stage 1 -> stage 2 -> ... -> coordinator").

    results = ResultStreams(on_end)   # Results(chain) streams the coordinator opened on this node
    links = Links(token_now, tls)      # long-lived Forward streams to the nodes after this one
    links.send("pi2:50051", request)   # LinkError when that node cannot be reached
    results.deliver(chain, reply)      # False when no coordinator listens for that chain
"""

from __future__ import annotations

import logging
import queue
import re
import threading
from typing import Callable, Iterator

import grpc

from caravan.proto import caravan_pb2 as pb
from caravan.proto import caravan_pb2_grpc as pb_grpc
from caravan.proto import auth, wire

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0  # to open a link to the next node
MAX_RELAY = 64  # nodes a chain may still name after this one
_CHAIN_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")
_ADDRESS = re.compile(r"[0-9A-Za-z.:\[\]_-]{1,253}:[0-9]{1,5}")


class LinkError(ConnectionError):
    """The next node of a chain cannot be reached."""


def check_chain(request: pb.ForwardRequest) -> None:
    """A chain batch's routing fields, before the node computes anything for it."""
    if not _CHAIN_ID.fullmatch(request.chain):
        raise wire.WireError(f"chain id {request.chain[:80]!r} is not 1 to 64 letters, digits, - or _")
    if len(request.relay) > MAX_RELAY:
        raise wire.WireError(f"a chain of {len(request.relay)} more nodes is longer than a node relays ({MAX_RELAY})")
    for address in request.relay:
        if not _ADDRESS.fullmatch(address):
            raise wire.WireError(f"relay address {address[:80]!r} is not HOST:PORT")


class ResultStreams:
    """The Results streams open on this node, by chain id; `on_end(chain)` once one has ended
    (the node ends the chain's sessions then)."""

    def __init__(self, on_end: Callable[[str], None] = lambda chain: None):
        self._lock = threading.Lock()
        self._queues: dict[str, queue.SimpleQueue] = {}
        self._on_end = on_end  # called with the chain id once its stream has ended

    def serve(self, chain: str, context: grpc.ServicerContext) -> Iterator[pb.ForwardReply]:
        """The body of a Results call: id 0 once registered, then what is delivered, until the
        coordinator cancels it or goes away."""
        if not _CHAIN_ID.fullmatch(chain):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"chain id {chain[:80]!r} is not 1 to 64 letters, digits, - or _")
        replies: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            if chain in self._queues:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"chain {chain} has a results stream already")
            self._queues[chain] = replies
        context.add_callback(lambda: replies.put(None))  # cancelled, or the connection is gone
        try:
            yield pb.ForwardReply(id=0)
            while (reply := replies.get()) is not None:
                yield reply
        finally:
            with self._lock:
                ended = self._queues.get(chain) is replies
                if ended:
                    del self._queues[chain]
            if ended:
                self._on_end(chain)

    def is_open(self, chain: str) -> bool:
        with self._lock:
            return chain in self._queues

    def close(self) -> None:
        """End every stream (the node is stopping): each coordinator hears its stream end."""
        with self._lock:
            queues = list(self._queues.values())
        for replies in queues:
            replies.put(None)

    def deliver(self, chain: str, reply: pb.ForwardReply) -> bool:
        with self._lock:
            replies = self._queues.get(chain)
        if replies is None:
            return False
        replies.put(reply)
        return True


def _first_outcome(channel: grpc.Channel) -> grpc.ChannelConnectivity | None:
    """READY or TRANSIENT_FAILURE, whichever the channel reaches first (None: neither in time),
    so a refused connection fails at once rather than after retries."""
    reached: list[grpc.ChannelConnectivity] = []
    done = threading.Event()

    def changed(state: grpc.ChannelConnectivity) -> None:
        if state in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE) and not reached:
            reached.append(state)
            done.set()

    channel.subscribe(changed, try_to_connect=True)
    done.wait(CONNECT_TIMEOUT_S)
    channel.unsubscribe(changed)
    return reached[0] if reached else None


class _Link:
    def __init__(self, address: str, token: str | None, tls: auth.TLSFiles | None):
        self.address = address
        self.channel = auth.open_channel(address, tls, options=wire.client_options())
        state = _first_outcome(self.channel)
        if state != grpc.ChannelConnectivity.READY:
            self.channel.close()
            why = "no connection" if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE else f"no answer in {CONNECT_TIMEOUT_S:.0f} s"
            raise LinkError(f"cannot reach the next node of the chain, {address} ({why})")
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        # The next node answers a chain's batches on their Results stream, never here: nobody
        # reads this call's replies, only whether it ended.
        self.call = pb_grpc.StageStub(auth.with_token(self.channel, token)).Forward(iter(self._requests.get, None))

    def send(self, request: pb.ForwardRequest) -> bool:
        if self.call.done():
            return False
        self._requests.put(request)
        return True

    def close(self) -> None:
        self._requests.put(None)
        self.call.cancel()
        self.channel.close()


class Links:
    """This node's Forward streams to the next nodes of its chains, opened on first use and
    opened again once when one has ended (the next node restarted)."""

    def __init__(self, token: Callable[[], str | None], tls: auth.TLSFiles | None):
        self._token = token  # the node's token now: a link opened after it changed sends the new one
        self._tls = tls
        self._lock = threading.Lock()
        self._links: dict[str, _Link] = {}

    def send(self, address: str, request: pb.ForwardRequest) -> None:
        with self._lock:
            link = self._links.get(address)
        if link is not None and link.send(request):
            return
        if link is not None:
            log.info("the link to %s ended (%s); opening it again", address, link.call.code())
            link.close()
        link = _Link(address, self._token(), self._tls)
        with self._lock:
            old, self._links[address] = self._links.get(address), link
        if old is not None and old is not link:
            old.close()
        if not link.send(request):
            raise LinkError(f"the next node of the chain, {address}, ended the stream at once ({link.call.code()})")

    def close(self) -> None:
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()
