"""Speculative decoding (pipeline/speculative.py): a draft's rows checked in one pass give
exactly the tokens decoding gives, greedy or sampled, with any drafter."""

from __future__ import annotations

import concurrent.futures
import json
import math
import threading
import urllib.request

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from caravan.coordinator.failover import ClusterPipeline
from caravan.coordinator.metrics import prometheus_text
from caravan.coordinator.scheduler import Event, Request, Scheduler
from caravan.pipeline.draft_model import DraftModel
from caravan.pipeline.generate import Generation
from caravan.pipeline.loader import load_model
from caravan.pipeline.sampler import Sampler, SamplingParams
from caravan.pipeline.sequence import SequenceState
from caravan.pipeline.speculative import (DRAFT_MAX, LONG_MATCH, PAUSE_MAX, PromptLookup, SampledDraft, draft_length,
                                          find_match, lookup)
from caravan.pipeline.stage import Segment
from support.nodes import cluster_token
from support.serve import Server
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


def test_lookup_follows_the_occurrence_that_agrees_longest_not_the_latest():
    """Two earlier occurrences of the tail's last 3 tokens: the one whose tokens before them agree
    with the history's too is the passage being copied, though another came later."""
    a, b = [40, 41, 42, 43], [50, 51]
    history = [*a, 1, 2, 3, 4, 60, 61, *b, 9, 2, 3, 4, 70, 71, *a, 1, 2, 3, 4]
    assert find_match(history, 2) == (8, 8)  # agrees over [*a, 1, 2, 3, 4], all 8 tokens
    assert lookup(history, 2) == [60, 61]
    assert lookup([5, 6, 2, 3, 8, 2, 3], 2) == [8, 2]  # equal agreement: the latest


def test_draft_length_weighs_acceptance_against_the_cost_of_a_row():
    assert draft_length(0.1, 0.2, 8) == 1  # a poor guess: the shortest draft
    assert draft_length(1.0, 0.2, 8) == 8  # kept whole: as long as allowed
    assert draft_length(0.9, 0.0, 16) == 16  # rows that cost nothing: as long as allowed
    lengths = [draft_length(p, 0.2, 16) for p in (0.5, 0.7, 0.85, 0.95)]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]
    assert draft_length(0.95, 0.5, 16) < draft_length(0.95, 0.2, 16)  # dearer rows, shorter drafts


def test_prompt_lookup_drafts_longer_in_a_copy_and_learns_from_rejections():
    passage = list(range(100, 140))
    copying = [*passage, 7, *passage[:12]]  # 12 tokens into a copy of the passage
    drafter = PromptLookup(draft_max=8)
    long_draft = drafter.propose(copying, 100)
    assert DRAFT_MAX < len(long_draft) <= 16 and long_draft == passage[12 : 12 + len(long_draft)]
    assert drafter.propose(copying, 3) == passage[12:15]  # never past the limit
    short = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2]  # agrees over 2 tokens only
    first = len(drafter.propose(short, 100))
    assert 1 < first < len(long_draft)
    drafter.proposed.clear()  # the drafts above were never sent
    for _ in range(2):  # short matches' drafts rejected: that class's drafts shrink
        drafter.update(len(drafter.propose(short, 100)), 0)
        drafter.pause = 0
    assert len(drafter.propose(short, 100)) < first


def test_prompt_lookup_pauses_after_misses():
    drafter = PromptLookup(draft_max=8)
    pauses = []
    for _ in range(6):
        drafter.update(3, 0)
        pauses.append(drafter.pause)
        drafter.pause = 0
    assert pauses == [1, 3, 7, 15, PAUSE_MAX, PAUSE_MAX]
    drafter.pause = 2
    history = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2]
    assert drafter.propose(history, 100) == [] and drafter.propose(history, 100) == []
    assert drafter.propose(history, 100)[:1] == [3]
    drafter.update(1, 1)
    assert (drafter.misses, drafter.pause) == (0, 0)


