"""The `caravan` command line, run as users run it: a subprocess with the real SmolLM2 model.

CARAVAN_HOME points at a private cache whose one entry links to the shared model file, so
the default model name resolves through the catalog without downloading anything.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from caravan.coordinator.cli import error_message
from caravan.coordinator.reference import llama_cpp_available
from caravan.pipeline import numba_config
from caravan.pipeline.catalog import PullError
from caravan.pipeline.generate import ContextFullError
from support.cli import caravan, env  # noqa: F401  (env: a fixture)

pytestmark = [pytest.mark.model, pytest.mark.slow]

TEXT = (
    "The llama is a domesticated South American camelid, widely used as a meat and pack "
    "animal by Andean cultures since the pre-Columbian era. Llamas are social animals and live "
    "with others as a herd. Their wool is soft and contains only a small amount of lanolin. "
    "Llamas can learn simple tasks after a few repetitions. When using a pack, they can carry "
    "about 25 to 30% of their body weight for 8 to 13 km. The name llama was adopted by "
    "European settlers from native Peruvians. The ancestors of llamas are thought to have "
    "originated from the Great Plains of North America about 40 million years ago.\n"
)





def only_json(stdout: str) -> dict:
    """stdout must be exactly one JSON object (and its newline)."""
    assert stdout.endswith("\n") and stdout.count("\n") == 1, stdout
    value = json.loads(stdout)
    assert isinstance(value, dict)
    return value


# One compute thread: these subprocesses share a few cores with the rest of the suite, and
# Numba's parallel kernels slow down badly when their threads are oversubscribed.
ONE_THREAD = ("--threads", "1")
GREEDY = ("--temperature", "0", "--max-tokens", "8", *ONE_THREAD)


PARIS = ("run", "The capital of France is", *GREEDY)


@pytest.fixture(scope="module")
def paris(env):
    result = caravan(env, *PARIS, "--json")
    assert result.returncode == 0, result.stderr
    return only_json(result.stdout)


def test_run_json_greedy_completes_paris(paris):
    assert paris["text"].startswith(" Paris")
    assert set(paris) == {"prompt_tokens", "tokens", "text", "timings"}
    assert 0 < len(paris["tokens"]) <= 8 and len(paris["prompt_tokens"]) == 5
    assert set(paris["timings"]) >= {"prefill_tokens_per_s", "decode_tokens_per_s", "first_token_s"}


def test_run_gives_the_same_tokens_without_speculation_or_with_short_drafts(env, paris):
    """Speculative decoding (on by default) changes no token: --no-speculate, --draft-max 2 and
    --drafts-in-flight 3 (passes sent ahead, even in one process) give the default run's tokens."""
    for flags in (["--no-speculate"], ["--draft-max", "2"], ["--drafts-in-flight", "3"]):
        result = caravan(env, *PARIS, "--json", *flags)
        assert result.returncode == 0, result.stderr
        assert only_json(result.stdout)["tokens"] == paris["tokens"]
    assert "tokens_per_pass" in paris["timings"]


def test_run_streams_the_same_text(env, paris):
    streamed = caravan(env, *PARIS)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == paris["text"] + "\n"


def test_bench_runs_llama_cpp_beside_caravan(env):
    """`caravan bench` measures llama.cpp on the same prompt in the same run, with the ratios and
    how many greedy tokens the two engines chose alike; without llama-cpp-python (or with
    --no-llama-cpp) it says why not. The prompt is longer than llama.cpp's batch of 512, which
    llama.cpp evaluates in two calls."""
    args = ("bench", *ONE_THREAD, "--json", "--runs", "1", "--ctx", "640", "--prompt-tokens", "516", "--decode-tokens", "4")
    bench = only_json(caravan(env, *args).stdout)
    assert bench["prefill_tokens_per_s"] > 0 and bench["decode_tokens_per_s"] > 0
    if llama_cpp_available() is None:
        reference = bench["llama.cpp"]
        assert reference["prefill_tokens_per_s"] > 0 and reference["decode_tokens_per_s"] > 0 and reference["first_token_s"] > 0
        assert bench["ratios"]["decode"] == pytest.approx(bench["decode_tokens_per_s"] / reference["decode_tokens_per_s"], rel=1e-2)
        assert reference["same_tokens"] == 4  # the filler repeats itself: no near ties in its first tokens
    else:
        assert "not installed" in bench["llama.cpp"]["skipped"]
    skipped = only_json(caravan(env, *args, "--no-llama-cpp").stdout)
    assert skipped["llama.cpp"] == {"skipped": "--no-llama-cpp"} and "ratios" not in skipped


