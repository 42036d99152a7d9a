"""One sequence's state and its stop rule: what the CLI's loop (generate.Generation, a batch of
one) and the server's (coordinator/scheduler.py, many sequences a step) both advance.

A sequence's prompt goes through the stages in chunks (`prefilled` counts how far); then each
decode step sends its last token, and the logits of that row give the next token. With a
drafter, the step sends the last token and a draft of the tokens that may follow it, and the
rows' logits give the tokens kept (speculative.py). Whatever loop drives it, the same rule
decides when it ends, with OpenAI's finish reasons.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .sampler import Sampler
from .speculative import Drafter, draft_distributions
from .stage import Segment

FINISH_STOP = "stop"  # an end-of-generation token was sampled (it is not kept)
FINISH_LENGTH = "length"  # max_tokens reached, or the context holds no further position
FINISH_CANCELLED = "cancelled"  # the caller gave up on it


class ContextFullError(ValueError):
    pass


def check_prompt_fits(prompt_ids: Sequence[int], n_ctx: int) -> None:
    """A prompt must leave the context a position for a generated token."""
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty")
    if len(prompt_ids) >= n_ctx:
        raise ContextFullError(f"prompt of {len(prompt_ids)} tokens does not fit the context of {n_ctx} tokens")


@dataclass(eq=False)
class SequenceState:
    """A prompt, the tokens generated after it, and how to pick the next one."""

    prompt_ids: list[int]
    sampler: Sampler
    max_tokens: int
    stop_ids: frozenset[int]
    adapters: tuple[tuple[str, float], ...] = ()  # LoRA adapters (name, scale) the sequence uses
    drafter: Drafter | None = None  # guesses the tokens that follow; None: one token a decode step
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # its KV caches on every stage
    tokens: list[int] = field(default_factory=list)  # generated so far (an end-of-generation token is not kept)
    drafted: int = 0  # draft tokens sent through the stages
    accepted: int = 0  # draft tokens kept
    prefilled: int = 0  # prompt tokens already through the stages
    finish_reason: str = ""  # FINISH_*, once it has ended
    history: list[int] = field(init=False)  # prompt then generated tokens, for the sampler's penalties

    def __post_init__(self) -> None:
        self.prompt_ids = list(self.prompt_ids)
        self.history = list(self.prompt_ids)

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return bool(self.finish_reason)

    @property
    def accepted_length(self) -> int:
        """The positions of the stages' caches that hold this sequence's tokens, once decoding:
        every token but the last, which the next pass sends. A stage may hold more (the rows of
        a draft's rejected tokens); those are overwritten, and must not be kept or copied."""
        return len(self.history) - 1

    def decode_segment(self, n_ctx: int) -> tuple[Segment, list[int], np.ndarray | None]:
        """The rows of a decode step: the last token, at its position (the caches hold exactly
        the positions before it: the accepted length), then the drafter's guess of the tokens
        after it, if any; and the distributions a sampled draft was drawn from (None: point
        masses). The draft stops where the context does, and a token short of max_tokens (the
        last row's token comes without a draft)."""
        position = self.accepted_length
        limit = min(n_ctx - len(self.history), self.max_tokens - len(self.tokens) - 1)
        draft = self.drafter.propose(self.history, limit) if self.drafter is not None and limit > 0 else []
        segment = Segment(self.session_id, position, 1 + len(draft), self.adapters)
        return segment, [self.history[-1], *draft], draft_distributions(draft)

    def advance(self, logits: np.ndarray, n_ctx: int, draft: Sequence[int] = (), q: np.ndarray | None = None) -> list[int]:
        """The tokens the rows' logits give, appended and returned: logits is (1 + len(draft),
        vocab), row i's the logits after draft[:i], or (1 + len(draft),) the token ids a last
        stage holding the head picked from them (a sampler that takes the argmax only); q
        (len(draft), vocab), when the draft was drawn at random, the distribution each draft token
        came from. A token is taken from each row in turn while the one before it equalled the
        draft (speculative.py's acceptance rule), so the returned token i comes from row i.
        `finish_reason` is set once the sequence ends: at an end-of-generation token (not
        returned), at max_tokens, or when the new token's position would not fit the context (it
        could not be run through the stages)."""
        new = []
        picked = logits.ndim == 1  # ids: the stage took the argmax, as this sampler would
        assert not picked or self.sampler.argmax_only
        for i, row in enumerate(logits):
            if picked:
                token = int(row)
            elif q is not None and i < len(draft):
                token = self.sampler.check_draft(row, self.history, draft[i], q[i])
            else:
                token = self.sampler.sample(row, self.history)
            if token in self.stop_ids:
                self.finish_reason = FINISH_STOP
                break
            self.tokens.append(token)
            self.history.append(token)
            new.append(token)
            if len(self.tokens) >= self.max_tokens or len(self.history) > n_ctx:
                self.finish_reason = FINISH_LENGTH
                break
            if i == len(draft) or token != draft[i]:
                break
        if draft:
            kept = sum(1 for token, guess in zip(new, draft) if token == guess)
            self.drafted += len(draft)
            self.accepted += kept
            if self.drafter is not None:
                self.drafter.update(len(draft), kept)
        return new
