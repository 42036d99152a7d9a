"""Pick the next token from a logits vector, as llama.cpp's default sampler chain does.

The chain and its order follow llama.cpp's `common_sampler` defaults (`common/common.h`,
`common_params_sampling::samplers`; the stages live in `src/llama-sampling.cpp`), keeping
the stages caravan exposes:

    logit bias -> penalties -> top-k -> top-p -> min-p -> temperature -> dist

The logit bias comes first, as `common_sampler_init` puts it ahead of the chain. The penalties
are `llama_sampler_penalties`: over the last `repeat_last_n` tokens (the prompt's included), a
token seen `count` times has its logit divided by the repeat penalty (multiplied when it is not
positive), then lowered by `count * frequency_penalty + presence_penalty`.
top-k, top-p and min-p see the logits before temperature, so temperature reshapes only the
distribution among the survivors. Temperature 0 is greedy decoding after the bias and the
penalties. Each filter keeps at least one token (llama.cpp's `min_keep = 1`).

A sampler may hold a `Constraint` (a grammar, pipeline/grammar.py): tokens it does not allow get
-inf before the chain, as llama.cpp applies its grammar sampler first, and the token drawn
advances it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # divides the logits before the draw; 0 = greedy argmax
    top_k: int = 40  # keep the k highest logits; 0 = off
    top_p: float = 0.95  # keep the smallest head whose probability reaches p; 1.0 = off
    min_p: float = 0.05  # keep tokens with p >= min_p * p_max; 0.0 = off
    repeat_penalty: float = 1.0  # CTRL-style penalty on recent tokens; 1.0 = off
    repeat_last_n: int = 64  # how many of the most recent tokens the penalties look at
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the recent tokens; 0 = off
    presence_penalty: float = 0.0  # subtracted once from every token in the recent tokens; 0 = off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit) pairs
    seed: int | None = None  # seeds the draws; None = fresh OS entropy

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if not (math.isfinite(self.repeat_penalty) and self.repeat_penalty > 0.0):
            raise ValueError(
                f"repeat_penalty must be finite and > 0 (1 = off), got {self.repeat_penalty}"
            )
        if self.repeat_last_n < 0:
            raise ValueError(f"repeat_last_n must be >= 0 (0 = off), got {self.repeat_last_n}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite (0 = off), got {getattr(self, name)}")
        for token, bias in self.logit_bias:
            if token < 0 or not math.isfinite(bias):
                raise ValueError(
                    f"logit_bias must pair token ids >= 0 with finite biases, got {token}: {bias}"
                )
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0 or None, got {self.seed}")


def apply_penalties(
    logits: np.ndarray,
    recent_tokens: np.ndarray,
    repeat: float = 1.0,
    frequency: float = 0.0,
    presence: float = 0.0,
) -> np.ndarray:
    """A copy of logits with each token of `recent_tokens` pushed down, as llama.cpp's
    `llama_sampler_penalties_apply` does.

    CTRL's repeat penalty (Keskar et al. 2019) divides a logit; llama.cpp divides positive
    logits and multiplies the others, so the penalty lowers a token whatever its sign, and
    once however often the token repeated. OpenAI's frequency and presence penalties then
    subtract `count * frequency + presence`.
    """
    out = logits.astype(np.float32, copy=True)  # (vocab,)
    tokens, counts = np.unique(recent_tokens, return_counts=True)  # (n_distinct,) each
    hit = out[tokens]
    hit = np.where(hit <= 0.0, hit * np.float32(repeat), hit / np.float32(repeat))
    out[tokens] = hit - (counts.astype(np.float32) * np.float32(frequency) + np.float32(presence))
    return out


def top_k_candidates(logits: np.ndarray, k: int) -> np.ndarray:
    """Token ids ordered by descending logit, the k best only when 0 < k < vocab.

    Ties go to the lower token id, so the result does not depend on how the selection
    happened to order equal values. With k set, only k tokens are sorted: np.partition
    finds the k-th largest logit in O(vocab).
    """
    vocab = logits.shape[0]
    if 0 < k < vocab:
        kth = np.partition(logits, vocab - k)[vocab - k]
        above = np.flatnonzero(logits > kth)
        tied = np.flatnonzero(logits == kth)[: k - above.size]
        ids = np.sort(np.concatenate([above, tied]))  # (k,)
    else:
        ids = np.arange(vocab)  # (vocab,)
    order = np.argsort(-logits[ids], kind="stable")
    return ids[order]


def log_z(logits: np.ndarray) -> np.ndarray:
    """log(sum(exp(logits))) over the last axis (each row of a 2-D array), computed from the
    maximum so it cannot overflow: log-softmax is logits - log_z(logits)."""
    top = logits.max(axis=-1)
    return top + np.log(np.exp(logits - top[..., None]).sum(axis=-1))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities in float64, shifted by the max so exp never overflows."""
    shifted = logits.astype(np.float64) - logits.max()
    e = np.exp(shifted)
    return e / e.sum()


