"""A node stays up for everyone while one peer misbehaves (issue 22): sessions go with the
coordinator that made them and stop at a cap from the node's memory, idle streams cannot take
the threads short calls and health need, a peer without the token cannot make the node read
what it sends, and the node's own edges (session ids, its cache directory, SIGTERM)."""

from __future__ import annotations

import contextlib
import queue
import signal
import subprocess
import sys
import textwrap
import time
from typing import Iterator

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from caravan.coordinator.remote import NodeClient, RemoteStage
from caravan.node.server import PEER_KEEPALIVE_MS
from caravan.node.streams import MAX_STREAMS_PER_PEER
from caravan.pipeline.loader import load_model
from caravan.pipeline.stage import KVCache, LocalStage, Segment, StageBatch
from caravan.proto import caravan_pb2 as pb
from caravan.proto import caravan_pb2_grpc as pb_grpc
from caravan.proto import wire

from support.nodes import MODEL_SHA as SHA, NODE_CTX as N_CTX, NODE_LAYERS as LAYERS
from support.nodes import NodeProcess, cluster_token, loaded_node
from support.wait import wait_for

pytestmark = pytest.mark.slow  # spawns caravan node processes




@pytest.fixture
def model(tiny_q8_path):
    return load_model(tiny_q8_path)


@contextlib.contextmanager
def coordinator_process(address: str) -> Iterator[subprocess.Popen]:
    """A coordinator in a process of its own holding COORDINATOR's sessions on the node."""
    coordinator = subprocess.Popen([sys.executable, "-c", COORDINATOR, address], stdout=subprocess.PIPE, text=True)
    try:
        assert coordinator.stdout.readline().strip() == "ready"
        yield coordinator
    finally:
        coordinator.kill()
        coordinator.wait()
        coordinator.stdout.close()


def forward_request(i: int, session: str, rows: int = 2) -> pb.ForwardRequest:
    return pb.ForwardRequest(id=i, segments=[pb.Segment(session_id=session, start=0, length=rows)],
                             hidden=wire.encode_hidden(np.ones((rows, 64), np.float32)))


class Stream:
    """A raw Forward stream outside any chain."""

    def __init__(self, client: NodeClient):
        self.requests: queue.Queue = queue.Queue()
        self.replies = client.stub.Forward(iter(self.requests.get, None))

    def send(self, request: pb.ForwardRequest) -> pb.ForwardReply:
        self.requests.put(request)
        return next(self.replies)

    def close(self) -> None:
        self.requests.put(None)

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- 6: sessions belong to their coordinator's streams, and stop at a cap --------------------

COORDINATOR = textwrap.dedent("""
    import queue, sys, time
    import numpy as np
    from caravan.coordinator.remote import NodeClient, RemoteStage
    from caravan.pipeline.stage import LayerRange, Segment, StageBatch
    from caravan.proto import caravan_pb2 as pb, wire

    client = NodeClient(sys.argv[1])
    stage = RemoteStage(client, LayerRange(0, 3), 64)  # a chain of one node: sessions on its Results stream
    for name in ("a", "b", "c"):
        stage.forward(StageBatch((Segment(name, 0, 4),), np.ones((4, 64), np.float32)))
    stage.copy_session("a", "a2", 3)
    requests = queue.Queue()  # and a batch outside any chain: its session on this Forward stream
    replies = client.stub.Forward(iter(requests.get, None))
    requests.put(pb.ForwardRequest(id=1, segments=[pb.Segment(session_id="raw", start=0, length=2)],
                                   hidden=wire.encode_hidden(np.ones((2, 64), np.float32))))
    assert next(replies).WhichOneof("result") == "hidden"
    print("ready", flush=True)
    time.sleep(600)
""")


def test_a_killed_coordinators_sessions_go_with_it(model, tmp_path):
    with loaded_node(model, tmp_path) as (client, _):
        with coordinator_process(client.address) as coordinator:
            assert client.info().sessions == 5  # a, b, c, a2 on the chain; raw on the stream
            coordinator.kill()  # SIGKILL: no EndSession, no goodbye
            seconds = wait_for(lambda: client.info().sessions == 0, 5)
        print(f"sessions gone {seconds:.2f} s after the coordinator was killed")
        # A new coordinator on the same layers starts clean, and closing its stage ends its sessions.
        assert client.load(model.file, SHA, model.config, LAYERS, N_CTX).source == "loaded"
        stage = RemoteStage(client, LAYERS, 64)
        stage.forward(StageBatch((Segment("a", 0, 2),), np.ones((2, 64), np.float32)))
        assert client.info().sessions == 1
        stage.close()
        wait_for(lambda: client.info().sessions == 0, 5)