def test_prompt_lookup_learns_from_the_draft_checked_when_drafts_sent_ahead_are_cancelled():
    """Drafts sent ahead of a pass cut short are never checked: an update goes to the oldest
    draft of its length, past the cancelled ones."""
    passage = list(range(100, 140))
    drafter = PromptLookup(draft_max=4)
    copying = [*passage, 7, *passage[:12]]
    short = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2]
    long_draft = drafter.propose(copying, 100)
    ahead = drafter.propose(short, 100)  # sent ahead, then cancelled
    assert len(ahead) != len(long_draft)
    record = {k: list(v) for k, v in drafter.record.items()}
    drafter.update(len(long_draft), 0)  # the first pass: cut at its first token
    changed = [k for k in record if record[k] != drafter.record[k]]
    assert changed == [LONG_MATCH]
    again = drafter.propose(short, 100)
    drafter.update(len(again), len(again))
    assert len(drafter.proposed) == 0


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


@pytest.fixture(scope="module")
def untied_path(tiny_model_path):
    """A tiny Q8_0 model with an output matrix of its own: its next token is not the last one
    again (a tied embedding's is), so its distribution is spread out."""
    return tiny_model_path(weight_type=QT.Q8_0, tied_output=False)


@pytest.fixture(scope="module")
def tiny_draft(tiny_model_path):
    """A draft for untied_path: the same weights in Q4_0, so the two agree in part."""
    shared = DraftModel(load_model(tiny_model_path(weight_type=QT.Q4_0, tied_output=False)), 256, draft_max=4)
    yield shared
    shared.close()


def test_sampled_drafts_keep_the_targets_distribution(untied_path, tiny_draft):
    """A draft token drawn from the draft model's q at the request's temperature, checked by the
    general rule (keep with min(1, p/q), else draw from max(0, p - q)): the first token kept
    follows the target's p0, and after a kept draft token d the bonus token follows p1 after d.
    Counted with a chi-square test (fixed seeds, fixed draws: it cannot flake); a sampled draft
    is also kept more often than the greedy draft's point mass would be."""
    pipeline, ids = build(untied_path), list(prompt(10, seed=9))
    params = SamplingParams(temperature=1.5, top_k=6, top_p=1.0, min_p=0.0, seed=3)
    sampler, drafter = Sampler(params), tiny_draft.drafter(params)
    pipeline.prefill("chi", ids[:-1])
    rows: dict[int, np.ndarray] = {}  # d -> the target's logits of [last, d]: (2, vocab)

    def target_rows(d: int) -> np.ndarray:
        if d not in rows:
            hidden = pipeline.forward([Segment("chi", len(ids) - 1, 2)], np.array([ids[-1], d]))
            rows[d] = pipeline.head.logits(hidden)
        return rows[d]

    draws, first, pairs, kept = 4000, {}, {}, 0
    for _ in range(draws):
        draft = drafter.propose(ids, 1)
        assert isinstance(draft, SampledDraft) and draft.q.shape == (1, 300)
        got = SequenceState(ids, sampler, 2, frozenset()).advance(target_rows(draft[0]), 256, draft, draft.q)
        first[got[0]] = first.get(got[0], 0) + 1
        if len(got) == 2:
            kept += 1
            pairs[tuple(got)] = pairs.get(tuple(got), 0) + 1
    drafter.end()
    q0 = draft.q[0]
    p0 = sampler.distribution(target_rows(draft[0])[0], ids)
    assert 0.1 < np.minimum(p0, q0).sum() < 0.9 and not np.allclose(p0, q0, atol=0.05)  # the draft differs
    statistic = sum((first.get(t, 0) - draws * p0[t]) ** 2 / (draws * p0[t]) for t in np.flatnonzero(p0))
    assert set(first) <= set(np.flatnonzero(p0).tolist())
    assert statistic < chi_square_critical(np.count_nonzero(p0) - 1), (statistic, first)
    for d in {d for d, _ in pairs}:  # the bonus token after each kept draft token
        p1 = sampler.distribution(target_rows(d)[1], ids + [d])
        n = sum(c for (t, _), c in pairs.items() if t == d)
        if n >= 200:
            statistic = sum((pairs.get((d, t), 0) - n * p1[t]) ** 2 / (n * p1[t]) for t in np.flatnonzero(p1))
            assert statistic < chi_square_critical(np.count_nonzero(p1) - 1), (d, statistic, pairs)
    point_mass = p0[int(np.argmax(q0))]  # how often a greedy draft would be kept
    assert kept / draws > point_mass + 0.05, (kept / draws, point_mass)


