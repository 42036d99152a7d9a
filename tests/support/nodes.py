"""Real `caravan node` processes on loopback ports, for cluster tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from caravan.pipeline.catalog import default_cache_dir
from caravan.coordinator.remote import NodeClient
from caravan.node.server import NodeSettings, create_server
from caravan.pipeline.stage import LayerRange
from caravan.proto.auth import TOKEN_FILE, load_token

NODE_CTX = 64  # the context of loaded_node's sessions
NODE_LAYERS = LayerRange(0, 3)  # the layers loaded_node holds
MODEL_SHA = "ab" * 32  # what loaded_node calls the model: a node only compares it


def cluster_token_file() -> Path:
    """The token file a coordinator uses by default (`caravan run --nodes ...` in a test), which
    test nodes are given too, so the two trust each other."""
    path = default_cache_dir() / TOKEN_FILE
    load_token(path)  # created on first use
    return path


def cluster_token() -> str:
    return load_token(cluster_token_file())

START_TIMEOUT_S = 60.0


class NodeProcess:
    """`python -m caravan.node --host 127.0.0.1 --port 0 ...`; address is known once it prints
    its first line. Its stderr goes to log_path (default: <cache_dir>.log). token_flags replace
    `--token-file <token_file>` (give () to pass none); env adds to the environment."""

    def __init__(self, cache_dir: Path, *extra: str, threads: int = 1, advertise: bool = False,
                 prefix: tuple[str, ...] = (), name: str | None = None, log_path: Path | None = None,
                 port: int = 0, token_file: Path | None = None, host: str = "127.0.0.1",
                 token_flags: tuple[str, ...] | None = None, env: dict[str, str] | None = None):
        self.cache_dir = Path(cache_dir)
        if token_flags is None:
            token_flags = ("--token-file", str(token_file or cluster_token_file()))
        cmd = [*prefix, sys.executable, "-m", "caravan.node", "--host", host, "--port", str(port),
               "--threads", str(threads), "--cache-dir", str(cache_dir), *token_flags, *extra]
        if not advertise:
            cmd.append("--no-advertise")
        if name:
            cmd += ["--name", name]
        self.log_path = Path(log_path or f"{cache_dir}.log")
        self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.address = self._read_address()

    def _read_address(self) -> str:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if sel.select(timeout=0.5):
                line = self.proc.stdout.readline()
                if " listening on " in line:
                    return line.rsplit(" ", 1)[1].strip()
                if not line:
                    break
        self.stop()
        raise RuntimeError(f"node did not start: {self.log_path.read_text()[-2000:]}")

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def kill(self) -> None:
        """SIGKILL, as a pulled plug: no goodbye to anyone."""
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()


@contextlib.contextmanager
def loaded_node(model, cache_dir: Path, **settings) -> Iterator[tuple[NodeClient, object]]:
    """(client, servicer) of a node in this process holding NODE_LAYERS of `model` (a
    LoadedModel), stopped on the way out; settings: NodeSettings fields."""
    server, port, servicer = create_server(NodeSettings(host="127.0.0.1", port=0, threads=1, cache_dir=cache_dir,
                                                        **settings))
    client = NodeClient(f"127.0.0.1:{port}")
    try:
        client.load(model.file, MODEL_SHA, model.config, NODE_LAYERS, NODE_CTX)
        yield client, servicer
    finally:
        client.close()
        server.stop(0)
