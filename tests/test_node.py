"""A node server in this process, on a real port, with a tiny seeded model: what it accepts,
what it refuses, and that one bad request never ends its stream or its service."""

from __future__ import annotations

import hashlib
import queue
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from grpc_health.v1 import health_pb2, health_pb2_grpc

from caravan.coordinator.remote import FORWARD_TIMEOUT_S, NodeClient, NodeError, Part, RemoteStage, load_request
from caravan.node.server import SERVICE, NodeSettings, create_server
from caravan.pipeline.loader import load_model
from caravan.pipeline.model import layer_tensor_shapes
from caravan.pipeline.stage import LayerRange, LocalStage, Segment, StageBatch, StageError
from caravan.proto import caravan_pb2 as pb
from caravan.proto import wire


SHA = "ab" * 32  # the tests name the tiny model by any well-formed digest
N_CTX = 64


@pytest.fixture
def model(tiny_q8_path):
    return load_model(tiny_q8_path)


@pytest.fixture
def node(tmp_path):
    server, port, servicer = create_server(NodeSettings(host="127.0.0.1", port=0, threads=1, cache_dir=tmp_path))
    client = NodeClient(f"127.0.0.1:{port}")
    yield client, servicer, tmp_path
    client.close()
    server.stop(0)


def health(client):
    stub = health_pb2_grpc.HealthStub(client.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=SERVICE)).status


def test_health_and_info_follow_loading(model, node):
    client, _, _ = node
    assert health(client) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert client.info().state == pb.NODE_STATE_IDLE
    reply = client.load(model.file, SHA, model.config, LayerRange(1, 3), N_CTX)
    assert reply.ready and reply.source == "pushed"
    assert health(client) == health_pb2.HealthCheckResponse.SERVING
    info = client.info()
    assert (info.state, info.model_sha256, info.layer_start, info.layer_stop) == (pb.NODE_STATE_READY, SHA, 1, 3)
    assert info.protocol_version == wire.PROTOCOL_VERSION and info.memory_available > 0
    # loading the same range again is a no-op
    assert client.load(model.file, SHA, model.config, LayerRange(1, 3), N_CTX).source == "loaded"


def test_remote_stage_is_bit_identical_with_several_sessions(model, node):
    client, _, _ = node
    client.load(model.file, SHA, model.config, LayerRange(0, 3), N_CTX)
    remote = RemoteStage(client, LayerRange(0, 3), model.config.dim)
    local = LocalStage.load(model.file, model.config, LayerRange(0, 3), N_CTX)
    rng = np.random.default_rng(0)
    batches = [
        StageBatch((Segment("a", 0, 7),), rng.standard_normal((7, 64), dtype=np.float32)),
        StageBatch((Segment("b", 0, 3),), rng.standard_normal((3, 64), dtype=np.float32)),
        StageBatch((Segment("a", 7, 1), Segment("b", 3, 1)), rng.standard_normal((2, 64), dtype=np.float32)),
    ]
    try:
        for batch in batches:
            assert np.array_equal(remote.forward(batch), local.forward(batch))
        remote.copy_session("b", "c", 4)  # a session started from another's cache, on the node
        local.copy_session("b", "c", 4)
        step = StageBatch((Segment("c", 4, 1),), rng.standard_normal((1, 64), dtype=np.float32))
        assert np.array_equal(remote.forward(step), local.forward(step))
        with pytest.raises(NodeError, match="exists already") as info:
            remote.copy_session("b", "c", 2)
        assert not info.value.lost  # a refused copy is the caller's mistake, not a dead node
        remote.end_session("a")
        with pytest.raises(StageError, match="session a is unknown"):
            remote.forward(StageBatch((Segment("a", 8, 1),), np.zeros((1, 64), np.float32)))
    finally:
        remote.close()


class Stream:
    """A raw Forward stream: send a request, read its reply."""

    def __init__(self, client):
        self.requests: queue.Queue = queue.Queue()
        self.replies = client.stub.Forward(iter(self.requests.get, None))

    def send(self, request):
        self.requests.put(request)
        return next(self.replies)

    def close(self):
        self.requests.put(None)