def inverse_cdf(probs: np.ndarray, u: float) -> int:
    """The index a uniform u in [0, 1) picks from probs (n,), which need not sum to 1: inverted
    through the cumulative distribution; side="right" never lands on an index whose probability
    is zero (or underflowed to it)."""
    cumulative = np.cumsum(probs)
    choice = int(np.searchsorted(cumulative, u * cumulative[-1], side="right"))
    return min(choice, probs.shape[0] - 1)


def top_p_count(sorted_logits: np.ndarray, p: float) -> int:
    """How many of the (descending) candidates make up the smallest head with mass >= p.

    As llama.cpp's top-p: the token that crosses p is kept; if rounding keeps the sum
    below p, everything stays.
    """
    cumulative = np.cumsum(softmax(sorted_logits))
    crossing = int(np.searchsorted(cumulative, p, side="left"))
    return min(crossing + 1, sorted_logits.shape[0])


def min_p_count(sorted_logits: np.ndarray, min_p: float) -> int:
    """How many of the (descending) candidates have p >= min_p * p_max.

    In logits that is logit >= max_logit + ln(min_p), as llama.cpp compares it; no
    softmax is needed and the renormalisation after earlier filters does not matter.
    """
    threshold = sorted_logits[0] + math.log(min_p)
    return max(1, int(np.count_nonzero(sorted_logits >= threshold)))


class Constraint(Protocol):
    """Which tokens may come next in a sequence (pipeline/grammar.py's GrammarConstraint)."""

    def allowed(self) -> np.ndarray: ...  # (vocab,) bool

    def accepts(self, token: int) -> bool: ...  # whether `token` may come next, without the whole mask

    def advance(self, token: int) -> None: ...  # the sequence chose `token`

    def allowed_rows(self, draft: list[int]) -> np.ndarray: ...  # (len(draft) + 1, vocab) bool, now and after each

    def rollback(self, count: int) -> None: ...  # take back the last `count` tokens advanced past


