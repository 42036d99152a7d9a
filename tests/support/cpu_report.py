"""A pytest plugin that reports each test file's wall time, CPU time and processes started, for
measuring the suite on a shared machine: `pytest --cpu-report ...` (tests/conftest.py).

Wall time on a busy machine says more about the neighbours than about the tests; CPU seconds
(this process and the children it has waited for) and the count of processes started do not.
A module-scoped server is counted in the test whose teardown stops it. Under pytest-xdist each
worker measures its own tests and hands them to the controller, which reports them all; a test
measures its own process, not what the other worker runs beside it.
"""

from __future__ import annotations

import collections
import resource
import subprocess
import time

import pytest

TOP_TESTS = 60
log_path: str | None = None  # where each test's line goes as it ends (conftest sets it)
_started = 0
_controller = False
_original_init = subprocess.Popen.__init__


def _counting_init(self, *args, **kwargs):
    global _started
    _started += 1
    _original_init(self, *args, **kwargs)


def _cpu_s() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


class _Totals:
    def __init__(self):
        self.per_file = collections.defaultdict(lambda: [0, 0.0, 0.0, 0])  # tests, wall, cpu, processes
        self.per_test: dict[str, tuple[float, float, int]] = {}  # wall, cpu, processes
        self._start = None

    def start(self):
        self._start = (time.monotonic(), _cpu_s(), _started)

    def finish(self, nodeid: str):
        wall, cpu, started = self._start
        test = (time.monotonic() - wall, _cpu_s() - cpu, _started - started)
        if log_path:
            with open(log_path, "a") as log:
                log.write(f"{test[0]:.2f}\t{test[1]:.2f}\t{test[2]}\t{nodeid}\n")
        self.add(nodeid, test)

    def add(self, nodeid: str, test: tuple[float, float, int]):
        self.per_test[nodeid] = test
        row = self.per_file[nodeid.split("::", 1)[0]]
        row[0] += 1
        for i, value in enumerate(test, start=1):
            row[i] += value


_totals = _Totals()


def pytest_sessionstart(session):
    global _controller
    # pytest-xdist's controller hears of its workers' tests interleaved: they measure them.
    _controller = session.config.pluginmanager.hasplugin("dsession")
    subprocess.Popen.__init__ = _counting_init


def pytest_sessionfinish(session):
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["cpu_report"] = [[nodeid, *test] for nodeid, test in _totals.per_test.items()]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """A pytest-xdist worker has finished: its tests join the report."""
    for nodeid, *test in getattr(node, "workeroutput", {}).get("cpu_report", []):
        _totals.add(nodeid, tuple(test))


def pytest_runtest_logstart(nodeid, location):
    if not _controller:
        _totals.start()


def pytest_runtest_logfinish(nodeid, location):
    if not _controller:
        _totals.finish(nodeid)


def pytest_terminal_summary(terminalreporter):
    rows = sorted(_totals.per_file.items(), key=lambda item: -item[1][2])
    write = terminalreporter.write_line
    write(f"{'wall s':>8} {'cpu s':>8} {'procs':>6} {'tests':>6}  file")
    for path, (tests, wall, cpu, started) in rows:
        write(f"{wall:8.1f} {cpu:8.1f} {started:6d} {tests:6d}  {path}")
    total = [sum(row[i] for row in _totals.per_file.values()) for i in range(4)]
    write(f"{total[1]:8.1f} {total[2]:8.1f} {total[3]:6d} {total[0]:6d}  total")
    write(f"{'wall s':>8} {'cpu s':>8} {'procs':>6}  test (the {TOP_TESTS} with the most CPU seconds)")
    for nodeid, (wall, cpu, started) in sorted(_totals.per_test.items(), key=lambda item: -item[1][1])[:TOP_TESTS]:
        write(f"{wall:8.1f} {cpu:8.1f} {started:6d}  {nodeid}")
