"""Fixtures for the tiny seeded models; test modules load them with
`pytest_plugins = ["fixtures_tiny"]`."""

from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType as QT

from tiny_models import write_tiny_llama

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