def masked(logits: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """A copy of logits, (..., vocab), with -inf wherever `allowed` (same shape, bool) is False:
    one row, or a row per draft token from Constraint.allowed_rows."""
    return np.where(allowed, logits, np.float32(-np.inf)).astype(np.float32, copy=False)


class Sampler:
    """Draws tokens with one seeded generator, so a seed fixes the whole sequence."""

    def __init__(self, params: SamplingParams, constraint: Constraint | None = None) -> None:
        self.params = params
        self.constraint = constraint
        self._rng = np.random.default_rng(params.seed)
        self._bias_ids = np.array([t for t, _ in params.logit_bias], dtype=np.int64)  # (n_bias,)
        self._bias = np.array([b for _, b in params.logit_bias], dtype=np.float32)  # (n_bias,)

    @property
    def argmax_only(self) -> bool:
        """It takes the argmax of the logits as they are (greedy, no constraint, bias or
        penalties), so whoever holds the logits picks the same token: a last stage holding the
        output head may pick it (generate.Pipeline.choose_greedily)."""
        p = self.params
        return p.temperature == 0.0 and self.constraint is None and not p.logit_bias and not self._penalties_on

    def sample(self, logits: np.ndarray, previous_tokens: Sequence[int] = ()) -> int:
        """The next token id; `logits` is (vocab,) and is not modified. With a constraint, only a
        token it allows, and the constraint moves past it."""
        if self.constraint is None:
            return self._draw(logits, previous_tokens)
        _check_shape(logits)
        token = self._greedy_accepted(logits, previous_tokens)
        if token is None:
            token = self._draw(masked(logits, self.constraint.allowed()), previous_tokens)
        self.constraint.advance(token)
        return token

    def _greedy_accepted(self, logits: np.ndarray, previous_tokens: Sequence[int]) -> int | None:
        """Plain greedy's token when the constraint accepts it, else None: the argmax of the masked
        logits is the unmasked argmax whenever that is allowed, which spares building and applying
        the whole mask on most steps (llama.cpp's sampler checks its grammar the same way)."""
        if not self._plain_greedy(previous_tokens):
            return None
        best = int(np.argmax(logits))
        return best if np.isfinite(logits[best]) and self.constraint.accepts(best) else None

    def _draw(self, logits: np.ndarray, previous_tokens: Sequence[int]) -> int:
        if self._plain_greedy(previous_tokens):
            # np.argmax returns the first maximum (ties go to the lowest id), and the first NaN
            # if there is one: one pass over the logits checks them and picks the token.
            _check_shape(logits)
            best = int(np.argmax(logits))
            _check_top(logits[best])
            return best
        ids, probs = self._candidates(logits, previous_tokens)
        if self.params.temperature == 0.0:
            return int(ids[0])
        return int(ids[inverse_cdf(probs, self._rng.random())])

    def check_draft(self, logits: np.ndarray, previous_tokens: Sequence[int], proposed: int, q: np.ndarray) -> int:
        """The token at a draft token's row, by the speculative sampling rule (speculative.py):
        `proposed` was drawn from q (vocab,); it is kept with probability min(1, p / q) at it,
        p this sampler's distribution for `logits`, else a token is drawn from max(0, p - q)
        renormalized, which is never `proposed`. A uniform is drawn only for a ratio strictly
        between 0 and 1, and a residual draw only when more than one token is left in it."""
        if self.constraint is not None:
            _check_shape(logits)
            logits = masked(logits, self.constraint.allowed())
        p = self.distribution(logits, previous_tokens)  # (vocab,) float64
        if q[proposed] > 0:
            ratio = p[proposed] / q[proposed]
        else:  # q is positive wherever a token was drawn; kept only if p allows it at all
            ratio = np.inf if p[proposed] > 0 else 0.0
        if ratio >= 1.0 or (ratio > 0.0 and self._rng.random() < ratio):
            token = proposed
        else:
            residual = np.maximum(p - q, 0.0)  # (vocab,)
            residual[proposed] = 0.0
            left = np.flatnonzero(residual)
            if left.size == 0:  # p and q equal to rounding: the mass is p's without the token refused
                residual, left = p.copy(), np.flatnonzero(p)
                residual[proposed] = 0.0
                left = left[left != proposed]
            token = int(left[0]) if left.size == 1 else int(left[inverse_cdf(residual[left], self._rng.random())])
        if self.constraint is not None:
            self.constraint.advance(token)
        return token

    def distribution(self, logits: np.ndarray, previous_tokens: Sequence[int] = ()) -> np.ndarray:
        """The probabilities `sample` draws the next token from, (vocab,) float64: zero for the
        tokens the filters drop; greedy is a point mass on the argmax."""
        ids, probs = self._candidates(logits, previous_tokens)
        out = np.zeros(logits.shape[0], dtype=np.float64)  # (vocab,)
        out[ids] = probs / probs.sum()
        return out

    def _candidates(self, logits: np.ndarray, previous_tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The tokens the chain keeps, in descending logit order, and their probabilities after
        temperature; greedy keeps the argmax alone."""
        p = self.params
        _validate_logits(logits)
        logits = self._penalised(self._biased(logits), previous_tokens)
        if p.temperature == 0.0:
            return np.array([int(np.argmax(logits))]), np.ones(1)

        ids = top_k_candidates(logits, p.top_k)  # (n,) descending by logit
        kept = logits[ids]
        if p.top_p < 1.0:
            kept = kept[: top_p_count(kept, p.top_p)]
        if p.min_p > 0.0:
            kept = kept[: min_p_count(kept, p.min_p)]
        return ids[: kept.shape[0]], softmax(kept / np.float32(p.temperature))  # (n_kept,) each

    def _plain_greedy(self, previous_tokens: Sequence[int]) -> bool:
        """The argmax of the logits as they are: temperature 0, no bias, no penalty after `previous_tokens`."""
        p = self.params
        return p.temperature == 0.0 and not p.logit_bias and not self._penalises(previous_tokens)

    @property
    def _penalties_on(self) -> bool:
        p = self.params
        off = p.repeat_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0
        return not (off or p.repeat_last_n == 0)

    def _penalises(self, previous_tokens: Sequence[int]) -> bool:
        return self._penalties_on and len(previous_tokens) > 0

    def _biased(self, logits: np.ndarray) -> np.ndarray:
        if not self._bias_ids.size:
            return logits
        vocab = logits.shape[0]
        if self._bias_ids.max() >= vocab:
            raise ValueError(
                f"logit_bias token ids must be in [0, {vocab}), got {self._bias_ids.max()}"
            )
        out = logits.astype(np.float32, copy=True)  # (vocab,)
        np.add.at(out, self._bias_ids, self._bias)  # finite biases: the max stays finite
        return out

    def _penalised(self, logits: np.ndarray, previous_tokens: Sequence[int]) -> np.ndarray:
        p = self.params
        if not self._penalises(previous_tokens):
            return logits
        recent = np.asarray(previous_tokens[-p.repeat_last_n :], dtype=np.int64)
        vocab = logits.shape[0]
        if recent.min() < 0 or recent.max() >= vocab:
            raise ValueError(
                f"previous_tokens must be token ids in [0, {vocab}), "
                f"got values from {recent.min()} to {recent.max()}"
            )
        return apply_penalties(
            logits, recent, p.repeat_penalty, p.frequency_penalty, p.presence_penalty
        )


_OVERFLOWED = "the model's activations overflowed, or its weights are damaged"


def _validate_logits(logits: np.ndarray) -> None:
    """A NaN, a +inf or an all -inf vector means the model broke; say so instead of drawing junk
    (a +inf makes every probability NaN)."""
    _check_shape(logits)
    top = logits.max()
    _check_top(top)
    if top == np.inf:
        raise ValueError(f"logits contain +inf ({_OVERFLOWED}): no token can be sampled")


def _check_shape(logits: np.ndarray) -> None:
    if not isinstance(logits, np.ndarray) or logits.ndim != 1 or logits.shape[0] == 0:
        raise ValueError(
            f"logits must be a non-empty 1-D numpy array (vocab,), got "
            f"{getattr(logits, 'shape', type(logits).__name__)}"
        )
    if not np.issubdtype(logits.dtype, np.floating):
        raise ValueError(f"logits must be floating point, got dtype {logits.dtype}")


def _check_top(top) -> None:
    """top: the logits' max (NaN when any is NaN)."""
    if np.isnan(top):
        raise ValueError(f"logits contain NaN ({_OVERFLOWED}): no token can be sampled")
    if top == -np.inf:
        raise ValueError("logits are all -inf: no token can be sampled")
