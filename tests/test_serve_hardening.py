"""`caravan serve` against clients that misbehave (issue 22): huge bodies, silent and half-sent
connections, web pages elsewhere, clients that leave, SIGTERM under load. A real server process
on a real port each time, driven over raw sockets where a client library would not misbehave."""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time

import pytest

from caravan.coordinator.cli import API_KEY_ENV, _api_key
from support.serve import MODEL, N_CTX, Server, raw_request
from support.wait import wait_for
pytestmark = [pytest.mark.model, pytest.mark.slow]

KEY = "s3cret-key"
READ_TIMEOUT_S = 2.0  # the server's --read-timeout here: short, so that the test sees it act
MAX_CONNECTIONS = 400  # the server's --max-connections here
MAX_BODY = 5 * 2**20  # the server's --max-body here: above the default, to show the flag raises it
HEALTH_LIMIT_S = 1.0  # /health must answer within this while others misbehave


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    key_file = folder / "api-key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    log = (folder / "serve.log").open("w+")
    s = Server("--api-key-file", str(key_file), "--read-timeout", str(READ_TIMEOUT_S),
               "--max-connections", str(MAX_CONNECTIONS), "--max-body", "5MiB", stderr=log)
    s.log = log
    yield s
    s.stop()
    log.close()


def address(server: Server) -> tuple[str, int]:
    host, port = server.url.split("//")[1].split("/")[0].split(":")
    return host, int(port)


def host_header(server: Server) -> dict:
    return {"Host": "%s:%d" % address(server)}


