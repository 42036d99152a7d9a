"""Malformed GGUF files, each made by patching the bytes of a valid tiny model: every one must
end in one clear error (GGUFError, ModelError, TokenizerError or UnsupportedTypeError) within
seconds, never a hang, a crash or a huge allocation. Then a fuzz test over the header, with
each batch of files opened in a child process under a memory and time limit.

test_gguf_file.py covers the reader on small hand-built files; here the same classes of damage
hit a whole model through `load_model` and the `caravan` command line.
"""

from __future__ import annotations

import json
import os
import re
import resource
import struct
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caravan.pipeline.gguf_file import GGUFError
from caravan.pipeline.loader import load_model
from caravan.pipeline.model import ModelError
from caravan.pipeline.quants import UnsupportedTypeError
from caravan.pipeline.tokenizer import TokenizerError
from support.tiny_models import tiny_llama, write_gguf

EXPECTED = (GGUFError, ModelError, TokenizerError, UnsupportedTypeError)
SECONDS = 2.0  # the most one bad file may take to be refused

# ---------------------------------------------------------------------------------------------
# Where each header field lies in a file.
#
# GGUF v3 (llama.cpp docs/gguf.md; gguf-py constants.py GGUF_MAGIC, GGUFValueType), little-endian:
#   magic "GGUF" @0 | version u32 @4 | n_tensors u64 @8 | n_kv u64 @16
#   n_kv x    key (u64 length + bytes) | value type u32 | value
#   n_tensors x name (u64 length + bytes) | n_dims u32 | ne u64 x n_dims | type u32 | offset u64
#   padding to general.alignment (32), then the tensor data
#   value: scalar | string (u64 length + bytes) | array (item type u32, count u64, items)

_SCALAR_SIZES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}


@dataclass
class KVField:
    key_length: int  # offset of the key's u64 length
    value_type: int  # offset of the value type u32
    value: int  # offset of the value (for arrays: of the item type u32)

    @property
    def array_count(self) -> int:  # offset of an array's u64 item count
        return self.value + 4


@dataclass
class TensorField:
    name_length: int  # offset of the name's u64 length
    n_dims: int  # offset of the u32 dimension count
    dims: list[int]  # offset of each u64 dimension
    type: int  # offset of the u32 type
    offset: int  # offset of the u64 data offset


@dataclass
class Layout:
    kvs: dict[str, KVField] = field(default_factory=dict)
    tensors: dict[str, TensorField] = field(default_factory=dict)
    header_end: int = 0  # end of the last tensor info
    data_start: int = 0

    VERSION, N_TENSORS, N_KV = 4, 8, 16


