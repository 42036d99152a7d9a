"""Nodes die (SIGKILL) or hang (SIGSTOP) in every phase of a run (connecting, loading, opening
streams, prefill, decode); the coordinator re-plans over the nodes that still answer, refills
the KV caches from the tokens so far, and the greedy text comes out the same as without the
failure. Real node processes, real signals."""

from __future__ import annotations

import os
import signal
import time

import pytest

from caravan.coordinator.cluster import model_cost
from caravan.coordinator.planner import NODE_RUNTIME_BYTES, PlanError
from caravan.coordinator.remote import NodeClient, RemoteStage
from caravan.pipeline.generate import Generation
from caravan.pipeline.model import layer_tensor_shapes
from caravan.pipeline.sampler import Sampler, SamplingParams
from support.failover import N_CTX, N_TOKENS, PROMPT, cluster, expected, generation, nodes  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.model, pytest.mark.slow]

FAULTS = {"kill": signal.SIGKILL, "freeze": signal.SIGSTOP}


def strike(node, fault: str, when: list) -> None:
    """Kill or freeze `node` once; `when` records that it happened (and when, for the caller)."""
    if not when:
        when.append(time.monotonic())
        os.kill(node.proc.pid, FAULTS[fault])


def at_phase(monkeypatch, phase: str, victim, fault: str, tokens: list) -> list:
    """Make the coordinator's own calls strike `victim` at the start of `phase`, the first time
    it gets there: in the middle of connecting (its Info answered, its benchmark next), part way
    through pushing its weights, as its results stream opens, with the prompt's first batch, or
    after three tokens. Returns the list `strike` fills."""
    when: list = []

    def before(owner, method, hits):
        original = getattr(owner, method)

        def hooked(self, *args, **kwargs):
            if hits(self, *args):
                strike(victim, fault, when)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(owner, method, hooked)

    if phase == "connecting":
        before(NodeClient, "benchmark", lambda client, *_: client.address == victim.address)
    elif phase == "loading":
        original_load = NodeClient.load

        def load(self, model, sha, config, layers, n_ctx, on_bytes=lambda n: None):
            def sent(n):
                on_bytes(n)
                if self.address == victim.address:
                    strike(victim, fault, when)  # after its first piece of weights
            return original_load(self, model, sha, config, layers, n_ctx, sent)

        monkeypatch.setattr(NodeClient, "load", load)
    elif phase == "opening streams":
        before(RemoteStage, "_open_results", lambda stage, part: part.client.address == victim.address)
    elif phase == "prefill":
        before(RemoteStage, "submit", lambda stage, batch: not tokens)
    else:
        assert phase == "decode"
        before(RemoteStage, "submit", lambda stage, batch: len(tokens) == 3)
    return when


PHASES = ["connecting", "loading", "opening streams", "prefill", "decode"]


@pytest.mark.parametrize("fault, phase", [("kill", phase) for phase in PHASES] +
                         [("freeze", phase) for phase in PHASES[:-1]])  # a frozen decode: test_node_that_hangs...
def test_node_lost_in_each_phase_of_a_run(smollm2, expected, nodes, tmp_path, monkeypatch, fault, phase):
    """One of 3 nodes is killed or frozen at a given phase of the run; the run re-plans over the
    other two and its greedy text is the fault-free one."""
    a, b, c = nodes(), nodes(), nodes()
    tokens: list[int] = []
    when = at_phase(monkeypatch, phase, b, fault, tokens)
    t0 = time.monotonic()
    pipeline = cluster(smollm2, [a.address, b.address, c.address], tmp_path, timeout_s=3.0)
    try:
        started = time.monotonic()
        for token in generation(pipeline, smollm2):
            tokens.append(token)
        assert when, f"the fault never struck in phase {phase}"
        assert (when[0] < started) == (phase in PHASES[:3])  # struck before or after the pipeline was built
        assert tokens == expected
        assert len(pipeline.recoveries) == 1 and b.address in pipeline.recoveries[0], pipeline.recoveries
        assert [s.node.name for s in pipeline.plan.assignments] == [a.address, c.address]
        took = time.monotonic() - t0
        print(f"{fault} while {phase}: the run took {took:.1f} s")
        if fault == "freeze":  # noticed within seconds, never at a long call's deadline
            assert took < 45
    finally:
        pipeline.close()


