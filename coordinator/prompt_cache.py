"""Which token sequences the stages' prompt caches hold, as the coordinator last knew them.

The scheduler retires a finished request's session (the stages keep its accepted positions,
pipeline/prompt_cache.py) and records its tokens here; a new request then copies the longest
prefix it shares with one of them and computes only the rest. A stage may have evicted a
session this index still lists: the copy fails as an unknown session, the request computes
its prompt (a miss), and the entry goes. So the index may be stale, never wrong about bits.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

import numpy as np

MAX_CACHED_SEQUENCES = 256  # entries at most: the stages' budgets usually evict sooner


@dataclass(frozen=True)
class Cached:
    tokens: np.ndarray  # (n,) int64: the ids whose keys and values the session's caches hold
    adapters: tuple[tuple[str, float], ...]  # LoRA adapters change keys and values: only equal ones match


class PromptIndex:
    """Session id -> its cached tokens, least recently used first, and the counters /metrics shows."""

    def __init__(self, capacity: int = MAX_CACHED_SEQUENCES):
        self.capacity = capacity
        self._lock = threading.Lock()  # the scheduler's lanes finish and start requests at once
        self._entries: collections.OrderedDict[str, Cached] = collections.OrderedDict()
        self.hits = 0  # requests that started from a cached prefix
        self.misses = 0  # requests that found none, or whose copy a stage refused
        self.tokens_reused = 0  # prompt tokens copied instead of computed

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, session_id: str, tokens: list[int], adapters: tuple) -> list[str]:
        """Record a retired session; returns the sessions no longer worth keeping (the oldest
        past the capacity, and those whose tokens the new one begins with), for the caller to end."""
        entry = Cached(np.asarray(tokens, dtype=np.int64), adapters)
        with self._lock:
            dropped = [other for other, cached in self._entries.items()
                       if cached.adapters == adapters and _starts_with(entry.tokens, cached.tokens)]
            for other in dropped:
                del self._entries[other]
            self._entries[session_id] = entry
            while len(self._entries) > self.capacity:
                dropped.append(self._entries.popitem(last=False)[0])
        return dropped

    def longest(self, prompt_ids: list[int], adapters: tuple, limit: int) -> tuple[str | None, int]:
        """The cached session sharing the longest beginning with `prompt_ids` (at most `limit`
        tokens), now the most recently used, and that length; (None, 0) when none shares any."""
        prompt = np.asarray(prompt_ids[:limit], dtype=np.int64)
        best, shared = None, 0
        with self._lock:
            for session_id, cached in self._entries.items():
                if cached.adapters == adapters:
                    n = _common_prefix(cached.tokens, prompt)
                    if n > shared:
                        best, shared = session_id, n
            if best is not None:
                self._entries.move_to_end(best)
        return best, shared

    def remove(self, session_id: str) -> None:
        with self._lock:
            self._entries.pop(session_id, None)

    def count(self, reused: int) -> None:
        """One request looked: `reused` tokens it copied (0, a miss)."""
        with self._lock:
            if reused:
                self.hits += 1
                self.tokens_reused += reused
            else:
                self.misses += 1


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def _starts_with(tokens: np.ndarray, prefix: np.ndarray) -> bool:
    return len(prefix) <= len(tokens) and _common_prefix(tokens, prefix) == len(prefix)
