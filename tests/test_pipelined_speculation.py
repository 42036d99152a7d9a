"""Several verification batches of one sequence in flight (pipeline/pipelined_speculation.py):
batches sent on the assumption that the one before is kept whole give exactly the greedy text,
whether that assumption holds, fails on a draft cut short, or on a wrong guess of the bonus
token; in one process and through three real nodes, also when a node dies mid-stream."""

from __future__ import annotations

import json
import threading
import urllib.request

import numpy as np
import pytest

from caravan.coordinator.failover import ClusterPipeline
from caravan.coordinator.scheduler import Event, Request, Scheduler
from caravan.pipeline.generate import Generation
from caravan.pipeline.pipelined_speculation import PipelinedSpeculation
from caravan.pipeline.sampler import Sampler, SamplingParams
from caravan.pipeline.sequence import SequenceState
from caravan.pipeline.stage import Segment
from support.nodes import cluster_token
from support.serve import Server
from support.stages import build, greedy, prompt
from support.speculation import copy_prompt, three_nodes  # noqa: F401  (three_nodes: a fixture)

N_TOKENS = 40


class Guessing:
    """A drafter that knows the text to come (`script`, the tokens after the prompt) and proposes
    `k` tokens of it after whatever history it is given (so its guess of a bonus token is right),
    except, the first time it is asked at one of these positions (tokens after the prompt): at a
    `cut` position its third token is wrong (a batch sent ahead keeps one draft token), at a
    `miss` position its first token is wrong (as the first row of a batch sent ahead: a wrong
    guess of the bonus token)."""

    def __init__(self, prompt_len: int, script: list[int], k: int = 3, cut=(), miss=(), vocab: int = 299):
        self.prompt_len, self.script, self.k, self.vocab = prompt_len, script, k, vocab
        self.cut, self.miss = set(cut), set(miss)
        self.updates: list[tuple[int, int]] = []

    def propose(self, history, limit):
        done = len(history) - self.prompt_len
        guess = self.script[done : done + min(self.k, limit)]
        if done in self.cut and len(guess) > 2:
            self.cut.discard(done)
            guess[2] = (guess[2] + 1) % self.vocab
        if done in self.miss and guess:
            self.miss.discard(done)
            guess[0] = (guess[0] + 1) % self.vocab
        return guess

    def update(self, proposed, accepted):
        self.updates.append((proposed, accepted))

    def end(self):
        pass


def decode(pipeline, ids, drafter, in_flight: int, max_tokens: int = N_TOKENS, stop=frozenset()):
    """Generation's loop without ending the session: (the sequence, its passes), closed."""
    sequence = SequenceState(ids, greedy(), max_tokens, stop, drafter=drafter)
    hidden = pipeline.prefill(sequence.session_id, ids)
    sequence.prefilled = len(ids)
    sequence.advance(pipeline.head.logits(hidden), pipeline.n_ctx)
    passes = PipelinedSpeculation(pipeline, sequence, in_flight)
    try:
        while not sequence.finished:
            passes.step()
    finally:
        passes.close()
    return sequence, passes


# Drafter faults by position: all guesses right, drafts cut short, bonus guesses wrong. With
# drafts of 3 a batch sent ahead starts every 3 positions from 4; after a cut at c the next
# starts at c + 6, after a miss at m at m + 4: each fault below falls on one.
SCRIPTS = {
    "kept": {},
    "cut": {"cut": (4, 16, 28)},
    "miss": {"miss": (4, 14, 24)},
    "mixed": {"cut": (4, 23), "miss": (13,)},
}


def seeded() -> Sampler:
    """Sampling at temperature 1 with a seed: the tiny model's greedy text repeats one token."""
    return Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42))


