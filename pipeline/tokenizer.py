"""Tokenizer built from a GGUF file's `tokenizer.ggml.*` metadata.

The reference is llama.cpp (src/llama-vocab.cpp): for the same metadata, `Tokenizer.encode`
gives the ids that `llama_tokenize` gives and `eog_ids` is the set `llama_vocab_is_eog`
accepts. The merge loops run in HuggingFace `tokenizers`; this module only translates the
metadata into a `tokenizers.Tokenizer` and does the two steps llama.cpp does around it:

1. Special tokens are cut out of the text first (llama.cpp's `tokenizer_st_partition`), so
   "<|im_start|>" becomes one id and the text around it is encoded on its own.
2. Each remaining fragment goes through the `tokenizers` pipeline:
   - "gpt2" (byte-level BPE): the pre-tokenizer regexes llama.cpp picks for
     `tokenizer.ggml.pre`, then GPT-2's byte-to-unicode mapping, then BPE with the file's
     merge list;
   - "llama" (SentencePiece BPE): spaces become U+2581 "▁", a "▁" is prepended where llama.cpp
     prepends one, and BPE merges derived from the vocabulary scores run over the whole
     fragment, with `<0xNN>` byte tokens for characters the vocabulary lacks.

Decoding does not use `tokenizers`: each id maps to the bytes llama.cpp's
`llama_token_to_piece(special=false)` gives (control tokens give nothing), and the bytes
are joined and read as UTF-8.
"""

from __future__ import annotations

import codecs
import enum
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from tokenizers import Regex, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from .gguf_file import describe

logger = logging.getLogger(__name__)


class TokenizerError(ValueError):
    """The GGUF tokenizer metadata is missing, malformed or of an unsupported kind."""


class _Attr(enum.IntEnum):
    """Token attribute bits, as llama.h's `llama_token_attr`; a token's attributes are an int
    (a plain IntEnum, not IntFlag: IntFlag's `&` is too slow for 100k-token vocabularies)."""

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5


# `tokenizer.ggml.token_type` values (gguf-py's TokenType) to attributes; llama-vocab.cpp, load.
_TOKEN_TYPE_ATTRS = {
    1: _Attr.NORMAL,
    2: _Attr.UNKNOWN,
    3: _Attr.CONTROL,
    4: _Attr.USER_DEFINED,
    5: _Attr.UNUSED,
    6: _Attr.BYTE,
}

# Ids that never render with special=False (llama_token_to_piece's `attr_special`).
_SILENT = _Attr.UNKNOWN | _Attr.CONTROL

SUPPORTED_MODELS = ("gpt2", "llama")
MAX_SPM_PIECE_CHARS = 512  # SentencePiece's limit on a trained piece

# --- pre-tokenizers --------------------------------------------------------------------------
# The regexes are llama.cpp's (llm_tokenizer_bpe's constructor), written there for std::regex:
# case-insensitive groups spelled out as [sS], lookaheads where HF used \p{Lu}/\p{Ll}. Taking
# them as llama.cpp has them, rather than from the models' tokenizer.json, keeps the splits
# equal to llama.cpp's. Each regex splits every piece the previous one left, keeping both
# the matches and the text between them ("isolated").

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"

_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"

_LLAMA3_REGEX = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_QWEN2_REGEX = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# "upper-case run then lower-case run" written with lookaheads: a letter that is not a-z,
# then letters that are not A-Z.
_UPPER_THEN_LOWER = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
)

_TEKKEN_REGEX = (
    _UPPER_THEN_LOWER + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_GPT4O_REGEX = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + _CONTRACTIONS + "?"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + _CONTRACTIONS + "?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreTokenizer:
    regexes: tuple[str, ...]  # applied in order, each to the pieces the previous left
    ignore_merges: bool = False  # a piece that is a whole vocabulary entry is taken as is
    add_bos: bool = False  # llama.cpp's add_bos when `tokenizer.ggml.add_bos_token` is absent


# llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT: used for files without `tokenizer.ggml.pre`.
_DEFAULT = _PreTokenizer(
    (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]")
)
_GPT2 = _PreTokenizer((_GPT2_REGEX,))
_LLAMA3 = _PreTokenizer((_LLAMA3_REGEX,), ignore_merges=True, add_bos=True)
_SMOLLM = _PreTokenizer((r"\p{N}", _GPT2_REGEX))  # every digit on its own, then GPT-2
_QWEN2 = _PreTokenizer((_QWEN2_REGEX,))
_TEKKEN = _PreTokenizer((_TEKKEN_REGEX,), ignore_merges=True, add_bos=True)
_GPT4O = _PreTokenizer((_GPT4O_REGEX,))

# `tokenizer.ggml.pre` -> pre-tokenizer, as llama_vocab::impl::load maps the names.
_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    "default": _DEFAULT,
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "exaone4"), _GPT2),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "lfm2"),
        _LLAMA3,
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _PreTokenizer((_LLAMA3_REGEX,))),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        _SMOLLM,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), _QWEN2),
    "tekken": _TEKKEN,
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O),
}

