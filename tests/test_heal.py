"""A cluster that heals and grows while it serves (issue 25): `caravan serve` in front of real node
processes on loopback ports; nodes are killed, come back, or start late, and join the plan while it
serves, without another failure to prompt it; /health says "degraded" meanwhile; with every node
gone the coordinator carries the model alone. Greedy text is the one-process text throughout."""

from __future__ import annotations

import os
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import ANY

import pytest

from caravan.coordinator import cluster as cluster_module
from caravan.coordinator.failover import ClusterPipeline
from caravan.coordinator.heal import Watcher
from caravan.coordinator.planner import PlanError
from caravan.pipeline.generate import Generation
from caravan.pipeline.sampler import Sampler, SamplingParams
from support.nodes import NodeProcess, cluster_token
from support.serve import MODEL, N_CTX, QUESTION, Server, chat_ids
from support.wait import wait_for
from support.netns import netns  # noqa: F401  (the fixture: a network namespace with multicast on its loopback)
from support.failover import PROMPT, cluster, expected, generation, nodes  # noqa: F401  (expected, nodes: fixtures)

pytestmark = [pytest.mark.model, pytest.mark.slow]

REJOIN_S = 60.0  # a node that answers again is in the plan within this (settle time, probes, measuring, loading)
STORY = [{"role": "user", "content": "Tell me a long story about a caravan of llamas crossing the mountains."}]
STORY_TOKENS = 40


def one_process_text(model, messages, max_tokens: int) -> str:
    tokens = Generation(model.local_pipeline(N_CTX), chat_ids(model, messages), Sampler(SamplingParams(temperature=0)),
                        max_tokens, model.tokenizer.eog_ids)
    return model.tokenizer.decode(list(tokens))


@pytest.fixture
def serve(tmp_path):
    """`caravan serve ARGS` with its log in a file (read with .log()); stopped after the test."""
    started = []

    def start(*args):
        log_path = tmp_path / f"serve{len(started)}.log"
        server = Server(*args, stderr=open(log_path, "w"))
        server.log = log_path.read_text
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def health(server) -> dict:
    status, body = server.get("/health", timeout=10)
    assert status == (503 if body["status"].startswith("no plan") else 200), body
    return body


def staged(server) -> list[str]:
    """The node names of the plan, in order, as /health tells them."""
    return [stage["node"] for stage in health(server).get("stages", [])]


def ask(server, messages=QUESTION, max_tokens=16) -> str:
    reply = server.client().chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                                    max_tokens=max_tokens)
    return reply.choices[0].message.content


def stream(server, messages, max_tokens, on_chunk=lambda i: None) -> str:
    pieces = []
    chunks = server.client().chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                                     max_tokens=max_tokens, stream=True)
    for i, chunk in enumerate(chunks):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        on_chunk(i)
    return "".join(pieces)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_node_killed_and_restarted_rejoins_and_health_follows(smollm2, nodes, serve):  # noqa: F811
    answer = one_process_text(smollm2, QUESTION, 16)
    a, b = nodes(name="a"), nodes(name="b")
    server = serve("--nodes", f"{a.address},{b.address}")
    assert health(server)["status"] == "ok" and staged(server) == ["a", "b"]

    b.kill()
    wait_for(lambda: health(server)["status"] == "degraded", 30, "/health says degraded")
    assert [row["node"] for row in health(server)["missing"]] == [b.address]
    assert ask(server) == answer  # routed around b
    assert staged(server) == ["a"]

    nodes(name="b", port=b.port, cache_dir=b.cache_dir)  # b restarts where it was; no request prompts the join
    took = wait_for(lambda: staged(server) == ["a", "b"], REJOIN_S, "b back in the plan")
    body = health(server)
    assert body["status"] == "ok" and "missing" not in body, body
    assert ask(server) == answer
    log = server.log()
    assert f"node {b.address}: asking for its info: unreachable" in log and "it left the pool" in log, log
    assert "node b (" in log and "joined the pool" in log, log
    assert "re-planned" in log and "was a [0, 30); now a [0, " in log, log
    print(f"b rejoined {took:.1f} s after it restarted")


