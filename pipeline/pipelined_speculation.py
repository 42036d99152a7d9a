"""Several verification batches of one sequence in flight through a chain of nodes.

Speculative decoding (speculative.py) checks a draft in one pass; through a chain of N nodes
that pass still leaves the other nodes idle while it crosses one of them. Here, while batch b is
in the chain, batch b + 1 is sent already, built on the assumption that b is kept whole: its
first row is the drafter's guess of b's bonus token (the first token it proposes after the
history and b's draft), then the drafter's draft after that guess, at the positions that follow
b's. Each batch in flight is built on the one before, up to `max_in_flight` of them (the
pipeline's depth: a batch for every node of the chain); a batch without a draft is not built on.

When b's logits come back they are checked as any pass is (SequenceState.advance). If b was kept
whole and its own next token is b + 1's first row, b + 1 ran on exactly the keys and values that
decoding would have cached: it stays valid and is checked in turn when it returns. Otherwise b + 1
and every later batch in flight are cancelled (their answers are collected and dropped) and the
next batch starts at the accepted length, sent at once behind the cancelled ones.

Why no rejected position is attended to again, nor a valid batch run on a cache that a cancelled
one overwrote:
- a chain runs the batches of one session in the order they were sent, on every node: the
  coordinator sends them on one Forward stream to the first node (RemoteStage.submit, in order
  under its lock), each node computes a stream's batches one after another and relays them on
  one stream to the next node (node/server.py Forward, node/relay.py Links), and the answers come
  back in that order; a LocalStage computes a batch when it is submitted;
- so a batch sent after cancelled ones runs after them on every node; it starts at the accepted
  length, at or below the cached length their rows left (proto/caravan.proto, Segment.start: a
  segment may start anywhere up to it), and overwrites from there, attending only to positions
  before it, which valid batches wrote;
- a valid batch in flight is built only on valid batches sent before it, and nothing is sent
  between them that is not also built on them: once one is cancelled, so is everything after it.

Answers are collected in the order batches were sent (dropped ones too), so a pipeline that
remembers each batch's tokens for failover (coordinator/failover.py) sees them in the order the
caches did. A batch that fails in flight (a node lost) is run again alone with the pipeline's
`forward`, after the batches behind it are collected and dropped: a ClusterPipeline re-plans and
refills there, and an error that stays is raised.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np

from .model import ModelHead
from .sequence import SequenceState
from .speculative import draft_distributions
from .stage import Segment, StageError

log = logging.getLogger(__name__)


class SubmittingPipeline(Protocol):
    """What the batches in flight need of a pipeline (generate.Pipeline, failover.ClusterPipeline)."""

    head: ModelHead
    n_ctx: int

    def forward(self, segments: Sequence[Segment], token_ids: np.ndarray) -> np.ndarray: ...
    def submit(self, segments: Sequence[Segment], token_ids: np.ndarray) -> Callable[[], np.ndarray]: ...


@dataclass
class _Flight:
    """A batch sent and not yet answered."""

    segment: Segment
    rows: list[int]  # its tokens: the first row's, then its draft
    result: Callable[[], np.ndarray]  # waits for its last hidden states (len(rows), dim)
    ahead: bool  # sent while an earlier batch of the sequence was in flight
    q: np.ndarray | None  # (len(draft), vocab): the distributions a sampled draft came from; None: point masses
    cancelled: bool = False  # built on a token that was not kept: its answer is dropped

    @property
    def draft(self) -> list[int]:
        return self.rows[1:]


@dataclass
class InFlightCounts:
    """What happened to the batches of one sequence."""

    sent: int = 0
    sent_ahead: int = 0  # sent while an earlier batch was in flight, on the assumption it is kept whole
    kept_ahead: int = 0  # of those, the ones that proved valid and gave tokens
    cancelled: int = 0  # answers dropped: built on a draft cut short or a wrong guess, or behind a failed batch
    cut: int = 0  # checked batches not kept whole that had batches behind them
    missed_guess: int = 0  # checked batches kept whole whose next token was not the first row of the one behind
    most_in_flight: int = 0  # batches sent and not yet answered at once, at most
    rerun: int = 0  # batches that failed in flight and were run again alone


class PipelinedSpeculation:
    """The decode passes of one sequence, with up to `max_in_flight` batches in flight. Call
    `step` for each checked batch's tokens until the sequence has finished, then `close`."""

    def __init__(self, pipeline: SubmittingPipeline, sequence: SequenceState, max_in_flight: int = 1,
                 build_on_sampled: bool = True):
        if max_in_flight < 1:
            raise ValueError(f"batches in flight must be at least 1, got {max_in_flight}")
        self.pipeline = pipeline
        self.sequence = sequence
        self.max_in_flight = max_in_flight
        # Whether a sampled draft (speculative.SampledDraft) is built on: which positions are
        # drafted changes a sampled draft's text, so the server, whose requests fly only while
        # alone, sends such a draft's passes one at a time for a seed's text not to depend on that.
        self.build_on_sampled = build_on_sampled
        self.flights: collections.deque[_Flight] = collections.deque()  # in the order sent
        self.assumed: list[int] = []  # the history once every valid batch in flight is kept whole
        self.counts = InFlightCounts()
        self.logits: np.ndarray | None = None  # the last pass checked: (rows, vocab), row i gave its token i

    def step(self) -> list[int]:
        """Send batches up to the bound, then check the oldest valid one: the tokens it gives,
        appended to the sequence. The sequence must be decoding and not finished."""
        while True:
            self._fill()  # sends a valid batch whenever none is in flight
            flight = self.flights.popleft()
            if not flight.cancelled:
                return self._check(flight, self._collect(flight))
            self._drop(flight)

    def close(self) -> None:
        """Collect and drop every answer still in flight (a chain counts an uncollected one late)."""
        while self.flights:
            self._drop(self.flights.popleft())

    def _fill(self) -> None:
        while len(self.flights) < self.max_in_flight:
            batch = self._next_batch()
            if batch is None:
                return
            self._send(*batch)

    def _next_batch(self) -> tuple[Segment, list[int], np.ndarray | None] | None:
        """The next batch to send: after the last valid one in flight, on the assumption it is
        kept whole (None when it has no draft to build on, or the drafter no guess, or the
        sequence would end with it); with none in flight, the sequence's own decode segment."""
        seq, n_ctx = self.sequence, self.pipeline.n_ctx
        valid = [flight for flight in self.flights if not flight.cancelled]
        if not valid:
            segment, rows, q = seq.decode_segment(n_ctx)
            self.assumed = [*seq.history, *rows[1:]]
            return segment, rows, q
        if not valid[-1].draft or seq.drafter is None or (valid[-1].q is not None and not self.build_on_sampled):
            return None
        position = len(self.assumed)  # of the guessed bonus token
        generated = len(seq.tokens) + position - len(seq.history)  # before the bonus token
        # The guess and its draft obey decode_segment's limits for the history they assume.
        limit = min(n_ctx - position - 1, seq.max_tokens - generated - 2)
        guess = seq.drafter.propose(self.assumed, 1 + limit) if limit >= 0 else []
        if not guess:
            return None
        self.assumed.extend(guess)
        q = draft_distributions(guess)  # its row 0 is the guessed bonus token, not a draft token: the batch
        q = q[1:] if q is not None and len(guess) > 1 else None  # is valid only if that is the token drawn
        return Segment(seq.session_id, position, len(guess), seq.adapters), list(guess), q

    def _send(self, segment: Segment, rows: list[int], q: np.ndarray | None) -> None:
        result = self.pipeline.submit([segment], np.asarray(rows, dtype=np.int64))
        ahead = any(not flight.cancelled for flight in self.flights)
        self.flights.append(_Flight(segment, rows, result, ahead, q))
        counts = self.counts
        counts.sent += 1
        counts.sent_ahead += ahead
        counts.most_in_flight = max(counts.most_in_flight, len(self.flights))

    def _collect(self, flight: _Flight) -> np.ndarray:
        """A valid batch's hidden states; if it failed, it runs again alone once the batches
        behind it are dropped (they were built on it, or on the plan that failed)."""
        try:
            return flight.result()
        except StageError:  # the stages refused it: they would again
            raise
        except Exception as exc:  # noqa: BLE001  (a node lost: run again below, where an error that stays is raised)
            log.info("a batch in flight failed (%s); running it again alone", exc)
        self._cancel_all()
        self.close()
        self.counts.rerun += 1
        return self.pipeline.forward([flight.segment], np.asarray(flight.rows, dtype=np.int64))

    def _check(self, flight: _Flight, hidden: np.ndarray) -> list[int]:
        """The tokens the batch gives; the batches after it stay valid only if it was kept whole
        and its own next token is the first row of the next one."""
        seq = self.sequence
        self.logits = self.pipeline.head.logits(hidden)  # (1 + len(draft), vocab)
        new = seq.advance(self.logits, self.pipeline.n_ctx, flight.draft, flight.q)
        self.counts.kept_ahead += flight.ahead
        following = next((f for f in self.flights if not f.cancelled), None)
        if following is None or seq.finished:
            self._cancel_all()
        elif following.segment.start != seq.accepted_length:
            self.counts.cut += 1
            self._cancel_all()
        elif following.rows[0] != seq.history[-1]:
            self.counts.missed_guess += 1
            self._cancel_all()
        return new

    def _cancel_all(self) -> None:
        for flight in self.flights:
            if not flight.cancelled:
                flight.cancelled = True
                self.counts.cancelled += 1

    def _drop(self, flight: _Flight) -> None:
        try:
            flight.result()
        except Exception as exc:  # noqa: BLE001  (its answer is not wanted; a lost node fails the next valid batch)
            log.debug("a cancelled batch failed: %s", exc)
