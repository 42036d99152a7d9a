"""The prompt cache across requests (issue 24): a stage keeps finished sessions under a byte
budget, least recently used first out, and later sessions copy from them and decode bit for
bit as if they had computed the prefix."""

from __future__ import annotations

import json
import re
import threading
import urllib.request

import grpc
import numpy as np
import pytest

from caravan.coordinator.failover import ClusterPipeline
from caravan.coordinator.remote import RemoteStage
from caravan.coordinator.scheduler import Request, Scheduler, common_prefix
from caravan.pipeline.generate import Generation
from caravan.pipeline.loader import load_model
from caravan.pipeline.stage import KVCache, LocalStage, Segment, StageBatch, StageError
from caravan.proto import caravan_pb2 as pb
from caravan.proto.wire import NODE_RUNTIME_BYTES
from support.nodes import NODE_CTX, NODE_LAYERS as LAYERS, NodeProcess, cluster_token, loaded_node
from support.serve import MODEL, Server, chat_ids
from support.stages import build, greedy, prompt
from support.wait import wait_for

N_CTX = 128


def retired_bytes(stage: LocalStage, n_positions: int) -> int:
    return KVCache.bytes_for(len(stage.layers), stage.config.kv_dim, n_positions)


def filled(pipeline, session: str, n: int, seed: int = 0) -> np.ndarray:
    ids = prompt(n, seed)
    pipeline.forward([Segment(session, 0, n)], ids)
    return ids


def test_budget_is_respected_exactly_least_recently_used_first(tiny_q8_path):
    pipeline = build(tiny_q8_path, n_ctx=N_CTX)
    stage = pipeline.stages[0]
    stage.prompt_cache.set_budget(retired_bytes(stage, 30))  # room for 30 positions in all
    for name in "abc":
        filled(pipeline, name, 12)
    pipeline.retire_session("a", 10)
    pipeline.retire_session("b", 10)
    assert stage.prompt_cache.stats().bytes == retired_bytes(stage, 20)
    stage.copy_session("a", "a2", 5)  # "a" is now the most recently used: "b" goes first
    pipeline.retire_session("c", 12)
    stats = stage.prompt_cache.stats()
    assert "b" not in stage.prompt_cache and "a" in stage.prompt_cache and "c" in stage.prompt_cache
    assert (stats.sessions, stats.tokens, stats.bytes) == (2, 22, retired_bytes(stage, 22))
    assert stats.bytes <= stats.budget and stats.hits == 1 and stats.evictions == 1
    assert set(stage.sessions) == {"a2"}  # retired sessions are not live ones


def test_a_session_larger_than_the_budget_is_not_kept(tiny_q8_path):
    pipeline = build(tiny_q8_path, n_ctx=N_CTX)
    stage = pipeline.stages[0]
    stage.prompt_cache.set_budget(retired_bytes(stage, 8))
    filled(pipeline, "a", 9)
    pipeline.retire_session("a", 9)
    assert "a" not in stage.prompt_cache and not stage.sessions
    assert stage.prompt_cache.stats().bytes == 0


def test_budget_zero_keeps_nothing(tiny_q8_path):
    pipeline = build(tiny_q8_path, n_ctx=N_CTX)  # LocalStage's default budget is 0
    filled(pipeline, "a", 9)
    pipeline.retire_session("a", 9)
    with pytest.raises(StageError, match="unknown here"):
        pipeline.copy_session("a", "b", 4)


