"""Speculative decoding: guess the tokens that come next, let the model check them in one pass.

A drafter proposes k tokens to follow a sequence's last token. The last token and the draft
go through the stages as one segment of 1 + k rows, as a prefill chunk does, and the head gives
logits for every row. Row i's logits are those a decode step would give after draft[:i]: the
kernels give a row the same bits whatever else is in its batch. So the token sampled from row i
is the token decoding would have produced there, and while it equals draft[i] the next row is
valid too. A pass keeps the tokens up to the first that differs from the draft, which is the
target's own token: at least one token a pass, at most 1 + k.

The acceptance rule is that of Leviathan et al. 2023 and Chen et al. 2023 ("Fast inference from
transformers via speculative decoding", algorithm 1; "Accelerating large language model decoding
with speculative sampling", algorithm 2): a draft token x drawn from the drafter's q is kept
with probability min(1, p(x) / q(x)), p the target's distribution at its row (the request's
whole sampler chain: bias, penalties, top-k, top-p, min-p, temperature); at the first one not
kept the token is drawn from max(0, p - q) renormalized; after a draft kept whole, the bonus
token is drawn from p. Each kept token then follows p exactly.

Two forms of q, both exact:
- A point mass on d (prompt lookup, a draft model at temperature 0, any deterministic drafter:
  `propose` returns a plain list). The rule is then: keep d with probability p(d), else draw
  from p without d. Drawing t from p with the sampler and keeping d when t == d is that rule
  (P(t = d) = p(d); given t != d, t follows p without d), and costs the sampler the one draw a
  decode step without a draft makes, so a seed gives the same text with speculation or without.
- A sampled draft (`SampledDraft`: a draft model drawing at the request's temperature,
  draft_model.py), which keeps more tokens at temperature > 0 as q comes closer to p.
  Sampler.check_draft applies the rule to each draft token in turn, and draws from the
  request's generator, in order: one uniform for a token whose ratio p(x) / q(x) is strictly
  between 0 and 1 (at or above 1 it is kept, at 0 refused, without a draw), one draw from the
  residual at the first token refused (none when the residual has one token left), and the
  bonus token's draw as a decode step makes it. The drafter draws its tokens from a generator
  of its own, seeded from the request's seed (draft_model.py). So the same seed and settings
  (drafter, draft length, passes in flight) give the same text, though not the text of decoding
  without the draft (the same distribution): which positions are drafted changes the draws. The
  server's scheduler therefore sends a sampled draft's passes one at a time, whether or not
  the request shares its steps (pipelined_speculation.py, `build_on_sampled`).
  Greedy (temperature 0) takes no draw and keeps exactly the argmax: p is a point mass.

The stages keep only accepted positions in use: rows of rejected tokens stay in a session's KV
cache past its accepted length, but the next segment starts at the accepted length (a segment
may start anywhere up to the cached length, proto/caravan.proto's Segment.start) and the stage
overwrites from there, so no rejected position is attended to again.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import numpy as np

from .sampler import SamplingParams

DRAFT_MAX = 8  # draft tokens a pass at most: rows beyond it cost more than they save when the guess is poor
NGRAM_MAX = 3  # the longest tail looked up in the text so far
NGRAM_MIN = 2  # the shortest: what followed one common token earlier is seldom what follows it now
PAUSE_MAX = 16  # decode steps without a draft, at most, after drafts rejected at their first token


class Drafter(Protocol):
    """Guesses the tokens that follow a sequence. One drafter per sequence: it may adapt to it."""

    # At most `limit` tokens to follow history: a list (a point mass each), or a SampledDraft.
    def propose(self, history: Sequence[int], limit: int) -> list[int]: ...

    def update(self, proposed: int, accepted: int) -> None: ...  # how many of the last draft's tokens the model kept

    def end(self) -> None: ...  # the sequence has ended: let go of what drafting for it holds


DrafterFactory = Callable[[SamplingParams], "Drafter | None"]  # a new sequence's drafter, given its sampling settings


class SampledDraft(list):
    """Draft tokens drawn at random from the drafter's distribution rather than chosen: `q`
    (len, vocab) float64 holds, row i, the distribution token i was drawn from."""

    def __init__(self, tokens: Sequence[int], q: np.ndarray):
        super().__init__(tokens)
        self.q = q  # (len(tokens), vocab)


def draft_distributions(draft: Sequence[int]) -> np.ndarray | None:
    """The distributions a draft was drawn from, (len(draft), vocab); None for a deterministic
    draft (a point mass on each token), whose rule needs no q."""
    return draft.q if isinstance(draft, SampledDraft) and len(draft) else None


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many tokens a and b share from the start, at most limit."""
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def lookup(history: Sequence[int], n_draft: int, ngram_min: int = NGRAM_MIN, ngram_max: int = NGRAM_MAX) -> list[int]:
    """What followed an earlier occurrence of the history's last n tokens, n from ngram_max down
    to ngram_min: the latest occurrence that n_draft tokens follow, else the earliest (in a run
    of one token the latest is followed by one token only); [] when none occurred before."""
    h = np.asarray(history, dtype=np.int64)  # (L,)
    for n in range(min(ngram_max, len(h) - 1), ngram_min - 1, -1):
        tail = h[-n:]
        match = np.ones(len(h) - n, dtype=bool)  # match[s]: h[s : s + n] == tail, for every s before the tail's own
        for j in range(n):
            match &= h[j : len(h) - n + j] == tail[j]
        starts = np.flatnonzero(match)
        if starts.size:
            whole = starts[starts + n + n_draft <= len(h)]
            follow = int(whole[-1] if whole.size else starts[0]) + n
            return h[follow : follow + n_draft].tolist()
    return []


class PromptLookup:
    """Prompt lookup decoding (Saxena 2023; llama.cpp's `lookup` and `ngram` drafters): the draft
    is what followed the same few tokens earlier in the prompt or the text so far. It needs no
    model and pays off where the answer copies its input (editing, quoting, code).

    It adapts to how well it guesses: the draft grows while it is kept whole and shrinks to
    one more than the tokens kept, and after drafts rejected at their first token it pauses,
    twice as long each time, so that text it cannot guess costs few wasted rows."""

    def __init__(self, draft_max: int = DRAFT_MAX):
        if draft_max < 1:
            raise ValueError(f"draft_max must be >= 1, got {draft_max}")
        self.draft_max = draft_max
        self.length = draft_max  # the next draft's length at most
        self.misses = 0  # drafts in a row rejected at their first token
        self.pause = 0  # decode steps left without a draft

    def propose(self, history: Sequence[int], limit: int) -> list[int]:
        if self.pause:
            self.pause -= 1
            return []
        n = min(self.length, limit)
        return lookup(history, n) if n > 0 else []

    def update(self, proposed: int, accepted: int) -> None:
        if accepted == proposed:
            self.length = min(self.draft_max, 2 * self.length)
        else:
            self.length = accepted + 1
        self.misses = self.misses + 1 if accepted == 0 else 0
        self.pause = min(2**self.misses - 1, PAUSE_MAX)

    def end(self) -> None:
        pass  # it holds nothing beyond its counters