def post(server: Server, path: str, body: dict | bytes, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, text = raw_request(server, "POST", "/v1" + path, {
        **host_header(server), "Content-Type": "application/json", "Authorization": f"Bearer {KEY}",
        **(headers or {})}, data)
    return status, json.loads(text)


def metric(server: Server, name: str) -> float:
    _, _, text = raw_request(server, "GET", "/metrics", {**host_header(server), "Authorization": f"Bearer {KEY}"})
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


class HealthWatch:
    """Asks /health over and over on a thread; `slowest` is the longest it took to answer."""

    def __init__(self, server: Server):
        self.server, self.slowest, self.answers = server, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                status, _, _ = raw_request(self.server, "GET", "/health", host_header(self.server))
            except OSError:
                status = 0
            took = time.monotonic() - start
            self.slowest = max(self.slowest, took if status == 200 else float("inf"))
            self.answers += 1
            time.sleep(0.05)

    def __enter__(self) -> "HealthWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def exchange(server: Server, head: bytes, chunks=(), timeout: float = 20.0) -> bytes:
    """Send `head`, then each of `chunks` while the server has not answered; return its answer."""
    with socket.create_connection(address(server), timeout=timeout) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        for chunk in chunks:
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break
            except BlockingIOError:
                pass
            sock.setblocking(True)
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sock.setblocking(False)
        sock.setblocking(True)
        sock.settimeout(timeout)
        return read_to_end(sock)


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset ends it too)."""
    answer = b""
    try:
        while data := sock.recv(65536):
            answer += data
    except ConnectionResetError:
        pass
    return answer


def chunked(body: bytes, size: int = 65536) -> list[bytes]:
    """`body` in HTTP/1.1 chunks, without the last (empty) one: the sender is still sending."""
    return [b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)]


def request_head(server: Server, path: str, length: int | None, extra: str = "") -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return (f"POST {path} HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\n{size}{extra}\r\n" % address(server)).encode()


def status_and_json(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body else {}


@pytest.mark.serial  # a bound on wall time: alone on the machine
def test_large_bodies_and_prompts_are_refused_fast_and_health_stays_quick(server):
    """Issue 22, defect 1: a body past --max-body is a 413 (by its Content-Length, and counted
    as a chunked upload comes in), a prompt that cannot fit the context is refused before it is
    tokenized, and all the while /health answers within a second."""
    ten_mb = 10 * 2**20
    with HealthWatch(server) as health:
        start = time.monotonic()
        # Declared: refused on the headers, before any of the 10 MB is read.
        answer = exchange(server, request_head(server, "/v1/completions", ten_mb) + b'{"prompt": "')
        status, reply = status_and_json(answer)
        assert status == 413 and "--max-body" in reply["error"]["message"], answer[:300]
        # Chunked, so no length is declared: refused once the body is past the bound, a string
        # prompt or a JSON array of token ids alike.
        for body in (b'{"prompt": "' + b"a" * MAX_BODY + b'"}',
                     b'{"prompt": [' + b",".join([b"504"] * (MAX_BODY // 4 + 1)) + b"]}"):
            assert len(body) > MAX_BODY
            answer = exchange(server, request_head(server, "/v1/completions", None), chunked(body))
            status, reply = status_and_json(answer)
            assert status == 413 and "--max-body" in reply["error"]["message"], answer[:300]
        # Under the bound (above the default, which --max-body raised) but past the context:
        # a 400 without tokenizing megabytes, for a completion and for a chat.
        text = "hello " * (4_500_000 // 6)
        status, reply = post(server, "/completions", {"model": MODEL, "prompt": text, "max_tokens": 4})
        assert status == 400 and reply["error"]["code"] == "context_length_exceeded", reply
        status, reply = post(server, "/chat/completions",
                             {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 4})
        assert status == 400 and reply["error"]["code"] == "context_length_exceeded", reply
        took = time.monotonic() - start
    assert took < 20, took
    assert health.answers > 0 and health.slowest < HEALTH_LIMIT_S, health.slowest
    status, reply = post(server, "/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 2})
    assert status == 200 and reply["choices"]


def test_a_prompt_just_under_the_context_still_runs(server, smollm2):
    """The refusal before tokenizing never refuses a prompt that fits."""
    text = " ".join(["word"] * 400)
    n = len(smollm2.tokenizer.encode(text))
    assert n < N_CTX - 4
    status, reply = post(server, "/completions", {"model": MODEL, "prompt": text, "max_tokens": 2})
    assert status == 200 and reply["usage"]["prompt_tokens"] == n


def test_silent_and_half_sent_connections_are_closed_and_a_real_request_gets_through(server):
    """Issue 22, defect 3: connections that never send a request, send half of its headers, or
    half of its body are closed within --read-timeout; meanwhile a request with the key works;
    past --max-connections a request gets a 503, and works again once the silent ones are gone."""
    head = request_head(server, "/v1/completions", 1000)
    kinds = {"silent": b"", "half headers": head[:40], "half body": head + b'{"prompt": "He'}
    socks = []
    for kind, data in kinds.items():
        for _ in range(100):
            sock = socket.create_connection(address(server), timeout=READ_TIMEOUT_S + 10)
            if data:
                sock.sendall(data)
            socks.append((kind, sock))
    opened = time.monotonic()
    status, reply = post(server, "/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 2})
    assert status == 200 and reply["choices"]
    for kind, sock in socks:
        try:
            answer = read_to_end(sock)
        except socket.timeout:
            pytest.fail(f"a {kind} connection was still open {time.monotonic() - opened:.1f} s after it opened")
        if kind == "half body":
            assert status_and_json(answer)[0] == 408, answer[:200]
        sock.close()
    assert time.monotonic() - opened < READ_TIMEOUT_S + 8

    # Past the cap: a clear refusal, then service again once the timeout has closed them.
    socks = [socket.create_connection(address(server), timeout=30) for _ in range(MAX_CONNECTIONS)]
    try:
        status, _, body = raw_request(server, "GET", "/v1/models", {**host_header(server),
                                                                    "Authorization": f"Bearer {KEY}"})
        assert status == 503, body
        wait_for(lambda: raw_request(server, "GET", "/v1/models", {**host_header(server), "Authorization": f"Bearer {KEY}"}
                                 )[0] == 200, READ_TIMEOUT_S + 10, "service again", interval_s=0.2)
    finally:
        for sock in socks:
            sock.close()


def test_a_non_streamed_request_whose_client_leaves_stops_decoding(server):
    """Issue 22, defect 5: a client that closes its connection before a non-streamed answer
    is done has its sequences cancelled at once, as a stream's would be."""
    body = json.dumps({"model": MODEL, "prompt": "1, 2, 3, 4, 5,", "max_tokens": N_CTX - 32, "temperature": 0,
                       "n": 4}).encode()
    sock = socket.create_connection(address(server), timeout=30)
    sock.sendall(request_head(server, "/v1/completions", len(body)) + body)
    wait_for(lambda: metric(server, "caravan_requests_in_flight") >= 4, 60, "4 sequences in flight")
    assert metric(server, "caravan_requests_in_flight") == 4
    sock.close()
    wait_for(lambda: metric(server, "caravan_requests_in_flight") == 0, 5, "the sequences cancelled")
    before = metric(server, "caravan_generated_tokens_total")
    time.sleep(1.0)
    assert metric(server, "caravan_generated_tokens_total") == before


