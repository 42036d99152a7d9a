"""Zeroconf discovery with real advertisements, inside a network namespace the test creates.

The namespace has only its own loopback interface, switched to multicast, so mDNS traffic
never leaves it (the host's loopback has no multicast, and no other network may be touched).
Needs root and iproute2; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from support.netns import ip_command, namespace_numbers, netns  # noqa: F401  (netns: the fixture)
from support.nodes import NodeProcess, cluster_token_file

pytestmark = pytest.mark.slow  # spawns caravan node processes


def caravan_in(ns, *args, timeout=120):
    return subprocess.run([*ns, sys.executable, "-m", "caravan.coordinator", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_nodes_are_discovered_and_used(netns, tiny_q8_path, tmp_path):
    nodes = [NodeProcess(tmp_path / name, advertise=True, prefix=netns, name=name) for name in ("alpha", "beta")]
    # A node set up with some other cluster's token: seen, but never trusted with layers.
    stranger = NodeProcess(tmp_path / "stranger", advertise=True, prefix=netns, name="stranger",
                           token_file=tmp_path / "other-cluster-token")
    nodes.append(stranger)
    try:
        listed = caravan_in(netns, "nodes", "--model", str(tiny_q8_path), "--json", "--discover-seconds", "2")
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)["nodes"]
        found = {n["name"]: n for n in rows if "name" in n}
        assert set(found) == {"alpha", "beta"}
        for node in nodes[:2]:
            row = next(r for r in found.values() if r["address"] == node.address)
            assert row["state"] == "idle" and row["ms_per_layer"] > 0 and row["cores"] >= 1
            assert row["memory_total"] > row["memory_available"] > 0
        (untrusted,) = [r for r in rows if r["address"] == stranger.address]
        assert untrusted["state"] == "untrusted"

        args = ("run", "hello world", "--model", str(tiny_q8_path), "--temperature", "0", "-n", "8", "--json",
                "--cache-dir", str(tmp_path / "coordinator"), "--token-file", str(cluster_token_file()))
        local = caravan_in(netns, *args)
        spread = caravan_in(netns, *args, "--discover", "--discover-seconds", "2", "-v")
        assert spread.returncode == 0, spread.stderr
        assert json.loads(spread.stdout)["tokens"] == json.loads(local.stdout)["tokens"]
        assert "layers placed: " in spread.stderr
        assert "stranger" not in spread.stderr.split("layers placed: ")[1].splitlines()[0]
        assert "leaving out" in spread.stderr and "cluster token" in spread.stderr
    finally:
        for node in nodes:
            node.stop()


def test_discover_with_no_nodes_says_what_to_do(netns, tiny_q8_path):
    result = caravan_in(netns, "run", "hi", "--model", str(tiny_q8_path), "--discover", "--discover-seconds", "0.5")
    assert result.returncode == 1
    assert "no caravan nodes answered" in result.stderr and result.stderr.count("\n") == 1


@pytest.fixture
def two_netns():
    """Namespaces a and b joined by a veth pair (10.213.0.1 in a, 10.213.0.2 in b): a LAN of
    two machines that exists only inside this test."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (`ip`)")
    tag = f"{os.getpid()}-{next(namespace_numbers)}"
    a, b = f"caravan-a-{tag}", f"caravan-b-{tag}"
    made = [n for n in (a, b) if ip_command("netns", "add", n).returncode == 0]
    try:
        if len(made) != 2:
            pytest.skip("cannot create network namespaces")
        steps = [
            ("link", "add", f"va{tag[-6:]}", "netns", a, "type", "veth", "peer", "name", f"vb{tag[-6:]}", "netns", b),
        ]
        for step in steps:
            done = ip_command(*step)
            assert done.returncode == 0, done.stderr
        for ns, dev, addr in ((a, f"va{tag[-6:]}", "10.213.0.1/24"), (b, f"vb{tag[-6:]}", "10.213.0.2/24")):
            for cmd in (("link", "set", "lo", "up"), ("addr", "add", addr, "dev", dev), ("link", "set", dev, "up")):
                done = ip_command("netns", "exec", ns, "ip", *cmd)
                assert done.returncode == 0, done.stderr
        yield ("ip", "netns", "exec", a), ("ip", "netns", "exec", b), f"vb{tag[-6:]}"
    finally:
        for n in made:
            ip_command("netns", "del", n)


@pytest.mark.model
def test_network_cut_between_machines_is_routed_around(two_netns, smollm2_path, tmp_path):
    """A node on the other side of a link that goes down mid-answer (no process dies, no
    reset arrives): the coordinator re-plans onto the node it can still reach, same text."""
    in_a, in_b, b_link = two_netns
    near = NodeProcess(tmp_path / "near", prefix=in_a)
    far = NodeProcess(tmp_path / "far", prefix=in_b, host="10.213.0.2")
    try:
        args = ("run", "Once upon a time, in a small village,", "--temperature", "0", "-n", "40", "-t", "1",
                "--ctx", "256")
        expected = subprocess.run([*in_a, sys.executable, "-m", "caravan.coordinator", *args],
                                  capture_output=True, timeout=180).stdout
        run = subprocess.Popen([*in_a, sys.executable, "-m", "caravan.coordinator", *args, "--nodes",
                                f"{near.address},{far.address}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               bufsize=0)
        first = run.stdout.read(8)
        cut = subprocess.run([*in_b, "ip", "link", "set", b_link, "down"], capture_output=True, text=True)
        assert cut.returncode == 0, cut.stderr
        rest, errors = run.communicate(timeout=180)
        assert run.returncode == 0, errors.decode()
        assert first + rest == expected
        assert b"re-planning" in errors and far.address.encode() in errors
    finally:
        near.stop()
        far.stop()