def good_request(i=1, session="s", start=0, rows=2):
    x = np.ones((rows, 64), np.float32)
    return pb.ForwardRequest(id=i, segments=[pb.Segment(session_id=session, start=start, length=rows)],
                             hidden=wire.encode_hidden(x))


def test_forward_before_loading_is_refused(node):
    client, _, _ = node
    stream = Stream(client)
    reply = stream.send(good_request())
    stream.close()
    assert reply.WhichOneof("result") == "error"
    assert reply.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "no layers" in reply.error.message


def test_bad_batches_get_errors_and_the_stream_goes_on(model, node):
    client, _, _ = node
    client.load(model.file, SHA, model.config, LayerRange(0, 3), N_CTX)
    stream = Stream(client)
    bad = [
        (pb.ForwardRequest(id=2, segments=[pb.Segment(session_id="s", start=0, length=2)],
                           hidden=wire.encode_hidden(np.ones((2, 32), np.float32))), "columns"),
        (pb.ForwardRequest(id=3, segments=[pb.Segment(session_id="s", start=0, length=3)],
                           hidden=wire.encode_hidden(np.ones((2, 64), np.float32))), "2 hidden rows"),
        (pb.ForwardRequest(id=4, segments=[], hidden=wire.encode_hidden(np.ones((2, 64), np.float32))), "segment"),
        (good_request(5, start=10), "unknown here"),
        (good_request(6, start=N_CTX - 1), "past the context"),
        (pb.ForwardRequest(id=7, segments=[pb.Segment(session_id="s", start=0, length=2)],
                           hidden=pb.Tensor(format=1, rows=2, cols=64, data=b"\0" * 7)), "bytes"),
        (pb.ForwardRequest(id=8, segments=[pb.Segment(session_id="s", start=0, length=600)],
                           hidden=pb.Tensor(format=1, rows=600, cols=64, data=b"")), "rows"),
    ]
    for request, message in bad:
        reply = stream.send(request)
        assert reply.id == request.id
        assert reply.WhichOneof("result") == "error", message
        assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert message in reply.error.message
    reply = stream.send(good_request(9))
    stream.close()
    assert reply.WhichOneof("result") == "hidden" and reply.hidden.rows == 2
    assert client.info().state == pb.NODE_STATE_READY


@pytest.mark.parametrize("fmt, value", [
    (pb.WIRE_FORMAT_F32, np.nan), (pb.WIRE_FORMAT_F32, np.inf), (pb.WIRE_FORMAT_F16, -np.inf),
    (pb.WIRE_FORMAT_Q8_0, np.nan),
], ids=["f32-nan", "f32-inf", "f16-minus-inf", "q8_0-nan"])
def test_a_non_finite_hidden_state_is_refused_before_any_compute(model, node, fmt, value):
    client, _, _ = node
    client.load(model.file, SHA, model.config, LayerRange(0, 3), N_CTX)
    stream = Stream(client)
    x = np.ones((3, 64), np.float32)
    x[2, 40] = value
    reply = stream.send(pb.ForwardRequest(id=1, segments=[pb.Segment(session_id="s", start=0, length=3)],
                                          hidden=wire.encode_hidden(x, fmt)))
    assert reply.WhichOneof("result") == "error"
    assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "hidden state row 2 of 3 holds NaN or Inf" in reply.error.message
    assert client.info().sessions == 0  # nothing was computed: no session was made
    reply = stream.send(good_request(2))
    assert reply.WhichOneof("result") == "hidden"
    assert client.info().sessions == 1  # before the stream closes: its sessions end with it
    stream.close()


def test_a_batch_refused_for_its_reply_format_makes_no_session(model, node):
    client, _, _ = node
    client.load(model.file, SHA, model.config, LayerRange(0, 3), N_CTX)
    stream = Stream(client)
    request = good_request(1)
    request.reply_format = 9
    reply = stream.send(request)
    stream.close()
    assert reply.WhichOneof("result") == "error"
    assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "unknown wire format 9" in reply.error.message
    assert client.info().sessions == 0