def test_small_things(server):
    """Issue 22, defect 10 (the HTTP parts)."""
    for prompt in ([504], [[504]], ["Hello"], [504, 28, 253]):  # one prompt, in each of OpenAI's forms
        status, reply = post(server, "/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 2})
        assert status == 200 and reply["choices"], (prompt, reply)
    assert post(server, "/completions", {"model": MODEL, "prompt": [504], "max_tokens": 2})[1]["usage"][
        "prompt_tokens"] == 1
    for prompt, words in ((["a", "b"], "batch of 2 prompts"), ([[1], [2]], "batch of 2 prompts"), ([], "non-empty"),
                          ([True], "non-empty"), ([1.5], "non-empty")):
        status, reply = post(server, "/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 2})
        assert status == 400 and words in reply["error"]["message"], (prompt, reply)
    # A lone surrogate, and JSON nested past what the parser takes: JSON 400s, not 500s.
    status, reply = post(server, "/completions", b'{"model": "%s", "prompt": "\\ud800", "max_tokens": 2}' % MODEL.encode())
    assert status == 400 and "surrogate" in reply["error"]["message"]
    status, reply = post(server, "/chat/completions", b'{"messages": [{"role": "user", "content": "a\\udfffb"}]}')
    assert status == 400 and "surrogate" in reply["error"]["message"]
    status, reply = post(server, "/completions", {"model": MODEL, "prompt": "\U0001F600 ok", "max_tokens": 2})
    assert status == 200  # a surrogate pair, escaped as the json module does, is fine
    status, reply = post(server, "/completions", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert status == 400 and reply["error"]["type"] == "invalid_request_error"
    # Unknown routes and wrong methods: JSON too.
    status, _, text = raw_request(server, "GET", "/v2/nothing", host_header(server))
    assert status == 404 and "/v1/chat/completions" in json.loads(text)["error"]["message"]
    status, headers, text = raw_request(server, "DELETE", "/v1/models", host_header(server))
    assert status == 405 and "GET" in json.loads(text)["error"]["message"] and "GET" in headers["allow"]
    # The key: any case of "Bearer", nothing else.
    auth = {**host_header(server), "Content-Type": "application/json"}
    for header, expected in ((f"bearer {KEY}", 200), (f"BEARER {KEY}", 200), (f"Bearer {KEY}x", 401),
                             (f"Basic {KEY}", 401), (KEY, 401), ("", 401)):
        status, _, _ = raw_request(server, "GET", "/v1/models", {**auth, "Authorization": header})
        assert status == expected, header


def test_a_client_leaving_mid_upload_leaves_no_traceback(server):
    for _ in range(3):
        with socket.create_connection(address(server), timeout=10) as sock:
            sock.sendall(request_head(server, "/v1/completions", 5000) + b'{"prompt": "Hel')
            time.sleep(0.3)
    time.sleep(0.5)
    status, _ = post(server, "/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 2})
    assert status == 200
    server.log.flush()
    server.log.seek(0)
    log = server.log.read()
    assert "Traceback" not in log, log[-3000:]


def test_api_key_from_the_environment_or_a_file(tmp_path, monkeypatch):
    def args(**given) -> argparse.Namespace:
        return argparse.Namespace(**{"api_key": None, "api_key_file": None, **given})

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert _api_key(args()) is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert _api_key(args()) == "from-env"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    key_file.chmod(0o600)
    assert _api_key(args(api_key_file=key_file)) == "from-file"
    assert _api_key(args(api_key="given")) == "given"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        _api_key(args(api_key_file=tmp_path / "empty"))
    with pytest.raises(ValueError, match="--api-key-file .*missing: No such file"):
        _api_key(args(api_key_file=tmp_path / "missing"))


@pytest.mark.serial  # a bound on wall time: alone on the machine
def test_sigterm_ends_the_server_quickly_with_requests_in_flight():
    """Issue 22, defect 5: SIGTERM with 4 answers being written ends `serve` within seconds,
    exit code 0, and the key from the environment is the one asked for. Answers still running get
    a 503 once the grace has passed."""
    s = Server(env={API_KEY_ENV: KEY})
    results = []

    def ask() -> None:
        try:
            results.append(post(s, "/completions", {"model": MODEL, "prompt": "1, 2, 3,", "max_tokens": N_CTX - 16,
                                                    "temperature": 0})[0])
        except OSError as exc:
            results.append(exc)

    try:
        status, _, _ = raw_request(s, "GET", "/v1/models", {**host_header(s), "Authorization": "Bearer wrong"})
        assert status == 401
        threads = [threading.Thread(target=ask, daemon=True) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_for(lambda: metric(s, "caravan_requests_in_flight") >= 4, 60, "4 requests in flight")
        assert metric(s, "caravan_requests_in_flight") == 4
        start = time.monotonic()
        s.proc.terminate()
        code = s.proc.wait(timeout=30)
        took = time.monotonic() - start
        assert code == 0 and took < 6, (code, took, s.proc.stderr.read()[-3000:])
        for thread in threads:
            thread.join(timeout=10)
        assert results == [503] * 4  # each told so, in JSON, before the server went
    finally:
        s.stop()


@pytest.mark.serial  # a bound on wall time: alone on the machine
def test_sigterm_in_front_of_nodes_closes_their_sessions(tmp_path):
    """Issue 22, defect 5: SIGTERM in front of two nodes, with answers being written, leaves
    no session behind on either node."""
    from caravan.coordinator.remote import NodeClient
    from support.nodes import NodeProcess, cluster_token

    nodes = [NodeProcess(tmp_path / f"n{i}") for i in range(2)]
    s = Server("--nodes", ",".join(n.address for n in nodes), env={API_KEY_ENV: KEY})
    clients = [NodeClient(n.address, cluster_token()) for n in nodes]
    try:
        threads = [threading.Thread(target=post, args=(s, "/completions", {
            "model": MODEL, "prompt": "1, 2, 3,", "max_tokens": N_CTX - 16, "temperature": 0}), daemon=True)
            for _ in range(2)]
        for thread in threads:
            thread.start()
        wait_for(lambda: all(c.info().sessions > 0 for c in clients), 60, "a session on each node")
        assert metric(s, "caravan_requests_in_flight") == 2 and all(c.info().sessions > 0 for c in clients)
        start = time.monotonic()
        s.proc.terminate()
        code = s.proc.wait(timeout=30)
        assert code == 0 and time.monotonic() - start < 8, (code, time.monotonic() - start)
        assert [c.info().sessions for c in clients] == [0, 0]
    finally:
        s.stop()
        for c in clients:
            c.close()
        for n in nodes:
            n.stop()
