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

import collections
from typing import Callable, Protocol, Sequence

import numpy as np

from .sampler import SamplingParams

DRAFT_MAX = 8  # draft tokens a pass at most (twice as many for a LONG_MATCH): rows beyond it cost more than they save
NGRAM_MIN = 2  # tokens a match agrees over at least: what followed one common token is seldom what follows now
CONTEXT_MAX = 16  # tokens of agreement looked for before a match: enough to tell a copied passage from a common phrase
LONG_MATCH = 9  # a match agreeing over this many tokens is a copy in progress: its draft may be twice DRAFT_MAX
ROW_COST = 0.2  # a draft row's time over a one-row pass's: between one process's and a chain's (bench_speculative.py)
UNCHECKED_MAX = 32  # drafts remembered until checked: more than any chain of nodes keeps in flight
PAUSE_MAX = 16  # decode steps without a draft, at most, after drafts rejected at their first token
# How often a draft token is kept, a priori, by the tokens its match agrees over (the shortest of
# each class): the longer the agreement, the likelier the text is copying (tests/bench/RESULTS.md).
MATCH_PRIORS = ((NGRAM_MIN, 0.6), (3, 0.75), (5, 0.85), (LONG_MATCH, 0.95))
PRIOR_WEIGHT = 4.0  # the priors count as this many checked draft tokens
FORGET = 0.9  # each checked draft scales down what the drafts before it taught


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


def find_match(history: Sequence[int], n_draft: int, ngram_min: int = NGRAM_MIN) -> tuple[int, int]:
    """(where its continuation starts, how many tokens it agrees over) for the earlier occurrence
    of the history's last token whose preceding tokens agree with the history's for longest (up
    to CONTEXT_MAX), counting agreement only as far as the tokens after it reach (up to n_draft);
    then the longest agreement, then the latest. In a copy the longest agreement is the passage
    being copied; in a run of one token the latest occurrence agrees longest but has the fewest
    tokens after it. (0, 0) when none agrees over ngram_min tokens."""
    if len(history) < 2:
        return 0, 0
    last = len(history) - 1
    ends = np.flatnonzero(np.asarray(history[:-1]) == history[-1]).tolist()  # earlier occurrences of the last token
    best = (0, 0, 0)  # (agreement counted as far as the tokens after it go, agreement, continuation start)
    for end in ends:
        agreed = 1  # history[end - j] == history[last - j] for j < agreed
        while agreed < CONTEXT_MAX and end >= agreed and history[end - agreed] == history[last - agreed]:
            agreed += 1
        follow = end + 1
        best = max(best, (min(agreed, len(history) - follow, n_draft), agreed, follow))
    _, agreed, follow = best
    return (follow, agreed) if agreed >= ngram_min else (0, 0)


def lookup(history: Sequence[int], n_draft: int, ngram_min: int = NGRAM_MIN) -> list[int]:
    """The n_draft tokens (fewer at the history's end) that followed find_match's occurrence of
    the history's tail; [] when none agrees over ngram_min tokens."""
    follow, agreed = find_match(history, n_draft, ngram_min)
    return list(history[follow : follow + n_draft]) if agreed else []


def draft_length(p: float, row_cost: float, most: int) -> int:
    """The draft length, 1 to most, that gives the most tokens per unit of time when each draft
    token is kept with probability p (given the ones before it were): a draft of k gives
    1 + p + ... + p^k tokens for a pass costing 1 + row_cost * k one-row passes."""
    best, best_rate, tokens, kept = 1, 0.0, 1.0, 1.0
    for k in range(1, most + 1):
        kept *= p
        tokens += kept
        rate = tokens / (1 + row_cost * k)
        if rate > best_rate:
            best, best_rate = k, rate
    return best


class PromptLookup:
    """Prompt lookup decoding (Saxena 2023; llama.cpp's `lookup` and `ngram` drafters): the draft
    is what followed the same tokens earlier in the prompt or the text so far. It needs no model
    and pays off where the answer copies its input (editing, quoting, code).

    Its length weighs the chance of each token being kept against the cost of a row: that chance
    is learnt per class of match (how many tokens the match agrees over: a long agreement is a
    copy in progress), from priors and the drafts checked so far, forgetting old ones. After
    drafts rejected at their first token it pauses, twice as long each time, so that text it
    cannot guess costs few wasted rows."""

    def __init__(self, draft_max: int = DRAFT_MAX, row_cost: float = ROW_COST):
        if draft_max < 1:
            raise ValueError(f"draft_max must be >= 1, got {draft_max}")
        if row_cost < 0:
            raise ValueError(f"row_cost must be >= 0, got {row_cost}")
        self.draft_max = draft_max
        self.row_cost = row_cost
        # Per class of match (its shortest agreement): [draft tokens kept, draft tokens checked], decayed.
        self.record = {shortest: [prior * PRIOR_WEIGHT, PRIOR_WEIGHT] for shortest, prior in MATCH_PRIORS}
        # (class, length) of the drafts not yet checked, oldest first; drafts sent ahead and
        # cancelled are never checked, hence a bound.
        self.proposed: collections.deque[tuple[int, int]] = collections.deque(maxlen=UNCHECKED_MAX)
        self.misses = 0  # drafts in a row rejected at their first token
        self.pause = 0  # decode steps left without a draft

    def propose(self, history: Sequence[int], limit: int) -> list[int]:
        if self.pause:
            self.pause -= 1
            return []
        longest = 2 * self.draft_max
        follow, agreed = find_match(history, longest)
        if not agreed or limit < 1:
            return []
        match_class = max(shortest for shortest in self.record if shortest <= agreed)
        kept, checked = self.record[match_class]
        most = longest if agreed >= LONG_MATCH else self.draft_max
        n = min(draft_length(kept / checked, self.row_cost, most), limit)
        draft = list(history[follow : follow + n])
        self.proposed.append((match_class, len(draft)))
        return draft

    def update(self, proposed: int, accepted: int) -> None:
        match_class = self._checked_class(proposed)
        if match_class is not None:
            record = self.record[match_class]
            record[0] = FORGET * record[0] + accepted
            record[1] = FORGET * record[1] + accepted + (accepted < proposed)  # the token that differed was checked too
        self.misses = self.misses + 1 if accepted == 0 else 0
        self.pause = min(2**self.misses - 1, PAUSE_MAX)

    def _checked_class(self, proposed: int) -> int | None:
        """The class of the draft just checked: the oldest one proposed of its length, or one
        longer (a pass sent ahead through a chain starts with the guessed bonus token of the
        pass before: pipelined_speculation.py); drafts sent ahead of a pass cut short are
        cancelled unchecked, and passed over here."""
        while self.proposed:
            match_class, length = self.proposed.popleft()
            if length in (proposed, proposed + 1):
                return match_class
        return None

    def end(self) -> None:
        pass  # it holds nothing beyond its counters