CHAIN_LAYERS = (LayerRange(0, 1), LayerRange(1, 2), LayerRange(2, 3))


@pytest.fixture
def chain_nodes(model, tmp_path):
    """Three nodes in this process holding one layer each of the tiny model."""
    servers, clients = [], []
    for i, layers in enumerate(CHAIN_LAYERS):
        server, port, _ = create_server(NodeSettings(host="127.0.0.1", port=0, threads=1, name=f"node{i}",
                                                     cache_dir=tmp_path / f"n{i}"))
        servers.append(server)
        clients.append(NodeClient(f"127.0.0.1:{port}"))
        clients[-1].info()
        clients[-1].load(model.file, SHA, model.config, layers, N_CTX)
    yield clients
    for client, server in zip(clients, servers):
        client.close()
        server.stop(0)


def chain_of(clients, dim, timeout_s=FORWARD_TIMEOUT_S):
    return RemoteStage(clients[0], CHAIN_LAYERS[0], dim, timeout_s=timeout_s,
                       then=[Part(c, r) for c, r in zip(clients[1:], CHAIN_LAYERS[1:])])


def test_a_chain_of_nodes_is_bit_identical_and_names_the_node_that_refuses(model, chain_nodes):
    chain = chain_of(chain_nodes, model.config.dim)
    local = LocalStage.load(model.file, model.config, LayerRange(0, 3), N_CTX)
    rng = np.random.default_rng(1)
    try:
        for batch in (StageBatch((Segment("a", 0, 5),), rng.standard_normal((5, 64), dtype=np.float32)),
                      StageBatch((Segment("b", 0, 2), Segment("a", 5, 1)), rng.standard_normal((3, 64), dtype=np.float32))):
            assert np.array_equal(chain.forward(batch), local.forward(batch))
        assert len(chain.hop_s) == 2 and all(h > 0 for h in chain.hop_s)
        # Only node1 lost session b: node0 computes, node1 refuses, node2 passes the refusal on.
        chain_nodes[1].end_session("b")
        with pytest.raises(StageError, match="node node1: .*session b is unknown"):
            chain.forward(StageBatch((Segment("b", 2, 1),), np.ones((1, 64), np.float32)))
        batch = StageBatch((Segment("a", 6, 1),), rng.standard_normal((1, 64), dtype=np.float32))
        assert np.array_equal(chain.forward(batch), local.forward(batch))  # the chain goes on
    finally:
        chain.close()


def test_a_chain_keeps_several_batches_in_flight(model, chain_nodes):
    """Lanes call forward from several threads at once; each gets its own batch's answer."""
    chain = chain_of(chain_nodes, model.config.dim)
    local = LocalStage.load(model.file, model.config, LayerRange(0, 3), N_CTX)
    rng = np.random.default_rng(2)
    sessions = [f"s{i}" for i in range(4)]
    steps = {s: [rng.standard_normal((1, 64), dtype=np.float32) for _ in range(12)] for s in sessions}
    expected = {s: [local.forward(StageBatch((Segment(s, pos, 1),), x)) for pos, x in enumerate(steps[s])]
                for s in sessions}

    def run(session):
        return [chain.forward(StageBatch((Segment(session, pos, 1),), x)) for pos, x in enumerate(steps[session])]

    try:
        with ThreadPoolExecutor(len(sessions)) as pool:
            results = dict(zip(sessions, pool.map(run, sessions)))
        for s in sessions:
            assert all(np.array_equal(a, b) for a, b in zip(results[s], expected[s]))
    finally:
        chain.close()