# --- special tokens found by their text -------------------------------------------------------
# llama.cpp finds end-of-turn tokens by text when the file names none, and treats every token
# whose text is in _EOG_TEXTS as ending generation (llama-vocab.cpp, load; issue #9606).

_EOT_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
    "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
})
_EOM_TEXTS = frozenset({"<|eom_id|>"})
_FIM_PAD_TEXTS = frozenset({"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"})
_FIM_REP_TEXTS = frozenset({"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"})
_FIM_SEP_TEXTS = frozenset({"<|file_sep|>"})
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
})

# llama.cpp's ids when the file has no `tokenizer.ggml.<name>_token_id` (llama-vocab.cpp, load).
_DEFAULT_SPECIAL_IDS = {
    "llama": {"bos": 1, "eos": 2, "unknown": 0},
    "gpt2": {"bos": 11, "eos": 11},
}

_SPACE_MARK = "\u2581"  # SentencePiece's "▁", which stands for a space inside tokens


@dataclass(frozen=True)
class _SpecialIds:
    bos: int | None
    eos: int | None
    eot: int | None
    eom: int | None
    unknown: int | None
    padding: int | None
    fim_pad: int | None
    fim_rep: int | None
    fim_sep: int | None


class Tokenizer:
    """Text <-> token ids for one GGUF vocabulary; build it with `from_metadata`."""

    def __init__(
        self,
        *,
        model: str,
        tokens: list[str],
        attrs: list[int],
        special_ids: _SpecialIds,
        eog_ids: frozenset[int],
        add_bos: bool,
        add_eos: bool,
        add_space_prefix: bool,
        pipeline: _HFTokenizer,
    ) -> None:
        self.model = model
        self.vocab_size = len(tokens)
        self.bos_id = special_ids.bos
        self.eos_id = special_ids.eos
        self.unknown_id = special_ids.unknown
        self.padding_id = special_ids.padding
        self.eog_ids = eog_ids
        self.add_bos = add_bos
        # Read and exposed, but encode never appends EOS: a prompt to continue must not end
        # in one, and no LLaMA-family GGUF sets it.
        self.add_eos = add_eos
        self.add_space_prefix = add_space_prefix
        self._tokens = tokens
        self._pipeline = pipeline
        self._pieces = _token_pieces(model, tokens, attrs)
        self._specials_parsed = _special_texts(tokens, attrs, parse_special=True)
        self._specials_plain = _special_texts(tokens, attrs, parse_special=False)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF key/values (strings, lists of strings, 1-D numpy arrays, scalars)."""
        start = time.perf_counter()
        model = _read_model(metadata)
        tokens = _read_tokens(metadata)
        attrs = _read_attrs(metadata, len(tokens))
        special_ids = _read_special_ids(metadata, model, len(tokens))
        special_ids = _find_special_ids_by_text(special_ids, tokens, attrs)
        eog_ids = _eog_ids(special_ids, tokens, attrs)

        if model == "gpt2":
            pre = _read_pre_tokenizer(metadata)
            pipeline = _byte_level_bpe(tokens, _read_merges(metadata), pre)
            add_bos_default, add_space_prefix = pre.add_bos, False
        else:
            scores = _read_array(metadata, "tokenizer.ggml.scores", len(tokens))
            pipeline = _sentencepiece_bpe(tokens, scores, special_ids.unknown)
            add_bos_default = True
            add_space_prefix = _read_bool(metadata, "tokenizer.ggml.add_space_prefix", True)

        add_bos = _read_bool(metadata, "tokenizer.ggml.add_bos_token", add_bos_default)
        add_eos = _read_bool(metadata, "tokenizer.ggml.add_eos_token", False)
        if add_bos and special_ids.bos is None:
            raise TokenizerError(
                "tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id is not "
                "set; set the BOS id or add_bos_token = false"
            )
        tokenizer = cls(
            model=model,
            tokens=tokens,
            attrs=attrs,
            special_ids=special_ids,
            eog_ids=eog_ids,
            add_bos=add_bos,
            add_eos=add_eos,
            add_space_prefix=add_space_prefix,
            pipeline=pipeline,
        )
        logger.debug(
            "tokenizer %s: %d tokens, bos=%s eos=%s eog=%s, built in %.3f s",
            model, len(tokens), special_ids.bos, special_ids.eos, sorted(eog_ids),
            time.perf_counter() - start,
        )
        return tokenizer

    def encode(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids for `text`, as llama.cpp's llama_tokenize(parse_special=special).

        add_bos: None follows the model (`self.add_bos`). special: True maps the text of
        control and user-defined tokens ("<|im_start|>") to their ids; False encodes it as
        plain text (user-defined tokens are still matched, as llama.cpp does).
        """
        if add_bos is None:
            add_bos = self.add_bos
        ids: list[int] = []
        if add_bos:
            if self.bos_id is None:
                raise TokenizerError("encode(add_bos=True): this vocabulary has no BOS token")
            ids.append(self.bos_id)
        # SentencePiece models prefix a space to text at the start and after each special
        # token (llama_vocab::impl::tokenize, LLAMA_VOCAB_TYPE_SPM).
        after_special = True
        for fragment in self._split_special(text, special):
            if isinstance(fragment, int):
                ids.append(fragment)
                after_special = True
                continue
            if self.add_space_prefix and after_special:
                fragment = " " + fragment
            ids.extend(self._pipeline.encode(fragment, add_special_tokens=False).ids)
            after_special = False
        return ids

    def encode_rendered(self, text: str) -> list[int]:
        """Token ids of a prompt a chat template rendered, special tokens mapped: BOS where the
        model asks for one, except that a template that writes the BOS token itself must not
        get a second one."""
        starts_with_bos = self.bos_id is not None and text.startswith(self.token_text(self.bos_id))
        return self.encode(text, add_bos=False if starts_with_bos else self.add_bos, special=True)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; control tokens render as "" (llama_token_to_piece, special=False).

        Invalid UTF-8 (a multi-byte character cut off) becomes U+FFFD.
        """
        ids = [self._check_id(i) for i in ids]
        data = b"".join([self._pieces[i] for i in ids])
        if ids and self._strips_space_after(ids[0]) and data.startswith(b" "):
            data = data[1:]
        return data.decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry for `token_id`, as stored ("Ġthe", "▁the", "<0x0A>")."""
        return self._tokens[self._check_id(token_id)]

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes `token_id` stands for in text (b"" for control tokens)."""
        return self._pieces[self._check_id(token_id)]

    def _strips_space_after(self, first_id: int) -> bool:
        # The space a SentencePiece model prefixed to the prompt is not part of the text; a
        # sequence that starts with BOS is such a prompt (llama-cpp-python's detokenize).
        return self.add_space_prefix and first_id == self.bos_id

    def _check_id(self, token_id: int) -> int:
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} out of range (vocab size {self.vocab_size})")
        return token_id

    def _split_special(self, text: str, special: bool) -> list[str | int]:
        """`text` cut into plain fragments and special-token ids.

        Same order as llama.cpp's tokenizer_st_partition: longest special token first, each
        cutting every fragment left so far at its non-overlapping occurrences, left to right.
        """
        fragments: list[str | int] = [text] if text else []
        for token_text, token_id in self._specials_parsed if special else self._specials_plain:
            if token_text not in text:
                continue
            cut: list[str | int] = []
            for fragment in fragments:
                if isinstance(fragment, int) or token_text not in fragment:
                    cut.append(fragment)
                    continue
                for n, part in enumerate(fragment.split(token_text)):
                    if n:
                        cut.append(token_id)
                    if part:
                        cut.append(part)
            fragments = cut
        return fragments


class StreamDecoder:
    """Incremental detokenizer for streamed output: never emits half a multi-byte UTF-8
    character (an emoji split across byte tokens arrives whole), and never emits text it must
    later take back.

    The concatenation of everything `push` and `flush` return equals `Tokenizer.decode` of
    all the ids pushed.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        # Holds back the bytes of an unfinished character; a byte that cannot start or
        # continue one becomes U+FFFD as soon as that is known, as in bytes.decode.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = True
        self._strip_space = False

    def push(self, token_id: int) -> str:
        """The new text that is now complete ("" while a character waits for more bytes)."""
        piece = self._tokenizer.token_bytes(token_id)
        if self._first:
            self._first = False
            self._strip_space = self._tokenizer._strips_space_after(int(token_id))
        if self._strip_space and piece:
            self._strip_space = False
            if piece.startswith(b" "):
                piece = piece[1:]
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """Whatever is left at the end (U+FFFD for a character that never completed)."""
        return self._utf8.decode(b"", final=True)


