"""Many requests through one pipeline: continuous batching on the coordinator.

One thread runs the model (Numba's kernels and every stage call happen there). Each step it
builds one batch from every request that is decoding (its last token, plus the tokens its
drafter guesses follow it: speculative decoding, pipeline/speculative.py) plus at most
`step_prompt_tokens` prompt tokens of the requests still prefilling (the oldest first; several short
prompts share a step), runs it through the stages in one forward call, and samples the next
tokens of each request from its rows. Requests join and leave between steps. The kernels give a
row the same bits whatever else shares its batch, so a greedy request gets the same text alone
or among many. A step's events go to the requests' on_event during the step and the `flush`
hook after it: the server sends them to its streams together there and, when it runs the whole
model on every core, waits until they are written, so that writing them does not slow the next
step's kernels (handoff.EventHandoff).

In front of several nodes the scheduler runs one lane per stage: each lane is a thread with
its own batch, and the lanes' batches follow each other through the stages, so every node
works at once (pipelining) instead of waiting for the batch to come round again. A request
alone in its lane, with drafts, keeps several of its own passes in flight instead
(pipeline/pipelined_speculation.py), for as long as it stays alone, unless its drafts are drawn
at random (a draft model at temperature > 0): which positions are drafted changes such a
request's text, and a seed's text must not depend on the lane's company. Requests that share a
step send one batch at a time: tests/bench/RESULTS.md says why.

Several samples of one prompt (n > 1) share its prefill: only the first request, the leader,
runs the prompt; its followers then get a copy of its KV caches on every stage and sample
their first tokens from the same logits. Requests whose prompts begin alike (a chat template's
system prompt) share that beginning the same way: a new request copies it from an earlier one
of its lane and computes only the rest.

With the prompt cache on, a request that ends is retired instead: every stage keeps the keys
and values of its tokens (within the stage's budget), and a later request whose prompt begins
with them (the next turn of a chat, a regenerated answer) copies that prefix when it is
admitted (coordinator/prompt_cache.py).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numba
import numpy as np

from caravan.pipeline.generate import Pipeline
from caravan.pipeline.pipelined_speculation import PipelinedSpeculation
from caravan.pipeline.sampler import Sampler, log_z
from caravan.pipeline.sequence import FINISH_CANCELLED, FINISH_STOP, SequenceState, check_prompt_fits
from caravan.pipeline.speculative import DrafterFactory, PromptLookup, common_prefix
from caravan.pipeline.stage import Segment

from .prompt_cache import PromptIndex

log = logging.getLogger(__name__)

STEP_PROMPT_TOKENS = 64  # prompt tokens per step: bounds how long a new prompt stalls the others
MAX_BATCH = 32  # sequences decoding at once; more wait in the queue
MIN_SHARED_PREFIX = 16  # prompt tokens two requests must share for the later one to copy them


@dataclass(frozen=True)
class Event:
    kind: str  # "token", "done" or "error"
    token: int = -1
    logprob: float = 0.0  # token: its log-probability, when the request asked for logprobs
    top: tuple[tuple[int, float], ...] = ()  # token: the most likely (token, logprob) pairs, if asked
    finish_reason: str = ""  # done: a sequence.FINISH_* reason
    message: str = ""  # error


class Request(SequenceState):
    """A sequence the server runs: its state, plus how its events reach the client."""

    def __init__(self, prompt_ids: list[int], sampler: Sampler, max_tokens: int, stop_ids: frozenset[int],
                 on_event: Callable[[Event], None], adapters: tuple[tuple[str, float], ...] = (),
                 top_logprobs: int = -1):
        super().__init__(prompt_ids, sampler, max_tokens, stop_ids, adapters)
        self.on_event = on_event  # called on the scheduler's thread: must only hand off
        self.top_logprobs = top_logprobs  # -1: no logprobs; k >= 0: each token's logprob and the k most likely
        self.followers: list[Request] = []  # samples of the same prompt: they copy its prefill
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.first_token_s = 0.0

    def cancel(self) -> None:
        self.cancelled = True  # the scheduler ends the session at its next step


class _Sampled(NamedTuple):
    """A request whose rows of a step give tokens: `row`, and one more for each draft token."""

    request: Request
    row: int
    draft: tuple[int, ...] = ()
    q: np.ndarray | None = None  # (len(draft), vocab): the distributions a sampled draft came from; None: point masses


@dataclass
class _Batch:
    """One step's rows through the stages, and what they are for."""

    segments: list[Segment] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # the rows' token ids, in segment order
    sampled: list[_Sampled] = field(default_factory=list)  # the requests whose rows give tokens
    prefilling: list[Request] = field(default_factory=list)  # the requests whose prompt tokens it carries
    computed: int = 0  # prompt tokens it carries
    whole_prompt: Request | None = None  # a lone request whose prompt from `start` goes into the chain at once
    start: int = 0