def test_sampled_draft_rule_is_greedy_at_temperature_zero_and_draws_as_documented():
    """check_draft at temperature 0 keeps exactly the argmax and draws nothing; at temperature >
    0 it draws one uniform for a ratio strictly between 0 and 1, none at or above 1 or at 0."""
    logits = np.array([0.0, 2.0, 1.0, -1.0], dtype=np.float32)
    q = np.array([0.1, 0.2, 0.6, 0.1])
    greedy_sampler = Sampler(SamplingParams(temperature=0.0, seed=5))
    state = greedy_sampler._rng.bit_generator.state
    assert [greedy_sampler.check_draft(logits, [], d, q) for d in range(4)] == [1, 1, 1, 1]
    assert greedy_sampler._rng.bit_generator.state == state
    params = SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, seed=5)
    sampler, twin = Sampler(params), Sampler(params)
    assert sampler.check_draft(logits, [], 1, q) == 1  # p(1) > q(1): kept, no draw
    assert sampler.check_draft(logits, [], 3, q) == 1  # p(3) = 0 (top-k): refused; the residual holds token 1 alone
    assert sampler._rng.bit_generator.state == twin._rng.bit_generator.state
    sampler.check_draft(logits, [], 2, q)  # 0 < p(2) / q(2) < 1: one uniform
    twin._rng.random()
    assert sampler._rng.bit_generator.state == twin._rng.bit_generator.state


def sampled_text(pipeline, ids, draft, params, in_flight: int) -> list[int]:
    return list(Generation(pipeline, ids, Sampler(params), N_TOKENS, frozenset(), drafter=draft.drafter(params),
                           in_flight=in_flight))


def test_a_draft_model_greedy_text_is_the_models_and_a_seed_fixes_the_sampled_text(untied_path, tiny_draft):
    """Greedy with the tiny draft: the text without it. At temperature > 0 (drafts drawn): the
    same seed and settings give the same text, passes in flight or not."""
    ids = list(prompt(16, seed=8))
    greedy_params = SamplingParams(temperature=0.0)
    alone = list(Generation(build(untied_path), ids, greedy(), N_TOKENS, frozenset()))
    assert sampled_text(build(untied_path), ids, tiny_draft, greedy_params, 1) == alone
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=11)
    once = sampled_text(build(untied_path), ids, tiny_draft, params, 1)
    assert sampled_text(build(untied_path), ids, tiny_draft, params, 1) == once
    assert sampled_text(build(untied_path), ids, tiny_draft, params, 3) == sampled_text(build(untied_path), ids,
                                                                                        tiny_draft, params, 3)
    assert tiny_draft.sessions == 0


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



CODE = """from dataclasses import dataclass


@dataclass
class Camel:
    name: str
    load_kg: float
    water_l: float

    def carry(self, kg: float) -> None:
        if kg < 0:
            raise ValueError(f"load must be positive, got {kg}")
        self.load_kg += kg

    def drink(self, litres: float) -> None:
        if litres < 0:
            raise ValueError(f"water must be positive, got {litres}")
        self.water_l += litres

    def unload(self, kg: float) -> None:"""


