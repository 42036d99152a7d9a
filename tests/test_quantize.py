"""`caravan quantize` against its oracles: every tensor it writes equals gguf-py's
`quantize` of the source's values, the types follow llama.cpp's llama-quant.cpp rules, every
key survives with its GGUF type, and the files load and run in llama.cpp and in caravan."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from caravan.coordinator.cli import main
from caravan.pipeline.gguf_file import GGUFFile
from caravan.pipeline.loader import load_model
from caravan.pipeline.model import ModelConfig
from caravan.pipeline.quantize import FILE_TYPES, QuantizeError, parse_type, quantize_model
from caravan.pipeline.quants import SUPPORTED_TYPES
from caravan.pipeline.stage import Segment
from support import naive
from support.llama_cpp_taps import LLAMA_CPP_THREADS
from support.tiny_models import dequantized_weights, tiny_llama, write_gguf


OFFERED = tuple(FILE_TYPES)
BLOCK_TYPES = (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0)


def raw(gguf: GGUFFile, name: str) -> np.ndarray:
    info = gguf.tensors[name]
    return np.frombuffer(gguf.tensor_bytes(name), np.uint8).reshape(info.n_rows, info.row_bytes)


def expected_type(name: str, shape: tuple[int, ...], source: QT, target: QT, tied: bool) -> QT:
    """llama-quant.cpp's choice, written out for the tensors of a llama model: 1-D tensors keep
    their type; for block types the output projection (or the token embedding tied to it) is
    Q8_0 (llama.cpp: Q6_K, which gguf-py cannot write)."""
    if len(shape) == 1:
        return source
    if target in BLOCK_TYPES and (name == "output.weight" or (tied and name == "token_embd.weight")):
        return QT.Q8_0
    return target


def check_against_gguf_quantize(src_path, dst_path, target: QT) -> None:
    src, dst = GGUFFile(src_path), GGUFFile(dst_path)
    assert list(dst.tensors) == list(src.tensors)
    tied = "output.weight" not in src.tensors
    for name, info in src.tensors.items():
        out = dst.tensors[name]
        assert out.shape == info.shape, name
        assert out.type == expected_type(name, info.shape, info.type, target, tied), name
        if out.type == info.type:
            np.testing.assert_array_equal(raw(dst, name), raw(src, name), err_msg=name)
        else:
            values = dequantize(raw(src, name), info.type).astype(np.float32)
            expected = quantize(values, out.type).view(np.uint8).reshape(info.n_rows, -1)
            np.testing.assert_array_equal(raw(dst, name), expected, err_msg=name)
    for key, value in src.metadata.items():
        if key in ("general.file_type", "general.quantization_version"):
            continue
        assert dst.value_types[key] == src.value_types[key], key
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(dst.metadata[key], value, err_msg=key)
        else:
            assert dst.metadata[key] == value, key
    assert dst.metadata["general.file_type"] == FILE_TYPES[target].value
    assert dst.metadata["general.quantization_version"] == 2


@pytest.mark.parametrize("target", OFFERED, ids=lambda t: t.name)
@pytest.mark.parametrize("source", (QT.F32, QT.F16, QT.BF16, QT.Q4_1), ids=lambda t: f"from-{t.name}")
def test_tensors_equal_gguf_quantize_of_the_source(tiny_model_path, tmp_path, source, target):
    src = tiny_model_path(weight_type=source, seed=5)
    dst = tmp_path / "out.gguf"
    report = quantize_model(src, dst, target, progress=False)
    check_against_gguf_quantize(src, dst, target)
    assert report.n_tensors == len(GGUFFile(src).tensors)
    # Q4_1 to Q4_1 too: the embedding tied to the output becomes Q8_0.
    assert report.requantized_from == (["Q4_1"] if source == QT.Q4_1 else [])


@pytest.mark.parametrize("target", (QT.Q4_0, QT.F16), ids=lambda t: t.name)
def test_untied_output(tiny_model_path, tmp_path, target):
    """With its own output.weight, the embedding gets the asked type and the output Q8_0."""
    src = tiny_model_path(weight_type=QT.F32, tied_output=False, seed=6)
    quantize_model(src, tmp_path / "out.gguf", target, progress=False)
    check_against_gguf_quantize(src, tmp_path / "out.gguf", target)
    dst = GGUFFile(tmp_path / "out.gguf")
    assert dst.tensors["token_embd.weight"].type == target
    assert dst.tensors["output.weight"].type == (QT.Q8_0 if target == QT.Q4_0 else target)


def test_row_length_off_the_block_size_falls_back_to_f16(tmp_path, caplog):
    """A matrix whose rows do not split into 32-weight blocks is written F16 (with a warning);
    1-D tensors such as biases keep their type."""
    metadata, tensors = tiny_llama(weight_type=QT.F32, seed=7)
    rng = np.random.default_rng(0)
    tensors["blk.0.odd.weight"] = (rng.standard_normal((8, 40)).astype(np.float32), QT.F32)
    tensors["blk.0.attn_q.bias"] = (rng.standard_normal(64).astype(np.float32), QT.F32)
    src = write_gguf(tmp_path / "src.gguf", metadata, tensors)
    with caplog.at_level(logging.WARNING, logger="caravan"):
        report = quantize_model(src, tmp_path / "out.gguf", QT.Q4_0, progress=False)
    dst = GGUFFile(tmp_path / "out.gguf")
    assert dst.tensors["blk.0.odd.weight"].type == QT.F16
    np.testing.assert_array_equal(raw(dst, "blk.0.odd.weight"),
                                  quantize(tensors["blk.0.odd.weight"][0], QT.F16).view(np.uint8))
    assert dst.tensors["blk.0.attn_q.bias"].type == QT.F32
    assert dst.tensors["blk.0.attn_q.weight"].type == QT.Q4_0
    assert any("blk.0.odd.weight" in note and "F16" in note for note in report.notes)
    assert "row length 40" in caplog.text


def test_requantizing_warns(tiny_model_path, tmp_path, caplog):
    src = tiny_model_path(weight_type=QT.Q4_1, seed=5)
    with caplog.at_level(logging.WARNING, logger="caravan"):
        quantize_model(src, tmp_path / "out.gguf", QT.Q8_0, progress=False)
    assert "already quantized (Q4_1)" in caplog.text


def test_type_names():
    assert parse_type("q4_0") == QT.Q4_0 and parse_type("BF16") == QT.BF16
    with pytest.raises(QuantizeError, match=r"Q4_K_M: gguf-py has no quantizer .*offered: Q4_0, Q4_1, Q5_0"):
        parse_type("Q4_K_M")
    with pytest.raises(QuantizeError, match=r"Q9: unknown type \(offered: "):
        parse_type("Q9")


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["quantize", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_bad_input_is_one_line_and_nonzero(tiny_q8_path, tmp_path, capsys):
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("not a model\n" * 10)
    existing = tmp_path / "existing.gguf"
    existing.write_bytes(b"keep me")
    cases = [
        ((str(not_gguf), str(tmp_path / "a.gguf"), "--type", "Q8_0"), "not a GGUF file"),
        ((str(tiny_q8_path), str(tmp_path / "a.gguf"), "--type", "Q3_K_S"), "no quantizer for it (offered: Q4_0"),
        ((str(tiny_q8_path), str(tmp_path / "a.gguf"), "--type", "int4"), "unknown type (offered: Q4_0"),
        ((str(tiny_q8_path), str(existing), "--type", "Q4_0"), "already exists"),
        ((str(tiny_q8_path), str(tmp_path / "no-such-dir" / "a.gguf"), "--type", "Q4_0"), "cannot write"),
        ((str(tmp_path / "missing.gguf"), str(tmp_path / "a.gguf"), "--type", "Q4_0"), "no such file"),
    ]
    for args, message in cases:
        rc, out, err = run_cli(capsys, *args)
        assert rc == 1 and out == "", args
        lines = [line for line in err.splitlines() if line.startswith("caravan: error:")]
        assert len(lines) == 1 and message in lines[0], (args, err)
    assert existing.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.gguf", "notes.txt"]  # nothing half-written


def test_cli_writes_and_reports(tiny_model_path, tmp_path, capsys):
    import json

    src = tiny_model_path(weight_type=QT.F32, seed=5)
    rc, out, _ = run_cli(capsys, str(src), str(tmp_path / "out.gguf"), "--type", "q5_0", "--json")
    assert rc == 0
    report = json.loads(out)
    assert report["file_type"] == "Q5_0" and report["n_converted"] == 22 and report["n_kept"] == 7
    check_against_gguf_quantize(src, tmp_path / "out.gguf", QT.Q5_0)


# ---------------------------------------------------------------------------------------------
# The output runs: in llama.cpp, and in caravan for the types its kernels take


def llama_cpp_model(path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the reference engine) is not installed")
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=LLAMA_CPP_THREADS, logits_all=True, verbose=False)


def llama_cpp_greedy(llama, ids: list[int], n: int) -> list[int]:
    llama.reset()
    tokens = []
    for token in llama.generate(ids, temp=0.0, top_k=1):
        tokens.append(token)
        if len(tokens) == n:
            return tokens
    return tokens


PROMPT = [299, 17, 204, 81, 3, 150, 42, 260]


@pytest.mark.oracle
@pytest.mark.parametrize("target", OFFERED, ids=lambda t: t.name)
def test_output_runs_in_llama_cpp_and_caravan(tiny_model_path, tmp_path, target):
    """llama.cpp loads each file, and its logits sit within the activation-quantization noise of
    a float64 evaluation of the file's own weights (as caravan's do, test_stage.py). Where
    caravan's kernels take the type, its greedy tokens equal llama.cpp's on the same file."""
    src = tiny_model_path(weight_type=QT.F32, seed=5)
    path = tmp_path / "out.gguf"
    quantize_model(src, path, target, progress=False)
    llama = llama_cpp_model(path)
    llama.eval(PROMPT)
    ref = np.asarray(llama.scores[: len(PROMPT)])
    gguf = GGUFFile(path)
    config = ModelConfig.from_metadata(gguf.metadata, gguf.tensors["token_embd.weight"].n_rows)
    _, expected = naive.forward_model(dequantized_weights(gguf), config, np.asarray(PROMPT))
    scale = np.abs(expected).max()
    assert np.abs(ref - expected).max() < 5e-2 * scale
    if all(info.type in SUPPORTED_TYPES for info in gguf.tensors.values()):
        pipeline = load_model(path).local_pipeline(256)
        ours = pipeline.head.logits(pipeline.forward([Segment("s", 0, len(PROMPT))], np.asarray(PROMPT)))
        pipeline.end_session("s")
        assert np.abs(ours - ref).max() < 5e-2 * scale
        from caravan.pipeline.generate import Generation
        from caravan.pipeline.sampler import Sampler, SamplingParams

        generation = Generation(pipeline, PROMPT, Sampler(SamplingParams(temperature=0)), 16, frozenset())
        assert list(generation) == llama_cpp_greedy(llama, PROMPT, 16)


# Both engines quantize activations to 8-bit blocks and sit about 0.7 apart in logits from a
# float64 evaluation (README, Correctness): greedy paths may part where llama.cpp's own top two
# logits are closer than that.
NEAR_TIE = 0.7


@pytest.mark.model
@pytest.mark.oracle
def test_real_model_requantized(smollm2_path, smollm2, tmp_path):
    """SmolLM2 Q4_1 -> F16 (its dequantized copy) -> Q8_0: the Q8_0 file's matrices equal
    gguf-py's quantize of the F16 copy, and caravan and llama.cpp complete prompts from it with
    the same greedy tokens, up to a near-tie of llama.cpp's own logits."""
    from caravan.pipeline.generate import Generation
    from caravan.pipeline.sampler import Sampler, SamplingParams

    f16, q8 = tmp_path / "smollm2-f16.gguf", tmp_path / "smollm2-q8_0.gguf"
    quantize_model(smollm2_path, f16, QT.F16, progress=False)
    report = quantize_model(f16, q8, QT.Q8_0, progress=False)
    assert report.requantized_from == [] and report.n_converted == 30 * 7 + 1  # and the embedding
    src, dst = GGUFFile(f16), GGUFFile(q8)
    for name in ("blk.0.attn_q.weight", "blk.29.ffn_down.weight", "token_embd.weight"):
        expected = quantize(dequantize(raw(src, name), QT.F16), QT.Q8_0)
        np.testing.assert_array_equal(raw(dst, name), expected)
    model = load_model(q8)
    assert model.file.metadata["tokenizer.ggml.merges"] == smollm2.file.metadata["tokenizer.ggml.merges"]
    llama_cpp = pytest.importorskip("llama_cpp")
    llama = llama_cpp.Llama(model_path=str(q8), n_ctx=512, n_threads=LLAMA_CPP_THREADS, logits_all=True, verbose=False)
    pipeline = model.local_pipeline(512)
    for prompt in ("The capital of France is", "Once upon a time"):
        ids = model.tokenizer.encode(prompt)
        ours = list(Generation(pipeline, ids, Sampler(SamplingParams(temperature=0)), 16, frozenset()))
        ref = llama_cpp_greedy(llama, ids, 16)
        top2 = np.sort(np.asarray(llama.scores[len(ids) - 1 : len(ids) - 1 + len(ref)]), axis=1)[:, -2:]
        parted = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
        if parted is not None:
            assert parted >= 4 and top2[parted, 1] - top2[parted, 0] < NEAR_TIE, (prompt, parted, top2[parted])
        if prompt.startswith("The capital"):
            assert model.tokenizer.decode(ours).startswith(" Paris")
