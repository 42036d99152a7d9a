"""The `caravan` command run as users run it, in a subprocess, with a private CARAVAN_HOME whose
one entry links to the shared SmolLM2 file (so the default name resolves without downloading)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def env(smollm2_path, tmp_path_factory):
    cache = tmp_path_factory.mktemp("caravan-home")
    (cache / "models").mkdir()
    os.symlink(smollm2_path, cache / "models" / smollm2_path.name)
    return {**os.environ, "CARAVAN_HOME": str(cache), "PYTHONIOENCODING": "utf-8"}


def caravan(env, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "caravan.coordinator", *args],
        input=stdin, capture_output=True, text=True, env=env, timeout=300,
    )