def test_a_copy_of_a_retired_session_decodes_as_if_it_had_computed_the_prefix(tiny_q8_path):
    """The retired session keeps only the positions it was told are valid (a rejected draft
    past them is cut), and a session copied from it goes on bit for bit as a fresh one."""
    ids = prompt(40, seed=5)
    fresh = build(tiny_q8_path, splits=[1, 2], n_ctx=N_CTX)
    expected = fresh.forward([Segment("fresh", 0, len(ids))], ids)
    pipeline = build(tiny_q8_path, splits=[1, 2], n_ctx=N_CTX)
    for stage in pipeline.stages:
        stage.prompt_cache.set_budget(1 << 30)
    pipeline.forward([Segment("turn1", 0, 30)], ids[:30])
    pipeline.forward([Segment("turn1", 30, 3)], np.array([1, 2, 3]))  # a draft the caller rejected
    pipeline.retire_session("turn1", 30)
    assert all(stage.prompt_cache.stats().tokens == 30 for stage in pipeline.stages)
    with pytest.raises(StageError, match="cannot copy 31"):
        pipeline.stages[0].copy_session("turn1", "turn2", 31)
    pipeline.copy_session("turn1", "turn2", 30)
    hidden = pipeline.forward([Segment("turn2", 30, 10)], ids[30:])
    np.testing.assert_array_equal(hidden, expected[30:])
    pipeline.copy_session("turn1", "turn3", 30)  # the retired session is never written: copy it again
    np.testing.assert_array_equal(pipeline.forward([Segment("turn3", 30, 10)], ids[30:]), expected[30:])


def test_retire_refuses_positions_never_computed_and_ends_the_session(tiny_q8_path):
    pipeline = build(tiny_q8_path, n_ctx=N_CTX)
    stage = pipeline.stages[0]
    stage.prompt_cache.set_budget(1 << 30)
    filled(pipeline, "a", 5)
    with pytest.raises(StageError, match="cannot keep 6"):
        stage.retire_session("a", 6)
    assert "a" not in stage.sessions and "a" not in stage.prompt_cache
    stage.retire_session("unknown", 3)  # nothing to keep: as end_session
    filled(pipeline, "b", 5)
    stage.retire_session("b", 5)
    stage.end_session("b")  # ending a retired session drops it from the cache
    assert stage.prompt_cache.stats().sessions == 0


def test_shrink_makes_room_for_live_sessions_oldest_first(tiny_q8_path):
    pipeline = build(tiny_q8_path, n_ctx=N_CTX)
    stage = pipeline.stages[0]
    evicted = []
    stage.prompt_cache.set_budget(1 << 30)
    stage.prompt_cache.on_evict = evicted.append
    for name in "abc":
        filled(pipeline, name, 10)
        pipeline.retire_session(name, 10)
    assert stage.prompt_cache.shrink_to(retired_bytes(stage, 15)) == ["a", "b"]
    assert evicted == ["a", "b"] and stage.prompt_cache.stats().tokens == 10


# ---------------------------------------------------------------------------------------------
# On a node: EndSession with keep, the budget, and the memory cap


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 64), dtype=np.float32)


def test_a_node_keeps_a_retired_session_and_copies_from_it(tiny_q8_path, tmp_path):
    model = load_model(tiny_q8_path)
    local = LocalStage.load(model.file, model.config, LAYERS, NODE_CTX)
    with loaded_node(model, tmp_path, cache_budget=1 << 20) as (client, servicer):
        remote = RemoteStage(client, LAYERS, model.config.dim)
        try:
            batch = StageBatch((Segment("a", 0, 20),), rows(20))
            remote.forward(batch)
            local.forward(batch)
            remote.retire_session("a", 12)
            info = client.info()
            assert info.sessions == 0 and (info.prompt_cache.sessions, info.prompt_cache.tokens) == (1, 12)
            assert info.prompt_cache.bytes == KVCache.bytes_for(len(LAYERS), model.config.kv_dim, 12)
            assert info.prompt_cache.budget == 1 << 20
            remote.copy_session("a", "b", 12)
            local.copy_session("a", "b", 12)
            step = StageBatch((Segment("b", 12, 3),), rows(3, seed=1))
            np.testing.assert_array_equal(remote.forward(step), local.forward(step))
            assert client.info().prompt_cache.hits == 1
            with pytest.raises(grpc.RpcError) as caught:  # more than it computed: refused, and ended
                client.stub.EndSession(pb.EndSessionRequest(session_id="b", keep=30))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "caches 15 positions, cannot keep 30" in caught.value.details()
            assert client.info().prompt_cache.sessions == 1
        finally:
            remote.close()
        # the retired session belongs to the chain's stream: it ends with it
        wait_for(lambda: client.info().prompt_cache.sessions == 0, 5)


