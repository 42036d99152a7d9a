"""GGUFFile against gguf-py's GGUFReader on good files, and a clear GGUFError, fast, on bad ones;
then the model-level checks: what is valid GGUF but not a model caravan can run."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFValueType

from caravan.pipeline.gguf_file import GGUFError, GGUFFile
from caravan.pipeline.loader import load_model
from caravan.pipeline.model import ModelConfig, ModelError
from caravan.pipeline.quants import UnsupportedTypeError
from support.tiny_models import tiny_llama, tiny_vocabulary, write_gguf



# ---------------------------------------------------------------------------------------------
# Good files: the same as gguf-py reads


def test_reads_what_gguf_reader_reads(tiny_path):
    ours = GGUFFile(tiny_path)
    reader = GGUFReader(tiny_path)
    fields = {name: field for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert set(ours.metadata) == set(fields)
    for name, field in fields.items():
        expected, got = field.contents(), ours.metadata[name]
        if isinstance(got, np.ndarray):
            np.testing.assert_array_equal(got, np.asarray(expected), err_msg=name)
        else:
            assert got == expected, name
    assert ours.version == 3 and ours.alignment == 32
    assert set(ours.tensors) == {t.name for t in reader.tensors}
    for tensor in reader.tensors:
        info = ours.tensors[tensor.name]
        assert info.type == tensor.tensor_type
        assert info.shape == tuple(int(d) for d in tensor.shape)
        assert info.n_bytes == tensor.n_bytes
        assert info.offset == tensor.data_offset
        data = ours.tensor_data(tensor.name)
        assert data.tobytes() == np.asarray(tensor.data).tobytes(), tensor.name
        assert not data.flags.writeable


def test_tensor_data_shapes(tiny_q8_path):
    gguf = GGUFFile(tiny_q8_path)
    assert gguf.tensor_data("blk.0.attn_q.weight").shape == (64, 2 * 34)  # (rows, row bytes)
    assert gguf.tensor_data("blk.0.ffn_down.weight").shape == (64, 3 * 34)
    norm = gguf.tensor_data("blk.0.attn_norm.weight")
    assert norm.shape == (64,) and norm.dtype == np.float32
    assert gguf.tensor_type("nope") is None
    assert gguf.tensors["token_embd.weight"].n_rows == 300


# ---------------------------------------------------------------------------------------------
# Bad files, written with struct


def gguf_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_u32(key: str, value: int) -> bytes:
    return gguf_string(key) + struct.pack("<II", GGUFValueType.UINT32, value)


def kv_str(key: str, value: str) -> bytes:
    return gguf_string(key) + struct.pack("<I", GGUFValueType.STRING) + gguf_string(value)


def tensor_info(name: str, dims: tuple[int, ...], ttype: int, offset: int) -> bytes:
    return gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ttype, offset)


def gguf_bytes(
    kvs: list[bytes],
    tensors: list[bytes],
    data: bytes = b"",
    *,
    version: int = 3,
    n_kv: int | None = None,
    n_tensors: int | None = None,
) -> bytes:
    header = b"GGUF" + struct.pack(
        "<IQQ", version, len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    )
    body = header + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % 32) + data


def small_gguf(**changes) -> bytes:
    """Two tensors: "a" F32 (2 rows of 32) at data offset 0, "b" Q8_0 (1 row) at 256."""
    kvs = changes.pop("kvs", [kv_str("general.architecture", "llama"), kv_u32("llama.block_count", 1)])
    tensors = changes.pop("tensors", [tensor_info("a", (32, 2), QT.F32, 0), tensor_info("b", (32, 1), QT.Q8_0, 256)])
    data = changes.pop("data", np.arange(64, dtype=np.float32).tobytes() + bytes(34) + bytes(30))
    return gguf_bytes(kvs, tensors, data, **changes)


def assert_gguf_error(tmp_path, content: bytes, match: str, name: str = "bad.gguf") -> str:
    path = tmp_path / name
    path.write_bytes(content)
    start = time.perf_counter()
    with pytest.raises(GGUFError, match=match) as info:
        GGUFFile(path)
    assert time.perf_counter() - start < 1.0
    assert str(path) in str(info.value)  # every message names the file
    return str(info.value)


def test_small_gguf_is_valid(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(small_gguf())
    gguf = GGUFFile(path)
    assert gguf.metadata == {"general.architecture": "llama", "llama.block_count": 1}
    np.testing.assert_array_equal(gguf.tensor_data("a"), np.arange(64, dtype=np.float32).reshape(2, 32))
    assert gguf.tensor_data("b").shape == (1, 34)
    reader = GGUFReader(path)  # gguf-py agrees that it is well-formed
    assert [t.name for t in reader.tensors] == ["a", "b"]


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        GGUFFile(tmp_path / "nope.gguf")


def test_directory(tmp_path):
    with pytest.raises(GGUFError, match="not a regular file"):
        GGUFFile(tmp_path)


def test_empty_file(tmp_path):
    assert_gguf_error(tmp_path, b"", r"not a GGUF file \(0 bytes, too short\)")


def test_not_gguf(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert_gguf_error(tmp_path, b"GGML" + noise, r"not a GGUF file \(magic b'GGML'")


def test_bad_version(tmp_path):
    assert_gguf_error(tmp_path, small_gguf(version=99), r"GGUF version 99 is not supported \(supported: 2, 3\)")


@pytest.mark.parametrize("item_type", (GGUFValueType.UINT8, GGUFValueType.STRING), ids=lambda t: t.name)
def test_49_byte_file_claiming_2_pow_62_array_items(tmp_path, item_type):
    kv = gguf_string("a") + struct.pack("<IIQ", GGUFValueType.ARRAY, item_type, 2**62)
    content = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv
    assert len(content) == 49
    assert_gguf_error(tmp_path, content, r"a \(4611686018427387904 items\) needs .* bytes")


def test_huge_kv_count(tmp_path):
    assert_gguf_error(tmp_path, small_gguf(n_kv=2**60), r"key/value count 1152921504606846976 is impossible")


def test_huge_tensor_count(tmp_path):
    assert_gguf_error(tmp_path, small_gguf(n_tensors=2**40), r"tensor count 1099511627776 is impossible")


def test_truncated_header(tmp_path):
    """Cut inside the second tensor's info: the counts are plausible, the read is not."""
    kvs = [kv_str("general.architecture", "llama"), kv_u32("llama.block_count", 1)]
    first = tensor_info("a", (32, 2), QT.F32, 0)
    cut = 24 + sum(map(len, kvs)) + len(first) + 12
    assert_gguf_error(
        tmp_path, small_gguf()[:cut], r"b dimension count needs 4 bytes at offset \d+ .*truncated or corrupt"
    )


