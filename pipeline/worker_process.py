"""Run untrusted work (a model's chat template) in helper processes that can be killed.

Python cannot interrupt a thread stuck in a loop, so work that may never end runs in a process of
its own: a few persistent workers, each fed one JSON request at a time over a pipe. A call that
outlives its deadline kills its worker, and a fresh one takes its place; a worker's address space
is capped, so a runaway cannot take the machine's memory either. Messages are JSON, never pickle:
a worker runs hostile code, and what it sends back must not be able to run code here.

A worker is started with `python -c` rather than multiprocessing's spawn, which would import the
parent's `__main__` (the whole command line) into every worker.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any, Callable

logger = logging.getLogger(__name__)

WORKER_START_SECONDS = 60.0  # a fresh interpreter's imports, on a busy Raspberry Pi

_READY = b"{}"
# `python -c` puts the working directory first on sys.path; a worker imports nothing from there.
_WORKER_MAIN = f"import sys; del sys.path[0]; from {__name__} import _serve; _serve()"


class WorkTimeout(Exception):
    """A request outlived its deadline; its worker was killed."""


class WorkerCrashed(ChildProcessError):
    """A worker died, or sent something that is not a reply, while handling a request."""


def encode(message: Any) -> bytes:
    """A request or reply as sent: JSON in UTF-8 (TypeError, ValueError for what JSON cannot hold)."""
    # surrogatepass: a client's text may hold lone surrogates, which JSON carries but UTF-8 does not.
    return json.dumps(message, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _decode(data: bytes) -> Any:
    return json.loads(data.decode("utf-8", "surrogatepass"))


class _Worker:
    """One worker process and the two pipes to it."""

    def __init__(self, target: str, seconds: float, memory_bytes: int) -> None:
        self.target = target
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        # A worker still busy when its parent dies ends itself a little after twice the deadline.
        argv = [str(to_child_r), str(from_child_w), target, repr(2 * seconds + 1), str(memory_bytes)]
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _WORKER_MAIN, *argv],
                pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                start_new_session=True,  # the terminal's Ctrl-C is for the parent, which kills its workers
            )
        except BaseException:
            os.close(to_child_w)
            os.close(from_child_r)
            raise
        finally:
            os.close(to_child_r)  # the child's ends: it holds its own copies now
            os.close(from_child_w)
        self._to_child = Connection(to_child_w, readable=False)
        self._from_child = Connection(from_child_r, writable=False)
        self._ready = False

    def alive(self) -> bool:
        return self.process.poll() is None

    def call(self, request: bytes, seconds: float, max_reply_bytes: int) -> Any:
        if not self._ready:
            self._wait_ready()
        try:
            self._to_child.send_bytes(request)
            replied = self._from_child.poll(seconds)
            if replied:
                return _decode(self._from_child.recv_bytes(max_reply_bytes))
        except (EOFError, OSError, ValueError) as exc:  # ValueError: not JSON (or not UTF-8)
            raise WorkerCrashed(self._why_gone(exc)) from exc
        raise WorkTimeout(f"no reply within {seconds:g} s")

    def _wait_ready(self) -> None:
        try:
            if self._from_child.poll(WORKER_START_SECONDS) and self._from_child.recv_bytes(len(_READY)) == _READY:
                self._ready = True
                return
        except (EOFError, OSError):
            pass
        self.kill()
        raise ChildProcessError(f"a worker process ({self.target}) did not start within "
                                f"{WORKER_START_SECONDS:g} s (exit status {self.process.returncode}); "
                                "its error, if any, is above")

    def _why_gone(self, exc: BaseException) -> str:
        try:
            status = self.process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            return f"it sent no valid reply ({type(exc).__name__}: {exc})"
        if status < 0:
            return f"it was killed by {signal.Signals(-status).name}"
        return f"it exited with status {status}"

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self._to_child.close()
        self._from_child.close()


class ProcessPool:
    """Up to `size` workers running `target` ("module:function", dict -> dict), started on demand
    and kept between calls; `call` may be used from any number of threads at once."""

    def __init__(self, target: str, *, seconds: float, memory_bytes: int, size: int) -> None:
        self.target = target
        self.seconds = seconds
        self.memory_bytes = memory_bytes
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._pid = os.getpid()

    def call(self, request: bytes, max_reply_bytes: int) -> Any:
        """The worker's reply to `request` (`encode`d), or WorkTimeout after `seconds` (the
        worker is killed), or WorkerCrashed."""
        with self._slots:
            worker = self._take()
            try:
                reply = worker.call(request, self.seconds, max_reply_bytes)
            except BaseException:
                worker.kill()
                self._give(self._new_worker())  # starts now, so the next call finds it ready
                raise
            self._give(worker)
            return reply

    def _take(self) -> _Worker:
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the workers belong to the parent
                self._idle, self._pid = [], os.getpid()
            while self._idle:
                worker = self._idle.pop()
                if worker.alive():
                    return worker
                logger.warning("a %s worker process exited while idle (status %s); starting another",
                               self.target, worker.process.returncode)
                worker.kill()
        return self._new_worker()

    def _give(self, worker: _Worker) -> None:
        with self._lock:
            self._idle.append(worker)

    def _new_worker(self) -> _Worker:
        return _Worker(self.target, self.seconds, self.memory_bytes)


# --- the worker's side ----------------------------------------------------------------------


def _limit_memory(extra_bytes: int) -> None:
    """Cap the address space at what the process has now plus `extra_bytes`."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        logger.warning("cannot read this process's size; the worker runs without a memory bound")
        return
    limit = kib * 1024 + extra_bytes
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _serve() -> None:
    """A worker's main loop: argv holds its pipes, its target, backstop and memory bound."""
    read_fd, write_fd, target, backstop, memory_bytes = sys.argv[1:6]
    inbox = Connection(int(read_fd), writable=False)
    outbox = Connection(int(write_fd), readable=False)
    module, function = target.split(":")
    handler: Callable[[dict], dict] = getattr(importlib.import_module(module), function)
    _limit_memory(int(memory_bytes))
    try:
        outbox.send_bytes(_READY)
        while True:
            request = _decode(inbox.recv_bytes())
            # SIGALRM's default action ends the process: the backstop if the parent is gone.
            signal.setitimer(signal.ITIMER_REAL, float(backstop))
            reply = handler(request)
            signal.setitimer(signal.ITIMER_REAL, 0)
            outbox.send_bytes(encode(reply))
    except (EOFError, BrokenPipeError):
        return  # the parent closed the pipes, or exited