def test_node_down_before_the_run_is_left_out(smollm2, expected, nodes, tmp_path, caplog):
    """A node given in the list that is already gone when the run starts: the run goes on over
    the others, saying which one it left out."""
    a, b, c = nodes(), nodes(), nodes()
    b.kill()
    pipeline = cluster(smollm2, [a.address, b.address, c.address], tmp_path)
    try:
        assert list(generation(pipeline, smollm2)) == expected
        assert [s.node.name for s in pipeline.plan.assignments] == [a.address, c.address]
        assert any("leaving out" in r.message and b.address in r.message for r in caplog.records)
    finally:
        pipeline.close()


def test_node_lost_while_re_planning(smollm2, expected, nodes, tmp_path, monkeypatch):
    """A second node dies while the coordinator re-plans around the first (loading the new
    ranges): it plans again, over the one node left."""
    a, b, c = nodes(), nodes(), nodes()
    tokens: list[int] = []
    pipeline = cluster(smollm2, [a.address, b.address, c.address], tmp_path)
    try:
        first = at_phase(monkeypatch, "prefill", b, "kill", tokens)
        second = at_phase(monkeypatch, "loading", c, "kill", tokens)
        for token in generation(pipeline, smollm2):
            tokens.append(token)
        assert first and second
        assert tokens == expected
        assert len(pipeline.recoveries) == 2, pipeline.recoveries
        assert b.address in pipeline.recoveries[0] and "loading layers" in pipeline.recoveries[1]
        assert [s.node.name for s in pipeline.plan.assignments] == [a.address]
    finally:
        pipeline.close()


def test_no_plan_fits_the_nodes_left_at_start(smollm2, nodes, tmp_path, monkeypatch):
    """Lost while loading, with the node left too small for the model: one clear error."""
    cost = model_cost(smollm2, N_CTX)
    limit = NODE_RUNTIME_BYTES + 18 * cost.per_layer  # each node holds 18 of the 30 layers
    a, b = nodes("--memory-limit", str(limit)), nodes("--memory-limit", str(limit))
    at_phase(monkeypatch, "loading", b, "kill", [])
    with pytest.raises(PlanError, match=rf"^no plan fits the nodes still alive \(.+\) after node .*{b.port}.*"
                                        r"loading layers .*30 layers need .* add a node or use a smaller --ctx$"):
        cluster(smollm2, [a.address, b.address], tmp_path)


def test_cli_run_survives_a_node_killed_while_starting(smollm2_path, expected, nodes):
    """The issue's case: `caravan run` through 3 nodes; the last one is killed as soon as the first
    has its layers (the coordinator is loading the others): the run re-plans and finishes."""
    import json
    import subprocess
    import sys

    a, b, c = nodes(), nodes(), nodes()
    run = subprocess.Popen([sys.executable, "-m", "caravan.coordinator", "run", PROMPT, "--temperature", "0",
                            "-n", str(N_TOKENS), "-t", "1", "--ctx", str(N_CTX), "--json", "-v",
                            "--nodes", f"{a.address},{b.address},{c.address}"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in run.stderr:
        seen.append(line)
        if a.address in line and " ready " in line:
            c.kill()
            break
    out, errors = run.communicate(timeout=120)
    errors = "".join(seen) + errors
    assert run.returncode == 0, errors
    assert json.loads(out)["tokens"] == expected
    assert "re-planning" in errors and c.address in errors and "Traceback" not in errors


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
    proxy = subprocess.Popen([sys.executable, str(Path(__file__).parent / "support" / "delay_proxy.py"), b.address, "0", "1000"],
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
    from support.serve import MODEL, QUESTION, Server, chat_ids

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