def read_layout(content: bytes, alignment: int = 32) -> Layout:
    """The offsets of every field of a well-formed GGUF v3 file, read with struct alone (not with
    the reader under test)."""
    pos = 24
    layout = Layout()

    def take(fmt: str) -> int:
        nonlocal pos
        (value,) = struct.unpack_from(fmt, content, pos)
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        pos += n
        return content[pos - n : pos].decode()

    def skip_value(vtype: int) -> None:
        nonlocal pos
        if vtype == GGUFValueType.STRING:
            string()
        elif vtype == GGUFValueType.ARRAY:
            item_type, count = take("<I"), take("<Q")
            for _ in range(count):
                skip_value(item_type)
        else:
            pos += _SCALAR_SIZES[GGUFValueType(vtype)]

    n_tensors, n_kv = struct.unpack_from("<QQ", content, 8)
    for _ in range(n_kv):
        start = pos
        key = string()
        type_at = pos
        vtype = take("<I")
        layout.kvs[key] = KVField(start, type_at, pos)
        skip_value(vtype)
    for _ in range(n_tensors):
        start = pos
        name = string()
        n_dims_at = pos
        n_dims = take("<I")
        dims = [pos + 8 * i for i in range(n_dims)]
        pos += 8 * n_dims
        layout.tensors[name] = TensorField(start, n_dims_at, dims, pos, pos + 4)
        pos += 12
    layout.header_end = pos
    layout.data_start = -(-pos // alignment) * alignment
    return layout


def patched(content: bytes, offset: int, fmt: str, value) -> bytes:
    """content with struct.pack(fmt, value) written over the bytes at offset."""
    raw = struct.pack(fmt, value)
    return content[:offset] + raw + content[offset + len(raw) :]


def renamed(content: bytes, offset: int, old: str, new: str) -> bytes:
    """content with the string at offset (its u64 length) changed from old to new, same length."""
    assert len(old) == len(new) and content[offset + 8 : offset + 8 + len(old)] == old.encode()
    return content[: offset + 8] + new.encode() + content[offset + 8 + len(new) :]


# ---------------------------------------------------------------------------------------------
# The corpus


@dataclass(frozen=True)
class Tiny:
    content: bytes
    layout: Layout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    """A valid 2-layer Q8_0 model (300 tokens, dim 64), as bytes and field offsets."""
    path = write_gguf(tmp_path_factory.mktemp("corpus") / "tiny.gguf", *tiny_llama(n_layers=2))
    content = path.read_bytes()
    return Tiny(content, read_layout(content))


def kv(t: Tiny, key: str) -> KVField:
    return t.layout.kvs[key]


def ti(t: Tiny, name: str) -> TensorField:
    return t.layout.tensors[name]


U64_MAX = 2**64 - 1
BLOCK_COUNT, TOKENS, TOKEN_TYPE = "llama.block_count", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type"
EMBD, OUTPUT_NORM = "token_embd.weight", "output_norm.weight"
LAST = OUTPUT_NORM  # the last tensor info in the file

# (id, make(tiny) -> malformed bytes, error class, message pattern)
BYTE_CASES = [
    # header
    ("bad-magic", lambda t: b"GGML" + t.content[4:], GGUFError,
     r"not a GGUF file \(magic b'GGML', expected b'GGUF'\)"),
    ("version-0", lambda t: patched(t.content, Layout.VERSION, "<I", 0), GGUFError,
     r"GGUF version 0 is not supported \(supported: 2, 3\)"),
    ("version-1-u32-counts", lambda t: patched(t.content, Layout.VERSION, "<I", 1), GGUFError,
     r"GGUF version 1 is not supported"),
    ("future-version-4", lambda t: patched(t.content, Layout.VERSION, "<I", 4), GGUFError,
     r"GGUF version 4 is not supported"),
    ("negative-tensor-count", lambda t: patched(t.content, Layout.N_TENSORS, "<q", -1), GGUFError,
     r"tensor count 18446744073709551615 is impossible for a \d+-byte file"),
    ("huge-tensor-count", lambda t: patched(t.content, Layout.N_TENSORS, "<Q", 2**40), GGUFError,
     r"tensor count 1099511627776 is impossible"),
    ("negative-kv-count", lambda t: patched(t.content, Layout.N_KV, "<q", -1), GGUFError,
     r"key/value count 18446744073709551615 is impossible"),
    ("huge-kv-count", lambda t: patched(t.content, Layout.N_KV, "<Q", 2**32), GGUFError,
     r"key/value count 4294967296 is impossible"),
    # keys
    ("key-length-huge", lambda t: patched(t.content, 24, "<Q", 2**63), GGUFError,
     r"key #0 needs 9223372036854775808 bytes at offset 32 but the file has \d+ left"),
    ("key-length-negative", lambda t: patched(t.content, 24, "<q", -1), GGUFError,
     r"key #0 needs 18446744073709551615 bytes"),
    ("empty-key", lambda t: patched(t.content, kv(t, BLOCK_COUNT).key_length, "<Q", 0), GGUFError,
     r"key #4 is empty"),
    ("key-not-utf8", lambda t: patched(t.content, kv(t, BLOCK_COUNT).key_length + 8, "<2s", b"\xff\xfe"),
     GGUFError, r"key #4 is not valid UTF-8"),
    ("duplicate-key", lambda t: renamed(t.content, kv(t, "tokenizer.ggml.bos_token_id").key_length,
                                        "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"),
     GGUFError, r"key 'tokenizer.ggml.eos_token_id' appears twice"),
    # values
    ("unknown-value-type", lambda t: patched(t.content, kv(t, BLOCK_COUNT).value_type, "<I", 99), GGUFError,
     r"llama.block_count has unknown value type 99"),
    ("value-type-13", lambda t: patched(t.content, kv(t, BLOCK_COUNT).value_type, "<I", 13), GGUFError,
     r"llama.block_count has unknown value type 13"),
    ("u32-value-read-as-string", lambda t: patched(t.content, kv(t, BLOCK_COUNT).value_type, "<I",
                                                   GGUFValueType.STRING),
     GGUFError, r"value of llama.block_count needs \d+ bytes"),
    ("u32-value-read-as-float", lambda t: patched(t.content, kv(t, BLOCK_COUNT).value_type, "<I",
                                                  GGUFValueType.FLOAT32),
     ModelError, r"llama.block_count: expected an integer, got 2\.8\d*e-45"),
    ("array-of-unknown-type", lambda t: patched(t.content, kv(t, TOKENS).value, "<I", 99), GGUFError,
     r"tokenizer.ggml.tokens items has unknown value type 99"),
    ("huge-string-array-count", lambda t: patched(t.content, kv(t, TOKENS).array_count, "<Q", 2**62),
     GGUFError, r"tokenizer.ggml.tokens \(4611686018427387904 items\) needs"),
    ("max-string-array-count", lambda t: patched(t.content, kv(t, TOKENS).array_count, "<Q", U64_MAX),
     GGUFError, r"tokenizer.ggml.tokens \(18446744073709551615 items\) needs"),
    ("huge-numeric-array-count", lambda t: patched(t.content, kv(t, TOKEN_TYPE).array_count, "<Q", 2**61),
     GGUFError, r"tokenizer.ggml.token_type \(2305843009213693952 items\) needs 9223372036854775808 bytes"),
    ("huge-string-in-array", lambda t: patched(t.content, kv(t, TOKENS).array_count + 8, "<Q", 2**63),
     GGUFError, r"value of tokenizer.ggml.tokens needs 9223372036854775808 bytes"),
    ("strings-read-as-arrays", lambda t: patched(t.content, kv(t, TOKENS).value, "<I", GGUFValueType.ARRAY),
     GGUFError, r"tokenizer.ggml.tokens \(704529255366656 items\) needs"),
    # tensor infos
    ("tensor-name-length-huge", lambda t: patched(t.content, ti(t, EMBD).name_length, "<Q", 2**63), GGUFError,
     r"tensor #0 name needs 9223372036854775808 bytes"),
    ("tensor-name-empty", lambda t: patched(t.content, ti(t, EMBD).name_length, "<Q", 0), GGUFError,
     r"tensor #0 has an empty or oversized name"),
    ("tensor-name-not-utf8", lambda t: patched(t.content, ti(t, EMBD).name_length + 8, "<1s", b"\x80"),
     GGUFError, r"tensor #0 name is not valid UTF-8"),
    ("zero-dimensions", lambda t: patched(t.content, ti(t, EMBD).n_dims, "<I", 0), GGUFError,
     r"tensor token_embd.weight has 0 dimensions \(allowed: 1 to 4\)"),
    ("five-dimensions", lambda t: patched(t.content, ti(t, EMBD).n_dims, "<I", 5), GGUFError,
     r"tensor token_embd.weight has 5 dimensions"),
    ("max-dimensions", lambda t: patched(t.content, ti(t, EMBD).n_dims, "<I", 2**32 - 1), GGUFError,
     r"tensor token_embd.weight has 4294967295 dimensions"),
    ("zero-dimension", lambda t: patched(t.content, ti(t, EMBD).dims[1], "<Q", 0), GGUFError,
     r"tensor token_embd.weight has an invalid shape \[64, 0\]"),
    ("huge-dimension", lambda t: patched(t.content, ti(t, EMBD).dims[1], "<Q", 2**62), GGUFError,
     r"tensor token_embd.weight has an invalid shape \[64, 4611686018427387904\]"),
    ("max-dimension", lambda t: patched(t.content, ti(t, EMBD).dims[0], "<Q", U64_MAX), GGUFError,
     r"invalid shape \[18446744073709551615, 300\]"),
    ("byte-size-overflows-u64", lambda t: patched(t.content, ti(t, EMBD).dims[0], "<Q", 2**61), GGUFError,
     r"tensor token_embd.weight \(\d{21,} bytes at data offset 0\) runs past the end of the file"),
    ("unknown-tensor-type", lambda t: patched(t.content, ti(t, EMBD).type, "<I", 9999), GGUFError,
     r"tensor token_embd.weight has unknown type 9999"),
    ("removed-tensor-type-Q4_2", lambda t: patched(t.content, ti(t, EMBD).type, "<I", 4), GGUFError,
     r"tensor token_embd.weight has unknown type 4"),
    ("unsupported-tensor-type", lambda t: patched(t.content, ti(t, EMBD).type, "<I", QT.IQ4_NL),
     UnsupportedTypeError, r"token_embd.weight: unsupported type IQ4_NL \(supported: .*Q8_0"),
    ("norm-not-f32", lambda t: patched(t.content, ti(t, OUTPUT_NORM).type, "<I", QT.F16), ModelError,
     r"output_norm.weight: norm weights must be F32, got F16"),
    ("offset-past-the-end", lambda t: patched(t.content, ti(t, LAST).offset, "<Q", 2**40), GGUFError,
     r"tensor output_norm.weight \(256 bytes at data offset 1099511627776\) runs past the end"),
    ("offset-max", lambda t: patched(t.content, ti(t, LAST).offset, "<Q", 2**64 - 32), GGUFError,
     r"tensor output_norm.weight \(256 bytes at data offset 18446744073709551584\) runs past the end"),
    ("offset-unaligned", lambda t: patched(t.content, ti(t, EMBD).offset, "<Q", 1), GGUFError,
     r"tensor token_embd.weight offset 1 is not aligned to 32"),
    ("duplicate-tensor-name", lambda t: renamed(t.content, ti(t, "blk.0.attn_q.weight").name_length,
                                                "blk.0.attn_q.weight", "blk.0.attn_k.weight"),
     GGUFError, r"tensor blk.0.attn_k.weight appears twice"),
    ("row-not-a-multiple-of-the-block", lambda t: patched(t.content, ti(t, EMBD).dims[0], "<Q", 48), GGUFError,
     r"token_embd.weight: row length 48 is not a multiple of the Q8_0 block size 32"),
    ("vocabulary-not-matching-the-embedding", lambda t: patched(t.content, ti(t, EMBD).dims[1], "<Q", 299),
     ModelError, r"vocabulary of 300 tokens does not match token_embd.weight's 299 rows"),
    ("embedding-width-not-dim", lambda t: patched(t.content, ti(t, EMBD).dims[0], "<Q", 32), ModelError,
     r"token_embd.weight: shape \[32, 300\], expected \[64, 300\]"),
    # truncation
    ("truncated-in-the-magic", lambda t: t.content[:3], GGUFError, r"not a GGUF file \(3 bytes, too short\)"),
    ("truncated-in-the-counts", lambda t: t.content[:20], GGUFError, r"too short"),
    ("truncated-in-a-key", lambda t: t.content[: kv(t, "tokenizer.ggml.bos_token_id").key_length + 12], GGUFError,
     r"key #16 needs 27 bytes at offset \d+ but the file has 4 left \(truncated or corrupt\)"),
    ("truncated-in-the-vocabulary", lambda t: t.content[:kv(t, TOKENS).array_count + 1000], GGUFError,
     r"tokenizer.ggml.tokens \(300 items\) needs 2400 bytes at offset \d+ but the file has 992 left"),
    ("truncated-in-tensor-infos", lambda t: t.content[:ti(t, LAST).type], GGUFError,
     r"output_norm.weight type needs 4 bytes .*truncated or corrupt"),
    ("truncated-before-the-data", lambda t: t.content[: t.layout.data_start], GGUFError,
     r"tensor token_embd.weight \(20400 bytes at data offset 0\) runs past the end of the file \(truncated\?\)"),
    ("truncated-by-one-byte", lambda t: t.content[:-1], GGUFError,
     r"tensor output_norm.weight \(256 bytes at data offset \d+\) runs past the end"),
    # counts that disagree with what follows
    ("kv-count-one-short", lambda t: patched(t.content, Layout.N_KV, "<Q", len(t.layout.kvs) - 1), GGUFError,
     r"tensor tokenizer.ggml.eos_token_id has an invalid shape"),  # the last key read as a tensor
    ("kv-count-one-more", lambda t: patched(t.content, Layout.N_KV, "<Q", len(t.layout.kvs) + 1), GGUFError,
     r"tensor #0 name needs \d+ bytes"),
    ("tensor-count-one-more", lambda t: patched(t.content, Layout.N_TENSORS, "<Q", len(t.layout.tensors) + 1),
     GGUFError, r"tensor #20 has an empty or oversized name"),  # the padding read as a tensor
    ("strings-read-as-u64", lambda t: patched(t.content, kv(t, TOKENS).value, "<I", GGUFValueType.UINT64),
     GGUFError, r"key #14 needs \d+ bytes"),
]


def assert_refused(path: Path, error: type[Exception], pattern: str) -> str:
    """Loading the model and all its layers raises `error` matching `pattern`, within SECONDS."""
    start = time.perf_counter()
    with pytest.raises(EXPECTED) as info:
        load_model(path).local_pipeline(16)
    assert time.perf_counter() - start < SECONDS
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert re.search(pattern, str(info.value)), str(info.value)
    return str(info.value)


def test_the_unpatched_model_loads(tiny, tmp_path):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(tiny.content)
    assert load_model(path).local_pipeline(16).n_ctx == 16
    assert (len(tiny.layout.kvs), len(tiny.layout.tensors)) == struct.unpack_from("<QQ", tiny.content, 8)[::-1]


@pytest.mark.parametrize("make, error, pattern", [c[1:] for c in BYTE_CASES], ids=[c[0] for c in BYTE_CASES])
def test_patched_file_is_refused(tiny, tmp_path, make, error, pattern):
    path = tmp_path / "bad.gguf"
    path.write_bytes(make(tiny))
    message = assert_refused(path, error, pattern)
    if error is GGUFError:
        assert message.startswith(f"{path}: ")  # the reader names the file


# Valid GGUF whose metadata is of the wrong type or value: written with GGUFWriter.
# (id, metadata changes, error class, message pattern)
METADATA_CASES = [
    ("tokens-not-strings", {TOKENS: np.arange(300, dtype=np.int32)}, TokenizerError,
     r"tokenizer.ggml.tokens: expected a non-empty array of strings"),
    ("token-types-not-integers", {TOKEN_TYPE: ["1"] * 300}, TokenizerError,
     r"tokenizer.ggml.token_type: expected an integer array of at least 300 entries \(one per token\), "
     r"got shape \(300,\) dtype <U1"),
    ("token-types-float", {TOKEN_TYPE: np.full(300, np.nan, np.float32)}, TokenizerError,
     r"tokenizer.ggml.token_type: expected an integer array .* dtype float32"),
    ("token-types-short", {TOKEN_TYPE: np.ones(299, np.int32)}, TokenizerError,
     r"tokenizer.ggml.token_type: expected an integer array of at least 300 entries"),
    ("merges-not-strings", {"tokenizer.ggml.merges": np.arange(3, dtype=np.int32)}, TokenizerError,
     r"tokenizer.ggml.merges: expected an array of strings"),
    ("tokenizer-model-not-a-string", {"tokenizer.ggml.model": 7}, TokenizerError,
     r"tokenizer.ggml.model: unsupported tokenizer 7 \(supported: gpt2, llama\)"),
    ("tokenizer-model-an-array", {"tokenizer.ggml.model": np.array([1, 2], np.int32)}, TokenizerError,
     r"tokenizer.ggml.model: unsupported tokenizer an array of 2 items"),
    ("pre-tokenizer-an-array", {"tokenizer.ggml.pre": ["gpt-2", "llama3"]}, TokenizerError,
     r"tokenizer.ggml.pre: expected a string, got an array of 2 items"),
    ("bos-id-a-string", {"tokenizer.ggml.bos_token_id": "299"}, TokenizerError,
     r"tokenizer.ggml.bos_token_id: expected an integer token id, got '299'"),
    ("scores-missing-for-llama-tokenizer", {"tokenizer.ggml.model": "llama"}, TokenizerError,
     r"tokenizer.ggml.scores: missing"),
    ("architecture-unknown", {"general.architecture": "bert"}, ModelError,
     r"unknown architecture 'bert' \(general.architecture; supported: llama, qwen2, phi3, gemma, gemma2, gemma3\)"),
    ("embedding-length-a-string", {"llama.embedding_length": "64"}, ModelError,
     r"llama.embedding_length: expected an integer, got '64'"),
    ("head-count-a-float", {"llama.attention.head_count": 4.0}, ModelError,
     r"llama.attention.head_count: expected an integer, got 4.0"),
    ("block-count-an-array", {BLOCK_COUNT: ["a", "b"]}, ModelError,
     r"llama.block_count: expected an integer, got an array of 2 items"),
    ("rope-base-negative", {"llama.rope.freq_base": -1.0}, ModelError,
     r"llama.rope.freq_base: must be a positive finite number, got -1.0"),
    ("norm-eps-nan", {"llama.attention.layer_norm_rms_epsilon": float("nan")}, ModelError,
     r"llama.attention.layer_norm_rms_epsilon: must be a positive finite number, got nan"),
    ("head-count-zero", {"llama.attention.head_count": 0}, ModelError,
     r"head_count 0 is not a positive multiple of head_count_kv 2"),
    ("alignment-zero", {"general.alignment": 0}, GGUFError, r"general.alignment 0 is not a positive power of two"),
    ("alignment-a-string", {"general.alignment": "32"}, GGUFError,
     r"general.alignment '32' is not a positive power of two"),
    ("alignment-a-bool", {"general.alignment": True}, GGUFError,
     r"general.alignment True is not a positive power of two"),
]


def write_changed(path: Path, changes: dict, **tiny_kwargs) -> Path:
    metadata, tensors = tiny_llama(n_layers=2, **tiny_kwargs)
    metadata.update(changes)
    return write_gguf(path, metadata, tensors)


@pytest.mark.parametrize("changes, error, pattern", [c[1:] for c in METADATA_CASES], ids=[c[0] for c in METADATA_CASES])
def test_metadata_of_the_wrong_type_is_refused(tmp_path, changes, error, pattern):
    assert_refused(write_changed(tmp_path / "bad.gguf", changes), error, pattern)


def test_a_megabyte_token_in_a_sentencepiece_vocabulary_loads_quickly(tmp_path, caplog):
    """Building SentencePiece merges splits every token at every position: a crafted 1 MB
    token took minutes before tokens longer than SentencePiece's own limit were left out."""
    metadata, _ = tiny_llama(n_layers=2)
    tokens = list(metadata[TOKENS])
    tokens[100] = "a" * 1_000_000
    changes = {
        "tokenizer.ggml.model": "llama",
        TOKENS: tokens,
        "tokenizer.ggml.scores": np.zeros(len(tokens), np.float32),
    }
    path = write_changed(tmp_path / "long-token.gguf", changes)
    start = time.perf_counter()
    model = load_model(path)
    assert time.perf_counter() - start < SECONDS
    assert model.tokenizer.vocab_size == 300
    assert "longer than 512 characters are never formed by merges: 1 of them (first: id 100)" in caplog.text


# ---------------------------------------------------------------------------------------------
# The command line: one line on stderr, exit status 1, no traceback

CLI_CASES = [
    "bad-magic", "huge-string-array-count", "unknown-value-type", "truncated-by-one-byte",
    "vocabulary-not-matching-the-embedding", "unsupported-tensor-type", "u32-value-read-as-float",
]


@pytest.mark.parametrize("case", CLI_CASES)
@pytest.mark.slow
def test_caravan_run_reports_one_line(tiny, tmp_path, case):
    _, make, error, pattern = next(c for c in BYTE_CASES if c[0] == case)
    path = tmp_path / "bad.gguf"
    path.write_bytes(make(tiny))
    env = {**os.environ, "CARAVAN_HOME": str(tmp_path / "home"), "NUMBA_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "caravan.coordinator", "run", "hi", "--model", str(path), "--threads", "1"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("caravan: error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert result.stdout == ""


# ---------------------------------------------------------------------------------------------
# Fuzzing the header. Each batch of mutated files is opened by one child process under an
# address-space limit (a huge allocation fails there as MemoryError instead of swapping this
# machine) and a per-file alarm (a hang becomes "timeout"); it reports one JSON line per file.

CHILD_MEMORY = 2 << 30  # RLIMIT_AS of the child, bytes
BATCH = 50  # files per child process
CHILD = textwrap.dedent(
    """
    import json, signal, sys, time, traceback

    from caravan.pipeline.gguf_file import GGUFError
    from caravan.pipeline.loader import load_model
    from caravan.pipeline.model import ModelError
    from caravan.pipeline.quants import UnsupportedTypeError
    from caravan.pipeline.tokenizer import TokenizerError

    EXPECTED = (GGUFError, ModelError, TokenizerError, UnsupportedTypeError)


    class Timeout(BaseException):
        pass


    def alarm(signum, frame):
        raise Timeout()


    signal.signal(signal.SIGALRM, alarm)
    for line in sys.stdin:
        path = line.strip()
        start = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, float(sys.argv[1]))
        try:
            load_model(path).local_pipeline(16)
            outcome = "loaded"
        except EXPECTED as exc:
            outcome = type(exc).__name__
        except Timeout:
            outcome = "timeout"
        except BaseException:
            outcome = "unexpected " + traceback.format_exc(limit=-4)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        print(json.dumps({"path": path, "outcome": outcome, "seconds": time.perf_counter() - start}), flush=True)
    """
)


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))