# --- reading metadata ---------------------------------------------------------------------------


def _read_model(metadata: Mapping[str, Any]) -> str:
    model = metadata.get("tokenizer.ggml.model")
    if model is None:
        raise TokenizerError(
            f"tokenizer.ggml.model: missing (supported: {', '.join(SUPPORTED_MODELS)})"
        )
    if not isinstance(model, str) or model not in SUPPORTED_MODELS:
        raise TokenizerError(
            f"tokenizer.ggml.model: unsupported tokenizer {describe(model)} "
            f"(supported: {', '.join(SUPPORTED_MODELS)})"
        )
    return model


def _read_tokens(metadata: Mapping[str, Any]) -> list[str]:
    key = "tokenizer.ggml.tokens"
    tokens = metadata.get(key)
    if tokens is None:
        raise TokenizerError(f"{key}: missing; the GGUF file has no vocabulary")
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence) or not tokens:
        raise TokenizerError(f"{key}: expected a non-empty array of strings")
    if not all(isinstance(t, str) for t in tokens):
        raise TokenizerError(f"{key}: expected an array of strings")
    # llama.cpp renames empty entries so that every token has a distinct, non-empty text.
    tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
    if len(set(tokens)) != len(tokens):
        seen: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if t in seen:
                raise TokenizerError(f"{key}: duplicate token {describe(t)} at ids {seen[t]} and {i}")
            seen[t] = i
    return tokens


