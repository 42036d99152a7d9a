"""A network namespace with multicast on its own loopback, for zeroconf tests: mDNS traffic
never leaves it. Needs root and iproute2; skipped with the reason otherwise."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess

import pytest

namespace_numbers = itertools.count()


def ip_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def netns():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (`ip`)")
    name = f"caravan-test-{os.getpid()}-{next(namespace_numbers)}"
    made = ip_command("netns", "add", name)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {made.stderr.strip()}")
    try:
        for cmd in (("link", "set", "lo", "up"), ("link", "set", "lo", "multicast", "on"),
                    ("route", "add", "224.0.0.0/4", "dev", "lo")):
            done = ip_command("netns", "exec", name, "ip", *cmd)
            assert done.returncode == 0, done.stderr
        yield ("ip", "netns", "exec", name)
    finally:
        ip_command("netns", "del", name)