def test_a_node_that_cannot_reach_the_next_says_so_at_once(model, chain_nodes):
    client = chain_nodes[0]
    results = client.stub.Results(pb.ResultsRequest(chain="c1"))
    assert next(results).id == 0
    stream = Stream(client)
    for i, (relay, message) in enumerate([(["127.0.0.1:9"], "cannot reach the next node of the chain, 127.0.0.1:9"),
                                          (["no port"], "relay address 'no port' is not HOST:PORT")], start=1):
        t0 = time.monotonic()
        request = good_request(i, rows=1, start=i - 1)
        request.chain, request.relay[:] = "c1", relay
        stream.requests.put(request)
        reply = next(results)
        assert reply.id == i and message in reply.error.message
        assert time.monotonic() - t0 < 3  # a refused connection, not a timeout
    request = good_request(9)
    request.chain = "no such chain"
    stream.requests.put(request)
    stream.close()
    results.cancel()
    assert client.info().state == pb.NODE_STATE_READY


def test_a_node_lost_in_the_middle_of_a_chain_fails_it_at_once(model, chain_nodes):
    chain = chain_of(chain_nodes, model.config.dim, timeout_s=60)
    try:
        chain.forward(StageBatch((Segment("a", 0, 2),), np.ones((2, 64), np.float32)))
        chain_nodes[1].channel.close()  # the coordinator's own view of node1 goes: its results stream ends
        t0 = time.monotonic()
        with pytest.raises(NodeError) as info:
            chain.forward(StageBatch((Segment("a", 2, 1),), np.ones((1, 64), np.float32)))
        assert info.value.lost and time.monotonic() - t0 < 5
    finally:
        chain.close()


def chunks(model, request, data_sha=None, extra=b"", drop_last=False, after_sha=b""):
    request.push_layers.extend(range(request.layer_start, request.layer_stop))
    yield pb.WeightChunk(header=request)
    digest = hashlib.sha256()
    for entry in request.tensors:
        data = bytes(model.file.tensor_bytes(entry.name))
        digest.update(data)
        yield pb.WeightChunk(data=data)
    if extra:
        yield pb.WeightChunk(data=extra)
    if not drop_last:
        yield pb.WeightChunk(sha256=data_sha or digest.hexdigest())
    if after_sha:
        yield pb.WeightChunk(data=after_sha)


@pytest.mark.parametrize("kind,message", [
    ("bad sha", "sha256"),
    ("extra bytes", "more than"),
    ("no sha", "ended before its sha256"),
    ("data after sha", "unexpected data"),
    ("no header", "must start with the load request"),
    ("no layers", "layers to push []"),
])
def test_bad_weight_streams_are_refused_and_leave_nothing(model, node, kind, message):
    client, _, cache_dir = node
    request = load_request(model.file, SHA, model.config, LayerRange(0, 2), N_CTX)
    if kind == "bad sha":
        stream = chunks(model, request, data_sha="0" * 64)
    elif kind == "extra bytes":
        stream = chunks(model, request, extra=b"x")
    elif kind == "no sha":
        stream = chunks(model, request, drop_last=True)
    elif kind == "data after sha":
        stream = chunks(model, request, after_sha=b"x")
    elif kind == "no layers":
        stream = iter([pb.WeightChunk(header=request)])
    else:
        stream = iter([pb.WeightChunk(data=b"abc")])
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.PushWeights(stream)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    assert not list((cache_dir / "layers").glob("*/*")) if (cache_dir / "layers").exists() else True
    assert client.load(model.file, SHA, model.config, LayerRange(0, 2), N_CTX).source == "pushed"


def mangled(model, change):
    request = load_request(model.file, SHA, model.config, LayerRange(0, 2), N_CTX)
    change(request)
    return request


