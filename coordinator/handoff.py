"""Tokens from the scheduler's threads to the HTTP streams on the event loop.

EventHandoff collects a step's events and hands them to the loop at once;
kernels_fill_the_cores says whether the step should wait for the streams' writes.
"""

from __future__ import annotations

import asyncio
import os
import threading

import numba

from .scheduler import Event

WRITE_WAIT_S = 0.1  # how long a step's end waits at most for its tokens' chunks to be written


class EventHandoff:
    """Events from the scheduler's threads to the streams on the event loop, a step's at once.

    The requests' on_event calls only collect them (put); the scheduler calls flush after each
    step, which hands them to the loop in one call_soon_threadsafe and, when this process runs
    the whole model on every core (`wait`), waits until the streams they woke have written their
    chunks before the next step starts.
    - Waking the loop's thread hands it the interpreter lock: when the first token of a step
      woke it as soon as it was sampled, sampling 8 streams took 0.8 ms a step instead of 0.27
      (the loop wrote its chunks while the scheduler waited for the lock).
    - Waiting keeps the loop's writing out of the next step's kernels when their threads fill the
      cores: the loop's thread would take a core from one (the other then waits at the end of
      every parallel loop). Measured against not waiting at 2 threads on 2 cores, it was within
      noise at 1 and 8 streams. With a core to spare, the loop writes there while the next step
      runs (1 thread on 2 cores, 12 interleaved rounds: one stream 69.1 tok/s without the wait,
      67.3 with it; 8 streams alike). The wait is at most WRITE_WAIT_S."""

    def __init__(self, wait: bool = True) -> None:
        self.wait = wait
        self._lock = threading.Condition()
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]] = {}  # by the streams' loop
        self._sent = 0  # deliveries handed to a loop so far
        self._written = 0  # the last delivery whose streams have written what it brought

    def put(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, event: Event) -> None:
        """Called on a scheduler thread: kept until its next flush."""
        with self._lock:
            self._pending.setdefault(loop, []).append((queue, event))

    def flush(self, timeout: float = WRITE_WAIT_S) -> None:
        """Called on a scheduler thread: send what was put and, if `wait`, wait (at most
        `timeout`) until its streams have written their chunks."""
        with self._lock:
            pending, self._pending = self._pending, {}
            first, self._sent = self._sent + 1, self._sent + len(pending)
            last = self._sent
        if not pending:
            return
        for number, (loop, events) in enumerate(pending.items(), first):
            try:
                loop.call_soon_threadsafe(self._deliver, loop, events, number)
            except RuntimeError:  # that loop is closed: the server is shutting down, its streams gone
                self._mark_written(number)
        if self.wait:
            with self._lock:
                self._lock.wait_for(lambda: self._written >= last, timeout)

    def _deliver(self, loop: asyncio.AbstractEventLoop, events: list[tuple[asyncio.Queue, Event]], number: int) -> None:
        for queue, event in events:
            queue.put_nowait(event)
        # Each put woke a stream's task; they run before this callback, each to its next wait,
        # writing its chunk to the socket on the way (a slow reader's is only buffered).
        loop.call_soon(self._mark_written, number)

    def _mark_written(self, number: int) -> None:
        with self._lock:
            self._written = max(self._written, number)
            self._lock.notify_all()


def kernels_fill_the_cores(threads: int | None, cores: int | None = None) -> bool:
    """Whether the model's kernels run on as many threads as there are cores (threads None:
    Numba's default, one per core; cores None: those this process may run on)."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return (threads or numba.config.NUMBA_NUM_THREADS) >= cores