def test_a_node_evicts_retired_sessions_when_a_live_one_needs_room(tiny_q8_path, tmp_path):
    model = load_model(tiny_q8_path)
    weights = LocalStage.load(model.file, model.config, LAYERS, NODE_CTX).weight_bytes
    per_session = KVCache.bytes_for(len(LAYERS), model.config.kv_dim, NODE_CTX)
    limit = NODE_RUNTIME_BYTES + weights + 3 * per_session + per_session // 2
    with loaded_node(model, tmp_path, memory_limit=limit, cache_budget=1 << 30) as (client, servicer):
        remote = RemoteStage(client, LAYERS, model.config.dim)
        try:
            remote.forward(StageBatch((Segment("r", 0, NODE_CTX),), rows(NODE_CTX)))
            remote.retire_session("r", NODE_CTX)  # as much as a full live session
            assert client.info().prompt_cache.bytes == per_session
            for name in "ab":
                remote.forward(StageBatch((Segment(name, 0, 2),), rows(2)))
            assert client.info().prompt_cache.sessions == 1  # two live and one retired fit
            remote.forward(StageBatch((Segment("c", 0, 2),), rows(2)))  # a third live one does not
            info = client.info()
            assert info.sessions == 3 and info.prompt_cache.sessions == 0 and info.prompt_cache.evictions == 1
            assert servicer.owners.owner("r") is None
        finally:
            remote.close()



# ---------------------------------------------------------------------------------------------
# `caravan serve` on the real model, in one process and in front of two nodes

SYSTEM = ("You are a helpful assistant who answers questions about geography briefly and precisely, "
          "in one sentence, without lists.")
TURNS = ["What is the capital of France?", "And what is the capital of Italy?"]
BUDGET = 3 << 20  # the conversation's sessions fit; with an unrelated request's they do not
OTHER = [{"role": "user", "content": "Write two sentences about the history of the bicycle, from its invention "
                                     "in the nineteenth century to the racing bicycles of today."}]


def chat(server: Server, messages: list[dict]) -> str:
    status, body = server.post("/chat/completions", json.dumps(
        {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 24}).encode(), timeout=300)
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


def scrape(server: Server) -> dict[str, float]:
    with urllib.request.urlopen(server.base_url + "/metrics", timeout=60) as response:
        text = response.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if not line.startswith("#")}


def conversation(server: Server) -> tuple[list[str], list[int], list[list[dict]]]:
    """Each turn's answer, the prompt tokens each computed (through /metrics), and its messages."""
    messages, answers, computed = [{"role": "system", "content": SYSTEM}], [], []
    sent = []
    for turn in TURNS:
        messages = messages + [{"role": "user", "content": turn}]
        before = scrape(server)["caravan_prompt_tokens_total"]
        answers.append(chat(server, messages))
        computed.append(int(scrape(server)["caravan_prompt_tokens_total"] - before))
        sent.append(messages)
        messages = messages + [{"role": "assistant", "content": answers[-1]}]
    return answers, computed, sent


def check_second_turn_computes_only_its_new_tokens(smollm2, server: Server, computed: list[int], sent) -> dict:
    first, second = chat_ids(smollm2, sent[0]), chat_ids(smollm2, sent[1])
    assert computed[0] == len(first)
    # The first turn's session holds its prompt and its answer: the second turn's prompt
    # begins with both (the template closes the answer after it), and computes the rest.
    answer = smollm2.tokenizer.encode(sent[1][-2]["content"], special=False)
    expected = len(second) - common_prefix(first + answer, second, len(second) - 1)
    print(f"first turn: {len(first)} prompt tokens computed; second: {computed[1]} of {len(second)}")
    assert computed[1] == expected and expected < len(second) - len(first)
    metrics = scrape(server)
    assert metrics["caravan_prompt_cache_hits_total"] == 1
    assert metrics["caravan_prompt_tokens_cached_total"] == len(second) - computed[1]
    return metrics


