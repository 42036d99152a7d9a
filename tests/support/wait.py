"""Waiting for something to happen: poll until a condition holds, with a deadline, instead of
sleeping for a guessed time."""

from __future__ import annotations

import time
from typing import Callable

POLL_INTERVAL_S = 0.05


def wait_for(condition: Callable[[], object], timeout_s: float, what: str = "the condition",
             interval_s: float = POLL_INTERVAL_S) -> float:
    """Seconds until condition() held (truthy); AssertionError naming `what` past timeout_s."""
    start = time.monotonic()
    while not condition():
        waited = time.monotonic() - start
        assert waited < timeout_s, f"{what}: not within {timeout_s} s"
        time.sleep(min(interval_s, max(timeout_s - waited, 0.0)))
    return time.monotonic() - start
