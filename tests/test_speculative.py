"""Speculative decoding (pipeline/speculative.py): a draft's rows checked in one pass give
exactly the tokens decoding gives, greedy or sampled, with any drafter."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from caravan.coordinator.failover import ClusterPipeline
from caravan.coordinator.metrics import prometheus_text
from caravan.coordinator.scheduler import Event, Request, Scheduler
from caravan.pipeline.generate import Generation
from caravan.pipeline.sampler import Sampler, SamplingParams
from caravan.pipeline.sequence import SequenceState
from caravan.pipeline.speculative import PAUSE_MAX, PromptLookup, lookup
from caravan.pipeline.stage import Segment
from support.nodes import cluster_token
from support.speculation import copy_prompt, three_nodes  # noqa: F401  (three_nodes: a fixture)
from support.stages import build, greedy, prompt

N_TOKENS = 32


class Scripted:
    """A drafter that knows the text to come (`script`, the tokens after the prompt) and, pass
    by pass (`plan`), proposes `k` of them "right", or with the first ("wrong") or the third
    ("partial") token wrong."""

    def __init__(self, prompt_len: int, script: list[int], plan: list[str], k: int = 4, vocab: int = 299):
        self.prompt_len, self.script, self.plan, self.k, self.vocab = prompt_len, script, list(plan), k, vocab
        self.updates: list[tuple[int, int]] = []

    def propose(self, history, limit):
        if not self.plan:
            return []
        done = len(history) - self.prompt_len
        guess = self.script[done : done + min(self.k, limit)]
        step = self.plan.pop(0)
        if step == "wrong" and guess:
            guess[0] = (guess[0] + 1) % self.vocab
        if step == "partial" and len(guess) > 2:
            guess[2] = (guess[2] + 1) % self.vocab
        return guess

    def update(self, proposed, accepted):
        self.updates.append((proposed, accepted))

    def end(self):
        pass


class Recording:
    """A stage that keeps each batch's segments and its session lengths after the batch."""

    def __init__(self, stage):
        self.stage, self.layers, self.depth, self.holds_head = stage, stage.layers, stage.depth, stage.holds_head
        self.passes: list[tuple[Segment, int]] = []

    def forward(self, batch):
        out = self.stage.forward(batch)
        for seg in batch.segments:
            self.passes.append((seg, self.stage.sessions[seg.session_id].length))
        return out

    def submit(self, batch):
        out = self.forward(batch)
        return lambda: out

    def end_session(self, session_id):
        self.stage.end_session(session_id)


def test_lookup_proposes_what_followed_the_longest_matching_tail():
    history = [1, 2, 3, 9, 9, 5, 2, 3, 7, 1, 2, 3]
    assert lookup(history, 2) == [9, 9]  # "1 2 3" matched at the start
    assert lookup([4, 2, 3, 8, 6, 6, 2, 3], 3) == [8, 6, 6]  # only "2 3" matches
    assert lookup([4, 2, 3, 8, 6, 6, 3], 3) == []  # a single token is too weak a match
    assert lookup([4, 2, 3, 8, 6, 6, 3], 3, ngram_min=1) == [8, 6, 6]
    assert lookup([1, 2, 3], 4) == []
    assert lookup([7, 7, 7, 7, 7], 3) == [7, 7]  # in a run, the occurrence with the most after it


def test_prompt_lookup_pauses_after_misses_and_grows_after_hits():
    drafter = PromptLookup(draft_max=8)
    history = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2]
    assert drafter.propose(history, 100) == [3, 4, 5, 6, 7, 8, 9, 10]
    drafter.update(8, 2)
    assert drafter.length == 3 and drafter.propose(history, 100) == [3, 4, 5]
    pauses = []
    for _ in range(6):
        drafter.update(3, 0)
        pauses.append(drafter.pause)
        drafter.pause = 0
    assert pauses == [1, 3, 7, 15, PAUSE_MAX, PAUSE_MAX]
    drafter.update(1, 1)
    assert (drafter.misses, drafter.pause, drafter.length) == (0, 0, 2)
    assert drafter.propose(history, 1) == [3]  # never past the limit