def test_kernels_compile_once_into_caravans_cache(env, tmp_path):
    """Without NUMBA_CACHE_DIR, compiled kernels go to <CARAVAN_HOME>/numba: the first process
    writes them, the next one only reads them."""
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    model = next((Path(env["CARAVAN_HOME"]) / "models").iterdir())
    os.symlink(model.resolve(), home / "models" / model.name)
    fresh = {key: value for key, value in env.items() if key != "NUMBA_CACHE_DIR"}
    fresh["CARAVAN_HOME"] = str(home)

    def cached():
        return {p: p.stat().st_mtime_ns for p in (home / "numba").rglob("*") if p.is_file()}

    args = ("run", "Hi", *ONE_THREAD, "--max-tokens", "2", "--temperature", "0")
    assert caravan(fresh, *args).returncode == 0
    first = cached()
    assert any(p.suffix == ".nbi" for p in first) and any(p.suffix == ".nbc" for p in first)
    assert caravan(fresh, *args).returncode == 0
    assert cached() == first


def test_kernel_cache_is_kept_apart_per_version_of_the_sources(tmp_path):
    """Numba checks a cached kernel against its own file only, so a change to vector.py's IR
    would leave the formats' kernels that inline it cached: any change to the pipeline's sources,
    in a subpackage too, moves the compiled kernels to a new folder. An operator's
    NUMBA_CACHE_DIR wins."""
    sources = Path(numba_config.__file__).parent
    copy = tmp_path / "pipeline"
    shutil.copytree(sources, copy, ignore=shutil.ignore_patterns("__pycache__"))
    fingerprint = numba_config.kernel_sources_fingerprint(copy)
    assert fingerprint == numba_config.kernel_sources_fingerprint(sources)
    for changed in ("vector.py", "formats/kquants.py"):
        before = numba_config.kernel_sources_fingerprint(copy)
        (copy / changed).write_text((copy / changed).read_text() + "\n# changed\n")
        assert numba_config.kernel_sources_fingerprint(copy) != before

    environ: dict[str, str] = {}
    numba_config.keep_compiled_kernels_in(tmp_path / "home", environ)
    assert environ["NUMBA_CACHE_DIR"] == str(tmp_path / "home" / "numba" / fingerprint)
    environ = {"NUMBA_CACHE_DIR": str(tmp_path / "mine")}
    numba_config.keep_compiled_kernels_in(tmp_path / "home", environ)
    assert environ["NUMBA_CACHE_DIR"] == str(tmp_path / "mine")