class _Lane:
    """One model thread and the requests it batches. With several lanes their batches travel
    the stages one behind the other, so while a node works on one lane's batch the node before
    it works on the next lane's (pipelining); a request stays in its lane."""

    def __init__(self, index: int):
        self.index = index
        self.active: list[Request] = []
        self.thread: threading.Thread | None = None
        self.passes: PipelinedSpeculation | None = None  # the passes in flight of a request alone in the lane


class Scheduler:
    def __init__(self, pipeline: Pipeline, max_batch: int = MAX_BATCH, step_prompt_tokens: int = STEP_PROMPT_TOKENS,
                 threads: int | None = None, lanes: int = 1, draft_max: int = 0, prompt_cache: bool = False,
                 drafter: DrafterFactory | None = None, in_flight: int = 0):
        self.pipeline = pipeline
        self.prompt_cache = PromptIndex() if prompt_cache else None  # finished sessions the stages keep
        self.threads = threads  # Numba's thread count is per calling thread: set it on ours
        self.max_batch = max_batch
        self.step_prompt_tokens = step_prompt_tokens
        self.draft_max = draft_max  # prompt lookup's longest draft; 0: no speculative decoding
        # Each sequence's drafter, made at submit: `drafter` when given (a draft model's), else
        # prompt lookup with draft_max.
        self.new_drafter = drafter or (lambda params: PromptLookup(draft_max) if draft_max else None)
        self.in_flight = in_flight  # a lone request's passes in flight at most: 0, the pipeline's depth; 1, one
        self.lanes = [_Lane(i) for i in range(lanes)]
        self.lane_batch = -(-max_batch // lanes)  # sequences per lane at most
        self.waiting: list[Request] = []
        self._wake = threading.Condition()  # guards waiting and _closed
        self._closed = False
        self._counts = threading.Lock()
        self.steps = 0
        self.tokens_generated = 0
        self.sequence_passes = 0  # a request's rows through the stages that gave tokens, counted once a step
        self.draft_tokens = 0  # draft tokens run through the stages
        self.draft_tokens_accepted = 0  # of those, the ones kept
        self.passes_sent_ahead = 0  # passes of a lone request sent while its earlier one was in flight
        self.passes_kept_ahead = 0  # of those, the ones checked and kept (the others were cancelled or landed)
        self.prompt_tokens_computed = 0  # prompt tokens run through the stages (shared prefills once)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) per step, last minute
        # Called on a lane's thread after each turn of its loop (a step and its events) and after
        # close(): a consumer that collects the on_event calls sends them on here, all at once
        # (the server's EventHandoff).
        self.flush: Callable[[], None] = lambda: None
        for lane in self.lanes:
            lane.thread = threading.Thread(target=self._run, args=(lane,), name=f"caravan-scheduler-{lane.index}", daemon=True)
            lane.thread.start()

    @property
    def active(self) -> list[Request]:
        return [request for lane in self.lanes for request in lane.active]

    def submit(self, request: Request) -> Request:
        check_prompt_fits(request.prompt_ids, self.pipeline.n_ctx)
        for sequence in (request, *request.followers):
            if sequence.drafter is None:
                sequence.drafter = self.new_drafter(sequence.sampler.params)
        with self._wake:
            self.waiting.append(request)
            self._wake.notify_all()
        return request

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        for lane in self.lanes:
            lane.thread.join(timeout=30)
        with self._wake:
            waiting, self.waiting = self.waiting, []
        for request in waiting:
            self._end(request, Event("done", finish_reason=FINISH_CANCELLED))
        self.flush()

    def tokens_per_second(self, window_s: float = 60.0) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= window_s]
        if len(recent) < 2:
            return 0.0
        return sum(n for _, n in recent[1:]) / max(now - recent[0][0], 1e-9)

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    # --- the lanes' threads ---------------------------------------------------------------------

    def _run(self, lane: _Lane) -> None:
        if self.threads is not None:
            numba.set_num_threads(self.threads)
        while True:
            try:
                with self._wake:
                    while not self._closed and not lane.active and not self.waiting:
                        self._wake.wait()
                    if self._closed:
                        break
                    admitted = self._admit(lane)
                self._start_from_cache(admitted)
                self._drop_cancelled(lane)
                if lane.active:
                    self._step(lane)
            except Exception:  # noqa: BLE001  (a bug must not kill a model thread of the server)
                log.exception("scheduler step failed")
                for request in list(lane.active):
                    self._end(request, Event("error", message="internal error in the scheduler"))
            self.flush()
        for request in list(lane.active):
            self._end(request, Event("done", finish_reason=FINISH_CANCELLED))
        self.flush()

    def _admit(self, lane: _Lane) -> list[Request]:
        """Take waiting requests while this lane has room and no fewer requests than the others
        (so a few requests spread over the lanes). A leader brings its followers along once its
        prefill is done: keep room for them. Called with _wake held; returns those taken."""
        admitted = []
        while self.waiting:
            request = self.waiting[0]
            fits = not lane.active or len(lane.active) + 1 + len(request.followers) <= self.lane_batch
            if not fits or len(lane.active) > min(len(other.active) for other in self.lanes):
                break
            admitted.append(self.waiting.pop(0))
            lane.active.append(admitted[-1])
        return admitted

    def _start_from_cache(self, requests: list[Request]) -> None:
        """Start each new request from the cached session sharing the longest beginning with its
        prompt (its last token is always computed: its logits give the first token). A stage
        that evicted that session refuses the copy: the request computes its prompt instead."""
        if self.prompt_cache is None:
            return
        for request in requests:
            donor, shared = self.prompt_cache.longest(request.prompt_ids, request.adapters, len(request.prompt_ids) - 1)
            if shared >= MIN_SHARED_PREFIX:
                try:
                    self.pipeline.copy_session(donor, request.session_id, shared)
                    request.prefilled = shared
                except Exception as exc:  # noqa: BLE001  (evicted, or a node lost: compute the prompt)
                    log.info("prompt cache: copying %s: %s", donor, exc)
                    self.prompt_cache.remove(donor)
                    self._end_sessions([request.session_id, donor])  # what a partial copy left
            self.prompt_cache.count(request.prefilled)

    def _end_sessions(self, session_ids: list[str]) -> None:
        for session_id in session_ids:
            try:
                self.pipeline.end_session(session_id)
            except Exception as exc:  # noqa: BLE001  (a node gone: its caches went with it)
                log.warning("ending session %s: %s", session_id, exc)

    def _retire(self, request: Request, event: Event) -> None:
        """End the request's session; with the prompt cache on, a finished one is retired: the
        stages keep the positions of its tokens for later requests to copy."""
        kept = cached_tokens(request, event) if self.prompt_cache is not None else []
        if len(kept) < MIN_SHARED_PREFIX:
            self._end_sessions([request.session_id])
            return
        try:
            self.pipeline.retire_session(request.session_id, len(kept))
        except Exception as exc:  # noqa: BLE001  (a node gone, or a stage refused: nothing to keep)
            log.warning("retiring session %s: %s", request.session_id, exc)
            self._end_sessions([request.session_id])
            return
        self._end_sessions(self.prompt_cache.add(request.session_id, kept, request.adapters))

    def _drop_cancelled(self, lane: _Lane) -> None:
        with self._wake:
            waiting = [r for r in self.waiting if r.cancelled]
            self.waiting = [r for r in self.waiting if not r.cancelled]
        for request in waiting + [r for r in lane.active if r.cancelled]:
            self._end(request, Event("done", finish_reason=FINISH_CANCELLED))

    def _end(self, request: Request, event: Event) -> None:
        for lane in self.lanes:
            if request in lane.active:
                lane.active.remove(request)
            if lane.passes is not None and lane.passes.sequence is request:
                self._land(lane)  # before the stages let go of its session
        self._retire(request, event)
        request.on_event(event)
        followers, request.followers = request.followers, []  # still waiting for the prefill they share
        for follower in followers:
            follower.on_event(event)
        for sequence in (request, *followers):
            if sequence.drafter is not None:
                sequence.drafter.end()  # a draft model's session for it

    def _start_followers(self, lane: _Lane, leader: Request, row: int, sampled: list[_Sampled]) -> None:
        """The leader's prompt is through: give each follower a copy of its caches and a place
        among the rows sampled from this step's logits."""
        followers, leader.followers = leader.followers, []
        for follower in followers:
            if follower.cancelled:
                follower.on_event(Event("done", finish_reason=FINISH_CANCELLED))
                continue
            try:
                self.pipeline.copy_session(leader.session_id, follower.session_id, len(leader.prompt_ids))
            except Exception as exc:  # noqa: BLE001  (nodes lost beyond recovery)
                self._end(follower, Event("error", message=str(exc)))
                continue
            follower.prefilled = len(follower.prompt_ids)
            lane.active.append(follower)
            sampled.append(_Sampled(follower, row))

    def _share_prefix(self, request: Request, earlier: list[Request], computing: list[Request]) -> bool:
        """Start a new request from the KV caches of the earlier request of its lane whose prompt
        shares the longest beginning with its own (chat prompts open with the same system
        prompt): the stages copy those positions (as for n > 1) instead of computing them again,
        as llama.cpp's server reuses a cached prompt. False when that request has not computed
        the shared positions yet (or does so in this step, `computing`): wait for it rather than
        compute them twice."""
        donor, shared = None, MIN_SHARED_PREFIX - 1
        for other in earlier:
            if other.adapters != request.adapters:  # adapters change the keys and values
                continue
            # the prompt's last token is always computed: its logits give the first token
            n = common_prefix(other.prompt_ids, request.prompt_ids, len(request.prompt_ids) - 1)
            if n > shared:
                donor, shared = other, n
        if donor is None:
            return True
        if donor.prefilled < shared or any(donor is r for r in computing):
            return False
        try:
            self.pipeline.copy_session(donor.session_id, request.session_id, shared)
        except Exception as exc:  # noqa: BLE001  (a node lost: compute the prompt instead)
            log.warning("copying the prompt prefix of %s: %s", donor.session_id, exc)
            return True
        request.prefilled = shared
        return True

    def _whole_prompt_at_once(self, request: Request) -> bool:
        """Whether the rest of this prompt should go in one call that pipelines its chunks through
        a chain of nodes: more than a step's worth is left, and the stages are such a chain."""
        left = len(request.prompt_ids) - request.prefilled
        return not request.decoding and left > self.step_prompt_tokens and self.pipeline.prefill_depth > 1

    def _prompt_rows(self, lane: _Lane, segments: list, ids: list, sampled: list, row: int) -> tuple[list[Request], int]:
        """Add the prompt tokens of the lane's requests still prefilling, in the order they came,
        up to step_prompt_tokens in all (several short prompts go through in one step), to the step's
        segments and ids after its `row` decode rows; returns the requests and the token count."""
        prefilling, budget = [], self.step_prompt_tokens
        for i, request in enumerate(lane.active):
            if budget == 0:
                break
            if request.decoding:
                continue
            if request.prefilled == 0 and not self._share_prefix(request, lane.active[:i], prefilling):
                continue  # an earlier request computes the prefix it shares this step: copy it next step
            start = request.prefilled
            chunk = request.prompt_ids[start : start + budget]
            segments.append(Segment(request.session_id, start, len(chunk), request.adapters))
            ids.extend(chunk)
            row += len(chunk)
            budget -= len(chunk)
            request.prefilled += len(chunk)
            prefilling.append(request)
            if request.decoding:
                sampled.append(_Sampled(request, row - 1))
        return prefilling, self.step_prompt_tokens - budget

    @property
    def _passes_in_flight(self) -> int:
        return self.in_flight or self.pipeline.prefill_depth

    def _flies(self, lane: _Lane) -> Request | None:
        """The lane's request, when it is alone there, decoding with a drafter, in front of a
        chain of nodes: its passes can be in flight several at once."""
        request = lane.active[0] if len(lane.active) == 1 else None
        if (request is None or not request.decoding or not request.tokens or request.followers
                or request.drafter is None or self._passes_in_flight == 1):
            return None
        return request

    def _land(self, lane: _Lane) -> None:
        """Collect the answers of the lane's passes in flight: its next step sends one batch."""
        if lane.passes is not None:
            passes, lane.passes = lane.passes, None
            passes.close()

    def _step_in_flight(self, lane: _Lane, request: Request) -> None:
        """The lone request's next pass checked, with passes sent behind it (pipelined_speculation.py)."""
        if lane.passes is None or lane.passes.sequence is not request:
            self._land(lane)
            lane.passes = PipelinedSpeculation(self.pipeline, request, self._passes_in_flight, build_on_sampled=False)
        passes = lane.passes
        accepted, drafted, counts = request.accepted, request.drafted, dataclasses.replace(passes.counts)
        try:
            tokens = passes.step()
        except Exception as exc:  # noqa: BLE001  (refused, or nodes lost beyond recovery)
            self._end(request, Event("error", message=str(exc)))
            return
        with self._counts:
            self.steps += 1
            self.sequence_passes += 1
            self.draft_tokens += request.drafted - drafted
            self.passes_sent_ahead += passes.counts.sent_ahead - counts.sent_ahead
            self.passes_kept_ahead += passes.counts.kept_ahead - counts.kept_ahead
        self._record(self._tell(request, tokens, passes.logits, accepted))

    def _step(self, lane: _Lane) -> None:
        """One forward call: a row for each decoding request of the lane, plus prompt tokens."""
        lone = self._flies(lane)
        if lone is not None:
            self._step_in_flight(lane, lone)
            return
        self._land(lane)
        batch = self._batch(lane)
        hidden = self._run_batch(lane, batch)
        if hidden is not None:
            self._sample(lane, batch, hidden)

    def _batch(self, lane: _Lane) -> _Batch:
        """The step's rows: each decoding request's last token and draft, then prompt tokens
        (or, for a lone request, the rest of its prompt at once)."""
        batch = _Batch()
        for request in lane.active:
            if request.decoding and request.tokens:
                segment, rows, q = request.decode_segment(self.pipeline.n_ctx)
                batch.segments.append(segment)
                batch.ids.extend(rows)
                batch.sampled.append(_Sampled(request, len(batch.ids) - len(rows), tuple(rows[1:]), q))
        lone = lane.active[0] if not batch.segments and len(lane.active) == 1 else None
        if lone is not None and self._whole_prompt_at_once(lone):
            # Nothing else in the lane waits on this step: the rest of the prompt goes into the
            # chain of nodes at once, its chunks following each other (Pipeline.prefill).
            batch.whole_prompt, batch.start = lone, lone.prefilled
            lone.prefilled = len(lone.prompt_ids)
            batch.prefilling, batch.computed = [lone], lone.prefilled - batch.start
            batch.sampled.append(_Sampled(lone, 0))
        else:
            batch.prefilling, batch.computed = self._prompt_rows(lane, batch.segments, batch.ids, batch.sampled,
                                                                 len(batch.ids))
        return batch

    def _run_batch(self, lane: _Lane, batch: _Batch) -> np.ndarray | None:
        """The batch's last hidden states (rows, dim); None when it failed, its requests ended."""
        lone = batch.whole_prompt
        try:
            if lone is not None:
                hidden = self.pipeline.prefill(lone.session_id, lone.prompt_ids, lone.adapters, batch.start)
            else:
                hidden = self.pipeline.forward(batch.segments, np.asarray(batch.ids, dtype=np.int64))
        except ValueError as exc:  # a request the stages refuse (StageError, context): fail the batch's requests
            for request in {id(s.request): s.request for s in batch.sampled}.values():
                self._end(request, Event("error", message=str(exc)))
            for request in batch.prefilling:
                if request in lane.active:
                    self._end(request, Event("error", message=str(exc)))
            return None
        except Exception as exc:  # noqa: BLE001  (nodes lost beyond recovery, no plan fits)
            for request in list(lane.active):
                self._end(request, Event("error", message=str(exc)))
            return None
        with self._counts:
            self.steps += 1
            self.prompt_tokens_computed += batch.computed
        return hidden

    def _sample(self, lane: _Lane, batch: _Batch, hidden: np.ndarray) -> None:
        """Each sampled request's tokens from its rows of hidden (rows, dim), told to its client;
        a leader whose prompt is through brings its followers in first."""
        sampled = batch.sampled
        for request, row, _, _ in list(sampled):
            if request.followers:
                self._start_followers(lane, request, row, sampled)
        if not sampled:
            return
        rows = [s.row + i for s in sampled for i in range(1 + len(s.draft))]
        logits = self.pipeline.head.logits(hidden[rows])  # (len(rows), vocab)
        first, generated = 0, 0
        for request, _, draft, q in sampled:
            generated += self._advance(request, logits[first : first + 1 + len(draft)], draft, q)
            first += 1 + len(draft)
        with self._counts:
            self.sequence_passes += len(sampled)
            self.draft_tokens += sum(len(s.draft) for s in sampled)
        self._record(generated)

    def _record(self, generated: int) -> None:
        """A step's tokens, for tokens_generated and tokens_per_second."""
        with self._counts:
            self.tokens_generated += generated
        self._recent.append((time.monotonic(), generated))
        while self._recent and time.monotonic() - self._recent[0][0] > 60.0:
            self._recent.popleft()

    def _advance(self, request: Request, logits: np.ndarray, draft: tuple[int, ...], q: np.ndarray | None) -> int:
        """The request's next tokens from its rows' logits (1 + len(draft), vocab), told to its
        client (_tell). Returns how many tokens it got."""
        accepted = request.accepted
        tokens = request.advance(logits, self.pipeline.n_ctx, draft, q)
        return self._tell(request, tokens, logits, accepted)

    def _tell(self, request: Request, tokens: list[int], logits: np.ndarray, accepted: int) -> int:
        """Tokens the request just got, each told to its client with the logprobs of its own
        row of `logits`; the request ends if they finish it (`accepted`: its draft tokens kept
        before them). Returns how many tokens it got."""
        if not request.first_token_s:
            request.first_token_s = time.perf_counter() - request.submitted
        for token, row_logits in zip(tokens, logits):
            if request.top_logprobs >= 0:
                logprob, top = token_logprobs(row_logits, token, request.top_logprobs)
                request.on_event(Event("token", token=token, logprob=logprob, top=top))
            else:
                request.on_event(Event("token", token=token))
        with self._counts:
            self.draft_tokens_accepted += request.accepted - accepted
        if request.finished:
            self._end(request, Event("done", finish_reason=request.finish_reason))
        return len(tokens)


def cached_tokens(request: Request, event: Event) -> list[int]:
    """The tokens whose keys and values the request's caches hold as it ends with `event`: the
    prompt as far as it went, then its accepted length (the last token sampled is fed only when
    the next was the stop token; rows of rejected draft tokens are never kept). None after an
    error: the stages may have undone it."""
    if event.kind != "done":
        return []
    if not request.decoding:
        return request.prompt_ids[: request.prefilled]
    fed = len(request.history) if event.finish_reason == FINISH_STOP else request.accepted_length
    return request.history[:fed]


def token_logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """log p(token) under the model's distribution (softmax of the raw logits, before any
    sampling setting), and the k most likely (token, log p), most likely first."""
    logits = logits.astype(np.float64)
    normalizer = log_z(logits)
    best = np.argpartition(-logits, k)[:k] if 0 < k < logits.shape[0] else np.arange(logits.shape[0] if k else 0)
    best = best[np.argsort(-logits[best], kind="stable")]
    return float(logits[token] - normalizer), tuple((int(i), float(logits[i] - normalizer)) for i in best)
