"""llama.cpp's own binaries as real processes on loopback, the anchors the benchmarks run beside
caravan: llama-server (beside `caravan serve`) and ggml-rpc-server (beside `caravan node`).
tests/bench/build_llama_cpp.sh builds them once per machine."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

BUILD_SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "build_llama_cpp.sh"
START_TIMEOUT_S = 120.0
POLL_S = 0.2


def llama_cpp_bin(*names: str) -> Path:
    """The folder build_llama_cpp.sh built into, holding every one of `names`, or why it does not."""
    root = Path(os.environ.get("CARAVAN_LLAMA_CPP_BUILD", Path.home() / ".cache/caravan/llama.cpp-build"))
    folder = root / "build" / "bin"
    for name in names:
        if not (folder / name).exists():
            raise SystemExit(f"{folder / name} is missing: run {BUILD_SCRIPT} first (it builds llama.cpp once)")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_listening(address: str, proc: subprocess.Popen) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} on {address} exited ({proc.returncode})")
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=0.5):
            return
        time.sleep(POLL_S)
    raise SystemExit(f"{proc.args[0]} on {address} did not listen within {START_TIMEOUT_S:g} s")


@contextlib.contextmanager
def rpc_servers(threads: int, n: int):
    """n ggml-rpc-server processes on loopback; yields their addresses once each accepts connections."""
    folder = llama_cpp_bin("ggml-rpc-server")
    procs, addresses = [], []
    try:
        for _ in range(n):
            port = free_port()
            procs.append(subprocess.Popen([str(folder / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(port),
                                           "-t", str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            addresses.append(f"127.0.0.1:{port}")
        for address, proc in zip(addresses, procs):
            wait_listening(address, proc)
        yield addresses
    finally:
        for proc in procs:
            stop(proc)


class LlamaServer:
    """`llama-server -m MODEL` on a free loopback port, ready (its /health answers 200) once built;
    url ends in /v1 as Server's does, so the same client code talks to either. rpc: addresses of
    ggml-rpc-servers to put every layer on (-ngl 99), as `caravan serve --nodes` does with nodes.
    Its log goes to a temporary file, shown when it fails to start."""

    def __init__(self, model: Path, *args: str, threads: int = 1, ctx: int = 512, parallel: int = 1,
                 rpc: list[str] | tuple[str, ...] = ()):
        port = free_port()
        command = [str(llama_cpp_bin("llama-server") / "llama-server"), "-m", str(model), "--host", "127.0.0.1",
                   "--port", str(port), "-t", str(threads), "-tb", str(threads), "-c", str(ctx),
                   "-np", str(parallel), "--no-webui", *args]
        command += ["-ngl", "99", "--rpc", ",".join(rpc)] if rpc else ["-ngl", "0"]
        # Closed by stop().
        self._log = tempfile.NamedTemporaryFile("w+", prefix="llama-server-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        self.base_url = f"http://127.0.0.1:{port}"
        self.url = self.base_url + "/v1"
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"llama-server exited ({self.proc.returncode}):\n{self.log()[-2000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(self.base_url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
            time.sleep(POLL_S)
        raise SystemExit(f"llama-server did not answer /health within {START_TIMEOUT_S:g} s:\n{self.log()[-2000:]}")

    def log(self) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def post(self, path: str, body: dict, timeout: float = 300) -> dict:
        """The JSON answer of a POST to base_url + path."""
        request = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def cpu_s(self) -> float:
        """CPU seconds the server has spent so far, all its threads, user and system (Linux's /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15

    def stop(self) -> None:
        stop(self.proc)
        self._log.close()