def test_other_versions_kernels_go_once_unused_for_a_while(tmp_path):
    """Each upgrade leaves its predecessor's compiled kernels behind: a start removes other
    versions' folders (and the folders Numba made in numba/ itself before these) that no
    process has used for KEEP_OTHER_VERSIONS_DAYS, keeps recently used ones and anything else,
    and marks its own folder as used; an operator's NUMBA_CACHE_DIR leaves the cache alone."""
    root = tmp_path / "home" / "numba"
    long_ago = time.time() - (numba_config.KEEP_OTHER_VERSIONS_DAYS + 1) * 86400
    lately = time.time() - 86400
    legacy = "pipeline_" + "0" * 40  # what Numba named the cache before the per-version folders
    paths = {name: root / name for name in ("0123456789abcdef", "fedcba9876543210", "notes", legacy)}
    for name, path in paths.items():
        path.mkdir(parents=True)
        (path / "quants.kernel-1.py311.nbi").write_bytes(b"")
        os.utime(path, (long_ago, lately if name == "fedcba9876543210" else long_ago))
    mine = root / numba_config.kernel_sources_fingerprint()
    mine.mkdir()
    os.utime(mine, (long_ago, long_ago))

    numba_config.keep_compiled_kernels_in(tmp_path / "home", {"NUMBA_CACHE_DIR": str(tmp_path / "mine")})
    assert all(path.exists() for path in paths.values())
    numba_config.keep_compiled_kernels_in(tmp_path / "home", {})
    assert sorted(p.name for p in root.iterdir()) == sorted([mine.name, "fedcba9876543210", "notes"])
    assert mine.stat().st_mtime > lately


def test_tokenize_maps_special_text_to_ids(env):
    result = caravan(env, "tokenize", "<|im_start|>user\nHi<|im_end|>", "--json")
    assert result.returncode == 0, result.stderr
    tokens = only_json(result.stdout)["tokens"]
    assert tokens[0] == 1 and tokens[-1] == 2  # <|im_start|>, <|im_end|>

    result = caravan(env, "tokenize", "<|im_start|>user")
    assert result.stdout.splitlines() == ["     1 -> '<|im_start|>'", "  4093 -> 'user'"]


CHAT = ("chat", "--system", "Be brief.", "--temperature", "0", "--max-tokens", "6", *ONE_THREAD)
CHAT_LINES = "What is 2+2?\nName a colour.\n"


def test_chat_two_piped_lines_get_two_replies(env):
    result = caravan(env, *CHAT, "--json", stdin=CHAT_LINES)
    assert result.returncode == 0, result.stderr
    messages = only_json(result.stdout)["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert all(replies)

    streamed = caravan(env, *CHAT, stdin=CHAT_LINES)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == "".join(r + "\n" for r in replies)


def test_chat_reset_and_exit(env):
    result = caravan(env, *CHAT, "--json", stdin="Hi\n/reset\n\nHello\n/exit\nignored\n")
    assert result.returncode == 0, result.stderr
    messages = only_json(result.stdout)["messages"]
    assert [(m["role"], m["content"]) for m in messages[:2]] == [("system", "Be brief."), ("user", "Hello")]
    assert len(messages) == 3


def test_perplexity_windows(env, tmp_path):
    text_file = tmp_path / "llama.txt"
    text_file.write_text(TEXT * 2, encoding="utf-8")
    result = caravan(env, "perplexity", str(text_file), "--ctx", "64", "--max-windows", "2", "--json", *ONE_THREAD)
    assert result.returncode == 0, result.stderr
    out = only_json(result.stdout)
    assert out["n_scored"] == 2 * (64 - 1 - 32)  # the second half of each window, as llama-perplexity
    assert math.isfinite(out["ppl"]) and 1.0 < out["ppl"] < 1000.0


def test_perplexity_file_too_short(env, tmp_path):
    text_file = tmp_path / "short.txt"
    text_file.write_text("Too short.", encoding="utf-8")
    assert_one_error_line(caravan(env, "perplexity", str(text_file), "--ctx", "64"), "fewer than --ctx 64")


def assert_one_error_line(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("caravan: error: "), result.stderr
    assert expected in lines[0]
    assert result.stdout == ""


@pytest.fixture(scope="module")
def bad_files(smollm2_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "text.gguf").write_text("this is not a model\n" * 10)
    with open(smollm2_path, "rb") as f:
        (folder / "truncated.gguf").write_bytes(f.read(1_000_000))
    from support.tiny_models import tiny_model, write_gguf

    metadata, tensors = tiny_model("llama")
    metadata = {k.replace("llama.", "mamba."): v for k, v in metadata.items()} | {"general.architecture": "mamba"}
    write_gguf(folder / "mamba.gguf", metadata, tensors)
    return folder


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", "hi", "--model", "{bad}/missing.gguf"], "no such file"),
        (["run", "hi", "--model", "{bad}/text.gguf"], "not a GGUF file"),
        (["run", "hi", "--model", "{bad}/truncated.gguf"], "truncated"),
        (["tokenize", "hi", "--model", "{bad}/truncated.gguf"], "truncated"),
        (["run", "hi", "--model", "llama-9000"], "unknown model 'llama-9000'"),
        (["run", "hi", "--model", "{bad}/mamba.gguf"], "unknown architecture 'mamba' (general.architecture; "
                                                        "supported: llama, qwen2, phi3, gemma, gemma2, gemma3)"),
        (["run", "word " * 40, "--ctx", "16", *ONE_THREAD], "does not fit the context of 16 tokens"),
        (["run", "hi", "--temperature", "-1"], "temperature must be finite and >= 0"),
        (["run", "hi", "--threads", "0"], "--threads must be between 1"),
        (["perplexity", "{bad}/missing.txt"], "No such file"),
        (["bench", "--decode-tokens", "1", "--prompt-tokens", "8", *ONE_THREAD], "--decode-tokens must be at least 2"),
        # refused before the model loads or the (unreachable) node is asked
        (["plan", "--nodes", "127.0.0.1:9", "--acceptance", "1.5"], "--acceptance must be between 0 and 1"),
        (["plan", "--nodes", "127.0.0.1:9", "--acceptance", "most"], "--acceptance must be a number between 0 and 1"),
    ],
    ids=["missing", "not-gguf", "truncated", "truncated-tokenize", "unknown-name", "unknown-arch", "prompt-too-long",
         "bad-temperature", "bad-threads", "missing-text", "bench-one-token", "plan-acceptance-range",
         "plan-acceptance-text"],
)
def test_expected_failures_are_one_line(env, bad_files, args, expected):
    args = [a.replace("{bad}", str(bad_files)) for a in args]
    assert_one_error_line(caravan(env, *args), expected)


