"""Whose sessions a node holds, and how many it holds at most.

A session belongs to the stream of the coordinator that made it: the Results stream of its
chain (RemoteStage opens one on every node of the chain before the chain's first batch), or,
for a batch sent outside a chain, the Forward stream it came on. When that stream ends (the
coordinator closed the stage, died, or lost its connection: gRPC cancels the call, and
keepalive notices a peer that went silent) the node ends every session it owned, so a
coordinator that dies takes its sessions with it (DESIGN.md). A batch from another owner for
an existing session (a re-plan's refill under the same id) takes the session over.

The cap: every session may grow to the loaded context, so a node holds at most as many as
fit, at that size, in the memory its layers left free.

    owners = SessionOwners()
    owners.claim("chain-1", ["a", "b"])   # after a batch made or used them
    owners.release("chain-1")             # -> ["a", "b"]: the sessions to end now
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass

MAX_SESSIONS = 4096  # per node whatever its memory: a session costs objects beyond its cache
_STREAM = "stream:"  # starts a Forward stream's owner name; chain ids have no colon (relay.py)


def stream_owner() -> str:
    """A new owner name for the batches of one Forward stream sent outside a chain."""
    return f"{_STREAM}{uuid.uuid4().hex}"


def is_chain(owner: str) -> bool:
    return not owner.startswith(_STREAM)


class SessionLimitError(MemoryError):
    """A batch or a copy would start a session past the node's cap (RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True)
class SessionCap:
    """How many sessions fit: KV caches of `session_bytes` each in `room` bytes."""

    session_bytes: int  # one session's KV cache for the node's layers, full at n_ctx
    room: int  # bytes free for KV caches once the layers were loaded
    n_ctx: int

    @property
    def limit(self) -> int:
        return max(1, min(MAX_SESSIONS, self.room // max(1, self.session_bytes)))

    def check(self, held: int, new: int, node: str) -> None:
        if new and held + new > self.limit:
            raise SessionLimitError(
                f"node {node} holds {held} sessions and its cap is {self.limit} (a {self.n_ctx}-token KV cache "
                f"is {self.session_bytes >> 20} MiB, {self.room >> 20} MiB are free for them): end sessions, or "
                f"give the node more memory or its layers a shorter context")


class SessionOwners:
    """Session id -> the owner (a chain id, or a Forward stream's) whose stream keeps it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._owner: dict[str, str] = {}

    def claim(self, owner: str, session_ids) -> None:
        with self._lock:
            for session_id in session_ids:
                self._owner[session_id] = owner

    def forget(self, session_id: str) -> None:
        with self._lock:
            self._owner.pop(session_id, None)

    def owner(self, session_id: str) -> str | None:
        with self._lock:
            return self._owner.get(session_id)

    def release(self, owner: str) -> list[str]:
        """The sessions `owner` still holds, now owned by nobody: the caller ends them."""
        with self._lock:
            owned = [s for s, o in self._owner.items() if o == owner]
            for session_id in owned:
                del self._owner[session_id]
        return owned

    def clear(self) -> None:
        with self._lock:
            self._owner.clear()
