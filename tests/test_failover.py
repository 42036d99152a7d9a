"""Nodes die (SIGKILL) or hang (SIGSTOP) in the middle of a generation; the coordinator
re-plans over the nodes that still answer, refills the KV caches from the tokens so far, and
the greedy text comes out the same as without the failure. Real node processes, real signals."""

from __future__ import annotations

import os
import signal
import time

import pytest

from caravan.coordinator.cluster import model_cost
from caravan.coordinator.failover import ClusterPipeline
from caravan.coordinator.planner import NODE_RUNTIME_BYTES, PlanError
from caravan.pipeline.generate import Generation
from caravan.pipeline.model import layer_tensor_shapes
from caravan.pipeline.sampler import Sampler, SamplingParams
from node_processes import NodeProcess, cluster_token

pytestmark = pytest.mark.model

N_CTX = 256
PROMPT = "Once upon a time, in a small village,"
N_TOKENS = 24


def generation(pipeline, model):
    return Generation(pipeline, model.tokenizer.encode(PROMPT), Sampler(SamplingParams(temperature=0)), N_TOKENS,
                      stop_ids=frozenset())


@pytest.fixture(scope="module")
def expected(smollm2):
    return list(generation(smollm2.local_pipeline(N_CTX), smollm2))


@pytest.fixture
def nodes(tmp_path):
    started: list[NodeProcess] = []

    def start(*args, cache_dir=None, **kwargs):
        node = NodeProcess(cache_dir or tmp_path / f"node{len(started)}", *args, **kwargs)
        started.append(node)
        return node

    yield start
    for node in started:
        if node.proc.poll() is None:
            os.kill(node.proc.pid, signal.SIGCONT)
        node.stop()


def cluster(model, addresses, tmp_path, timeout_s=10.0):
    return ClusterPipeline(model, lambda: list(addresses), N_CTX, tmp_path, progress=False,
                           forward_timeout_s=timeout_s, token=cluster_token())


def test_node_killed_mid_generation(smollm2, expected, nodes, tmp_path):
    a, b, c = nodes(), nodes(), nodes()
    pipeline = cluster(smollm2, [a.address, b.address, c.address], tmp_path)
    try:
        assert len(pipeline.plan.assignments) == 3
        tokens = []
        for i, token in enumerate(generation(pipeline, smollm2)):
            tokens.append(token)
            if i == 7:
                b.kill()
        assert tokens == expected
        assert len(pipeline.recoveries) == 1 and b.address in pipeline.recoveries[0]
        assert [a.node.name for a in pipeline.plan.assignments] == [a.address, c.address]
    finally:
        pipeline.close()


def test_node_that_hangs_is_treated_as_dead(smollm2, expected, nodes, tmp_path):
    a, b = nodes(), nodes()
    pipeline = cluster(smollm2, [a.address, b.address], tmp_path, timeout_s=2.0)
    try:
        tokens, stalled = [], 0.0
        for i, token in enumerate(generation(pipeline, smollm2)):
            tokens.append(token)
            if i == 5:
                os.kill(a.proc.pid, signal.SIGSTOP)  # alive, holding its sockets, answering nothing
                t0 = time.monotonic()
            if i == 6:
                stalled = time.monotonic() - t0
        assert tokens == expected
        assert len(pipeline.recoveries) == 1 and a.address in pipeline.recoveries[0]
        assert stalled < 15, f"took {stalled:.1f} s to get past the hung node"
        print(f"hung node noticed and routed around in {stalled:.1f} s")
    finally:
        pipeline.close()


def test_node_that_comes_back_joins_the_next_plan(smollm2, expected, nodes, tmp_path):
    a, b, c = nodes(), nodes(), nodes()
    addresses = [a.address, b.address, c.address]
    pipeline = cluster(smollm2, addresses, tmp_path)
    try:
        first_range = pipeline.plan.assignments[0].layers
        tokens = []
        for i, token in enumerate(generation(pipeline, smollm2)):
            tokens.append(token)
            if i == 4:
                a.kill()
            if i == 9:
                assert [s.node.name for s in pipeline.plan.assignments] == [b.address, c.address]
                nodes(port=a.port, cache_dir=a.cache_dir)  # a restarts where it was, its weight cache intact
                b.kill()
        assert tokens == expected
        assert len(pipeline.recoveries) == 2
        assert [s.node.name for s in pipeline.plan.assignments] == [a.address, c.address]
        # a kept its first layers in its cache: only the ones the new plan adds travel
        new_range = pipeline.plan.assignments[0].layers
        layer_bytes = [sum(smollm2.file.tensors[n].n_bytes for n in layer_tensor_shapes(smollm2.config, layer))
                       for layer in range(30)]
        assert pipeline.cluster.pushed[a.address] == sum(layer_bytes[first_range.stop : new_range.stop])
    finally:
        pipeline.close()