def test_truncated_tensor_data(tmp_path, tiny_q8_path):
    """A real model cut in the middle of its tensor data."""
    content = tiny_q8_path.read_bytes()
    data_start = GGUFFile(tiny_q8_path).data_offset
    cut = data_start + (len(content) - data_start) // 2
    assert_gguf_error(tmp_path, content[:cut], r"runs past the end of the file \(truncated\?\)")


def test_tensor_offset_past_the_file(tmp_path):
    tensors = [tensor_info("a", (32, 2), QT.F32, 0), tensor_info("b", (32, 1), QT.Q8_0, 2**40)]
    match = r"tensor b \(34 bytes at data offset 1099511627776\) runs past"
    assert_gguf_error(tmp_path, small_gguf(tensors=tensors), match)


def test_unaligned_tensor_offset(tmp_path):
    tensors = [tensor_info("a", (32, 2), QT.F32, 0), tensor_info("b", (32, 1), QT.Q8_0, 257)]
    assert_gguf_error(tmp_path, small_gguf(tensors=tensors), r"tensor b offset 257 is not aligned to 32")


def test_duplicate_key(tmp_path):
    kvs = [kv_u32("llama.block_count", 1), kv_str("general.architecture", "llama"), kv_u32("llama.block_count", 2)]
    assert_gguf_error(tmp_path, small_gguf(kvs=kvs), r"key 'llama.block_count' appears twice")


