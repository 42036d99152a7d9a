"""The tokenizer against llama.cpp (through llama-cpp-python), on the real SmolLM2 vocabulary
and on tiny vocabularies written with gguf.GGUFWriter."""

import logging
import random
from pathlib import Path

import gguf
import numpy as np
import pytest

from caravan.pipeline.gguf_file import read_gguf
from caravan.pipeline.tokenizer import StreamDecoder, Tokenizer, TokenizerError

TRICKY = [
    "Héllo wörld, ça va? naïve café",
    "你好，世界！日本語のテキストと한국어",
    "مرحبا بالعالم שלום עולם",
    "emoji 🤗 👍🏽 👩‍👩‍👧‍👦 🇫🇷🇯🇵 🏳️‍🌈 🧑‍💻",
    "def f(x):\n    if x:\n\treturn x  # tab\n        pass\n",
    "a    b\n\n\n  c\t\t d   \n",
    "   \n   \n\r\n",
    "1234567 3.14159 1,000,000 ² Ⅻ ٣",
    "I'm we're they've he'll she'd it's DON'T I'M ’tis",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|><|im_end|>\n<|endoftext|>",
    "",
    " leading space",
    "  two leading spaces",
    " ",
    "\n",
    "\u00a0nbsp\u2009thin\u3000ideographic zero\u200bwidth",
    "e\u0301 combining, ﬁ ligature, ＡＢＣ fullwidth",
    "http://example.com/a?b=c&d=e#f ...!!!???---___",
]
PLAIN = [s for s in TRICKY if "<|" not in s]


def random_texts(alphabet: list[str], n: int, seed: int, max_len: int = 30) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_len))) for _ in range(n)]