def test_a_frozen_coordinators_sessions_go_after_the_keepalive(model, tmp_path):
    """A coordinator that stops answering without closing its connection (frozen, unplugged):
    the node's own keepalive pings go unanswered and its streams end."""
    with loaded_node(model, tmp_path) as (client, _), coordinator_process(client.address) as coordinator:
        coordinator.send_signal(signal.SIGSTOP)  # its sockets stay open; nothing answers on them
        seconds = wait_for(lambda: client.info().sessions == 0, 4 * PEER_KEEPALIVE_MS / 1e3)
    print(f"sessions gone {seconds:.1f} s after the coordinator froze")


def test_a_session_taken_over_by_a_new_chain_stays_when_the_old_one_ends(model, tmp_path):
    """A re-plan's refill re-creates sessions under the same ids on a new chain before the old
    chain's stream has ended on the node: the old chain's end must not take them."""
    with loaded_node(model, tmp_path) as (client, _):
        old, new = RemoteStage(client, LAYERS, 64), RemoteStage(client, LAYERS, 64)
        batch = StageBatch((Segment("s", 0, 3),), np.ones((3, 64), np.float32))
        old.forward(batch)
        new.forward(batch)
        old.close()
        time.sleep(0.5)
        assert client.info().sessions == 1
        new.close()
        wait_for(lambda: client.info().sessions == 0, 5)


def test_sessions_past_the_memory_cap_are_refused_by_name(model, tmp_path):
    weights = LocalStage.load(model.file, model.config, LAYERS, N_CTX).weight_bytes
    per_session = KVCache.bytes_for(len(LAYERS), model.config.kv_dim, N_CTX)
    limit = wire.NODE_RUNTIME_BYTES + weights + 3 * per_session + per_session // 2
    with loaded_node(model, tmp_path, memory_limit=limit) as (client, _), Stream(client) as stream:
        for i, session in enumerate("abc", start=1):
            assert stream.send(forward_request(i, session)).WhichOneof("result") == "hidden"
        reply = stream.send(forward_request(4, "d"))
        assert reply.WhichOneof("result") == "error"
        assert reply.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "holds 3 sessions and its cap is 3" in reply.error.message
        assert stream.send(forward_request(5, "a")).WhichOneof("result") == "hidden"  # a held one goes on
        with pytest.raises(grpc.RpcError) as caught:
            client.stub.CopySession(pb.CopySessionRequest(source="a", target="a2", length=2))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "cap is 3" in caught.value.details()
        client.end_session("b")
        assert stream.send(forward_request(6, "d")).WhichOneof("result") == "hidden"
        assert client.info().sessions == 3


def test_end_session_answers_while_batches_wait_for_the_kernels(model, tmp_path):
    """EndSession waits for no queue of batches (an EndSession that timed out behind them left
    its session behind)."""
    with loaded_node(model, tmp_path) as (client, servicer), Stream(client) as stream:
        assert stream.send(forward_request(1, "a")).WhichOneof("result") == "hidden"
        with servicer._compute:  # as while other batches hold and wait for the kernels
            client.stub.EndSession(pb.EndSessionRequest(session_id="a"), timeout=1)
            assert client.info().sessions == 0


# --- 7: idle streams leave threads for short calls and health --------------------------------


def test_idle_streams_cannot_starve_short_calls_or_health(model, tmp_path):
    requests: queue.Queue = queue.Queue()  # never fed: every Forward stream stays idle
    calls = []
    with loaded_node(model, tmp_path) as (client, servicer):
        try:
            for i in range(40):
                calls.append(client.stub.Forward(iter(requests.get, None)))
                calls.append(client.stub.Results(pb.ResultsRequest(chain=f"idle{i}")))
            wait_for(lambda: sum(call.done() for call in calls) == len(calls) - MAX_STREAMS_PER_PEER, 10)
            refused = [call for call in calls if call.done()]
            assert all(call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for call in refused)
            assert "this node serves no more streams" in refused[0].details()
            assert servicer.streams.open == MAX_STREAMS_PER_PEER
            health = health_pb2_grpc.HealthStub(client.channel)
            for call in (lambda: client.stub.Info(pb.InfoRequest(), timeout=1),
                         lambda: client.stub.EndSession(pb.EndSessionRequest(session_id="x"), timeout=1),
                         lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=1)):
                t0 = time.monotonic()
                call()
                assert time.monotonic() - t0 < 1
        finally:
            for call in calls:
                call.cancel()