def test_node_that_starts_late_joins_a_running_server(smollm2, nodes, serve):  # noqa: F811
    """A configured address with nothing on it at the start: the server serves over the other, and
    takes the node once it answers, at a request boundary."""
    answer = one_process_text(smollm2, QUESTION, 16)
    a = nodes(name="a")
    late = f"127.0.0.1:{free_port()}"
    server = serve("--nodes", f"{a.address},{late}")
    body = health(server)
    assert body["status"] == "degraded" and [row["node"] for row in body["missing"]] == [late], body
    assert ask(server) == answer
    nodes(name="late", port=int(late.rsplit(":", 1)[1]))
    wait_for(lambda: staged(server) == ["a", "late"], REJOIN_S, "the late node in the plan")
    assert health(server)["status"] == "ok"
    assert ask(server) == answer


class Chat:
    """`caravan chat ARGS` as a real process, its stdin a pipe (one line a turn), its log in a file."""

    def __init__(self, log_path, *args: str):
        self.log_path = log_path
        self.proc = subprocess.Popen([sys.executable, "-m", "caravan.coordinator", "chat", "-t", "1", "--ctx",
                                      str(N_CTX), "--temperature", "0", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(log_path, "w"), text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)

    def log(self) -> str:
        return self.log_path.read_text()

    def turn(self, line: str, lines: int) -> str:
        """Send one line; the reply, `lines` lines of streamed text."""
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = []
        deadline = time.monotonic() + REJOIN_S
        while len(reply) < lines:
            assert self.selector.select(timeout=max(0.0, deadline - time.monotonic())), self.log()
            got = self.proc.stdout.readline()
            assert got, self.log()
            reply.append(got)
        return "".join(reply).removesuffix("\n")

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


def planned_now(log: str) -> str:
    """The plan after the last re-plan a log tells of ("a [0, 15), b [15, 30)"); "" before any."""
    moves = [line for line in log.splitlines() if "re-planned in" in line]
    return moves[-1].rsplit("; now ", 1)[-1] if moves else ""


def test_chat_heals_between_turns(smollm2, nodes, tmp_path):  # noqa: F811
    """`caravan chat` over nodes: a node killed after a turn is routed around at the next; once it
    answers again, and a --nodes address that starts answering late, both join the plan between
    turns, without another failure to prompt it. Every turn's text is the one-process text."""
    questions = ["What is the capital of France? Answer in one word.", "And of Italy? Answer in one word.",
                 "And of Spain? Answer in one word."]
    a, b = nodes(name="a"), nodes(name="b")
    late = f"127.0.0.1:{free_port()}"
    chat = Chat(tmp_path / "chat.log", "--nodes", f"{a.address},{b.address},{late}", "--max-tokens", "12")
    history: list[dict] = []

    def turn(question: str) -> None:
        history.append({"role": "user", "content": question})
        answer = one_process_text(smollm2, history, 12)
        assert chat.turn(question, answer.count("\n") + 1) == answer, chat.log()
        history.append({"role": "assistant", "content": answer})

    try:
        turn(questions[0])
        b.kill()
        turn(questions[1])  # routed around b
        assert "re-planning over the nodes that still answer" in chat.log()
        assert "b [" not in planned_now(chat.log())
        nodes(name="b", port=b.port, cache_dir=b.cache_dir)
        nodes(name="late", port=int(late.rsplit(":", 1)[1]))
        wait_for(lambda: "b [" in planned_now(chat.log()) and "late [" in planned_now(chat.log()), REJOIN_S,
                 "b and the late node in the plan")
        turn(questions[2])
        log = chat.log()
        assert "node b (" in log and "node late (" in log and "joined the pool" in log, log
    finally:
        chat.stop()
    assert chat.proc.returncode == 0, chat.log()


def planned(pipeline) -> list[str]:
    """The addresses of a ClusterPipeline's plan, in order ([] while it moves)."""
    current = pipeline.cluster
    return [a.node.name for a in current.plan.assignments] if current is not None else []


def test_greedy_text_unchanged_while_a_node_rejoins(smollm2, expected, nodes, tmp_path):  # noqa: F811
    """A greedy generation runs while a lost node comes back: the watcher moves the plan onto it
    between two tokens (the generation waits there for it), and the text is the one-process text."""
    a, b = nodes(), nodes()
    pipeline = cluster(smollm2, [a.address, b.address], tmp_path)
    watcher = Watcher(pipeline, lambda: [a.address, b.address], [a.address, b.address], cluster_token(),
                      period_s=0.5, settle_s=1.0).start()
    try:
        tokens = []
        for i, token in enumerate(generation(pipeline, smollm2)):
            tokens.append(token)
            if i == 3:
                b.kill()
            if i == 8:
                assert [s.node.name for s in pipeline.plan.assignments] == [a.address]
                # The failover dropped b at once; the watcher hears of it at its next probe.
                wait_for(lambda: watcher.missing() == [{"node": b.address, "error": ANY}], REJOIN_S, "b missing")
                before = pipeline.generation
                nodes(port=b.port, cache_dir=b.cache_dir)
                wait_for(lambda: pipeline.generation > before, REJOIN_S, "the plan moved onto b")
        assert tokens == expected
        assert [s.node.name for s in pipeline.plan.assignments] == [a.address, b.address]
        assert watcher.missing() == []
    finally:
        watcher.close()
        pipeline.close()


def test_node_restarted_between_requests_is_loaded_again_at_once(smollm2, expected, nodes, tmp_path):  # noqa: F811
    """A node of the plan restarts while no request runs: it answers, but without its layers; the
    watcher re-plans before the next request needs them (no failure meets that request)."""
    a, b = nodes(), nodes()
    pipeline = cluster(smollm2, [a.address, b.address], tmp_path)
    watcher = Watcher(pipeline, lambda: [a.address, b.address], [a.address, b.address], cluster_token(),
                      period_s=0.5, settle_s=1.0).start()
    try:
        before = pipeline.generation
        b.kill()
        nodes(port=b.port, cache_dir=b.cache_dir)
        wait_for(lambda: pipeline.generation > before, REJOIN_S, "the plan loaded onto b again")
        assert planned(pipeline) == [a.address, b.address]
        assert list(generation(pipeline, smollm2)) == expected
        assert pipeline.recoveries == []  # no batch met a lost node
    finally:
        watcher.close()
        pipeline.close()


def test_a_flapping_node_is_not_taken_at_every_blink(smollm2, nodes, tmp_path):  # noqa: F811
    """A node that answers for less than the settle time, again and again, is never planned with;
    once it stays, it joins after a longer settle time, in one re-plan."""
    a = nodes()
    port = free_port()
    flapper = f"127.0.0.1:{port}"
    pipeline = cluster(smollm2, [a.address, flapper], tmp_path)
    watcher = Watcher(pipeline, lambda: [a.address, flapper], [a.address, flapper], cluster_token(),
                      period_s=0.25, settle_s=2.0).start()
    try:
        first = pipeline.generation
        for _ in range(3):
            up = nodes(port=port)
            time.sleep(0.8)
            up.kill()
            time.sleep(0.5)
        assert pipeline.generation == first
        nodes(port=port)
        took = wait_for(lambda: planned(pipeline) == [a.address, flapper], REJOIN_S, "the node, steady now, in the plan")
        assert pipeline.generation == first + 1
        assert took >= 3.0, took  # its settle time grew with its blinks
    finally:
        watcher.close()
        pipeline.close()


def test_every_node_gone_the_coordinator_carries_on(smollm2, nodes, serve):  # noqa: F811
    """Both nodes are killed mid-stream: the coordinator holds the model itself and the text goes
    on unchanged; once a node answers again, it takes the layers back."""
    story = one_process_text(smollm2, STORY, STORY_TOKENS)
    a, b = nodes(name="a"), nodes(name="b")
    server = serve("--nodes", f"{a.address},{b.address}")

    def kill_both(i: int) -> None:
        if i == 4:
            a.kill()
            b.kill()

    assert stream(server, STORY, STORY_TOKENS, kill_both) == story
    assert "this process carries all 30 layers" in server.log()
    assert staged(server) == ["local"]
    # The failover's re-plan is at once; /health hears of the lost nodes at the watcher's next probe.
    wait_for(lambda: health(server)["status"] == "degraded", REJOIN_S, "/health says degraded")
    nodes(name="a", port=a.port, cache_dir=a.cache_dir)
    wait_for(lambda: staged(server) == ["a"], REJOIN_S, "a takes the layers back from the coordinator")


def test_coordinator_without_the_memory_ends_with_a_clear_error(smollm2, nodes, tmp_path, monkeypatch):  # noqa: F811
    """Every node gone and this process short of memory for the model: the error says so, as before."""
    a = nodes()
    pipeline = ClusterPipeline(smollm2, lambda: [a.address], 256, tmp_path, progress=False, token=cluster_token())
    try:
        run = iter(Generation(pipeline, smollm2.tokenizer.encode("Once upon a time"),
                              Sampler(SamplingParams(temperature=0)), 8, stop_ids=frozenset()))
        next(run)
        real = cluster_module._local_info

        def short_of_memory():
            info = real()
            info.memory_available = 1 << 20
            return info

        monkeypatch.setattr(cluster_module, "_local_info", short_of_memory)
        a.kill()
        with pytest.raises(PlanError, match=r"^every node is gone \(node .*\) and this process cannot carry the "
                                            r"model alone: the model's 30 layers need .* MiB"):
            next(run)
    finally:
        pipeline.close()


def test_node_found_by_zeroconf_joins_a_running_server(netns, tmp_path):  # noqa: F811
    """`serve --discover` inside a network namespace (test_discovery.py's): a second node that
    starts advertising while it serves is found and taken into the plan."""
    import json
    import selectors
    import subprocess
    import sys

    alpha = NodeProcess(tmp_path / "alpha", advertise=True, prefix=netns, name="alpha")
    log_path = tmp_path / "serve.log"
    serve = subprocess.Popen([*netns, sys.executable, "-m", "caravan.coordinator", "serve", "--port", "0", "-t", "1",
                              "--ctx", str(N_CTX), "--discover", "--discover-seconds", "2"],
                             stdout=subprocess.PIPE, stderr=open(log_path, "w"), text=True)
    started = [alpha]
    try:
        sel = selectors.DefaultSelector()
        sel.register(serve.stdout, selectors.EVENT_READ)
        assert sel.select(timeout=120), log_path.read_text()
        url = serve.stdout.readline().rsplit(" ", 1)[1].strip().removesuffix("/v1") + "/health"

        def stages() -> list[str]:  # asked from inside the namespace, where the server listens
            got = subprocess.run([*netns, sys.executable, "-c", "import sys, urllib.request; "
                                  "print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())", url],
                                 capture_output=True, text=True, timeout=60)
            return [s["node"] for s in json.loads(got.stdout).get("stages", [])] if got.returncode == 0 else []

        assert stages() == ["alpha"]
        started.append(NodeProcess(tmp_path / "beta", advertise=True, prefix=netns, name="beta"))
        wait_for(lambda: stages() == ["alpha", "beta"], REJOIN_S, "beta, found by zeroconf, in the plan",
                 interval_s=1.0)
        assert "node beta (" in log_path.read_text() and "joined the pool" in log_path.read_text()
    finally:
        serve.terminate()
        serve.wait(timeout=30)
        for node in started:
            node.stop()


PACE_S = 0.15  # a reader's pause between tokens: the generation spans the whole move, with a history to refill
LINK_MBIT = 12  # b's link, slow enough that pushing its layers takes several times MOVE_PAUSE_S
MOVE_PAUSE_S = 4.0  # the longest a stream may wait for a move whose weights are pushed ahead


@pytest.fixture
def slow_link():
    """start(address): a delay_proxy.py to `address` at LINK_MBIT; its address."""
    proxies = []

    def start(address: str) -> str:
        proxy = subprocess.Popen([sys.executable, str(Path(__file__).parent / "support" / "delay_proxy.py"), address,
                                  "0", str(LINK_MBIT)], stdout=subprocess.PIPE, text=True)
        proxies.append(proxy)
        return proxy.stdout.readline().rsplit(" ", 1)[1].strip()

    yield start
    for proxy in proxies:
        proxy.kill()
        proxy.wait()
        proxy.stdout.close()


def test_uncached_weights_are_pushed_before_the_move(smollm2, nodes, slow_link, tmp_path):  # noqa: F811
    """A new node whose layers are not cached joins while a greedy generation runs: its layers are
    pushed while the generation goes on over the old plan, so the move stalls the stream only to
    refill the session, far less than the push takes. The text is the one-process text."""
    a, b = nodes(), nodes()
    b_link = slow_link(b.address)
    n_ctx = 1024  # room for the tokens generated while b settles, is measured and is sent its layers
    pipeline = ClusterPipeline(smollm2, lambda: [a.address], n_ctx, tmp_path, progress=False, token=cluster_token())
    watcher = Watcher(pipeline, lambda: [a.address, b_link], [a.address, b_link], cluster_token(),
                      period_s=0.5, settle_s=1.0)
    prompt = smollm2.tokenizer.encode(PROMPT)
    first, moved_at, tokens, gaps = pipeline.generation, None, [], []
    try:
        run = iter(Generation(pipeline, prompt, Sampler(SamplingParams(temperature=0)), n_ctx - len(prompt) - 1,
                              stop_ids=frozenset()))
        asked = time.monotonic()
        for i, token in enumerate(run):
            gaps.append(time.monotonic() - asked)
            tokens.append(token)
            if i == 2:
                watcher.start()
            if moved_at is None and pipeline.generation > first:
                moved_at = i
            if moved_at is not None and i >= moved_at + 4:
                break
            time.sleep(PACE_S)
            asked = time.monotonic()
        run.close()  # ends the session
        assert moved_at is not None, "the plan never moved onto b"
        assert planned(pipeline) == [a.address, b_link]
    finally:
        watcher.close()
        pipeline.close()
    b_layers = next(s.layers for s in pipeline.plan.assignments if s.node.name == b_link)
    pushed = sum(info.n_bytes for name, info in smollm2.file.tensors.items()
                 if name.startswith(tuple(f"blk.{i}." for i in b_layers)))
    push_s = pushed * 8 / (LINK_MBIT * 1e6)
    pause = max(gaps[3:])
    print(f"longest gap between tokens across the move: {pause:.2f} s (pushing {pushed / 1e6:.0f} MB over "
          f"{LINK_MBIT} Mbit/s takes {push_s:.1f} s); median gap {sorted(gaps)[len(gaps) // 2]:.3f} s")
    assert "received layers" in b.log_path.read_text() and push_s > 2 * MOVE_PAUSE_S, push_s  # uncached, and slow
    assert pause < MOVE_PAUSE_S, pause
    assert tokens == list(Generation(smollm2.local_pipeline(n_ctx), prompt, Sampler(SamplingParams(temperature=0)),
                                     len(tokens), stop_ids=frozenset()))
