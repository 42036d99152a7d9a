"""The kernels as plain Python (NUMBA_DISABLE_JIT=1) pass the same quant and op tests.

Compiled code can hide a bug that plain Python shows (an overflow, an integer type that wraps)
and the reverse; stumpy runs its suite this way for the same reason. The large shapes and the
thread-count test and the sweep over f32 values are left out: interpreted, they take minutes and
say nothing new (the sweep would compare numpy with itself); so are
test_formats.py's whole-model tests (test_stage.py's job, compiled).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs three test modules again, interpreted

TESTS = Path(__file__).resolve().parent
SUBSET = "not cols1536 and not T17 and not thread_count and not tiny_model and not memory_plan and not f16_conversions"


def test_quants_and_ops_without_jit():
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", SUBSET,
         str(TESTS / "test_quants.py"), str(TESTS / "test_formats.py"), str(TESTS / "test_ops.py")],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
