"""Kernels compiled ahead of time and said so: `caravan warmup`, a first `caravan run`, a node's
first benchmark, and the progress of weights pushed to a node."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pty
import subprocess
import sys
import time

import pytest
from gguf import GGMLQuantizationType as QT

from caravan.coordinator.cluster import _push_progress, _said_after
from caravan.pipeline import warmup
from caravan.pipeline.gguf_file import GGUFFile
from caravan.pipeline.loader import load_model
from caravan.pipeline.stage import LayerRange
from support.tiny_models import tiny_llama, write_gguf, write_tiny_llama


def two_format_model(path):
    """A tiny LLaMA whose attention matrices are Q8_0 and feed-forward ones Q4_0."""
    metadata, tensors = tiny_llama()
    tensors = {name: (array, QT.Q4_0) if ".ffn_" in name and array.ndim == 2 else (array, ttype)
               for name, (array, ttype) in tensors.items()}
    return write_gguf(path, metadata, tensors)


def caravan(env, *args: str, tty: bool = False) -> tuple[int, str, str, float]:
    """(exit status, stdout, stderr, seconds); with tty, stderr is a terminal."""
    start = time.perf_counter()
    if not tty:
        result = subprocess.run([sys.executable, "-m", "caravan.coordinator", *args], capture_output=True,
                                text=True, env=env, timeout=600)
        return result.returncode, result.stdout, result.stderr, time.perf_counter() - start
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "caravan.coordinator", *args], stdout=subprocess.PIPE,
                               stderr=follower, text=True, env=env)
    os.close(follower)
    stdout, _ = process.communicate(timeout=600)
    chunks = []
    with contextlib.suppress(OSError):  # EIO once the terminal's other end has closed and it is drained
        while chunk := os.read(leader, 65536):
            chunks.append(chunk)
    os.close(leader)
    return process.returncode, stdout, b"".join(chunks).decode(errors="replace"), time.perf_counter() - start


@pytest.mark.slow
def test_warmup_compiles_each_format_once_and_runs_then_start_at_once(tmp_path):
    model = two_format_model(tmp_path / "two.gguf")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "kernels"), "CARAVAN_HOME": str(tmp_path / "home")}

    status, out, err, first = caravan(env, "warmup", "-m", str(model))
    assert status == 0, err
    lines = out.splitlines()
    assert [line.split()[:2] for line in lines[:2]] == [["Q4_0", "compiled"], ["Q8_0", "compiled"]], out
    assert lines[2] == f"2 of 2 formats compiled, kernels in {tmp_path / 'kernels'}"
    assert "compiling kernels for Q4_0 (llama), first run only" in err and "compiling kernels for Q8_0" in err

    status, out, err, second = caravan(env, "warmup", "-m", str(model))
    assert status == 0, err
    assert [line.split()[:2] for line in out.splitlines()[:2]] == [["Q4_0", "cached"], ["Q8_0", "cached"]], out
    assert "0 of 2 formats compiled" in out and "compiling" not in err
    assert second < first * 0.7, (first, second)

    # A run of the warmed model says nothing about kernels; a model in a new format says it compiles.
    status, out, err, _ = caravan(env, "run", "-m", str(model), "hi", "-n", "2", tty=True)
    assert status == 0 and "compiling" not in err, err
    q4_1 = write_tiny_llama(tmp_path / "q4_1.gguf", weight_type=QT.Q4_1)
    status, out, err, _ = caravan(env, "run", "-m", str(q4_1), "hi", "-n", "2", tty=True)
    assert status == 0, err
    assert "compiling kernels for Q4_1 (llama), first run only" in err and "Q8_0" not in err, err


def test_markers_follow_the_kernel_cache(tmp_path, monkeypatch):
    path = two_format_model(tmp_path / "two.gguf")
    file = GGUFFile(path)
    config = load_model(path).config
    assert warmup.model_formats(file) == [QT.Q4_0, QT.Q8_0]
    assert warmup.layer_formats(file, config, 0) == [QT.Q4_0, QT.Q8_0]
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    assert warmup.cold_formats(config, [QT.Q4_0]) == [] and not warmup.nothing_compiled()  # no cache: unknown
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "kernels"))
    assert warmup.nothing_compiled() and warmup.cold_formats(config, [QT.Q4_0, QT.Q8_0]) == [QT.Q4_0, QT.Q8_0]
    warmup.mark("llama", QT.Q8_0)
    assert not warmup.nothing_compiled() and warmup.cold_formats(config, [QT.Q4_0, QT.Q8_0]) == [QT.Q4_0]
    assert warmup.cold_formats(config.__class__(**{**config.__dict__, "arch": "qwen2"}), [QT.Q8_0]) == [QT.Q8_0]


def test_a_node_says_when_its_first_benchmark_compiles(tmp_path, monkeypatch, caplog):
    from caravan.node.server import _benchmark

    config = load_model(write_tiny_llama(tmp_path / "tiny.gguf")).config
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "kernels"))  # where markers go; kernels stay cached
    with caplog.at_level(logging.INFO, logger="caravan"):
        assert _benchmark(config, QT.Q8_0) > 0
        assert "compiling kernels for Q8_0 (llama), first run only" in caplog.text
        caplog.clear()
        _benchmark(config, QT.Q8_0)
    assert "compiling" not in caplog.text


def test_pushing_weights_shows_layers_bytes_and_node(tmp_path, monkeypatch):
    model = load_model(write_tiny_llama(tmp_path / "tiny.gguf", n_layers=3))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
        with _push_progress(model, LayerRange(0, 2), "piA", True) as bar:
            bar.update(1000)
            time.sleep(1.1)  # a push quicker than a second shows nothing
            bar.update(1000)
    layer_bytes = sum(info.n_bytes for name, info in model.file.tensors.items() if name.startswith(("blk.0.", "blk.1.")))
    assert f"sending layers 0-1, {layer_bytes / 1e6:.1f} MB, to piA" in err.getvalue()
    with _push_progress(model, LayerRange(0, 1), "piB", True) as bar:
        pass  # the layers were cached: no bytes, no bar
    assert bar.bar is None


def test_a_long_wait_for_a_node_is_explained(caplog):
    with caplog.at_level(logging.INFO, logger="caravan"):
        with _said_after(0.05, "waiting for piA"):
            pass
        time.sleep(0.2)
        assert "waiting for piA" not in caplog.text  # a quick answer needs no explanation
        with _said_after(0.05, "waiting for piA"):
            time.sleep(0.5)
    assert "waiting for piA" in caplog.text