def _read_array(metadata: Mapping[str, Any], key: str, n_tokens: int, integer: bool = False) -> np.ndarray:
    value = metadata.get(key)
    if value is None:
        raise TokenizerError(f"{key}: missing; required for this tokenizer.ggml.model")
    kinds, what = ("iu", "an integer") if integer else ("iuf", "a numeric")
    expected = f"expected {what} array of at least {n_tokens} entries (one per token)"
    try:
        array = np.asarray(value)
    except ValueError:  # arrays of arrays of different lengths
        raise TokenizerError(f"{key}: {expected}, got {describe(value)} of uneven arrays") from None
    if array.ndim != 1 or array.shape[0] < n_tokens or array.dtype.kind not in kinds:
        raise TokenizerError(f"{key}: {expected}, got shape {array.shape} dtype {array.dtype}")
    return array[:n_tokens]


def _read_attrs(metadata: Mapping[str, Any], n_tokens: int) -> list[int]:
    if metadata.get("tokenizer.ggml.token_type") is None:
        return [_Attr.NORMAL] * n_tokens
    types = _read_array(metadata, "tokenizer.ggml.token_type", n_tokens, integer=True)
    return [_TOKEN_TYPE_ATTRS.get(int(t), _Attr.UNDEFINED) for t in types.tolist()]


def _read_bool(metadata: Mapping[str, Any], key: str, default: bool) -> bool:
    value = metadata.get(key, default)
    if not isinstance(value, (bool, np.bool_)):
        raise TokenizerError(f"{key}: expected a bool, got {describe(value)}")
    return bool(value)


def _read_special_ids(metadata: Mapping[str, Any], model: str, n_tokens: int) -> _SpecialIds:
    """Special ids from `tokenizer.ggml.<name>_token_id`, else llama.cpp's defaults; an id
    outside the vocabulary is ignored with a warning, as llama.cpp does."""
    defaults = _DEFAULT_SPECIAL_IDS[model]
    ids: dict[str, int | None] = {}
    for name in ("bos", "eos", "eot", "eom", "unknown", "padding", "fim_pad", "fim_rep", "fim_sep"):
        key = f"tokenizer.ggml.{name}_token_id"
        default = defaults.get(name)
        if default is not None and default >= n_tokens:
            default = None
        value = metadata.get(key)
        if value is None:
            ids[name] = default
        elif isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TokenizerError(f"{key}: expected an integer token id, got {describe(value)}")
        elif not 0 <= int(value) < n_tokens:
            logger.warning("%s = %d is outside the vocabulary (%d tokens); using %s",
                           key, int(value), n_tokens, default)
            ids[name] = default
        else:
            ids[name] = int(value)
    return _SpecialIds(**ids)