@pytest.mark.slow
def test_second_turn_computes_only_new_tokens_in_one_process_and_output_is_unchanged(smollm2):
    off = Server("--cache-budget", "0")
    try:
        expected, computed_off, _ = conversation(off)
        assert "caravan_prompt_cache_hits_total" not in scrape(off)
    finally:
        off.stop()
    server = Server("--cache-budget", str(BUDGET))
    try:
        answers, computed, sent = conversation(server)
        assert answers == expected  # greedy, token for token
        assert computed[0] == computed_off[0] and computed[1] < computed_off[1]
        check_second_turn_computes_only_its_new_tokens(smollm2, server, computed, sent)
        chat(server, OTHER)  # its session does not fit beside the conversation's
        metrics = scrape(server)
        label = f'{{stage="local",layers="0-{smollm2.config.n_layers - 1}"}}'
        assert metrics[f"caravan_prompt_cache_budget_bytes{label}"] == BUDGET
        assert 0 < metrics[f"caravan_prompt_cache_bytes{label}"] <= BUDGET
        assert metrics[f"caravan_prompt_cache_evictions_total{label}"] >= 1
        assert metrics[f"caravan_prompt_cache_stage_hits_total{label}"] == 1
    finally:
        server.stop()


@pytest.mark.slow
def test_second_turn_computes_only_new_tokens_in_front_of_two_nodes(smollm2, tmp_path):
    nodes = [NodeProcess(tmp_path / f"node{i}") for i in range(2)]
    addresses = ",".join(node.address for node in nodes)
    try:
        off = Server("--nodes", addresses, "--cache-budget", "0")
        try:
            expected, _, _ = conversation(off)
        finally:
            off.stop()
        server = Server("--nodes", addresses)
        try:
            answers, computed, sent = conversation(server)
            assert answers == expected
            metrics = check_second_turn_computes_only_its_new_tokens(smollm2, server, computed, sent)
            hits = [v for k, v in metrics.items() if k.startswith("caravan_prompt_cache_stage_hits_total{")]
            assert hits == [1, 1]  # each node copied the cached session once
        finally:
            server.stop()
    finally:
        for node in nodes:
            node.stop()


@pytest.mark.slow
def test_failover_drops_cached_sessions_and_the_next_turn_is_unchanged(smollm2, tmp_path, caplog):
    """A node dies between two turns: the chain's other nodes drop its sessions, cached ones
    included, so the second turn's copy is refused (a miss) and it computes its whole prompt,
    the same tokens as in one process; the re-plan drops the other cached sessions."""
    first = chat_ids(smollm2, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[0]}])
    other = chat_ids(smollm2, OTHER)
    local = smollm2.local_pipeline(512)
    answer = list(Generation(local, first, greedy(), 12, stop_ids=frozenset()))
    second = first + answer + smollm2.tokenizer.encode(" And Italy?", special=False)
    expected = list(Generation(local, second, greedy(), 12, stop_ids=frozenset()))
    nodes = [NodeProcess(tmp_path / f"node{i}") for i in range(3)]
    pipeline = ClusterPipeline(smollm2, lambda: [n.address for n in nodes], 512, tmp_path, progress=False,
                               token=cluster_token())
    scheduler = Scheduler(pipeline, prompt_cache=True)
    try:
        assert run_one(scheduler, first)[0] == answer
        kept = run_one(scheduler, other)[1]
        assert len(scheduler.prompt_cache) == 2 and kept in pipeline.replay.retired
        nodes[1].kill()
        tokens, last = run_one(scheduler, second)
        assert tokens == expected
        assert len(pipeline.recoveries) == 1 and pipeline.replay.retired == {last}  # only the turn after the re-plan
        assert (scheduler.prompt_cache.hits, scheduler.prompt_cache.misses) == (0, 3)
        assert scheduler.prompt_tokens_computed == len(first) + len(other) + len(second)
        # the other request's at least (the first turn's too when the copy met the dead node first)
        assert re.search(r"re-plan: dropped [12] cached sessions", caplog.text) and kept not in pipeline.replay.history
    finally:
        scheduler.close()
        pipeline.close()
        for node in nodes:
            node.stop()


def run_one(scheduler: Scheduler, prompt_ids: list[int]) -> tuple[list[int], str]:
    """A greedy request of 12 tokens through the scheduler: its tokens and its session id."""
    tokens, done = [], threading.Event()

    def on_event(event):
        if event.kind == "token":
            tokens.append(event.token)
        else:
            assert event.kind == "done", event.message
            done.set()

    request = scheduler.submit(Request(prompt_ids, greedy(), 12, frozenset(), on_event))
    assert done.wait(300)
    return tokens, request.session_id


