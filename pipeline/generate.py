"""The generation loop: tokens in, through a list of stages, tokens out.

It sees only `list[Stage]`: one process is `[LocalStage(0, n_layers)]`; a chain of nodes is one
RemoteStage (coordinator/remote.py), and a plan that also places layers in this process is a
list of both. Embedding, the final norm, the output head and sampling run here, except that a
last stage holding the head (the planner's choice) answers the decode rows of greedy sessions
with their token ids (StageBatch.argmax): the hidden states stay on the node.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from .lora import LoraAdapter
from .model import ModelHead
from .pipelined_speculation import InFlightCounts, PipelinedSpeculation
from .sampler import Sampler
from .sequence import ContextFullError, SequenceState, check_prompt_fits  # noqa: F401  (ContextFullError: imported from here)
from .speculative import Drafter
from .stage import Segment, Stage, StageBatch, StageStats

PREFILL_CHUNK = 256  # rows per forward call during prefill: bounds activation and attention scratch
PIPELINED_CHUNK_MIN = 32  # rows per chunk at least when chunks follow each other into a chain


class Pipeline:
    """A model's head plus stages that together cover every layer, in order."""

    def __init__(self, head: ModelHead, stages: Sequence[Stage], n_ctx: int):
        expected = 0
        for stage in stages:
            if stage.layers.start != expected:
                raise ValueError(f"stages leave a gap or overlap at layer {expected} (next stage starts at {stage.layers.start})")
            expected = stage.layers.stop
        if expected != head.config.n_layers:
            raise ValueError(f"stages cover layers [0, {expected}) of {head.config.n_layers}")
        self.head = head
        self.stages = list(stages)
        self.n_ctx = n_ctx
        self.greedy: set[str] = set()  # sessions whose sampler takes the argmax only (choose_greedily)

    def choose_greedily(self, session_id: str) -> None:
        """The session's sampler takes the argmax and nothing else (Sampler.argmax_only): when the
        last stage holds the output head, forward and submit answer its rows with token ids
        (T,) instead of hidden states, and head.logits passes them through. Until end_session."""
        self.greedy.add(session_id)

    def forward(self, segments: Sequence[Segment], token_ids: np.ndarray) -> np.ndarray:
        """Embed the tokens, run them through every stage; returns the last hidden states (T, dim),
        or the rows' token ids (T,) when the last stage picks them (choose_greedily)."""
        return self._forward(segments, token_ids, decide=True)

    def _forward(self, segments: Sequence[Segment], token_ids: np.ndarray, decide: bool) -> np.ndarray:
        hidden = self.head.embed(token_ids)
        for stage in self.stages:
            hidden = stage.forward(self._batch(stage, segments, hidden, decide))
        return hidden

    def _batch(self, stage: Stage, segments: Sequence[Segment], hidden: np.ndarray, decide: bool) -> StageBatch:
        """The batch for `stage`: one that answers with token ids where it may (the last stage
        holds the head and every segment's session is greedy) and the caller wants them."""
        argmax = (decide and stage is self.stages[-1] and all(seg.session_id in self.greedy for seg in segments)
                  and stage.holds_head)
        return StageBatch(tuple(segments), hidden, argmax)

    def submit(self, segments: Sequence[Segment], token_ids: np.ndarray) -> Callable[[], np.ndarray]:
        """forward, sent now; the function returned waits for the last hidden states. When the
        stages are one chain of nodes, batches submitted one after another compute at once, each
        node on its own, in the order sent (pipelined_speculation.py); else this is forward."""
        if len(self.stages) > 1:
            hidden = self.forward(segments, token_ids)
            return lambda: hidden
        stage = self.stages[0]
        return stage.submit(self._batch(stage, segments, self.head.embed(token_ids), decide=True))

    @property
    def prefill_depth(self) -> int:
        """How many batches of one sequence (chunks of a prompt, drafts) can be computing at
        once: the stage's depth (the nodes of a chain) when the stages are one, else 1."""
        return self.stages[0].depth if len(self.stages) == 1 else 1

    def prefill(self, session_id: str, prompt_ids: Sequence[int], adapters: tuple = (), start: int = 0) -> np.ndarray:
        """A session's prompt through every stage, in chunks, from position `start` (the caches
        hold the positions before it); returns the hidden state of its last position (1, dim).

        When the stages are one chain of several nodes (a stage whose `depth` > 1: its `submit`
        sends a batch without waiting for it), the chunks follow each other into the chain:
        node 1 computes chunk 2 while node 2 computes chunk 1, so the nodes work at once, and
        the chunks are made small enough for that (two per node, at least PIPELINED_CHUNK_MIN
        rows). A row's result does not depend on the chunk it is in, so this is bit-identical
        to one chunk after another. Always hidden states: a stage holding the head would give
        every row's token where one is wanted."""
        ids = np.asarray(prompt_ids, dtype=np.int64)
        depth = self.prefill_depth
        if depth == 1:
            hidden = None
            for first in range(start, len(ids), PREFILL_CHUNK):
                chunk = ids[first : first + PREFILL_CHUNK]
                hidden = self._forward([Segment(session_id, first, len(chunk), adapters)], chunk, decide=False)
            return hidden[-1:]
        stage = self.stages[0]
        size = min(PREFILL_CHUNK, max(PIPELINED_CHUNK_MIN, -(-(len(ids) - start) // (2 * depth))))
        pending = []
        try:
            for first in range(start, len(ids), size):
                chunk = ids[first : first + size]
                batch = StageBatch((Segment(session_id, first, len(chunk), adapters),), self.head.embed(chunk))
                pending.append(stage.submit(batch))
        finally:
            # Every answer is read, also after an error: the first error is the one raised.
            results, error = [], None
            for result in pending:
                try:
                    results.append(result())
                except Exception as exc:  # noqa: BLE001  (re-raised below)
                    error = error or exc
            if error is not None:
                raise error
        return results[-1][-1:]

    def end_session(self, session_id: str) -> None:
        self.greedy.discard(session_id)
        for stage in self.stages:
            stage.end_session(session_id)

    def copy_session(self, source: str, target: str, length: int) -> None:
        """Session `target` starts as the first `length` positions of `source`, on every stage."""
        for stage in self.stages:
            stage.copy_session(source, target, length)

    def retire_session(self, session_id: str, length: int) -> None:
        """End the session on every stage, each keeping its first `length` positions in its
        prompt cache for later sessions to copy (`length`: the tokens accepted, not drafts)."""
        for stage in self.stages:
            stage.retire_session(session_id, length)

    def add_adapter(self, adapter: LoraAdapter) -> None:
        """Make a LoRA adapter available to sessions (Segment.adapters): each stage keeps the
        matrices of its own layers."""
        for stage in self.stages:
            stage.add_adapter(adapter)

    def stats(self, ask_nodes: bool = True) -> list[StageStats]:
        """What each place that runs layers holds, in layer order (Stage.stats)."""
        return [row for stage in self.stages for row in stage.stats(ask_nodes)]

    def close(self) -> None:
        for stage in self.stages:
            stage.close()


@dataclass
class Timings:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0  # from the call to the prompt's logits
    first_token_s: float = 0.0  # from the call to the first sampled token
    decode_s: float = 0.0  # from the first token to the last
    decode_passes: int = 0  # decode passes checked: fewer than tokens when drafts are kept
    passes: InFlightCounts = field(default_factory=InFlightCounts)  # the decode passes sent, ahead and cancelled

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first token comes out of prefill; decode speed counts the ones after it.
        n = self.generated_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens a decode pass gives: 1 without speculation, more when drafts are kept."""
        n = self.generated_tokens - 1
        return n / self.decode_passes if self.decode_passes else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 3),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            "first_token_s": round(self.first_token_s, 6),
            "tokens_per_pass": round(self.tokens_per_pass, 3),
            "passes_cancelled": self.passes.cancelled,
            "most_passes_in_flight": self.passes.most_in_flight,
        }


@dataclass
class Generation:
    """One sequence's generation, a batch of one; iterate it for token ids. The KV caches on
    every stage, and the drafter's, are released when it finishes or is closed."""

    pipeline: Pipeline
    prompt_ids: Sequence[int]
    sampler: Sampler
    max_tokens: int
    stop_ids: frozenset[int]
    adapters: tuple[tuple[str, float], ...] = ()  # LoRA adapters (name, scale), added with Pipeline.add_adapter
    drafter: Drafter | None = None  # speculative decoding's guesses (speculative.py); None: one token a pass
    timings: Timings = field(default_factory=Timings)
    in_flight: int = 0  # decode passes in flight at once at most: 0, the pipeline's depth; 1, one at a time
    sequence: SequenceState = field(init=False)

    def __post_init__(self) -> None:
        check_prompt_fits(self.prompt_ids, self.pipeline.n_ctx)
        self.sequence = SequenceState(self.prompt_ids, self.sampler, self.max_tokens, self.stop_ids, self.adapters,
                                      self.drafter)

    @property
    def tokens(self) -> list[int]:
        return self.sequence.tokens

    @property
    def finish_reason(self) -> str:
        return self.sequence.finish_reason

    def __iter__(self) -> Iterator[int]:
        try:
            yield from self._run()
        finally:
            self.pipeline.end_session(self.sequence.session_id)
            if self.drafter is not None:
                self.drafter.end()

    def _run(self) -> Iterator[int]:
        """Prefill, then passes of the last token and a draft (if any), several in flight through
        a chain of nodes (pipelined_speculation.py), until the sequence ends."""
        seq, n_ctx = self.sequence, self.pipeline.n_ctx
        if self.sampler.argmax_only:
            self.pipeline.choose_greedily(seq.session_id)
        t0 = time.perf_counter()
        hidden = self.pipeline.prefill(seq.session_id, seq.prompt_ids, seq.adapters)
        seq.prefilled = len(seq.prompt_ids)
        logits = self.pipeline.head.logits(hidden)  # (1, vocab): the prompt's last row gives the first token
        self.timings.prompt_tokens = len(seq.prompt_ids)
        self.timings.prefill_s = time.perf_counter() - t0
        new = seq.advance(logits, n_ctx)
        t_first = time.perf_counter()
        self.timings.first_token_s = t_first - t0
        self.timings.generated_tokens = len(seq.tokens)
        yield from new
        passes = PipelinedSpeculation(self.pipeline, seq, self.in_flight or self.pipeline.prefill_depth)
        self.timings.passes = passes.counts
        try:
            while not seq.finished:
                new = passes.step()
                self.timings.decode_passes += 1
                self.timings.decode_s = time.perf_counter() - t_first
                self.timings.generated_tokens = len(seq.tokens)
                yield from new
        finally:
            passes.close()
