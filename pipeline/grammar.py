"""Constrained decoding: a grammar that says, at each step, which tokens may come next.

The grammars (JSON schemas, Lark, llama.cpp's GBNF) compile and run in llguidance
(guidance-ai/llguidance), which computes a token mask per step from a lexer over the
vocabulary's bytes and an Earley parser. `Grammars` holds its view of one model's vocabulary,
built once per model (LoadedModel.grammars); `GrammarConstraint` is one sequence's parser state,
which the Sampler asks for the allowed tokens and advances with the token it chose
(pipeline/sampler.py, `Constraint`).

The parser is built on a worker thread while the prompt is computed (a large grammar takes a
while). The masks are computed on the sampling thread: one takes microseconds, less than handing
it over from another thread, whose every wake waits out Python's GIL switch interval while the
kernels hold the GIL (tests/bench/RESULTS.md, structured output).
"""

from __future__ import annotations

import functools
import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask_par_with_draft_tokens

from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

# Builds the sequences' parsers, one at a time: a second core is left to the kernels.
_BUILDS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="caravan-grammar")
# "Any JSON object", as OpenAI's response_format json_object and Ollama's format "json" ask.
ANY_JSON_OBJECT = {"type": "object"}
# JSON on one line, spaced as Python's json.dumps: free whitespace lets a small model run on in
# newlines until max_tokens. A schema's own "x-guidance" options may still say otherwise.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A schema or grammar that the constrained-decoding library refuses; the message says why."""


class Grammars:
    """Compiles grammars for one model's vocabulary and starts a constraint per sequence."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.vocab_size = tokenizer.vocab_size
        self.eog_ids = sorted(tokenizer.eog_ids)
        self.tokenizer = llguidance.LLTokenizer(_VocabularyBytes(tokenizer), eos_token=self.eog_ids)
        self._executor = llguidance.LLExecutor(num_threads=1)

    def json_schema(self, schema: dict | bool) -> str:
        """The grammar of a JSON schema (a JSON object matching it, compactly spaced), or a GrammarError."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_LAYOUT)
        except ValueError as exc:
            raise GrammarError(str(exc)) from None
        return self._checked(grammar)

    def gbnf(self, text: str) -> str:
        """The grammar of llama.cpp's GBNF (or llguidance's Lark) text, or a GrammarError."""
        try:
            grammar = llguidance.grammar_from("gbnf", text)
        except ValueError as exc:
            raise GrammarError(str(exc)) from None
        return self._checked(grammar)

    def lark(self, text: str) -> str:
        """The grammar of llguidance's Lark text (which may embed JSON schemas), or a GrammarError."""
        return self._checked(llguidance.LLMatcher.grammar_from_lark(text))

    def _checked(self, grammar: str) -> str:
        # A warning (an unimplemented keyword, an unknown format) would silently loosen the
        # constraint: refuse it as an error, so the client knows what it would not get.
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error or messages:
            raise GrammarError("; ".join(m.strip() for m in messages) or "the grammar is invalid")
        return grammar

    def constraint(self, grammar: str) -> GrammarConstraint:
        """A new sequence's constraint for a grammar from json_schema, gbnf or lark."""
        return GrammarConstraint(self, grammar)


class _VocabularyBytes(llguidance.TokenizerWrapper):
    """The vocabulary as llguidance reads it: each token's bytes (control tokens by their text,
    marked special) and an encode function."""

    def __init__(self, tokenizer: Tokenizer) -> None:  # noqa: super().__init__ probes a foreign tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        pieces = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.special_token_ids = [i for i, piece in enumerate(pieces) if not piece]
        self.tokens = [piece or tokenizer.token_text(i).encode() for i, piece in enumerate(pieces)]
        self.is_tokenizer_wrapper = True
        self._gtokenizer = lambda text: tokenizer.encode(text, add_bos=False, special=False)
        self._accepts_bytes = False


class GrammarConstraint:
    """One sequence's place in its grammar: the tokens allowed next, advanced token by token."""

    def __init__(self, grammars: Grammars, grammar: str) -> None:
        self.grammars = grammars
        self._bitmask = allocate_token_bitmask(1, grammars.vocab_size)  # (1, ceil(vocab / 32)) int32
        # Building the parser can take a while for a large grammar, and drops the GIL: off the
        # caller's thread, while the prompt is computed.
        self._building: Future[llguidance.LLMatcher] = _BUILDS.submit(
            llguidance.LLMatcher, grammars.tokenizer, grammar, log_level=0)
        self._allowed: np.ndarray | None = None  # the mask for the next token, once computed

    @functools.cached_property
    def _matcher(self) -> llguidance.LLMatcher:
        return self._building.result()

    def allowed(self) -> np.ndarray:
        """(vocab,) bool: which tokens may come next; only end-of-generation ones once the matcher
        is in error (it never is for a validated grammar), so the sequence ends rather than fails."""
        if self._allowed is None:
            matcher = self._matcher
            if not matcher.is_error():
                matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
            if matcher.is_error():
                log.warning("grammar constraint failed, ending the sequence: %s", matcher.get_error())
                self._allowed = np.zeros(self.grammars.vocab_size, dtype=bool)
                self._allowed[self.grammars.eog_ids] = True
            else:
                self._allowed = _unpack(self._bitmask[0], self.grammars.vocab_size)
        return self._allowed

    def accepts(self, token: int) -> bool:
        """Whether `token` may come next, checked alone (cheaper than the whole mask)."""
        if self._allowed is not None:
            return bool(self._allowed[token])
        return self._matcher.validate_tokens([int(token)]) == 1

    def advance(self, token: int) -> None:
        """The sequence chose `token`: move past it."""
        self._matcher.consume_token(int(token))
        self._allowed = None

    def rollback(self, count: int) -> None:
        """Take back the last `count` tokens advanced past (speculated tokens the model rejected)."""
        self._matcher.rollback(count)
        self._allowed = None

    @property
    def finished(self) -> bool:
        """Whether the grammar is complete and allows nothing but the end of generation."""
        return self._matcher.is_stopped()

    def allowed_rows(self, draft: list[int]) -> np.ndarray:
        """(len(draft) + 1, vocab) bool: the tokens allowed now and after each draft token in turn,
        for checking speculated tokens in one call; rows after a draft token the grammar refuses
        allow nothing. The sequence's own place does not move."""
        masks = np.zeros((len(draft) + 1, self._bitmask.shape[1]), dtype=np.int32)  # (k + 1, ceil(vocab / 32))
        fill_next_token_bitmask_par_with_draft_tokens(self.grammars._executor,
                                                      [(self._matcher, 0, [int(t) for t in draft])], masks)
        return np.stack([_unpack(row, self.grammars.vocab_size) for row in masks])


def _unpack(bits: np.ndarray, vocab_size: int) -> np.ndarray:
    """(vocab,) bool from llguidance's bitmask (token i is bit i % 32 of word i // 32)."""
    return np.unpackbits(bits.view(np.uint8), bitorder="little")[:vocab_size].view(bool)
