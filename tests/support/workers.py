"""pytest-xdist for the suite: plain `pytest` runs on a few workers, and a test marked `serial`
runs while the other workers wait (tests/conftest.py wires these hooks).

A serial test makes a claim about wall time that holds on an otherwise idle machine (/health
answers within a second under its own load, SIGTERM ends a server within seconds); another
worker's test on the same cores would make it a claim about the neighbour. Two file locks in a
folder the controller makes for the run keep it alone: every test holds `running` shared, a
serial test holds it exclusively, and `gate` (taken before `running`) stops the other workers
from starting a test while a serial one waits for theirs to end, so it cannot be starved.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

# Each worker holds its own loaded models and starts servers and nodes of its own; the suite's
# wall-time bounds are measured at this many.
MAX_WORKERS = 2
LOCK_FOLDER = "caravan_locks"  # the key in each worker's workerinput
_folder: Path | None = None  # this run's lock folder: made by the controller, known to each worker


def default_workers() -> int:
    """One worker per core this process may run on, at most MAX_WORKERS."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))


def distribute_by_default(config: pytest.Config) -> None:
    """`pytest` alone runs on default_workers(), each test file on one worker (its module-scoped
    servers start once); `-n N` (`-n 0`: in this process), `-p no:xdist`, --pdb, a worker's own
    configuration and a pytest that a worker's test starts (test_nojit.py's: it has the worker's
    core) are left as they are, and one core keeps the tests in this process."""
    if (not config.pluginmanager.hasplugin("xdist") or hasattr(config, "workerinput")
            or "PYTEST_XDIST_WORKER" in os.environ or default_workers() < 2
            or config.option.numprocesses is not None or config.getoption("usepdb")):
        return
    config.option.numprocesses = default_workers()
    if config.option.dist == "no":
        config.option.dist = "loadfile"


def is_controller(config: pytest.Config) -> bool:
    """True in pytest-xdist's controller, which only hands tests to its workers."""
    return bool(getattr(config.option, "numprocesses", None)) and not hasattr(config, "workerinput")


def make_lock_folder(config: pytest.Config) -> None:
    global _folder
    if is_controller(config):
        _folder = Path(tempfile.mkdtemp(prefix="caravan-tests-"))
    elif hasattr(config, "workerinput") and LOCK_FOLDER in config.workerinput:
        _folder = Path(config.workerinput[LOCK_FOLDER])


def hand_lock_folder_to(node) -> None:
    node.workerinput[LOCK_FOLDER] = os.fspath(_folder)


def remove_lock_folder(config: pytest.Config) -> None:
    if is_controller(config) and _folder is not None:
        shutil.rmtree(_folder, ignore_errors=True)


@contextlib.contextmanager
def turn(serial: bool) -> Iterator[None]:
    """Around one test's setup, call and teardown: alone when `serial`, beside the other
    workers' tests otherwise. Without workers, nothing to wait for."""
    if _folder is None:
        yield
        return
    with open(_folder / "gate", "a") as gate, open(_folder / "running", "a") as running:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(running, fcntl.LOCK_EX if serial else fcntl.LOCK_SH)
        if not serial:
            fcntl.flock(gate, fcntl.LOCK_UN)
        yield  # closing the files releases what is still held


@contextlib.contextmanager
def one_worker_at_a_time(name: str) -> Iterator[None]:
    """For work the workers would otherwise repeat side by side (the first pull of a model): the
    second waits, then finds it done. Without workers, nothing to wait for."""
    if _folder is None:
        yield
        return
    with open(_folder / name, "a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        yield


def lock_numba_cache_saves() -> None:
    """Make this process's saves into Numba's kernel cache one at a time per function.

    Numba adds a compiled signature by reading the function's index, picking the first free
    data file number and writing both back, unlocked (numba/numba#4807): two processes saving
    two signatures of one function at once can both pick the same number, and the index may
    then name a file holding the other signature's code. Two workers on a cold cache compile
    the same kernels side by side; under this lock (one per cache folder) the second reads the
    first's index."""
    from numba.core.caching import IndexDataCacheFile

    save = IndexDataCacheFile.save
    if getattr(save, "locked", False):
        return

    def locked_save(self, key, data):
        with open(os.path.join(self._cache_path, "saving.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            save(self, key, data)

    locked_save.locked = True
    IndexDataCacheFile.save = locked_save
