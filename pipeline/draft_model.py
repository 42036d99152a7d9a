"""A draft model: a smaller model of the target's vocabulary guesses the tokens that follow.

The draft model runs in this process, all its layers in one pipeline shared by every sequence,
each sequence on a session of its own (DraftModel.drafter). To guess, a drafter brings its
session up to the sequence's history, then decodes up to k tokens (ModelDrafter).

At temperature 0 it decodes greedily: the draft is a point mass q, checked by sampling from the
target and keeping while equal, and the text is exactly the model's. At temperature > 0 it
draws each token from the draft's distribution under the sequence's own sampler settings
(bias, penalties, top-k, top-p, min-p, temperature), which brings q close to the target's p, and
hands q on with the draft (speculative.SampledDraft) for the acceptance rule min(1, p/q):
more tokens kept than a greedy draft keeps when p is spread out. Its draws come from a generator
of its own, seeded from the sequence's seed (DRAFT_SEED_STREAM keeps it apart from the
sampler's), one uniform a draft token in the order drafted.

The draft session follows the accepted tokens without being told them: before a guess it keeps
the longest beginning its cached tokens share with the history (the tokens the target kept) and
feeds the rest from there, overwriting the positions of rejected guesses (a segment may start
anywhere up to the cached length, as on the target's stages).
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Sequence

import numpy as np

from .generate import Pipeline
from .loader import LoadedModel
from .model import ModelError
from .sampler import Sampler, SamplingParams, inverse_cdf
from .speculative import DRAFT_MAX, SampledDraft, common_prefix
from .stage import Segment
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

DRAFT_SEED_STREAM = 1  # mixed into a sequence's seed for its drafter's generator, apart from its sampler's


class DraftModelError(ModelError):
    """A --draft model that cannot draft for the model: unreadable, or of another vocabulary."""


def check_vocabulary(target: Tokenizer, draft: Tokenizer, draft_name: str) -> None:
    """A draft's token ids must mean what the target's mean: the same number of tokens, and the
    same text for each id."""
    if draft.vocab_size != target.vocab_size:
        raise DraftModelError(f"--draft {draft_name}: its vocabulary has {draft.vocab_size} tokens, the model's "
                                   f"{target.vocab_size}; give a draft model with the model's tokenizer")
    for token_id in range(target.vocab_size):
        if draft.token_text(token_id) != target.token_text(token_id):
            raise DraftModelError(
                f"--draft {draft_name}: token {token_id} is {draft.token_text(token_id)!r} there but "
                f"{target.token_text(token_id)!r} in the model; give a draft model with the model's tokenizer")


class DraftModel:
    """A draft model's layers loaded in this process, shared by the drafters of many sequences."""

    def __init__(self, model: LoadedModel, n_ctx: int, draft_max: int = DRAFT_MAX):
        if draft_max < 1:
            raise ValueError(f"draft_max must be >= 1, got {draft_max}")
        self.model = model
        self.pipeline: Pipeline = model.local_pipeline(n_ctx)
        self.draft_max = draft_max
        self.lock = threading.Lock()  # one guess at a time: the scheduler's lanes may draft at once

    def drafter(self, params: SamplingParams | None = None) -> "ModelDrafter":
        """A new sequence's drafter (its draft session is made at its first guess); `params`, the
        sequence's sampler settings: at temperature > 0 it draws its drafts with them."""
        return ModelDrafter(self, params)

    @property
    def sessions(self) -> int:
        """Draft sessions alive: one per sequence that has drafted and not ended."""
        return sum(row.sessions for row in self.pipeline.stats())

    def close(self) -> None:
        self.pipeline.close()


class ModelDrafter:
    """One sequence's guesses from a draft model, greedy or drawn (SampledDraft) at temperature
    > 0. Its length adapts as PromptLookup's does: it grows while drafts are kept whole and
    shrinks to one more than the tokens kept."""

    def __init__(self, draft: DraftModel, params: SamplingParams | None = None):
        self.draft = draft
        sampled = params is not None and params.temperature > 0
        self.sampler = Sampler(params) if sampled else None  # its chain gives q; its generator is not drawn from
        self.rng = np.random.default_rng(None if not sampled or params.seed is None else [params.seed, DRAFT_SEED_STREAM])
        self.session_id = f"draft-{uuid.uuid4().hex}"
        self.fed: list[int] = []  # tokens whose keys and values the draft session holds, in order
        self.length = draft.draft_max  # the next draft's length at most
        self.passes = 0  # drafts the target checked
        self.rejected_at_first = 0  # of those, drafts whose first token the target rejected
        self.kept_whole = 0  # drafts of draft_max tokens the target kept whole

    def propose(self, history: Sequence[int], limit: int) -> list[int]:
        pipeline = self.draft.pipeline
        # The last guess is not fed: the draft's context must hold the history and all but one.
        n = min(self.length, limit, pipeline.n_ctx - len(history) + 1)
        if n <= 0:
            return []
        with self.draft.lock:
            keep = common_prefix(self.fed, history, len(history) - 1)  # at least the last token is fed
            self.fed = list(history[:keep])  # until the feed succeeds: all the session surely holds
            hidden = pipeline.prefill(self.session_id, history, start=keep)  # (1, dim)
            self.fed = list(history)
            draft, q = [], []  # q: the distributions drawn from, when sampling
            while True:
                draft.append(self._pick(pipeline.head.logits(hidden[-1:])[0], [*history, *draft], q))
                if len(draft) == n:
                    break
                hidden = pipeline.forward([Segment(self.session_id, len(self.fed), 1)], np.array(draft[-1:]))
                self.fed.append(draft[-1])
        return SampledDraft(draft, np.stack(q)) if q else draft

    def _pick(self, logits: np.ndarray, previous: list[int], q: list[np.ndarray]) -> int:
        """The next draft token after `previous` from the draft's logits (vocab,): the argmax, or a
        draw from the sampler chain's distribution, which is appended to q."""
        if self.sampler is None:
            return int(np.argmax(logits))
        q.append(self.sampler.distribution(logits, previous))  # (vocab,)
        return inverse_cdf(q[-1], self.rng.random())

    def update(self, proposed: int, accepted: int) -> None:
        self.passes += 1
        self.rejected_at_first += accepted == 0
        self.kept_whole += accepted == proposed == self.draft.draft_max
        if accepted == proposed:
            self.length = min(self.draft.draft_max, 2 * self.length)
        else:
            self.length = accepted + 1

    def end(self) -> None:
        """Let go of the draft session (if it was made); the sequence has ended."""
        with self.draft.lock:
            self.draft.pipeline.end_session(self.session_id)
        self.fed = []