def write_vocab(path: Path, tokens: list[str], types: list[int], **keys) -> Path:
    """A GGUF file with a vocabulary and no tensors; llama.cpp loads it with vocab_only=True
    once the llama.* hyperparameters it reads first are present."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model(keys.pop("model"))
    if "pre" in keys:
        writer.add_tokenizer_pre(keys.pop("pre"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if "scores" in keys:
        writer.add_token_scores(keys.pop("scores"))
    if "merges" in keys:
        writer.add_token_merges(keys.pop("merges"))
    writer.add_bos_token_id(keys.pop("bos"))
    writer.add_eos_token_id(keys.pop("eos"))
    if "unk" in keys:
        writer.add_unk_token_id(keys.pop("unk"))
    if "add_space_prefix" in keys:
        writer.add_add_space_prefix(keys.pop("add_space_prefix"))
    assert not keys, keys
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp_vocab(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="needs llama-cpp-python, the reference")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


# --- the real SmolLM2 vocabulary (gpt2 byte-level BPE, pre "smollm") ---------------------------


@pytest.fixture(scope="module")
def smollm2_metadata(smollm2_path):
    return read_gguf(smollm2_path).metadata


@pytest.fixture(scope="module")
def smol(smollm2_metadata) -> Tokenizer:
    """The SmolLM2 tokenizer (conftest's `smollm2` is the whole loaded model)."""
    return Tokenizer.from_metadata(smollm2_metadata)


@pytest.fixture(scope="module")
def smollm2_ref(smollm2_path):
    return llama_cpp_vocab(smollm2_path)


@pytest.mark.model
def test_smollm2_header(smol):
    assert smol.vocab_size == 49152
    assert (smol.bos_id, smol.eos_id, smol.add_bos) == (1, 2, False)
    assert smol.token_text(1) == "<|im_start|>"
    # <|endoftext|>, <|im_end|> and <reponame>, which llama.cpp takes for a FIM repo token.
    assert smol.eog_ids == frozenset({0, 2, 4})


@pytest.mark.model
def test_smollm2_builds_fast(smollm2_metadata):
    import time

    # CPU seconds, which another test running beside it on the same cores does not lengthen.
    start = time.process_time()
    Tokenizer.from_metadata(smollm2_metadata)
    assert time.process_time() - start < 1.0


@pytest.mark.model
@pytest.mark.oracle
@pytest.mark.parametrize("special", [True, False])
@pytest.mark.parametrize("text", TRICKY)
def test_smollm2_encode_matches_llama_cpp(smol, smollm2_ref, text, special):
    expected = smollm2_ref.tokenize(text.encode(), add_bos=False, special=special)
    assert smol.encode(text, special=special) == expected


@pytest.mark.model
@pytest.mark.oracle
def test_smollm2_random_text_matches_llama_cpp(smol, smollm2_ref):
    alphabet = list("abcXYZ019 \n\t'.,!?-_éüñ中文🙂👍🏽\u200d\u00a0<|>") + [
        "<|im_start|>", "<|im_end|>", "  ", "\r\n", "'s", "’",
    ]
    for text in random_texts(alphabet, 500, seed=0):
        for special in (True, False):
            expected = smollm2_ref.tokenize(text.encode(), add_bos=False, special=special)
            assert smol.encode(text, special=special) == expected, (text, special)


@pytest.mark.model
def test_smollm2_special_tokens(smol):
    assert smol.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    as_text = smol.encode("<|im_start|>user\nhi<|im_end|>", special=False)
    assert 1 not in as_text and 2 not in as_text
    assert smol.decode(as_text) == "<|im_start|>user\nhi<|im_end|>"
    assert smol.encode("hi", add_bos=True)[0] == 1


@pytest.mark.model
@pytest.mark.parametrize("text", PLAIN)
def test_smollm2_round_trip(smol, text):
    assert smol.decode(smol.encode(text)) == text


@pytest.mark.model
@pytest.mark.oracle
@pytest.mark.parametrize("text", TRICKY)
def test_smollm2_decode_matches_llama_cpp(smol, smollm2_ref, text):
    ids = smol.encode(text)
    # Control tokens (<|im_start|>, <|im_end|>) render as nothing, as in llama.cpp.
    assert smol.decode(ids) == smollm2_ref.detokenize(ids).decode("utf-8", errors="replace")


@pytest.mark.model
@pytest.mark.oracle
def test_smollm2_eog_matches_llama_cpp(smol, smollm2_ref):
    import llama_cpp

    vocab = smollm2_ref._model.vocab
    expected = {i for i in range(smol.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert smol.eog_ids == expected


# --- streaming ----------------------------------------------------------------------------------


@pytest.mark.model
@pytest.mark.parametrize("text", PLAIN)
def test_stream_decoder_concatenates_to_decode(smol, text):
    ids = smol.encode(text)
    stream = StreamDecoder(smol)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == smol.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.model
def test_stream_decoder_holds_back_a_split_emoji(smol):
    ids = smol.encode("🤗")
    assert len(ids) > 1  # byte-level BPE spreads the four UTF-8 bytes over several tokens
    stream = StreamDecoder(smol)
    assert [stream.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert stream.push(ids[-1]) == "🤗"
    assert stream.flush() == ""


@pytest.mark.model
def test_stream_decoder_flushes_an_unfinished_character(smol):
    ids = smol.encode("a🤗")
    stream = StreamDecoder(smol)
    assert stream.push(ids[0]) == "a"
    assert stream.push(ids[1]) == ""
    assert stream.flush() == "\ufffd"


@pytest.mark.model
def test_stream_decoder_control_tokens_are_silent(smol):
    stream = StreamDecoder(smol)
    assert [stream.push(i) for i in smol.encode("<|im_start|>hi<|im_end|>")] == ["", "hi", ""]


# --- a tiny SentencePiece ("llama") vocabulary -------------------------------------------------

SPM_PIECES = [
    "▁", "e", "t", "a", "h", "l", "o", "r", "d", "w", "n", "i", "s", "g", ",", "!", "x",
    "▁t", "he", "▁the", "ll", "llo", "▁he", "▁hello", "el", "lo", "▁w", "or", "ld", "▁world",
    "orld", "▁a", "at", "▁at", "▁▁", "▁▁▁▁", "in", "ing", "▁is", "▁this", "th", "is", "▁th",
    "é", "中", "中文", "文", "1", "2", "3", "12", "123", "23", "hel", "▁hel", "wor", "▁wor",
    "\n", "\n\n", "▁\n", "es", "est", "▁test", "▁te", "te",
]
SPM_ALPHABET = list("helowrdtasing,!x123 中文é\nzß🙂") + [
    "<|user|>", "<|ctrl|>", "<s>", "</s>", "<unk>", "  ", "hello", " world", "the ",
]
SPM_TEXTS = [
    "hello world", "the test", "", " ", "  hello", "hello\n\nworld",
    "zebra ßtraße 🙂",  # z, ß and the emoji are not in the vocabulary: <0xNN> byte tokens
    "中文 文中", "hello<|user|>world", "<s>hello</s>", "<|ctrl|> x",
]


def spm_vocab(path: Path, seed: int, add_space_prefix: bool | None) -> Path:
    """<unk>, <s>, </s>, the 256 byte tokens, SPM_PIECES with shuffled scores (so the merge
    order differs from seed to seed), a user-defined and a control token."""
    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPM_PIECES
    tokens += ["<|user|>", "<|ctrl|>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES) + [4, 3]
    scores = [0.0] * 259 + [float(-1 - r) for r in rng.permutation(len(SPM_PIECES))] + [0.0, 0.0]
    keys = {} if add_space_prefix is None else {"add_space_prefix": add_space_prefix}
    return write_vocab(
        path, tokens, types, model="llama", scores=scores, bos=1, eos=2, unk=0, **keys
    )


@pytest.fixture(scope="module", params=[(0, None), (1, None), (2, False)], ids=str)
def spm_path(request, tmp_path_factory):
    seed, add_space_prefix = request.param
    return spm_vocab(tmp_path_factory.mktemp("spm") / "vocab.gguf", seed, add_space_prefix)


@pytest.fixture(scope="module")
def spm(spm_path) -> Tokenizer:
    return Tokenizer.from_metadata(read_gguf(spm_path).metadata)


def test_a_rendered_prompt_gets_one_bos_whether_or_not_the_template_wrote_it(spm):
    assert spm.add_bos and spm.token_text(spm.bos_id) == "<s>"
    assert spm.encode_rendered("<s>hello") == spm.encode("<s>hello", add_bos=False, special=True)
    assert spm.encode_rendered("<s>hello").count(spm.bos_id) == 1
    assert spm.encode_rendered("hello") == spm.encode("hello", add_bos=True, special=True)


@pytest.mark.oracle
def test_spm_encode_matches_llama_cpp(spm, spm_path):
    ref = llama_cpp_vocab(spm_path)
    for text in SPM_TEXTS + random_texts(SPM_ALPHABET, 300, seed=1, max_len=25):
        for add_bos in (True, False):
            for special in (True, False):
                expected = ref.tokenize(text.encode(), add_bos=add_bos, special=special)
                assert spm.encode(text, add_bos=add_bos, special=special) == expected, (
                    text, add_bos, special,
                )


@pytest.mark.oracle
def test_spm_decode_matches_llama_cpp(spm, spm_path):
    ref = llama_cpp_vocab(spm_path)
    for text in SPM_TEXTS + random_texts(SPM_ALPHABET, 100, seed=2, max_len=25):
        for add_bos in (True, False):
            ids = spm.encode(text, add_bos=add_bos)
            if ids[:1] == [spm.bos_id] and not spm.add_space_prefix:
                # llama-cpp-python drops a leading space after BOS even when the model adds
                # none; Tokenizer.decode keeps it.
                continue
            expected = ref.detokenize(ids).decode("utf-8", errors="replace")
            assert spm.decode(ids) == expected, (text, add_bos)


def test_spm_merges_and_byte_fallback(tmp_path):
    path = spm_vocab(tmp_path / "vocab.gguf", seed=0, add_space_prefix=None)
    tokenizer = Tokenizer.from_metadata(read_gguf(path).metadata)
    assert tokenizer.add_bos and tokenizer.add_space_prefix
    assert tokenizer.eog_ids == frozenset({2})
    ids = tokenizer.encode("hello world")
    assert [tokenizer.token_text(i) for i in ids] == ["<s>", "▁hello", "▁world"]
    pieces = [tokenizer.token_text(i) for i in tokenizer.encode("ß", add_bos=False)]
    assert pieces == ["▁", "<0xC3>", "<0x9F>"]


def test_spm_round_trip(tmp_path):
    path = spm_vocab(tmp_path / "vocab.gguf", seed=0, add_space_prefix=None)
    tokenizer = Tokenizer.from_metadata(read_gguf(path).metadata)
    for text in ["hello world", "  two", "zebra ßtraße 🙂", "中文\n\nx", ""]:
        # The space the model prefixes is dropped again after BOS.
        assert tokenizer.decode(tokenizer.encode(text)) == text
        stream = StreamDecoder(tokenizer)
        ids = tokenizer.encode(text)
        assert "".join([stream.push(i) for i in ids] + [stream.flush()]) == text


# --- pre-tokenizers: the SmolLM2 vocabulary under each tokenizer.ggml.pre ---------------------

PRE_ALPHABET = list(
    "aZxÉéßǅΣσДд中あ한ا0 19٣²Ⅻ   \n\n\r\t\u00a0\u3000\u200d\u0301"
    "'’\".,;:!?-_/\\|$+<=>^~`@#%&*()[]{}😀👍🏽"
) + ["'s", "'S", "'ll", "'LL", "'ve", "123456", "  \n", "HelloWorld", "ABCdef", "ÉCOLE", "don't"]


@pytest.mark.model
@pytest.mark.oracle
@pytest.mark.parametrize(
    "pre", ["default", "gpt-2", "llama-bpe", "smollm", "qwen2", "tekken", "gpt-4o", "dbrx"]
)
def test_pre_tokenizer_matches_llama_cpp(smollm2_metadata, tmp_path, pre):
    path = write_vocab(
        tmp_path / "vocab.gguf",
        smollm2_metadata["tokenizer.ggml.tokens"],
        smollm2_metadata["tokenizer.ggml.token_type"].tolist(),
        model="gpt2", pre=pre, merges=smollm2_metadata["tokenizer.ggml.merges"], bos=1, eos=2,
    )
    ref = llama_cpp_vocab(path)
    tokenizer = Tokenizer.from_metadata(read_gguf(path).metadata)
    assert tokenizer.add_bos == ref._model.add_bos_token()
    for text in TRICKY + random_texts(PRE_ALPHABET, 300, seed=3, max_len=40):
        expected = ref.tokenize(text.encode(), add_bos=False, special=True)
        assert tokenizer.encode(text, add_bos=False) == expected, text


@pytest.mark.model
def test_unknown_pre_falls_back_to_gpt2(smollm2_metadata, caplog):
    gpt2 = Tokenizer.from_metadata({**smollm2_metadata, "tokenizer.ggml.pre": "gpt-2"})
    with caplog.at_level(logging.WARNING, logger="caravan.pipeline.tokenizer"):
        unknown = Tokenizer.from_metadata({**smollm2_metadata, "tokenizer.ggml.pre": "no-such"})
    assert "no-such" in caplog.text
    assert unknown.encode("x 1234 y's") == gpt2.encode("x 1234 y's")


# --- bad metadata ------------------------------------------------------------------------------

TINY_GPT2 = {
    "tokenizer.ggml.model": "gpt2",
    "tokenizer.ggml.pre": "gpt-2",
    "tokenizer.ggml.tokens": ["a", "b", "ab", "<|endoftext|>"],
    "tokenizer.ggml.token_type": np.array([1, 1, 1, 3], dtype=np.int32),
    "tokenizer.ggml.merges": ["a b"],
    "tokenizer.ggml.bos_token_id": 3,
    "tokenizer.ggml.eos_token_id": 3,
}


def test_tiny_gpt2_metadata():
    tokenizer = Tokenizer.from_metadata(TINY_GPT2)
    assert tokenizer.encode("ab<|endoftext|>ba") == [2, 3, 1, 0]
    assert tokenizer.decode([2, 3, 1, 0]) == "abba"
    assert tokenizer.eog_ids == frozenset({3})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens: missing"),
        ({"tokenizer.ggml.tokens": []}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.model": "bert"}, "unsupported tokenizer 'bert' (supported: gpt2, llama)"),
        ({"tokenizer.ggml.model": None}, "tokenizer.ggml.model: missing"),
        ({"tokenizer.ggml.merges": None}, "tokenizer.ggml.merges: missing"),
        ({"tokenizer.ggml.merges": ["ab"]}, "tokenizer.ggml.merges[0]"),
        ({"tokenizer.ggml.tokens": ["a", "b", "a", "x"]}, "duplicate token 'a' at ids 0 and 2"),
        ({"tokenizer.ggml.token_type": np.array([1], dtype=np.int32)}, "one per token"),
        ({"tokenizer.ggml.bos_token_id": "3"}, "tokenizer.ggml.bos_token_id"),
        (
            {"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": None},
            "tokenizer.ggml.scores: missing",
        ),
    ],
)
def test_bad_metadata(change, message):
    metadata = {k: v for k, v in {**TINY_GPT2, **change}.items() if v is not None}
    with pytest.raises(TokenizerError) as error:
        Tokenizer.from_metadata(metadata)
    assert message in str(error.value)


def test_out_of_range_ids():
    tokenizer = Tokenizer.from_metadata(TINY_GPT2)
    with pytest.raises(ValueError, match="token id 4 out of range"):
        tokenizer.decode([0, 4])
    with pytest.raises(ValueError, match="token id -1 out of range"):
        tokenizer.token_text(-1)