def test_duplicate_tensor_name(tmp_path):
    tensors = [tensor_info("a", (32, 2), QT.F32, 0), tensor_info("a", (32, 1), QT.Q8_0, 256)]
    assert_gguf_error(tmp_path, small_gguf(tensors=tensors), r"tensor a appears twice")


def test_unknown_tensor_type(tmp_path):
    tensors = [tensor_info("a", (32, 2), QT.F32, 0), tensor_info("b", (32, 1), 9999, 256)]
    assert_gguf_error(tmp_path, small_gguf(tensors=tensors), r"tensor b has unknown type 9999")


def test_unknown_value_type(tmp_path):
    kvs = [gguf_string("x") + struct.pack("<I", 77) + bytes(8)]
    assert_gguf_error(tmp_path, small_gguf(kvs=kvs), r"x has unknown value type 77")


@pytest.mark.parametrize("dims", [(32, 0), (0,), (32, 2**62)], ids=["zero-rows", "zero-length", "2**62"])
def test_invalid_dimension(tmp_path, dims):
    tensors = [tensor_info("a", dims, QT.F32, 0)]
    assert_gguf_error(tmp_path, small_gguf(tensors=tensors), r"tensor a has an invalid shape")


@pytest.mark.parametrize("n_dims", (0, 5))
def test_dimension_count(tmp_path, n_dims):
    tensors = [tensor_info("a", (1,) * n_dims, QT.F32, 0)]
    assert_gguf_error(tmp_path, small_gguf(tensors=tensors), rf"tensor a has {n_dims} dimensions \(allowed: 1 to 4\)")


def test_row_length_not_a_multiple_of_the_block_size(tmp_path):
    tensors = [tensor_info("a", (32, 2), QT.F32, 0), tensor_info("b", (33, 1), QT.Q8_0, 256)]
    match = r"row length 33 is not a multiple of the Q8_0 block size 32"
    assert_gguf_error(tmp_path, small_gguf(tensors=tensors), match)


def test_huge_shape_product_is_past_the_end(tmp_path):
    """Dimensions each below 2**62 whose product is astronomically large: no overflow, no
    allocation, just "past the end"."""
    tensors = [tensor_info("a", (2**40, 2**40, 2**40), QT.F32, 0)]
    assert_gguf_error(tmp_path, small_gguf(tensors=tensors), r"runs past the end")


def test_invalid_utf8_key(tmp_path):
    kvs = [gguf_string(b"\xff\xfe") + struct.pack("<II", GGUFValueType.UINT32, 1)]
    assert_gguf_error(tmp_path, small_gguf(kvs=kvs), r"not valid UTF-8")


def test_alignment_not_a_power_of_two(tmp_path):
    kvs = [kv_u32("general.alignment", 24)]
    assert_gguf_error(tmp_path, small_gguf(kvs=kvs), r"general.alignment 24 is not a positive power of two")


def test_arrays_nested_too_deep(tmp_path):
    inner = struct.pack("<IQ", GGUFValueType.ARRAY, 1) + struct.pack("<IQ", GGUFValueType.UINT8, 1) + b"\x01"
    kv = gguf_string("deep") + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.ARRAY, 1) + inner
    assert_gguf_error(tmp_path, small_gguf(kvs=[kv]), r"deep nests arrays deeper than 2")


# ---------------------------------------------------------------------------------------------
# Valid GGUF, but not a model caravan runs


def tiny(**kwargs):
    return tiny_llama(n_layers=2, **kwargs)


def test_unknown_architecture(tmp_path):
    metadata, tensors = tiny()
    metadata = {k.replace("llama.", "bert."): v for k, v in metadata.items()}
    metadata["general.architecture"] = "bert"
    path = write_gguf(tmp_path / "bert.gguf", metadata, tensors)
    with pytest.raises(ModelError, match=r"unknown architecture 'bert' \(general.architecture; supported: llama, qwen2, phi3, gemma, gemma2, gemma3\)"):
        load_model(path)
    with pytest.raises(ModelError, match="'bert'"):
        ModelConfig.from_metadata(GGUFFile(path).metadata, 300)


