"""A stage's prompt cache: the KV caches of finished sessions, kept for later requests to copy.

When a request ends, its session is retired instead of dropped: the stage keeps the positions
whose keys and values are valid (the tokens the coordinator accepted, never a rejected draft)
under a byte budget, the least recently used going first. A retired session is never written
again, only copied from (LocalStage.copy_session), so the next turn of a conversation or a
request sharing a system prompt starts from it (llama.cpp's server keeps its slots' prompts
the same way).

    pool = PromptCache(budget=64 << 20)
    pool.put("a", cache, length=120)  # kept, trimmed to 120 positions
    pool.get("a")                     # -> the KVCache, now the most recently used
    pool.shrink_to(0)                 # -> ["a"]: evicted
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Callable

CACHE_SHARE_OF_FREE = 0.25  # of the memory free besides the weights, the default budget's share


def default_budget(free_bytes: int) -> int:
    """The prompt cache's budget when no flag sets it: a share of what the weights leave free."""
    return max(0, int(free_bytes * CACHE_SHARE_OF_FREE))


@dataclass(frozen=True)
class CacheStats:
    sessions: int = 0  # retired sessions held
    tokens: int = 0  # their positions, in all
    bytes: int = 0  # their keys and values
    budget: int = 0  # bytes they may hold at most
    hits: int = 0  # copies made from a retired session
    evictions: int = 0  # retired sessions dropped to stay within the budget or make room


class PromptCache:
    """Retired sessions' KV caches in least recently used order, within `budget` bytes."""

    def __init__(self, budget: int = 0, on_evict: Callable[[str], None] = lambda session_id: None):
        self.budget = budget
        self.on_evict = on_evict  # told each session dropped to stay within the budget
        self._held: collections.OrderedDict[str, object] = collections.OrderedDict()  # id -> KVCache, oldest first
        self._lock = threading.RLock()  # a node makes room for live sessions outside its stage's lock
        self._bytes = 0
        self._tokens = 0
        self.hits = 0
        self.evictions = 0

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._held

    def put(self, session_id: str, cache, length: int) -> None:
        """Keep the first `length` positions of `cache` (a KVCache), copied to an exact fit, unless
        they alone exceed the budget; older sessions go until the rest fits."""
        with self._lock:
            self.pop(session_id)
            if length <= 0 or cache.nbytes_for(length) > self.budget:
                return
            kept = cache.trimmed(length)
            self._held[session_id] = kept
            self._bytes += kept.nbytes
            self._tokens += length
            self.shrink_to(self.budget)

    def get(self, session_id: str):
        """The retired session's KVCache (now the most recently used), or None."""
        with self._lock:
            cache = self._held.get(session_id)
            if cache is not None:
                self._held.move_to_end(session_id)
                self.hits += 1
            return cache

    def pop(self, session_id: str) -> bool:
        with self._lock:
            cache = self._held.pop(session_id, None)
            if cache is None:
                return False
            self._bytes -= cache.nbytes
            self._tokens -= cache.length
            return True

    def shrink_to(self, n_bytes: int) -> list[str]:
        """Evict the least recently used sessions until at most `n_bytes` are held; their ids."""
        evicted = []
        with self._lock:
            while self._held and self._bytes > max(0, n_bytes):
                session_id = next(iter(self._held))
                self.pop(session_id)
                self.evictions += 1
                evicted.append(session_id)
                self.on_evict(session_id)
        return evicted

    def set_budget(self, budget: int) -> None:
        with self._lock:
            self.budget = max(0, budget)
            self.shrink_to(self.budget)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(len(self._held), self._tokens, self._bytes, self.budget, self.hits, self.evictions)
