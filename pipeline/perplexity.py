"""Perplexity as llama.cpp's llama-perplexity computes it (tools/perplexity/perplexity.cpp).

- The text is tokenized once, as data (special-token text stays text), with a BOS first only
  where the model's metadata asks for one (`tokenizer.ggml.add_bos_token`).
- The tokens are cut into consecutive windows of n_ctx (the short tail is dropped), each
  evaluated from an empty cache; where the model adds a BOS, each window's first token is
  replaced by it.
- Only the second half of each window is scored, so every scored token is predicted from at
  least n_ctx/2 tokens of context (llama-perplexity's `first = n_ctx/2`).
"""

from __future__ import annotations

import uuid

import numpy as np

from .generate import PREFILL_CHUNK, Pipeline
from .sampler import log_z
from .stage import Segment
from .tokenizer import Tokenizer


def windows(tokenizer: Tokenizer, text: str, n_ctx: int) -> np.ndarray:
    """The text's token windows as llama-perplexity evaluates them: (n_windows, n_ctx), the
    short tail dropped; n_windows is 0 when the text is shorter than one window."""
    ids = tokenizer.encode(text, add_bos=None, special=False)  # add_bos None: the model's metadata
    n_windows = len(ids) // n_ctx
    tokens = np.asarray(ids[: n_windows * n_ctx], dtype=np.int64).reshape(n_windows, n_ctx)  # (window, position)
    if tokenizer.add_bos and tokenizer.bos_id is not None:
        tokens[:, 0] = tokenizer.bos_id
    return tokens


def first_scored(n_ctx: int) -> int:
    """The first position of a window whose logits are scored (they predict the next token)."""
    return n_ctx // 2


def window_nll(pipeline: Pipeline, window: np.ndarray) -> np.ndarray:
    """-log p(window[i + 1] | window[: i + 1]) for i = first_scored(n) .. n - 2, in float64,
    from one fresh session that prefills the window in chunks; the head runs on scored rows only."""
    session_id = uuid.uuid4().hex
    n = window.shape[0]
    first = first_scored(n)
    nll = []
    try:
        for start in range(0, n, PREFILL_CHUNK):
            chunk = window[start : start + PREFILL_CHUNK]  # (T,)
            hidden = pipeline.forward([Segment(session_id, start, len(chunk))], chunk)  # (T, dim)
            lo, hi = max(first, start), min(start + len(chunk), n - 1)  # scored positions in this chunk
            if lo >= hi:
                continue
            logits = pipeline.head.logits(hidden[lo - start : hi - start]).astype(np.float64)  # (rows, vocab)
            targets = window[lo + 1 : hi + 1]
            nll.append(log_z(logits) - logits[np.arange(hi - lo), targets])
    finally:
        pipeline.end_session(session_id)
    return np.concatenate(nll)