def test_plan_with_speculation_follows_the_formula(env, tmp_path):
    """`caravan plan --acceptance A --draft-max K` over a real node: E = (1 - A^(K+1)) / (1 - A)
    tokens a pass, a pass's compute and head grown by 1 + K * row_share, the hops not."""
    from support.nodes import NodeProcess, cluster_token_file
    from support.tiny_models import write_tiny_llama

    path = write_tiny_llama(tmp_path / "tiny.gguf")
    node = NodeProcess(tmp_path / "node")
    try:
        result = caravan(env, "plan", "--model", str(path), "--nodes", node.address, "--acceptance", "0.7",
                         "--draft-max", "4", "--token-file", str(cluster_token_file()), "--json", *ONE_THREAD)
    finally:
        node.stop()
    assert result.returncode == 0, result.stderr
    plan = only_json(result.stdout)
    sp = plan["speculation"]
    assert sp["acceptance"] == 0.7 and sp["draft_max"] == 4
    assert sp["tokens_per_pass"] == pytest.approx((1 - 0.7 ** 5) / 0.3, abs=1e-4)
    compute = sum((st["layers"][1] - st["layers"][0]) * st["ms_per_layer"] for st in plan["stages"])
    hops = sum(st["rtt_ms"] / 2 for st in plan["stages"]) + plan["stages"][-1]["rtt_ms"] / 2  # there and back
    assert 1e3 / (compute + plan["head_ms"] + hops) == pytest.approx(plan["expected_tokens_per_s"], rel=0.01)
    grown = (compute + plan["head_ms"]) * (1 + 4 * sp["row_share"]) + hops
    assert sp["pass_ms"] == pytest.approx(grown, rel=0.02)  # the JSON's figures are rounded
    assert sp["tokens_per_s"] == pytest.approx(1e3 * sp["tokens_per_pass"] / sp["pass_ms"], rel=0.01)