def _find_special_ids_by_text(
    ids: _SpecialIds, tokens: list[str], attrs: list[int]
) -> _SpecialIds:
    """Fill eot/eom/fim ids the file leaves unset from the token texts llama.cpp looks for,
    marking those tokens as control tokens as llama.cpp does."""
    found = {}
    for name, texts in (
        ("eot", _EOT_TEXTS), ("eom", _EOM_TEXTS), ("fim_pad", _FIM_PAD_TEXTS),
        ("fim_rep", _FIM_REP_TEXTS), ("fim_sep", _FIM_SEP_TEXTS),
    ):
        if getattr(ids, name) is not None:
            continue
        # llama.cpp takes whichever match its hash map yields first; the lowest id is ours.
        match = next((i for i, t in enumerate(tokens) if t in texts), None)
        if match is not None:
            found[name] = match
            attrs[match] |= _Attr.CONTROL
    return replace(ids, **found)


def _eog_ids(ids: _SpecialIds, tokens: list[str], attrs: list[int]) -> frozenset[int]:
    """The ids llama_vocab_is_eog accepts: EOS, EOT, EOM, the FIM pad/repo/separator tokens
    and every token whose text is a known end-of-generation marker."""
    eog = {i for i in (ids.eos, ids.eot, ids.eom, ids.fim_pad, ids.fim_rep, ids.fim_sep)
           if i is not None}
    for i, text in enumerate(tokens):
        if text in _EOG_TEXTS:
            eog.add(i)
            attrs[i] |= _Attr.CONTROL
    return frozenset(eog)


def _read_pre_tokenizer(metadata: Mapping[str, Any]) -> _PreTokenizer:
    name = metadata.get("tokenizer.ggml.pre")
    if name is None:
        logger.warning("tokenizer.ggml.pre: missing; using llama.cpp's 'default' pre-tokenizer, "
                       "which may split text differently from the original model")
        return _DEFAULT
    if not isinstance(name, str):
        raise TokenizerError(f"tokenizer.ggml.pre: expected a string, got {describe(name)}")
    pre = _PRE_TOKENIZERS.get(name)
    if pre is None:
        # llama.cpp refuses such a file; falling back to GPT-2's split keeps it usable.
        logger.warning("tokenizer.ggml.pre: unknown pre-tokenizer %r, using the GPT-2 regex "
                       "(known: %s)", name, ", ".join(sorted(_PRE_TOKENIZERS)))
        return _GPT2
    return pre


def _read_merges(metadata: Mapping[str, Any]) -> list[tuple[str, str]]:
    key = "tokenizer.ggml.merges"
    merges = metadata.get(key)
    if merges is None:
        raise TokenizerError(f"{key}: missing; a 'gpt2' tokenizer needs its BPE merges")
    if isinstance(merges, (str, bytes)) or not isinstance(merges, Sequence):
        raise TokenizerError(f"{key}: expected an array of strings")
    pairs = []
    for rank, merge in enumerate(merges):
        # "left right", split at the first space after the first character (llama.cpp).
        cut = merge.find(" ", 1) if isinstance(merge, str) else -1
        if cut < 0:
            raise TokenizerError(f"{key}[{rank}]: expected 'left right', got {describe(merge)}")
        pairs.append((merge[:cut], merge[cut + 1:]))
    return pairs


# --- building the tokenizers pipeline -------------------------------------------------------------


def _byte_level_bpe(
    tokens: list[str], merges: list[tuple[str, str]], pre: _PreTokenizer
) -> _HFTokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    usable = [(a, b) for a, b in merges if a in vocab and b in vocab and a + b in vocab]
    if len(usable) < len(merges):
        logger.warning("tokenizer.ggml.merges: ignoring %d merges of tokens not in the vocabulary",
                       len(merges) - len(usable))
    pipeline = _HFTokenizer(
        models.BPE(vocab=vocab, merges=usable, ignore_merges=pre.ignore_merges)
    )
    pipeline.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    return pipeline


def _sentencepiece_bpe(
    tokens: list[str], scores: np.ndarray, unknown_id: int | None
) -> _HFTokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    model = models.BPE(
        vocab=vocab,
        merges=_merges_from_scores(tokens, scores, vocab),
        unk_token=tokens[unknown_id] if unknown_id is not None else None,
        byte_fallback=True,
    )
    pipeline = _HFTokenizer(model)
    # No pre-tokenizer: SentencePiece merges across the whole text, spaces included.
    pipeline.normalizer = normalizers.Replace(" ", _SPACE_MARK)
    return pipeline