def check_in_child(paths: list[Path]) -> list[dict]:
    """Open each file in one child process; its report, one dict per file."""
    env = {**os.environ, "NUMBA_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(SECONDS)],
        input="".join(f"{p}\n" for p in paths), capture_output=True, text=True, env=env,
        preexec_fn=limit_memory, timeout=10 + SECONDS * len(paths) / 10,
    )
    assert result.returncode == 0, f"child exited with {result.returncode}: {result.stderr[-3000:]}"
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in reports] == [str(p) for p in paths]
    return reports


INTERESTING_U64 = (0, 1, 2, 31, 32, 33, 255, 2**31, 2**32 - 1, 2**32, 2**62, 2**63, U64_MAX)
INTERESTING_U32 = (0, 1, 4, 5, 7, 8, 9, 12, 13, 14, 30, 99, 2**31, 2**32 - 1)


def mutation_strategy(t: Tiny) -> st.SearchStrategy:
    """One to three edits of the file: bit flips and overwrites anywhere in the header,
    extreme values in its count, length, dimension, offset and type fields, and truncation."""
    layout = t.layout
    u64_fields = [Layout.N_TENSORS, Layout.N_KV] + [f.offset for f in layout.tensors.values()]
    u64_fields += [k.key_length for k in layout.kvs.values()]
    u64_fields += [k.array_count for name, k in layout.kvs.items() if name in (TOKENS, TOKEN_TYPE, "tokenizer.ggml.merges")]
    u64_fields += [f.name_length for f in layout.tensors.values()] + [d for f in layout.tensors.values() for d in f.dims]
    u32_fields = [Layout.VERSION] + [k.value_type for k in layout.kvs.values()]
    u32_fields += [f.n_dims for f in layout.tensors.values()] + [f.type for f in layout.tensors.values()]
    header = st.integers(0, layout.data_start - 1)
    edit = st.one_of(
        st.tuples(st.just("xor"), header, st.binary(min_size=1, max_size=1)),
        st.tuples(st.just("write"), header, st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("write"), st.sampled_from(u64_fields),
                  st.one_of(st.sampled_from(INTERESTING_U64), st.integers(0, U64_MAX)).map(lambda v: struct.pack("<Q", v))),
        st.tuples(st.just("write"), st.sampled_from(u32_fields),
                  st.one_of(st.sampled_from(INTERESTING_U32), st.integers(0, 2**32 - 1)).map(lambda v: struct.pack("<I", v))),
        st.tuples(st.just("cut"), st.integers(0, len(t.content) - 1), st.just(b"")),
    )
    return st.lists(edit, min_size=1, max_size=3)


def mutated(content: bytes, edits) -> bytes:
    data = bytearray(content)
    for kind, offset, raw in edits:
        if kind == "cut":
            del data[offset:]
        elif offset + len(raw) <= len(data):
            if kind == "xor":
                raw = bytes(a ^ b for a, b in zip(data[offset : offset + len(raw)], raw))
            data[offset : offset + len(raw)] = raw
    return bytes(data)


@pytest.mark.slow  # a fuzzing run
@settings(
    max_examples=12, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_fuzzed_headers_fail_cleanly(tiny, tmp_path_factory, data):
    batch = data.draw(st.lists(mutation_strategy(tiny), min_size=BATCH, max_size=BATCH), label="batch")
    directory = tmp_path_factory.mktemp("fuzz")
    paths = []
    for i, edits in enumerate(batch):
        paths.append(directory / f"{i}.gguf")
        paths[-1].write_bytes(mutated(tiny.content, edits))
    for report, edits in zip(check_in_child(paths), batch):
        outcome = report["outcome"]
        assert outcome == "loaded" or outcome in {e.__name__ for e in EXPECTED}, f"{edits}: {outcome}"
        assert report["seconds"] < SECONDS, f"{edits}: {report['seconds']:.1f} s"