@pytest.fixture(scope="module")
def non_finite_models(tmp_path_factory):
    """A tiny model with a NaN block scale, and one whose finite weights make its activations overflow."""
    from support.tiny_models import tiny_llama, with_block_scale, write_gguf

    folder = tmp_path_factory.mktemp("non-finite")
    metadata, tensors = tiny_llama()
    write_gguf(folder / "nan-scale.gguf", metadata, with_block_scale(tensors, "blk.1.attn_q.weight", np.nan, row=3))
    norm, ttype = tensors["blk.1.ffn_norm.weight"]
    write_gguf(folder / "overflow.gguf", metadata, {**tensors, "blk.1.ffn_norm.weight": (norm * np.float32(1e30), ttype)})
    return folder


@pytest.mark.parametrize("model, expected", [
    ("nan-scale.gguf", "blk.1.attn_q.weight: non-finite values (NaN or Inf) in its block scales; the model file is damaged"),
    ("overflow.gguf", "the hidden state became NaN or Inf in layers [0, 3) (the model's activations overflowed)"),
], ids=["nan-scale", "overflow"])
def test_non_finite_weights_or_activations_are_one_line(env, non_finite_models, model, expected):
    result = caravan(env, "run", "hi", "--model", str(non_finite_models / model), "--max-tokens", "4", *ONE_THREAD)
    assert_one_error_line(result, expected)


def test_usage_error_exits_2(env):
    result = caravan(env, "run")
    assert result.returncode == 2
    assert "usage: caravan run" in result.stderr and "Traceback" not in result.stderr
    result = caravan(env, "nodes", "--discover-seconds", "-1")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == ("caravan nodes: error: argument --discover-seconds: "
                                              "must be a positive number of seconds, got -1")


@pytest.mark.parametrize("verb, flag, value, expected", [
    ("run", "--draft-max", "0", "argument --draft-max: must be a positive integer, got 0"),
    ("run", "--draft-max", "-1", "argument --draft-max: must be a positive integer, got -1"),
    ("serve", "--draft-max", "x", "argument --draft-max: must be a positive integer, got x"),
    ("serve", "--max-body", "0", "argument --max-body: must be a positive size such as 4MiB, 512KiB or 1048576, got 0"),
    ("run", "--max-tokens", "x", "argument --max-tokens/-n: invalid int value: 'x'"),
], ids=["draft-max-0", "draft-max-negative", "draft-max-text", "max-body-0", "max-tokens-text"])
def test_a_bad_flag_value_is_one_line(env, verb, flag, value, expected):
    """As the values checked after parsing: the flag and what is wrong, not argparse's usage."""
    result = caravan(env, verb, flag, value, *(["hi"] if verb == "run" else []))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"caravan {verb}: error: {expected}"], result.stderr


def test_verbose_shows_the_traceback(env, bad_files):
    result = caravan(env, "run", "hi", "--model", str(bad_files / "text.gguf"), "-v")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and result.stderr.splitlines()[-1].startswith("caravan: error: ")


def test_ctrl_c_exits_130_quietly(env):
    process = subprocess.Popen(
        [sys.executable, "-m", "caravan.coordinator", "run", "Once upon a time", "--max-tokens", "200", *ONE_THREAD],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        # As a terminal would start it: pytest run in the background of a script inherits
        # SIGINT ignored (POSIX, for asynchronous commands), and so would caravan.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        process.stdout.read(1)  # the first streamed text: the model is loaded and generating
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert "Traceback" not in stderr


def test_error_message_table():
    assert error_message(ContextFullError("prompt of 9 tokens")) == (
        "prompt of 9 tokens (give a larger --ctx or a shorter prompt)"
    )
    assert error_message(PullError("unknown model 'x'")) == "unknown model 'x'"
    missing = FileNotFoundError(2, "No such file or directory", "a.txt")
    assert error_message(missing) == "a.txt: No such file or directory"
    assert error_message(KeyError("a bug")) is None