def test_not_enough_memory_left_is_a_clear_error(smollm2, nodes, tmp_path):
    cost = model_cost(smollm2, N_CTX)
    limit = NODE_RUNTIME_BYTES + 18 * cost.per_layer  # each node holds 18 of the 30 layers
    a, b = nodes("--memory-limit", str(limit)), nodes("--memory-limit", str(limit))
    pipeline = cluster(smollm2, [a.address, b.address], tmp_path)
    try:
        run = iter(generation(pipeline, smollm2))
        next(run)
        a.kill()
        with pytest.raises(PlanError, match=rf"after node .*{a.port}.*30 layers need .* add a node or use a smaller --ctx"):
            next(run)
        # Once a node is back, the same pipeline serves again.
        nodes("--memory-limit", str(limit), port=a.port, cache_dir=a.cache_dir)
        again = generation(pipeline, smollm2)
        assert len(list(again)) == N_TOKENS
    finally:
        pipeline.close()


def test_cli_run_survives_a_killed_node(smollm2_path, nodes):
    import subprocess
    import sys

    def caravan(*args):
        return subprocess.Popen([sys.executable, "-m", "caravan.coordinator", "run", PROMPT, "--temperature", "0",
                                 "-n", "40", "-t", "1", "--ctx", str(N_CTX), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, bufsize=0)

    expected_text, _ = caravan().communicate(timeout=120)
    a, b, c = nodes(), nodes(), nodes()
    run = caravan("--nodes", f"{a.address},{b.address},{c.address}")
    first = run.stdout.read(8)  # some text has streamed: the generation is under way
    b.kill()
    rest, errors = run.communicate(timeout=120)
    assert run.returncode == 0, errors.decode()
    assert first + rest == expected_text
    assert b"re-planning" in errors and b"Traceback" not in errors


def test_network_cut_to_a_node_is_treated_as_dead(smollm2, expected, nodes, tmp_path):
    """The link to a node goes silent (its proxy frozen: no packets, no resets), the node
    itself is fine: the coordinator stops waiting at the deadline and routes around it."""
    import subprocess
    import sys
    from pathlib import Path

    a, b = nodes(), nodes()
    proxy = subprocess.Popen([sys.executable, str(Path(__file__).with_name("delay_proxy.py")), b.address, "0", "1000"],
                             stdout=subprocess.PIPE, text=True)
    try:
        b_via_proxy = proxy.stdout.readline().rsplit(" ", 1)[1].strip()
        pipeline = cluster(smollm2, [a.address, b_via_proxy], tmp_path, timeout_s=2.0)
        try:
            tokens = []
            for i, token in enumerate(generation(pipeline, smollm2)):
                tokens.append(token)
                if i == 6:
                    os.kill(proxy.pid, signal.SIGSTOP)  # the cable is cut
            assert tokens == expected
            assert len(pipeline.recoveries) == 1 and b_via_proxy in pipeline.recoveries[0]
            assert [s.node.name for s in pipeline.plan.assignments] == [a.address]
        finally:
            pipeline.close()
    finally:
        os.kill(proxy.pid, signal.SIGCONT)
        proxy.kill()
        proxy.wait()


def test_http_client_sees_a_delay_not_an_error(smollm2, nodes):
    """`caravan serve` in front of 3 nodes; one is killed while an answer streams: the client
    gets the whole answer, the same as from one process."""
    from test_serve import MODEL, QUESTION, Server, chat_ids

    expected = smollm2.tokenizer.decode(list(Generation(
        smollm2.local_pipeline(512), chat_ids(smollm2, QUESTION), Sampler(SamplingParams(temperature=0)), 48,
        smollm2.tokenizer.eog_ids)))
    a, b, c = nodes(), nodes(), nodes()
    server = Server("--nodes", f"{a.address},{b.address},{c.address}")
    try:
        stream = server.client().chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                                         max_tokens=48, stream=True)
        pieces = []
        for i, chunk in enumerate(stream):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if i == 3:
                b.kill()
        assert "".join(pieces) == expected
    finally:
        server.stop()
    assert "re-planning" in server.proc.stderr.read()  # the failure did happen mid-answer