def test_cache_budget_flags_take_sizes_and_zero(capsys):
    from caravan.coordinator.cli import build_parser as serve_parser
    from caravan.node.cli import build_parser as node_parser

    assert serve_parser().parse_args(["serve", "--cache-budget", "0"]).cache_budget == 0
    assert serve_parser().parse_args(["serve", "--cache-budget", "512M"]).cache_budget == 512 << 20
    assert serve_parser().parse_args(["serve"]).cache_budget is None  # a share of the free memory
    assert node_parser().parse_args(["--cache-budget", "2G"]).cache_budget == 2 << 30
    assert node_parser().parse_args(["--cache-budget", "0"]).cache_budget == 0
    for parser, args in ((serve_parser(), ["serve", "--cache-budget", "lots"]), (node_parser(), ["--cache-budget", "-1"])):
        with pytest.raises(SystemExit):
            parser.parse_args(args)
        assert "--cache-budget" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The scheduler over LocalStages of a tiny model


def scheduled(pipeline, prompt_ids, stop_ids=frozenset(), max_tokens=6, prompt_cache=True) -> tuple[list[int], Scheduler]:
    scheduler = Scheduler(pipeline, prompt_cache=prompt_cache)
    try:
        request = Request(list(prompt_ids), greedy(), max_tokens, frozenset(stop_ids), lambda event: None)
        done = threading.Event()
        request.on_event = lambda event: done.set() if event.kind != "token" else None
        scheduler.submit(request)
        assert done.wait(120)
        return request.tokens, scheduler
    finally:
        scheduler.close()


def test_scheduler_keeps_exactly_the_tokens_fed_and_the_next_turn_computes_only_the_rest(tiny_q8_path):
    reference = build(tiny_q8_path, splits=[1, 2])
    first = [int(t) for t in prompt(30, seed=7)]
    answer, _ = scheduled(reference, first, prompt_cache=False)
    second = first + answer + [int(t) for t in prompt(9, seed=8)]
    expected, _ = scheduled(reference, second, prompt_cache=False)

    pipeline = build(tiny_q8_path, splits=[1, 2])
    for stage in pipeline.stages:
        stage.prompt_cache.set_budget(1 << 30)
    scheduler = Scheduler(pipeline, prompt_cache=True)
    try:
        for prompt_ids, tokens in ((first, answer), (second, expected)):
            request = Request(list(prompt_ids), greedy(), 6, frozenset(), lambda event: None)
            done = threading.Event()
            request.on_event = lambda event, done=done: done.set() if event.kind != "token" else None
            before = scheduler.prompt_tokens_computed
            scheduler.submit(request)
            assert done.wait(120)
            assert request.tokens == tokens  # greedy, token for token as without the cache
        # finish "length": the last token sampled was never fed back
        assert scheduler.prompt_tokens_computed - before == len(second) - len(first) - len(answer) + 1
        assert all(stage.prompt_cache.stats().tokens == len(second) + len(expected) - 1 for stage in pipeline.stages)
        assert (scheduler.prompt_cache.hits, scheduler.prompt_cache.misses) == (1, 1)
        assert len(scheduler.prompt_cache) == 1  # the second turn's session holds all the first's did
    finally:
        scheduler.close()


def test_a_request_stopped_by_its_stop_token_keeps_every_token_it_fed(tiny_q8_path):
    pipeline = build(tiny_q8_path)
    pipeline.stages[0].prompt_cache.set_budget(1 << 30)
    first = [int(t) for t in prompt(20, seed=6)]  # greedy: 36, 36, then 142 on and on
    free_run, _ = scheduled(pipeline, first, max_tokens=12, prompt_cache=False)
    k = max((i for i, token in enumerate(free_run) if token not in free_run[:i]), default=0)  # the last new token
    tokens, _ = scheduled(pipeline, first, stop_ids={free_run[k]}, max_tokens=12)
    assert k > 0 and tokens == free_run[:k]
    assert pipeline.stages[0].prompt_cache.stats().tokens == len(first) + k  # all k were fed back