@pytest.mark.model
def test_prompt_lookup_follows_the_method_the_code_repeats(smollm2):
    """SmolLM2 completes a method as its twins above it are written: prompt lookup follows the
    earlier passage that agrees longest with the text (not the latest short match), so more
    than 3 tokens a pass are kept on average, and the text is the greedy one."""
    pipeline, ids = smollm2.local_pipeline(512), smollm2.tokenizer.encode(CODE, special=True)
    alone = list(Generation(pipeline, ids, greedy(), 48, smollm2.tokenizer.eog_ids))
    generation = Generation(pipeline, ids, greedy(), 48, smollm2.tokenizer.eog_ids, drafter=PromptLookup())
    assert list(generation) == alone
    assert generation.timings.tokens_per_pass > 3


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


def first_request_tokens(path, draft, joined: bool) -> tuple[list[int], Scheduler]:
    """The tokens of a sampled request with a drafted draft (as in front of 3 nodes: passes may
    fly while it is alone), alone or joined after its sixth token by a second request."""
    scheduler = Scheduler(build(path), in_flight=3, drafter=draft.drafter)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=13)
    first = Request(list(prompt(14, seed=21)), Sampler(params), 30, frozenset(), None)
    second = Request(list(prompt(9, seed=22)), Sampler(params), 12, frozenset(), None)
    got, done = [], threading.Semaphore(0)

    def on_first(event: Event) -> None:
        got.append(event)
        if len(got) == 6 and joined:
            scheduler.submit(second)
        if event.kind != "token":
            done.release()

    first.on_event = on_first
    second.on_event = lambda e: done.release() if e.kind != "token" else None
    try:
        scheduler.submit(first)
        assert all(done.acquire(timeout=120) for _ in range(1 + joined))
    finally:
        scheduler.close()
    assert got[-1].kind == "done"
    return [e.token for e in got if e.kind == "token"], scheduler


def test_a_sampled_drafts_text_does_not_depend_on_sharing_steps(untied_path, tiny_draft):
    """serve: a seed gives a request with drawn drafts the same text whether it had its lane to
    itself or shared its steps (its passes go one at a time either way: which positions are
    drafted would change the draws)."""
    alone, scheduler = first_request_tokens(untied_path, tiny_draft, joined=False)
    joined, _ = first_request_tokens(untied_path, tiny_draft, joined=True)
    assert joined == alone and len(alone) == 30
    assert scheduler.draft_tokens_accepted > 0 and scheduler.passes_sent_ahead == 0
    assert tiny_draft.sessions == 0


@pytest.mark.slow
def test_serve_with_a_drawn_draft_gives_a_seed_its_text_alone_or_not(untied_path, tiny_model_path):
    """A real `caravan serve --draft` at temperature > 0: a seeded request gets the same text
    alone and beside another request, and draft tokens are kept."""
    draft_path = tiny_model_path(weight_type=QT.Q4_0, tied_output=False)
    server = Server("--model", str(untied_path), "--draft", str(draft_path), "--draft-max", "4", "--drafts-in-flight", "3",
                    ctx=256)  # as in front of 3 nodes: a lone request's passes may fly

    def ask(seed: int, text: str) -> str:
        body = {"model": untied_path.stem, "prompt": text, "max_tokens": 30, "temperature": 0.8, "seed": seed}
        status, answer = server.post("/completions", json.dumps(body).encode(), timeout=120)
        assert status == 200, answer
        return answer["choices"][0]["text"]

    try:
        alone = ask(5, "abc abd abe")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            beside = [pool.submit(ask, 5, "abc abd abe"), pool.submit(ask, 9, "xyz xy")]
            assert beside[0].result(timeout=120) == alone and beside[1].result(timeout=120)
        with urllib.request.urlopen(server.base_url + "/metrics", timeout=60) as response:
            metrics = dict(line.split() for line in response.read().decode().splitlines() if not line.startswith("#"))
    finally:
        server.stop()
    assert int(metrics["caravan_draft_tokens_accepted_total"]) > 0