def test_vocabulary_size_not_matching_the_embedding(tmp_path):
    metadata, tensors = tiny()
    tokens, merges, types = tiny_vocabulary(290)
    metadata.update({
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": np.array(types, np.int32),
        "tokenizer.ggml.bos_token_id": 289,
        "tokenizer.ggml.eos_token_id": 289,
    })
    path = write_gguf(tmp_path / "vocab.gguf", metadata, tensors)
    with pytest.raises(ModelError, match=r"vocabulary of 290 tokens does not match token_embd.weight's 300 rows"):
        load_model(path)


def test_missing_layer_tensor(tmp_path):
    metadata, tensors = tiny()
    del tensors["blk.1.ffn_up.weight"]
    model = load_model(write_gguf(tmp_path / "missing.gguf", metadata, tensors))  # layers load per stage
    with pytest.raises(ModelError, match=r"missing tensor blk.1.ffn_up.weight"):
        model.local_pipeline(16)


def test_missing_embedding(tmp_path):
    metadata, tensors = tiny()
    del tensors["token_embd.weight"]
    with pytest.raises(ModelError, match=r"missing tensor token_embd.weight"):
        load_model(write_gguf(tmp_path / "no_embd.gguf", metadata, tensors))


def test_layer_tensor_of_the_wrong_shape(tmp_path):
    metadata, tensors = tiny()
    tensors["blk.0.attn_k.weight"] = (np.zeros((64, 64), np.float32), QT.Q8_0)  # kv_dim is 32
    model = load_model(write_gguf(tmp_path / "shape.gguf", metadata, tensors))
    with pytest.raises(ModelError, match=r"blk.0.attn_k.weight: shape \[64, 64\], expected \[64, 32\]"):
        model.local_pipeline(16)


def test_norm_weights_must_be_f32(tmp_path):
    metadata, tensors = tiny()
    tensors["output_norm.weight"] = (tensors["output_norm.weight"][0], QT.F16)
    with pytest.raises(ModelError, match=r"output_norm.weight: norm weights must be F32, got F16"):
        load_model(write_gguf(tmp_path / "norm.gguf", metadata, tensors))


def test_unsupported_weight_type_names_the_tensor(tmp_path):
    """An IQ2_XS layer tensor (256-weight blocks of 74 bytes, so dim 256 here) is refused with
    its name."""
    metadata, tensors = tiny_llama(n_layers=1, dim=256, hidden_dim=256, n_heads=4, n_kv_heads=4)
    tensors["blk.0.ffn_down.weight"] = (np.zeros((256, 74), np.uint8), QT.IQ2_XS)  # one block per row
    model = load_model(write_gguf(tmp_path / "iq2xs.gguf", metadata, tensors))
    with pytest.raises(UnsupportedTypeError, match=r"blk.0.ffn_down.weight: unsupported type IQ2_XS \(supported: .*Q4_K"):
        model.local_pipeline(16)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("llama.block_count", None, r"missing metadata key llama.block_count"),
        ("llama.attention.head_count_kv", 3, r"head_count 4 is not a positive multiple of head_count_kv 3"),
        ("llama.rope.dimension_count", 18, r"rope.dimension_count 18 must be even and at most the head width 16"),
        ("llama.rope.dimension_count", 7, r"rope.dimension_count 7 must be even"),
        ("llama.feed_forward_length", 0, r"hidden_dim must be positive, got 0"),
    ],
    ids=["no-block-count", "heads", "rope-wide", "rope-odd", "hidden-zero"],
)
def test_bad_config_metadata(key, value, match):
    metadata, _ = tiny()
    if value is None:
        del metadata[key]
    else:
        metadata[key] = value
    with pytest.raises(ModelError, match=match):
        ModelConfig.from_metadata(metadata, 300)
