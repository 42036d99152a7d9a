"""Many requests through one pipeline: continuous batching on the coordinator.

One thread runs the model (Numba's kernels and every stage call happen there). Each step it
builds one batch from every request that is decoding (one row each) plus a chunk of at most
`prefill_chunk` prompt tokens from one request that is still prefilling, runs it through the
stages in one forward call, and samples the next token of each row that needs one. Requests
join and leave between steps. The kernels give a row the same bits whatever else shares its
batch, so a greedy request gets the same text alone or among many.

Several samples of one prompt (n > 1) share its prefill: only the first request, the leader,
runs the prompt; its followers then get a copy of its KV caches on every stage and sample
their first tokens from the same logits.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import numba
import numpy as np

from caravan.pipeline.generate import Pipeline
from caravan.pipeline.sampler import Sampler
from caravan.pipeline.stage import Segment

log = logging.getLogger(__name__)

PREFILL_CHUNK = 64  # prompt tokens per step: bounds how long a new prompt stalls the others
MAX_BATCH = 32  # sequences decoding at once; more wait in the queue


@dataclass(frozen=True)
class Event:
    kind: str  # "token", "done" or "error"
    token: int = -1
    logprob: float = 0.0  # token: its log-probability, when the request asked for logprobs
    top: tuple[tuple[int, float], ...] = ()  # token: the most likely (token, logprob) pairs, if asked
    finish_reason: str = ""  # done: "stop" (end of generation token), "length", "cancelled"
    message: str = ""  # error


@dataclass
class Request:
    prompt_ids: list[int]
    sampler: Sampler
    max_tokens: int
    stop_ids: frozenset[int]
    on_event: Callable[[Event], None]  # called on the scheduler's thread: must only hand off
    adapters: tuple[tuple[str, float], ...] = ()  # LoRA adapters (name, scale) the sequence uses
    top_logprobs: int = -1  # -1: no logprobs; k >= 0: each token's logprob and the k most likely
    followers: list["Request"] = field(default_factory=list)  # samples of the same prompt: they copy its prefill
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    tokens: list[int] = field(default_factory=list)
    prefilled: int = 0  # prompt tokens already through the stages
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    first_token_s: float = 0.0
    history: list[int] = field(init=False)  # prompt then generated tokens, for the sampler's penalties

    def __post_init__(self) -> None:
        self.history = list(self.prompt_ids)

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt_ids)

    def cancel(self) -> None:
        self.cancelled = True  # the scheduler ends the session at its next step


class Scheduler:
    def __init__(self, pipeline: Pipeline, max_batch: int = MAX_BATCH, prefill_chunk: int = PREFILL_CHUNK,
                 threads: int | None = None):
        self.pipeline = pipeline
        self.threads = threads  # Numba's thread count is per calling thread: set it on ours
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self._inbox: queue.Queue[Request | None] = queue.Queue()
        self.active: list[Request] = []
        self.waiting: list[Request] = []
        self.steps = 0
        self.tokens_generated = 0
        self.prompt_tokens_computed = 0  # prompt tokens run through the stages (shared prefills once)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) per step, last minute
        self._thread = threading.Thread(target=self._run, name="caravan-scheduler", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> Request:
        if len(request.prompt_ids) >= self.pipeline.n_ctx:
            raise ValueError(f"prompt of {len(request.prompt_ids)} tokens does not fit the context of "
                             f"{self.pipeline.n_ctx} tokens")
        self._inbox.put(request)
        return request

    def close(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=30)

    def tokens_per_second(self, window_s: float = 60.0) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if now - t <= window_s]
        if len(recent) < 2:
            return 0.0
        return sum(n for _, n in recent[1:]) / max(now - recent[0][0], 1e-9)

    @property
    def queue_length(self) -> int:
        return len(self.waiting) + self._inbox.qsize()

    # --- the scheduler thread -------------------------------------------------------------------

    def _run(self) -> None:
        if self.threads is not None:
            numba.set_num_threads(self.threads)
        while True:
            try:
                if not self._collect():
                    self._finish_all("cancelled")
                    return
                self._drop_cancelled()
                self._admit()
                if self.active:
                    self._step()
            except Exception:  # noqa: BLE001  (a bug must not kill the server's only model thread)
                log.exception("scheduler step failed")
                for request in list(self.active):
                    self._end(request, Event("error", message="internal error in the scheduler"))

    def _collect(self) -> bool:
        """Move submitted requests to the waiting list, blocking when there is nothing to do.
        False once close() was called."""
        if not self.active and not self.waiting:
            item = self._inbox.get()
            if item is None:
                return False
            self.waiting.append(item)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if item is None:
                return False
            self.waiting.append(item)

    def _admit(self) -> None:
        # A leader brings its followers along once its prefill is done: keep room for them.
        while self.waiting and (not self.active or len(self.active) + 1 + len(self.waiting[0].followers) <= self.max_batch):
            self.active.append(self.waiting.pop(0))

    def _drop_cancelled(self) -> None:
        for request in [r for r in self.active + self.waiting if r.cancelled]:
            if request in self.waiting:
                self.waiting.remove(request)
            self._end(request, Event("done", finish_reason="cancelled"))

    def _end(self, request: Request, event: Event) -> None:
        if request in self.active:
            self.active.remove(request)
        try:
            self.pipeline.end_session(request.session_id)
        except Exception as exc:  # noqa: BLE001  (a node gone: its caches went with it)
            log.warning("ending session %s: %s", request.session_id, exc)
        request.on_event(event)
        followers, request.followers = request.followers, []  # still waiting for the prefill they share
        for follower in followers:
            follower.on_event(event)

    def _start_followers(self, leader: Request, row: int, sampled: list[tuple[Request, int]]) -> None:
        """The leader's prompt is through: give each follower a copy of its caches and a place
        among the rows sampled from this step's logits."""
        followers, leader.followers = leader.followers, []
        for follower in followers:
            if follower.cancelled:
                follower.on_event(Event("done", finish_reason="cancelled"))
                continue
            try:
                self.pipeline.copy_session(leader.session_id, follower.session_id, len(leader.prompt_ids))
            except Exception as exc:  # noqa: BLE001  (nodes lost beyond recovery)
                self._end(follower, Event("error", message=str(exc)))
                continue
            follower.prefilled = len(follower.prompt_ids)
            self.active.append(follower)
            sampled.append((follower, row))

    def _finish_all(self, reason: str) -> None:
        for request in self.active + self.waiting:
            self._end(request, Event("done", finish_reason=reason))  # and its followers
        self.active, self.waiting = [], []

    def _step(self) -> None:
        """One forward call: a row for each decoding request, plus one prefill chunk."""
        segments, ids, sampled = [], [], []  # sampled: (request, row) whose logits give a token
        row = 0
        for request in self.active:
            if request.decoding and request.tokens:
                position = len(request.prompt_ids) + len(request.tokens) - 1
                segments.append(Segment(request.session_id, position, 1, request.adapters))
                ids.append(request.tokens[-1])
                sampled.append((request, row))
                row += 1
        prefilling = next((r for r in self.active if not r.decoding), None)
        if prefilling is not None:
            start = prefilling.prefilled
            chunk = prefilling.prompt_ids[start : start + self.prefill_chunk]
            segments.append(Segment(prefilling.session_id, start, len(chunk), prefilling.adapters))
            ids.extend(chunk)
            row += len(chunk)
            prefilling.prefilled += len(chunk)
            self.prompt_tokens_computed += len(chunk)
            if prefilling.decoding:
                sampled.append((prefilling, row - 1))
        try:
            hidden = self.pipeline.forward(segments, np.asarray(ids, dtype=np.int64))
        except ValueError as exc:  # a request the stages refuse (StageError, context): fail the batch's requests
            for request in {id(r): r for r, _ in sampled}.values():
                self._end(request, Event("error", message=str(exc)))
            if prefilling is not None and prefilling in self.active:
                self._end(prefilling, Event("error", message=str(exc)))
            return
        except Exception as exc:  # noqa: BLE001  (nodes lost beyond recovery, no plan fits)
            for request in list(self.active):
                self._end(request, Event("error", message=str(exc)))
            return
        self.steps += 1
        for request, row in list(sampled):
            if request.followers:
                self._start_followers(request, row, sampled)
        if not sampled:
            return
        logits = self.pipeline.head.logits(hidden[[r for _, r in sampled]])  # (len(sampled), vocab)
        self._recent.append((time.monotonic(), len(sampled)))
        while self._recent and time.monotonic() - self._recent[0][0] > 60.0:
            self._recent.popleft()
        for (request, _), row_logits in zip(sampled, logits):
            token = request.sampler.sample(row_logits, request.history)
            if not request.first_token_s:
                request.first_token_s = time.perf_counter() - request.submitted
            if token in request.stop_ids:
                self._end(request, Event("done", finish_reason="stop"))
                continue
            request.tokens.append(token)
            request.history.append(token)
            self.tokens_generated += 1
            if request.top_logprobs >= 0:
                logprob, top = token_logprobs(row_logits, token, request.top_logprobs)
                request.on_event(Event("token", token=token, logprob=logprob, top=top))
            else:
                request.on_event(Event("token", token=token))
            if len(request.tokens) >= request.max_tokens or len(request.prompt_ids) + len(request.tokens) >= self.pipeline.n_ctx:
                self._end(request, Event("done", finish_reason="length"))


def token_logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """log p(token) under the model's distribution (softmax of the raw logits, before any
    sampling setting), and the k most likely (token, log p), most likely first."""
    logits = logits.astype(np.float64)
    top = logits.max()
    log_z = top + np.log(np.exp(logits - top).sum())
    best = np.argpartition(-logits, k)[:k] if 0 < k < logits.shape[0] else np.arange(logits.shape[0] if k else 0)
    best = best[np.argsort(-logits[best], kind="stable")]
    return float(logits[token] - log_z), tuple((int(i), float(logits[i] - log_z)) for i in best)