@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize("sampler", [greedy, seeded])
def test_batches_sent_ahead_give_the_text_of_decoding(tiny_q8_path, script, sampler):
    """Three batches in flight (a LocalStage computes each when sent, so every assumption is
    acted on): the text is that of decoding without drafts (greedy, or sampled with a seed:
    only checked rows draw from the sampler), and the counts show which assumption failed."""
    ids = list(prompt(13, seed=6))
    alone = list(Generation(build(tiny_q8_path), ids, sampler(), N_TOKENS, frozenset()))
    drafter = Guessing(len(ids), alone, **SCRIPTS[script])
    generation = Generation(build(tiny_q8_path), ids, sampler(), N_TOKENS, frozenset(), drafter=drafter, in_flight=3)
    assert list(generation) == alone
    counts = generation.timings.passes
    assert counts.most_in_flight == 3 and counts.kept_ahead > 0
    assert (counts.cut > 0) == ("cut" in SCRIPTS[script]) and (counts.missed_guess > 0) == ("miss" in SCRIPTS[script])
    assert (counts.cancelled > 0) == bool(SCRIPTS[script])
    assert generation.timings.decode_passes == counts.sent - counts.cancelled < len(alone) // 2


def test_the_caches_hold_the_accepted_tokens_after_cancelled_batches(tiny_q8_path):
    """After batches were cancelled, each stage's cache holds, below the accepted length, the
    keys and values a run without drafts leaves, bit for bit: the next pass attends to nothing
    else (it overwrites from the accepted length on)."""
    ids = list(prompt(13, seed=6))
    plain_pipeline, fast_pipeline = build(tiny_q8_path, [2, 1]), build(tiny_q8_path, [2, 1])
    plain, _ = decode(plain_pipeline, ids, None, 1)
    script = plain.tokens + [0] * 8  # the drafts may run past the text's end
    fast, passes = decode(fast_pipeline, ids, Guessing(len(ids), script, cut=(4, 19), miss=(10, 28)), 3)
    assert fast.tokens == plain.tokens and passes.counts.cancelled > 0
    length = fast.accepted_length
    for plain_stage, fast_stage in zip(plain_pipeline.stages, fast_pipeline.stages):
        want, got = plain_stage.sessions[plain.session_id], fast_stage.sessions[fast.session_id]
        assert want.length == length <= got.length
        np.testing.assert_array_equal(got.k[..., :length], want.k[..., :length])
        np.testing.assert_array_equal(got.v[:, :, :length], want.v[:, :, :length])


def next_logits(pipeline, sequence) -> np.ndarray:
    """The logits of the sequence's next pass without a draft: its last token at the accepted
    length, attending to every position before it."""
    segment = Segment(sequence.session_id, sequence.accepted_length, 1)
    return pipeline.head.logits(pipeline.forward([segment], np.array(sequence.history[-1:])))


@pytest.mark.model
@pytest.mark.slow
def test_batches_in_flight_through_three_nodes_and_a_node_killed(smollm2, three_nodes, tmp_path):
    """Through 3 real node processes, with up to 3 batches in flight: every drafter script
    gives one process's greedy text, batches were in flight together, the caches of every node
    hold the accepted tokens after the stream; so does serve's scheduler with prompt lookup;
    then a node killed while batches are in flight changes nothing either."""
    ids, eog = copy_prompt(smollm2), smollm2.tokenizer.eog_ids
    local = smollm2.local_pipeline(512)
    plain, _ = decode(local, ids, None, 1, 40, eog)
    plain_next = next_logits(local, plain)
    vocab = smollm2.config.vocab_size
    addresses = [node.address for node in three_nodes]
    pipeline = ClusterPipeline(smollm2, lambda: list(addresses), 512, tmp_path, progress=False,
                               forward_timeout_s=10.0, token=cluster_token())
    try:
        assert pipeline.prefill_depth == 3
        for faults in SCRIPTS.values():
            drafter = Guessing(len(ids), plain.tokens + [0] * 8, vocab=vocab, **faults)
            fast, passes = decode(pipeline, ids, drafter, pipeline.prefill_depth, 40, eog)
            assert fast.tokens == plain.tokens, faults
            assert passes.counts.most_in_flight == 3 and passes.counts.kept_ahead > 0
            assert (passes.counts.cut > 0) == ("cut" in faults) and (passes.counts.missed_guess > 0) == ("miss" in faults)
            np.testing.assert_array_equal(next_logits(pipeline, fast), plain_next)
            pipeline.end_session(fast.session_id)
        scheduler = Scheduler(pipeline, draft_max=6)
        got, done = [], threading.Event()
        request = Request(ids, greedy(), 40, eog, lambda e: (got.append(e), e.kind != "token" and done.set()))
        try:
            scheduler.submit(request)
            assert done.wait(120)
        finally:
            scheduler.close()
        assert [e.token for e in got if e.kind == "token"] == plain.tokens and scheduler.passes_kept_ahead > 0
        drafter = Guessing(len(ids), plain.tokens + [0] * 8, vocab=vocab, **SCRIPTS["mixed"])
        generation = Generation(pipeline, ids, greedy(), 40, eog, drafter=drafter)
        tokens = []
        for token in generation:
            tokens.append(token)
            if len(tokens) >= 8 and three_nodes[1].proc.poll() is None:
                three_nodes[1].kill()
        assert tokens == plain.tokens
        assert generation.timings.passes.rerun == 1 and generation.timings.passes.cancelled > 0
        assert len(pipeline.recoveries) == 1 and three_nodes[1].address in pipeline.recoveries[0]
    finally:
        pipeline.close()


