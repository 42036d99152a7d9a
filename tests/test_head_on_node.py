"""The output head on the last node: it answers greedy rows with token ids, the ids the
coordinator's sampler would pick from the same hidden states (DESIGN.md, "Data flow of one
token"). A node in this process on a real port with a tiny seeded model; the cluster tests with
the real model and node processes are in test_cluster_head.py."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from caravan.coordinator.remote import NodeClient, NodeError, RemoteStage
from caravan.node.server import NodeSettings, create_server
from caravan.pipeline.loader import load_model
from caravan.pipeline.sampler import Sampler, SamplingParams
from caravan.pipeline.stage import LayerRange, LocalStage, Segment, StageBatch, StageError
from caravan.node.weights import RangeManifest, WeightError

SHA = "cd" * 32
N_CTX = 64
LAST = LayerRange(1, 3)  # the tiny model's last two layers


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def model(request, tiny_model_path):
    return load_model(tiny_model_path(weight_type=QT.Q8_0, tied_output=request.param))


def start_node(cache_dir):
    server, port, _ = create_server(NodeSettings(host="127.0.0.1", port=0, threads=1, cache_dir=cache_dir))
    return server, NodeClient(f"127.0.0.1:{port}")


def batches(dim):
    rng = np.random.default_rng(1)
    return [StageBatch((Segment("a", 0, 6),), rng.standard_normal((6, dim), dtype=np.float32)),
            StageBatch((Segment("a", 6, 3), Segment("b", 0, 2)), rng.standard_normal((5, dim), dtype=np.float32))]


def test_the_last_node_answers_with_the_samplers_greedy_ids(model, tmp_path):
    greedy = Sampler(SamplingParams(temperature=0))
    local = LocalStage.load(model.file, model.config, LAST, N_CTX)
    for restart in range(2):  # pushed, then read from the node's cache after a restart
        server, client = start_node(tmp_path)
        try:
            reply = client.load(model.file, SHA, model.config, LAST, N_CTX, head=True)
            assert reply.source == ("pushed", "cache")[restart]
            remote = RemoteStage(client, LAST, model.config.dim, head=True, vocab_size=model.config.vocab_size)
            for batch in batches(model.config.dim):
                hidden = local.forward(batch)
                expected = [greedy.sample(row) for row in model.head.logits(hidden)]
                ids = remote.forward(StageBatch(batch.segments, batch.hidden, argmax=True))
                assert ids.dtype == np.int64 and ids.tolist() == expected
            remote.close()
            local.end_session("a")
            local.end_session("b")
        finally:
            client.close()
            server.stop(0)


def test_a_node_without_the_head_refuses_token_ids_in_one_line(model, tmp_path):
    server, client = start_node(tmp_path)
    try:
        client.load(model.file, SHA, model.config, LAST, N_CTX)
        # a coordinator that believes the node holds the head: the node says no
        remote = RemoteStage(client, LAST, model.config.dim, head=True, vocab_size=model.config.vocab_size)
        batch = batches(model.config.dim)[0]
        with pytest.raises(StageError, match="hold no output head"):
            remote.forward(StageBatch(batch.segments, batch.hidden, argmax=True))
        assert remote.forward(batch).shape == batch.hidden.shape  # the stream goes on
        remote.close()
        with pytest.raises(NodeError, match="goes with the model's last layer"):
            client.load(model.file, SHA, model.config, LayerRange(0, 2), N_CTX, head=True)
    finally:
        client.close()
        server.stop(0)


def test_weight_error_names_the_head(model):
    with pytest.raises(WeightError, match="goes with the model's last layer"):
        RangeManifest.build(SHA, model.config, LayerRange(0, 1), [], head=True)
