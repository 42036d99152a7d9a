"""Bounded load: 32 clients for 60 seconds against `caravan serve` in front of 2 nodes, while at
the same time one client keeps sending 10 MB prompts, one holds 500 idle connections open and
one keeps walking away from non-streamed requests. Every well-behaved request completes without
an error, /health never takes a second to answer, and memory stays flat after warm-up (server
and nodes)."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import psutil
import pytest

from support.nodes import NodeProcess
from support.serve import MODEL, Server
pytestmark = [pytest.mark.model, pytest.mark.slow]

CLIENTS = 32
SECONDS = 60.0
WARM_UP = 15.0
IDLE_CONNECTIONS = 500
BIG_PROMPT = 10 << 20  # bytes of prompt text in each of the large requests
MAX_GROWTH = 0.10  # of a process's resident memory, between the end of warm-up and the end
CACHE_BUDGET = 16 << 20  # each node's prompt cache fills to it by design: counted apart from growth
HEALTH_LIMIT_S = 1.0


@pytest.mark.serial  # /health's bound holds under the test's own load, not another test's too
def test_thirty_two_clients_for_a_minute_while_others_misbehave(tmp_path):
    nodes = [NodeProcess(tmp_path / f"n{i}", "--cache-budget", str(CACHE_BUDGET)) for i in range(2)]
    server = Server("--nodes", ",".join(n.address for n in nodes), "--max-batch", "32")
    processes = [psutil.Process(server.proc.pid)] + [psutil.Process(n.proc.pid) for n in nodes]
    load = Load(server, time.monotonic() + SECONDS)
    try:
        warm, end = load.run(processes)
        growth = [(e - budget) / w - 1 for w, e, budget in zip(warm, end, (0, CACHE_BUDGET, CACHE_BUDGET))]
        print(load.summary(growth))
        assert not load.errors, load.errors[:3]
        assert len(load.done) >= CLIENTS and sum(load.done) > 0  # a sampled answer may be empty (end of text first)
        assert load.refused and set(load.refused) <= {413, "closed"}, load.refused
        late = [(round(seconds, 3), status) for seconds, status in load.health_s
                if status != 200 or seconds >= HEALTH_LIMIT_S]
        assert not late, late
        assert all(g < MAX_GROWTH for g in growth), growth
    finally:
        load.stop.set()
        server.stop()
        for n in nodes:
            n.stop()


class Load:
    """The well-behaved clients and the misbehaving ones, each a thread, and what they saw."""

    def __init__(self, server: Server, stop_at: float):
        self.server, self.stop_at = server, stop_at
        address = urllib.parse.urlsplit(server.url)
        self.host, self.port = address.hostname, address.port
        self.stop = threading.Event()  # the misbehaving ones stop once the clients are done
        self.lock = threading.Lock()
        self.done: list[int] = []  # each answer's length in characters
        self.errors: list[str] = []  # what a well-behaved request raised
        self.health_s: list[tuple[float, int | str]] = []  # (seconds, status) of each /health
        self.refused: list[int | str] = []  # what each 10 MB prompt was answered

    def run(self, processes: list[psutil.Process]) -> tuple[list[int], list[int]]:
        """Every thread until the clients' time is up: the processes' resident memory at the
        end of warm-up and at the end."""
        with concurrent.futures.ThreadPoolExecutor(CLIENTS + 4) as pool:
            others = [pool.submit(f) for f in (self.big_prompts, self.idle_connections, self.walk_aways, self.health)]
            futures = [pool.submit(self.client, i) for i in range(CLIENTS)]
            time.sleep(WARM_UP)
            warm = [p.memory_info().rss for p in processes]
            for f in futures:
                f.result(timeout=SECONDS + 120)
            self.stop.set()
            for f in others:
                f.result(timeout=60)
        return warm, [p.memory_info().rss for p in processes]

    def summary(self, growth: list[float]) -> str:
        slowest = max(s for s, _ in self.health_s)
        return (f"{len(self.done)} requests in {SECONDS:.0f} s from {CLIENTS} clients, {len(self.errors)} errors; "
                f"{len(self.refused)} 10 MB prompts refused ({sorted(set(map(str, self.refused)))}); /health asked "
                f"{len(self.health_s)} times, slowest {slowest * 1e3:.0f} ms; resident growth after warm-up "
                f"(server, node, node): {[f'{g:+.1%}' for g in growth]}")

    def client(self, i: int) -> None:
        openai_client = self.server.client()
        n = 0
        while time.monotonic() < self.stop_at:
            n += 1
            messages = [{"role": "user", "content": f"Client {i}, request {n}: name a fruit."}]
            try:
                if n % 2:
                    text = openai_client.chat.completions.create(
                        model=MODEL, messages=messages, max_tokens=12, temperature=0.7, seed=i * 1000 + n,
                    ).choices[0].message.content
                else:
                    text = "".join(c.choices[0].delta.content or "" for c in openai_client.chat.completions.create(
                        model=MODEL, messages=messages, max_tokens=12, temperature=0.7, stream=True) if c.choices)
                with self.lock:
                    self.done.append(len(text))
            except Exception as exc:  # noqa: BLE001  (counted: the assertion reports them)
                with self.lock:
                    self.errors.append(repr(exc))

    def big_prompts(self) -> None:
        body = json.dumps({"model": MODEL, "prompt": "word " * (BIG_PROMPT // 5), "max_tokens": 4}).encode()
        chunked = False
        while not self.stop.is_set():
            status = _post_big(self.host, self.port, body, chunked)
            chunked = not chunked
            with self.lock:
                self.refused.append(status)

    def idle_connections(self) -> None:
        """Opens connections that never send a byte (and half a request on every tenth), opening
        new ones as the server closes them."""
        held: list[socket.socket] = []
        try:
            while not self.stop.is_set():
                held = [s for s in held if _still_open(s)]
                while len(held) < IDLE_CONNECTIONS and not self.stop.is_set():
                    s = socket.create_connection((self.host, self.port), timeout=5)
                    if len(held) % 10 == 0:
                        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{")
                    held.append(s)
                self.stop.wait(0.5)
        finally:
            for s in held:
                s.close()

    def walk_aways(self) -> None:
        body = json.dumps({"model": MODEL, "prompt": "Tell me a long story about a caravan.", "max_tokens": 200,
                           "temperature": 0.7}).encode()
        while not self.stop.is_set():
            s = socket.create_connection((self.host, self.port), timeout=5)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            self.stop.wait(0.5)
            s.close()

    def health(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            status = _get(self.server.base_url + "/health", timeout=10)
            with self.lock:
                self.health_s.append((time.monotonic() - t0, status))
            self.stop.wait(0.25)


def _post_big(host: str, port: int, body: bytes, chunked: bool) -> int | str:
    """The response's status, or "closed" when the server closed the connection while the body
    was still being sent (a refusal before reading it all: the status may be lost in the reset).
    Chunked, the body's size is not declared: the server must count it as it comes."""
    with socket.create_connection((host, port), timeout=30) as s:
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % len(body)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"%s\r\nConnection: close\r\n\r\n" % framing)
        try:
            if chunked:
                for i in range(0, len(body), 1 << 16):
                    piece = body[i : i + (1 << 16)]
                    s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                s.sendall(b"0\r\n\r\n")
            else:
                s.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            head = s.recv(64)
        except ConnectionResetError:
            return "closed"
    return int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else "closed"


def _get(url: str, timeout: float) -> int | str:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError as exc:  # a timeout or a refused connection: the assertion reports it
        return repr(exc)


def _still_open(s: socket.socket) -> bool:
    """False once the server has closed the connection (a read gives end of file)."""
    s.setblocking(False)
    try:
        data = s.recv(1 << 16)
    except BlockingIOError:
        return True
    except OSError:
        data = b""
    finally:
        s.setblocking(True)
    if not data:
        s.close()
        return False
    return True  # it answered (a 408 or 503, say); it will close next