def serve_lone_then_joined(path, draft_max: int) -> tuple[list[Event], list[Event], Scheduler]:
    """A request alone in the scheduler's lane, joined by a second one after its sixth token;
    both requests' events."""
    scheduler = Scheduler(build(path), draft_max=draft_max, in_flight=3)  # as in front of 3 nodes
    passage = list(prompt(14, seed=21))
    first = Request(passage + passage[:10], seeded(), 30, frozenset(), None, top_logprobs=2)
    second = Request(list(prompt(9, seed=22)), seeded(), 12, frozenset(), None)
    events: tuple[list[Event], list[Event]] = ([], [])
    done = threading.Semaphore(0)

    def on_first(event: Event) -> None:
        events[0].append(event)
        if len(events[0]) == 6:
            scheduler.submit(second)  # from the scheduler's thread: it joins at the next step
        if event.kind != "token":
            done.release()

    first.on_event = on_first
    second.on_event = lambda e: (events[1].append(e), done.release() if e.kind != "token" else None)
    try:
        scheduler.submit(first)
        assert done.acquire(timeout=120) and done.acquire(timeout=120)
    finally:
        scheduler.close()
    return events[0], events[1], scheduler


def test_the_scheduler_keeps_a_lone_requests_passes_in_flight(tiny_q8_path):
    """serve: a request alone in its lane sends passes ahead; once another joins, the passes
    land and the two share steps. Tokens and logprobs are those without drafts."""
    plain_first, plain_second, _ = serve_lone_then_joined(tiny_q8_path, draft_max=0)
    first, second, scheduler = serve_lone_then_joined(tiny_q8_path, draft_max=4)
    assert (first, second) == (plain_first, plain_second)
    assert first[-1].finish_reason == "length" and all(e.top for e in first[:-1])
    assert scheduler.passes_kept_ahead > 0 and scheduler.tokens_generated > scheduler.sequence_passes
    assert all(lane.passes is None for lane in scheduler.lanes)


@pytest.mark.slow
def test_serve_counts_passes_sent_ahead_in_its_metrics(tiny_q8_path):
    """A real `caravan serve` with passes in flight (as in front of 3 nodes): /metrics counts the
    passes sent ahead and kept, and the passes whose tokens give tokens per pass, as counters."""
    server = Server("--model", str(tiny_q8_path), "--drafts-in-flight", "3", "--draft-max", "4", ctx=256)
    try:
        body = {"model": tiny_q8_path.stem, "prompt": "abc abd abe abc abd abe abc", "max_tokens": 60, "temperature": 0}
        status, answer = server.post("/completions", json.dumps(body).encode(), timeout=120)
        assert status == 200, answer
        with urllib.request.urlopen(server.base_url + "/metrics", timeout=60) as response:
            text = response.read().decode()
    finally:
        server.stop()
    metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
    for name in ("caravan_sequence_passes_total", "caravan_passes_sent_ahead_total", "caravan_passes_kept_ahead_total"):
        assert f"# TYPE {name} counter" in text
    assert 0 < metrics["caravan_passes_kept_ahead_total"] <= metrics["caravan_passes_sent_ahead_total"]
    generated, passes = metrics["caravan_generated_tokens_total"], metrics["caravan_sequence_passes_total"]
    assert generated == answer["usage"]["completion_tokens"] and 0 < passes < generated
    assert abs(metrics["caravan_tokens_per_pass"] - generated / passes) < 1e-3