def verification_vs_steps(pipeline, ids: list[int], draft: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The logits of one 1 + k row pass (the prompt's last token and a draft) and of the same
    tokens run one row a step, each on its own session after the same prefill."""
    head, start = pipeline.head, len(ids) - 1
    rows = [ids[-1], *draft]
    pipeline.prefill("pass", ids[:-1])
    one_pass = head.logits(pipeline.forward([Segment("pass", start, len(rows))], np.array(rows)))
    pipeline.prefill("steps", ids[:-1])
    steps = [head.logits(pipeline.forward([Segment("steps", start + i, 1)], np.array([token])))[0]
             for i, token in enumerate(rows)]
    pipeline.end_session("pass")
    pipeline.end_session("steps")
    return one_pass, np.stack(steps)


def test_a_verification_pass_gives_the_bits_of_single_steps(tiny_path):
    """Row independence for a k + 1 row segment, on every weight type and across a split."""
    ids, draft = list(prompt(11, seed=4)), list(prompt(6, seed=5))
    for splits in (None, [1, 2]):
        one_pass, steps = verification_vs_steps(build(tiny_path, splits), ids, draft)
        np.testing.assert_array_equal(one_pass, steps)


@pytest.mark.model
def test_a_verification_pass_gives_the_bits_of_single_steps_smollm2(smollm2):
    ids = smollm2.tokenizer.encode("The caravan crossed the desert in seven days and")
    draft = smollm2.tokenizer.encode(" rested at the well of", add_bos=False)
    one_pass, steps = verification_vs_steps(smollm2.local_pipeline(256), ids, draft)
    np.testing.assert_array_equal(one_pass, steps)


def test_drafts_rejected_first_or_kept_whole_give_the_greedy_text(tiny_q8_path):
    """A draft wrong at its first token, one kept whole, and a mix: the text is the greedy one,
    each pass starts at the accepted length, and the stage caches start + rows after it."""
    ids = list(prompt(13, seed=6))
    alone = list(Generation(build(tiny_q8_path), ids, greedy(), N_TOKENS, frozenset()))
    plan = ["wrong", "right", "wrong", "right", "right", "wrong", "right"]
    drafter = Scripted(len(ids), alone, plan)
    pipeline = build(tiny_q8_path)
    pipeline.stages = [Recording(stage) for stage in pipeline.stages]
    generation = Generation(pipeline, ids, greedy(), N_TOKENS, frozenset(), drafter=drafter)
    assert list(generation) == alone
    assert drafter.updates[:3] == [(4, 0), (4, 4), (4, 0)]
    passes = pipeline.stages[0].passes[1:]  # after the prefill
    kept = len(ids) + 1  # the prompt and the token its last row gave
    for (seg, length), (proposed, accepted) in zip(passes, drafter.updates):
        assert seg.start == kept - 1 and seg.length == 1 + proposed
        assert length == seg.start + seg.length  # the rejected rows' positions are past the accepted length
        kept += accepted + 1
    assert generation.timings.decode_passes == len(passes)


def test_prompt_lookup_gives_the_greedy_text_split_or_not(tiny_q8_path):
    ids = list(prompt(24, seed=7))
    ids = ids + ids[:20]  # a passage the draft can copy
    alone = list(Generation(build(tiny_q8_path), ids, greedy(), N_TOKENS, frozenset()))
    for splits in (None, [2, 1]):
        generation = Generation(build(tiny_q8_path, splits), ids, greedy(), N_TOKENS, frozenset(),
                                drafter=PromptLookup(draft_max=5))
        assert list(generation) == alone
        assert generation.sequence.drafted > 0
        assert generation.timings.passes.most_in_flight == 1  # LocalStages: one pass at a time


def test_sampled_text_is_the_same_with_a_draft(tiny_q8_path):
    """At temperature > 0 a seed gives the same text with a draft or without: each kept token
    costs the sampler one draw, from the same distribution."""
    ids = list(prompt(16, seed=8))
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.1, seed=42)
    alone = list(Generation(build(tiny_q8_path), ids, Sampler(params), N_TOKENS, frozenset()))
    drafter = Scripted(len(ids), alone, ["right", "wrong"] * 8, k=3)
    generation = Generation(build(tiny_q8_path), ids, Sampler(params), N_TOKENS, frozenset(), drafter=drafter)
    assert list(generation) == alone


def chi_square_critical(df: int, z: float = 3.719) -> float:
    """The chi-square quantile at 1 - 1e-4 (z, the normal's), by Wilson and Hilferty (1931)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_tokens_kept_from_a_pass_follow_the_targets_distribution(tiny_q8_path):
    """The acceptance rule keeps the target's distribution: over many passes of [last, d1]
    (d1 the most likely token), the first kept token follows p0, and after d1 the second
    follows p1. Counted against Sampler.distribution with a chi-square test (fixed seed, fixed
    draws: it cannot flake)."""
    pipeline = build(tiny_q8_path)
    ids = list(prompt(10, seed=9))
    params = SamplingParams(temperature=1.5, top_k=6, top_p=1.0, min_p=0.0, seed=1)
    sampler = Sampler(params)
    pipeline.prefill("chi", ids[:-1])
    p0_logits = pipeline.head.logits(pipeline.forward([Segment("chi", len(ids) - 1, 1)], np.array(ids[-1:])))[0]
    d1 = int(np.argmax(p0_logits))
    logits = pipeline.head.logits(pipeline.forward([Segment("chi", len(ids) - 1, 2)], np.array([ids[-1], d1])))
    p0 = sampler.distribution(logits[0], ids)
    p1 = sampler.distribution(logits[1], ids + [d1])
    expected = {(t,): p0[t] for t in np.flatnonzero(p0) if t != d1}
    expected.update({(d1, t): p0[d1] * p1[t] for t in np.flatnonzero(p1)})
    draws = 6000
    counts = dict.fromkeys(expected, 0)
    for _ in range(draws):
        sequence = SequenceState(ids, sampler, 2, frozenset())
        counts[tuple(sequence.advance(logits, 256, [d1]))] += 1
    statistic = sum((counts[c] - draws * p) ** 2 / (draws * p) for c, p in expected.items())
    assert 0 < p0[d1] < 1 and sum(counts[c] for c in counts if len(c) == 2) > draws // 10
    assert statistic < chi_square_critical(len(expected) - 1), (statistic, counts)


class Counting(PromptLookup):
    """Prompt lookup that keeps each pass's (proposed, accepted)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.updates: list[tuple[int, int]] = []

    def update(self, proposed, accepted):
        self.updates.append((proposed, accepted))
        super().update(proposed, accepted)


@pytest.mark.model
def test_prompt_lookup_gives_smollm2s_greedy_text(smollm2):
    """On a copied paragraph prompt lookup's drafts are kept whole, and a scripted draft wrong
    at its first token is rejected; the text is the greedy one either way."""
    pipeline, ids = smollm2.local_pipeline(512), copy_prompt(smollm2)
    alone = list(Generation(pipeline, ids, greedy(), 48, smollm2.tokenizer.eog_ids))
    drafter = Counting(draft_max=6)
    assert list(Generation(pipeline, ids, greedy(), 48, smollm2.tokenizer.eog_ids, drafter=drafter)) == alone
    assert any(accepted == proposed > 1 for proposed, accepted in drafter.updates)
    scripted = Scripted(len(ids), alone, ["wrong", "right"] * 4, vocab=smollm2.config.vocab_size)
    assert list(Generation(pipeline, ids, greedy(), 48, smollm2.tokenizer.eog_ids, drafter=scripted)) == alone
    assert scripted.updates[:2] == [(4, 0), (4, 4)]



def serve_all(pipeline, requests: list[Request], draft_max: int) -> tuple[list[list[Event]], Scheduler]:
    """Each request's events (its followers' after it), from one scheduler that speculates with
    `draft_max` (0: off), all submitted together."""
    scheduler = Scheduler(pipeline, draft_max=draft_max)
    sequences = [s for request in requests for s in (request, *request.followers)]
    events: list[list[Event]] = [[] for _ in sequences]
    done = threading.Semaphore(0)
    for sequence, got in zip(sequences, events):
        sequence.on_event = lambda e, got=got: (got.append(e), done.release() if e.kind != "token" else None)
    try:
        for request in requests:
            scheduler.submit(request)
        for _ in sequences:
            assert done.acquire(timeout=120)
    finally:
        scheduler.close()
    return events, scheduler


def copying_requests(top_logprobs: int = -1) -> list[Request]:
    """Greedy requests whose prompts repeat a passage (prompt lookup drafts from it), one with a
    follower (n = 2), one with logprobs."""
    requests = []
    for i in range(3):
        passage = list(prompt(14 + i, seed=20 + i))
        requests.append(Request(passage + passage[:10], greedy(), 20, frozenset(), None,
                                top_logprobs=top_logprobs if i == 1 else -1))
    requests[0].followers = [Request(requests[0].prompt_ids, greedy(), 20, frozenset(), None)]
    return requests


def test_the_scheduler_speculates_for_many_sequences_and_changes_no_token(tiny_q8_path):
    """Several sequences' drafts share steps; their tokens, a follower's and the logprobs are
    those of the scheduler without drafts."""
    plain, _ = serve_all(build(tiny_q8_path), copying_requests(top_logprobs=3), draft_max=0)
    fast, scheduler = serve_all(build(tiny_q8_path), copying_requests(top_logprobs=3), draft_max=4)
    assert fast == plain
    assert scheduler.draft_tokens_accepted > 0 and scheduler.tokens_generated > scheduler.sequence_passes
    assert all(e.top for e in fast[2] if e.kind == "token")
    metrics = dict(line.split() for line in prometheus_text(scheduler, []).splitlines() if not line.startswith("#"))
    assert float(metrics["caravan_tokens_per_pass"]) > 1
    assert int(metrics["caravan_draft_tokens_accepted_total"]) == scheduler.draft_tokens_accepted > 0


@pytest.mark.model
@pytest.mark.slow
def test_speculation_through_three_nodes_and_a_node_killed_mid_speculation(smollm2, three_nodes, tmp_path):
    """Through 3 real node processes prompt lookup and a draft rejected at its first token give
    one process's greedy text; a node killed after a pass that rejected part of its draft (its
    rows past the accepted length are in every stage's cache) changes nothing either: the
    coordinator refills the caches from the tokens it sent and the next pass starts at the
    accepted length."""
    ids = copy_prompt(smollm2)
    eog = smollm2.tokenizer.eog_ids
    alone = list(Generation(smollm2.local_pipeline(512), ids, greedy(), 40, eog))
    addresses = [node.address for node in three_nodes]
    pipeline = ClusterPipeline(smollm2, lambda: list(addresses), 512, tmp_path, progress=False,
                               forward_timeout_s=10.0, token=cluster_token())
    try:
        assert len(pipeline.plan.assignments) == 3
        lookup_drafter = Counting(draft_max=6)
        assert list(Generation(pipeline, ids, greedy(), 40, eog, drafter=lookup_drafter)) == alone
        assert any(accepted == proposed > 1 for proposed, accepted in lookup_drafter.updates)
        scripted = Scripted(len(ids), alone, ["wrong", "right", "partial"] * 6, vocab=smollm2.config.vocab_size)
        tokens = []  # one pass in flight at a time: the script is pass by pass (passes sent ahead: test_pipelined_speculation)
        for token in Generation(pipeline, ids, greedy(), 40, eog, drafter=scripted, in_flight=1):
            tokens.append(token)
            if len(scripted.updates) == 3 and not pipeline.recoveries and three_nodes[1].proc.poll() is None:
                three_nodes[1].kill()  # right after the pass that kept 2 of its 4 draft tokens
        assert tokens == alone
        assert scripted.updates[:3] == [(4, 0), (4, 4), (4, 2)]
        assert len(pipeline.recoveries) == 1 and three_nodes[1].address in pipeline.recoveries[0]
    finally:
        pipeline.close()