@pytest.mark.parametrize("change,code,message", [
    (lambda r: r.tensors.pop(), "INVALID_ARGUMENT", "missing"),
    (lambda r: r.tensors[1].shape.__setitem__(1, 65), "INVALID_ARGUMENT", "shape"),
    (lambda r: setattr(r.tensors[1], "type", 17), "INVALID_ARGUMENT", "unsupported type IQ2_XS"),
    (lambda r: setattr(r.tensors[1], "type", 999), "INVALID_ARGUMENT", "unknown tensor type"),
    (lambda r: setattr(r.tensors[1], "n_bytes", 1 << 40), "INVALID_ARGUMENT", "declared"),
    (lambda r: setattr(r, "layer_stop", 9), "INVALID_ARGUMENT", "not within"),
    (lambda r: setattr(r, "n_ctx", 0), "INVALID_ARGUMENT", "context size"),
    (lambda r: setattr(r, "model_sha256", "../../etc"), "INVALID_ARGUMENT", "sha256"),
    (lambda r: (setattr(r.config, "context_length", 1 << 31), setattr(r, "n_ctx", 1 << 31)),
     "RESOURCE_EXHAUSTED", "MiB free"),
])
def test_bad_load_requests_are_refused(model, node, change, code, message):
    client, _, _ = node
    with pytest.raises(grpc.RpcError) as caught:
        client.stub.Load(mangled(model, change))
    assert caught.value.code() == getattr(grpc.StatusCode, code)
    assert message in caught.value.details()
    assert client.info().state == pb.NODE_STATE_IDLE  # nothing was touched


def test_only_missing_layers_are_pushed(model, node):
    client, _, cache_dir = node
    first = client.load(model.file, SHA, model.config, LayerRange(0, 2), N_CTX)
    reply = client.stub.Load(load_request(model.file, SHA, model.config, LayerRange(1, 3), N_CTX))
    assert reply.needs_weights and list(reply.missing_layers) == [2]
    second = client.load(model.file, SHA, model.config, LayerRange(1, 3), N_CTX)
    layer_bytes = sum(model.file.tensors[n].n_bytes for n in layer_tensor_shapes(model.config, 2))
    assert second.source == "pushed" and second.bytes_received == layer_bytes
    assert first.bytes_received == 2 * layer_bytes  # the tiny model's layers are all alike
    assert sorted(p.name for p in (cache_dir / "layers" / SHA).iterdir()) == ["0", "1", "2"]


def test_damaged_cache_entry_is_ignored(model, node):
    client, _, cache_dir = node
    client.load(model.file, SHA, model.config, LayerRange(0, 2), N_CTX)
    (cache_dir / "layers" / SHA / "1" / "manifest.json").write_text("{not json")
    reply = client.stub.Load(load_request(model.file, SHA, model.config, LayerRange(0, 2), N_CTX + 1))
    assert reply.needs_weights and list(reply.missing_layers) == [1]


def test_benchmark(model, node):
    client, _, _ = node
    ms = client.benchmark(model.config, int(model.file.tensors["blk.0.ffn_up.weight"].type))
    assert 0 < ms < 1000