# --- 8: a peer without the token cannot make the node read what it sends ---------------------


def test_unauthenticated_calls_are_refused_before_their_body_is_read(tmp_path):
    node = NodeProcess(tmp_path / "n")
    channel = grpc.insecure_channel(node.address, options=wire.client_options())
    stub = pb_grpc.StageStub(channel)
    big = "x" * (wire.MAX_MESSAGE_BYTES - (1 << 20))  # 31 MiB, within the node's message limit

    def refused(call) -> None:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

    try:
        process = psutil.Process(node.proc.pid)
        for _ in range(2):  # warm up: the first calls set up what every call uses
            refused(lambda: stub.EndSession(pb.EndSessionRequest(session_id="s"), timeout=30))
        before = process.memory_info().rss
        for i in range(20):
            if i % 2:
                refused(lambda: stub.Load(pb.LoadRequest(model_sha256=big), timeout=30))
            else:
                refused(lambda: next(stub.Forward(iter([pb.ForwardRequest(chain=big)]), timeout=30)))
        grown = process.memory_info().rss - before
        print(f"node RSS {before >> 20} MiB, +{grown / 2**20:.1f} MiB after 20 unauthenticated 31 MiB calls")
        assert grown < 10 << 20  # a few streams' windows at most: no message was kept, or read whole
        trusted = NodeClient(node.address, cluster_token())
        assert trusted.info().state == pb.NODE_STATE_IDLE  # the node serves its own coordinator still
        trusted.close()
    finally:
        channel.close()
        node.stop()


# --- 10: session ids, a shared cache directory, SIGTERM --------------------------------------


def test_copy_session_ids_are_capped_as_forward_caps_them(model, tmp_path):
    with loaded_node(model, tmp_path) as (client, _), Stream(client) as stream:
        assert stream.send(forward_request(1, "a")).WhichOneof("result") == "hidden"
        too_long = "t" * (wire.MAX_SESSION_ID + 1)
        for source, target in (("a", too_long), (too_long, "b"), ("a", "")):
            with pytest.raises(grpc.RpcError) as caught:
                client.stub.CopySession(pb.CopySessionRequest(source=source, target=target, length=1))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"session id must have 1 to {wire.MAX_SESSION_ID} characters" in caught.value.details()
        client.copy_session("a", "t" * wire.MAX_SESSION_ID, 1)  # the longest id is fine
        assert client.info().sessions == 2


def test_two_nodes_cannot_share_a_cache_directory(tmp_path):
    first = NodeProcess(tmp_path / "shared")
    try:
        with pytest.raises(RuntimeError) as caught:
            NodeProcess(tmp_path / "shared", log_path=tmp_path / "second.log")
        error = (tmp_path / "second.log").read_text().strip()
        assert error.count("\n") == 0 and "Traceback" not in error, caught.value
        assert f"cache directory {tmp_path / 'shared'} is in use by another caravan node (pid {first.proc.pid})" in error
        assert "two nodes cannot share one" in error and "--cache-dir" in error
        assert first.proc.poll() is None
    finally:
        first.stop()
    NodeProcess(tmp_path / "shared").stop()  # free again once the first has gone


@pytest.mark.serial  # a bound on wall time: alone on the machine
def test_a_node_holding_layers_and_streams_exits_on_sigterm_at_once(model, tmp_path):
    node = NodeProcess(tmp_path / "n")
    client = NodeClient(node.address, cluster_token())
    try:
        client.load(model.file, SHA, model.config, LAYERS, N_CTX)
        stage = RemoteStage(client, LAYERS, 64)  # a coordinator's Forward and Results streams stay open
        stage.forward(StageBatch((Segment("a", 0, 2),), np.ones((2, 64), np.float32)))
        t0 = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(timeout=10) == 0
        seconds = time.monotonic() - t0
        print(f"node exited {seconds:.2f} s after SIGTERM")
        assert seconds < 2.0
        with pytest.raises(Exception) as caught:  # the coordinator hears it as a lost node
            stage.forward(StageBatch((Segment("a", 2, 1),), np.ones((1, 64), np.float32)))
        assert getattr(caught.value, "lost", False)
        stage.close()
    finally:
        client.close()
        node.stop()