def _merges_from_scores(
    tokens: list[str], scores: np.ndarray, vocab: Mapping[str, int]
) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-driven merging.

    llama.cpp's SPM tokenizer repeatedly merges the adjacent pair whose concatenation is the
    vocabulary entry with the highest score (llm_tokenizer_spm_session). As BPE merges that
    is: every split of every entry into two entries, ranked by the entry's score, highest
    first. The same construction as transformers' `generate_merges`; ties in score, which
    llama.cpp breaks by position in the text, are ranked here by token id.

    Splitting costs the square of a token's length, so entries longer than SentencePiece's
    own limit on trained pieces (max_sentencepiece_length <= 512, trainer_interface.cc) are
    left out: a crafted 1 MB token would otherwise take minutes. They stay in the vocabulary.
    """
    too_long = [i for i, t in enumerate(tokens) if len(t) > MAX_SPM_PIECE_CHARS]
    if too_long:
        logger.warning("tokenizer.ggml.tokens: tokens longer than %d characters are never formed by "
                       "merges: %d of them (first: id %d)", MAX_SPM_PIECE_CHARS, len(too_long), too_long[0])
    ranked = []
    for token_id, token in enumerate(tokens):
        if len(token) > MAX_SPM_PIECE_CHARS:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(scores[token_id]), token_id, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


# --- decoding -----------------------------------------------------------------------------------


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's map from the printable stand-in characters of byte-level BPE back to bytes.

    Bytes that are printable Latin-1 stand for themselves; the others (controls, space,
    0x7F-0xA0, 0xAD) are given the code points from U+0100 up, in byte order (OpenAI's
    gpt-2 encoder.py, bytes_to_unicode).
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    alphabet = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(0x100 + shifted)] = byte
            shifted += 1
    return alphabet


def _token_pieces(model: str, tokens: list[str], attrs: list[int]) -> list[bytes]:
    """The bytes each token contributes to decoded text (llama_token_to_piece, special=False)."""
    if model == "gpt2":
        # Stand-in character -> the character whose code point is the byte, then Latin-1.
        table = str.maketrans({c: chr(b) for c, b in _byte_level_alphabet().items()})
    pieces = []
    for token_id, (text, attr) in enumerate(zip(tokens, attrs)):
        if attr & _SILENT:
            pieces.append(b"")
        elif attr & _Attr.USER_DEFINED:
            pieces.append(text.encode("utf-8"))
        elif attr & _Attr.NORMAL:
            if model != "gpt2":
                pieces.append(text.replace(_SPACE_MARK, " ").encode("utf-8"))
                continue
            try:
                pieces.append(text.translate(table).encode("latin-1"))
            except UnicodeEncodeError:
                # A character outside the byte alphabet, only in malformed vocabularies
                # (llama.cpp renders it as "[UNK_BYTE_...]"): kept as its UTF-8.
                pieces.append(text.encode("utf-8"))
        elif attr & _Attr.BYTE:
            pieces.append(bytes([_byte_token_value(token_id, text)]))
        else:  # unused and undefined tokens render as nothing
            pieces.append(b"")
    return pieces


def _byte_token_value(token_id: int, text: str) -> int:
    """The byte a "<0xNN>" token stands for."""
    if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
        try:
            return int(text[3:5], 16)
        except ValueError:
            pass
    raise TokenizerError(
        f"tokenizer.ggml.tokens[{token_id}]: byte token {text!r} is not of the form <0xNN>"
    )


def _special_texts(
    tokens: list[str], attrs: list[int], parse_special: bool
) -> list[tuple[str, int]]:
    """(text, id) of the tokens cut out of text before BPE, longest first.

    Control, user-defined and unknown tokens with parse_special; only user-defined ones
    without it (llama.cpp's cache_special_tokens and tokenizer_st_partition). Length is in
    UTF-8 bytes, as llama.cpp measures it.
    """
    wanted = _Attr.CONTROL | _Attr.USER_DEFINED | _Attr.UNKNOWN
    specials = []
    for token_id, (text, attr) in enumerate(zip(tokens, attrs)):
        if not attr & wanted:
            continue
        if not parse_special and attr & _SILENT:
            continue
        specials.append((text, token_id))
    specials.sort(key=lambda item: (-len(item[0].encode("utf-8")), item[1]))
    return specials
