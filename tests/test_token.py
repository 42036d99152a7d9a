"""Joining without guessing (issue 25): `caravan token` prints the cluster's token and where it
lives, a node takes it from a file, --token or CARAVAN_TOKEN, reads its file again when it
refuses a call, both sides say which file to copy where, and a node says without -v which
coordinator it serves with which layers. Real node processes on loopback ports."""

from __future__ import annotations

import collections
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from caravan.coordinator.cluster import close_nodes, connect
from caravan.coordinator.remote import NodeError
from caravan.pipeline.loader import load_model
from caravan.pipeline.stage import LayerRange
from caravan.proto.auth import REREAD_S, TOKEN_ENV, TOKEN_FILE, TokenCheck, load_token

from support.nodes import NodeProcess

pytestmark = pytest.mark.slow  # spawns caravan node processes


SHA = "cd" * 32  # the tiny model, named by any well-formed digest


def caravan_token(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "caravan.coordinator", "token", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "CARAVAN_HOME": str(home)})


def test_caravan_token_creates_the_token_then_prints_the_same(tmp_path):
    home = tmp_path / "home"
    first = caravan_token(home)
    assert first.returncode == 0, first.stderr
    path = home / TOKEN_FILE
    token = first.stdout.strip()
    assert first.stdout == token + "\n" and token == load_token(path, create=False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert str(path) in first.stderr and "--token-file" in first.stderr and TOKEN_ENV in first.stderr
    again = caravan_token(home, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"token": token, "path": str(path)}
    other = tmp_path / "elsewhere" / "token"
    chosen = caravan_token(home, "--token-file", str(other))
    assert chosen.stdout.strip() == load_token(other, create=False) != token and str(other) in chosen.stderr


# Reads a token file path per line from stdin and answers the token it loads (or creates) there.
_LOAD_TOKEN_PER_LINE = """
import sys
from pathlib import Path
from caravan.proto.auth import TokenError, load_token
for line in sys.stdin:
    try:
        print(load_token(Path(line.strip())), flush=True)
    except TokenError as exc:
        print("refused:", exc, flush=True)
"""


def test_processes_starting_at_once_on_a_fresh_machine_all_read_the_same_whole_token(tmp_path):
    """Several processes create the token in a fresh directory at the same moment, round after
    round: each reads the one token the winner wrote, never an empty file or a token of its own."""
    processes = [subprocess.Popen([sys.executable, "-c", _LOAD_TOKEN_PER_LINE], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(8)]
    try:
        for round_ in range(200):
            path = tmp_path / f"fresh-{round_}" / TOKEN_FILE
            for process in processes:  # all wake at once, each blocked on its next line
                process.stdin.write(f"{path}\n")
                process.stdin.flush()
            answers = {process.stdout.readline().strip() for process in processes}
            assert answers == {load_token(path, create=False)}, (round_, answers)
            assert sorted(p.name for p in path.parent.iterdir()) == [TOKEN_FILE]  # no temporary left behind
    finally:
        for process in processes:
            process.stdin.close()
            process.wait(timeout=60)


def _connect_within(address: str, token: str, seconds: float):
    """connect() again until the node takes the token, or NodeError after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return connect([address], token)
        except NodeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_node_takes_a_token_file_copied_in_after_it_started(tmp_path):
    """The node makes its own token (no file yet); the coordinator's is refused with both files
    named; once the coordinator's file is copied over the node's, the node takes it, no restart."""
    ours, theirs = tmp_path / "coordinator-token", tmp_path / "node" / "cluster-token"
    token = load_token(ours)
    node = NodeProcess(tmp_path / "n", token_file=theirs)
    try:
        with pytest.raises(NodeError) as refused:
            connect([node.address], token)
        message = str(refused.value)
        assert "refused this coordinator's cluster token" in message
        assert f"copy {ours} (this coordinator's token file) to the node's token file ({theirs})" in message
        assert "--token-file" in message
        shutil.copy(ours, theirs)  # as `scp` would: the new token, mode 0600
        close_nodes(_connect_within(node.address, token, 10 * REREAD_S))
    finally:
        node.stop()
    log = node.log_path.read_text()
    assert f"copy the coordinator's token file to {theirs}" in log  # the node's side of the refusal
    assert f"{theirs}: the cluster token changed" in log


def test_a_refused_call_reads_the_token_file_again_at_most_every_reread_s(tmp_path):
    """However many calls a peer with a wrong token makes, the file is read at most once per
    interval: a token written within it waits for the next one."""
    Details = collections.namedtuple("Details", "method invocation_metadata")
    path = tmp_path / "token"
    check = TokenCheck(load_token(path), path, reread_s=3600)

    def answer(token: str) -> str:
        details = Details("/caravan.v1.Stage/Info", (("authorization", f"Bearer {token}"),))
        return "served" if check.intercept_service(lambda d: "handler", details) == "handler" else "refused"

    path.unlink()
    new = load_token(path)
    assert answer(new) == "served" and check.token == new  # the first refusal reads the file
    path.unlink()
    newer = load_token(path)
    assert answer(newer) == "refused" and answer(new) == "served"  # not again within the hour


def test_a_node_takes_its_token_from_the_environment_or_the_command_line(tmp_path):
    token = load_token(tmp_path / "token")
    for flags, env in ((("--token", str(token)), {}), ((), {TOKEN_ENV: str(token)})):
        node = NodeProcess(tmp_path / f"n{len(flags)}", token_flags=flags, env=env)
        try:
            close_nodes(connect([node.address], token))
            with pytest.raises(NodeError, match="refused this coordinator's cluster token: copy .* to the node and start "
                                                 "it with --token-file"):
                connect([node.address], load_token(tmp_path / "another-token"))
        finally:
            node.stop()
        visible = "the process list" in node.log_path.read_text()
        assert visible == bool(flags)  # --token warns that others can read it
        assert not (tmp_path / f"n{len(flags)}" / TOKEN_FILE).exists()


def test_a_bad_token_on_the_command_line_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "caravan.node", "--port", "0", "--no-advertise",
                             "--cache-dir", str(tmp_path), "--token", "short"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "--token: not a cluster token" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_node_says_without_v_which_coordinator_it_serves_with_which_layers(tmp_path, tiny_q8_path):
    model = load_model(tiny_q8_path)
    token = load_token(tmp_path / "token")
    node = NodeProcess(tmp_path / "n", token_file=tmp_path / "token")
    try:
        (first,) = connect([node.address], token)
        for _ in range(2):  # loading what it holds already says nothing new
            first.client.load(model.file, SHA, model.config, LayerRange(0, 2), 32)
        first.client.load(model.file, SHA, model.config, LayerRange(1, 3), 32)
        close_nodes([first])
    finally:
        node.stop()
    lines = [line for line in node.log_path.read_text().splitlines() if "serving coordinator" in line]
    assert len(lines) == 2, lines
    assert lines[0].startswith("INFO caravan.node.server: serving coordinator 127.0.0.1:")
    assert lines[0].endswith(" with layers [0, 2)") and lines[1].endswith(" with layers [1, 3)")