FAMILIES = {
    "llama3": dict(arch="llama", rope_freqs=True),
    "qwen2": dict(arch="qwen2"),
    "phi3": dict(arch="phi3", fused=True),
    "gemma2": dict(arch="gemma2", metadata={"gemma2.attention.sliding_window": 6, "gemma2.attn_logit_softcapping": 3.0}),
    "gemma3": dict(arch="gemma3", n_layers=4, head_dim=32, metadata={
        "gemma3.attention.sliding_window": 6, "gemma3.attention.sliding_window_pattern": 2,
        "gemma3.rope.scaling.factor": 8.0}),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_runs_on_a_node_bit_identical_and_restarts_from_its_cache(family, tmp_path):
    """The node learns the family from the wire config alone (block tensors, RoPE factors and
    scaling, sliding layers, caps), receives exactly those tensors, and gives the bits of a
    LocalStage; a second node on the same cache directory loads the layers from disk."""
    from support.tiny_models import write_tiny_model

    kwargs = dict(FAMILIES[family])
    model = load_model(write_tiny_model(tmp_path / f"{family}.gguf", kwargs.pop("arch"), **kwargs))
    layers = LayerRange(1, model.config.n_layers)
    local = LocalStage.load(model.file, model.config, layers, N_CTX)
    rng = np.random.default_rng(0)
    batches = [StageBatch((Segment("a", 0, 12),), rng.standard_normal((12, 64), dtype=np.float32)),
               StageBatch((Segment("a", 12, 1),), rng.standard_normal((1, 64), dtype=np.float32))]
    expected = [local.forward(batch) for batch in batches]
    for source in ("pushed", "cache"):
        server, port, _ = create_server(NodeSettings(host="127.0.0.1", port=0, threads=1, cache_dir=tmp_path / "node"))
        client = NodeClient(f"127.0.0.1:{port}")
        try:
            reply = client.load(model.file, SHA, model.config, layers, N_CTX)
            assert reply.source == source
            if source == "pushed":
                assert reply.bytes_received == sum(model.file.tensors[n].n_bytes for layer in layers
                                                   for n in layer_tensor_shapes(model.config, layer))
            remote = RemoteStage(client, layers, model.config.dim)
            try:
                for batch, out in zip(batches, expected):
                    assert np.array_equal(remote.forward(batch), out)
            finally:
                remote.close()
            assert client.benchmark(model.config, int(QT.Q8_0)) > 0
        finally:
            client.close()
            server.stop(0)


def test_node_of_another_protocol_version_is_refused_by_name(tmp_path):
    from caravan.coordinator.cluster import connect
    from caravan.coordinator.remote import NodeError
    from caravan.node.server import StageServicer

    class FutureNode(StageServicer):
        def Info(self, request, context):
            info = super().Info(request, context)
            info.protocol_version, info.version = 99, "9.0.0"
            return info

    from concurrent.futures import ThreadPoolExecutor

    from caravan.proto import caravan_pb2_grpc as pb_grpc

    servicer = FutureNode(NodeSettings(name="newpi", cache_dir=tmp_path))
    server = grpc.server(ThreadPoolExecutor(2))
    pb_grpc.add_StageServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(NodeError, match=r"node newpi \(127\.0\.0\.1:\d+\): speaks protocol 99 \(caravan 9\.0\.0\); "
                                            rf"this coordinator speaks {wire.PROTOCOL_VERSION}"):
            connect([f"127.0.0.1:{port}"])
    finally:
        server.stop(0)
    

def test_without_the_cluster_token_only_health_answers(model, tmp_path):
    from caravan.coordinator.cluster import connect
    from caravan.coordinator.remote import NodeError

    token = "s3cret-token-0123456789abcdef"
    server, port, _ = create_server(NodeSettings(host="127.0.0.1", port=0, cache_dir=tmp_path, token=token))
    address = f"127.0.0.1:{port}"
    try:
        for wrong in (None, "another-token-0123456789abcdef"):
            client = NodeClient(address, wrong)
            assert health(client) == health_pb2.HealthCheckResponse.NOT_SERVING  # health needs no token
            for call in (lambda: client.stub.Info(pb.InfoRequest()),
                         lambda: client.stub.Load(load_request(model.file, SHA, model.config, LayerRange(0, 1), N_CTX)),
                         lambda: client.stub.PushWeights(iter([pb.WeightChunk(data=b"x")])),
                         lambda: next(client.stub.Forward(iter([good_request()]))),
                         lambda: client.stub.EndSession(pb.EndSessionRequest(session_id="s"))):
                with pytest.raises(grpc.RpcError) as caught:
                    call()
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            client.close()
            with pytest.raises(NodeError, match="refused this coordinator's cluster token"):
                connect([address], wrong)
            assert connect([address], wrong, optional=[address]) == []  # a discovered stranger is left out
        (node,) = connect([address], token)
        assert node.info.state == pb.NODE_STATE_IDLE
        node.client.close()
    finally:
        server.stop(0)
    

def test_token_file_is_created_private_and_loose_ones_are_refused(tmp_path):
    import os
    import stat

    from caravan.proto.auth import TokenError, load_token

    path = tmp_path / "dir" / "cluster-token"
    token = load_token(path)
    assert len(token) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_token(path) == token
    os.chmod(path, 0o644)
    with pytest.raises(TokenError, match="chmod 600"):
        load_token(path)
    with pytest.raises(TokenError, match="no cluster token file"):
        load_token(tmp_path / "missing", create=False)
