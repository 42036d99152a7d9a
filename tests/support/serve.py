"""`caravan serve` as a real process on a free loopback port, and raw HTTP to it (for the
requests a client library would never send)."""

from __future__ import annotations

import http.client
import json
import os
import selectors
import subprocess
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit

MODEL = "smollm2-135m-instruct"
N_CTX = 512
START_TIMEOUT_S = 120.0
# Greedy, this model answers "The capital of France is Paris." (without "Answer in one word." it
# wanders into French, as llama.cpp does on the same prompt).
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
# Greedy, this model counts on from where the prompt stops: prompt lookup's drafts are kept
# several tokens a pass, so a pass may run past a stop string.
RECOUNT = ", ".join(str(i) for i in range(1, 21)) + "\n1, 2, 3, 4, 5,"


def tokens_through_stop(tokens: list[str], stop: str) -> int:
    """How many of `tokens` (their texts, in order) an answer cut at `stop` generated: through
    the one that completes it, as llama-server counts them."""
    return next(i for i in range(1, len(tokens) + 1) if stop in "".join(tokens[:i]))


class Server:
    def __init__(self, *args: str, env: dict | None = None, stderr=subprocess.PIPE, ctx: int | None = N_CTX):
        """`caravan serve ARGS` on a free port; `stderr` may be a file to keep its log in; ctx None
        leaves the context size to the model."""
        ctx_flags = ("--ctx", str(ctx)) if ctx is not None else ()
        self.proc = subprocess.Popen([sys.executable, "-m", "caravan.coordinator", "serve", "--port", "0", "-t", "1",
                                      *ctx_flags, *args], stdout=subprocess.PIPE, stderr=stderr,
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=START_TIMEOUT_S):
            self.stop()
            raise RuntimeError("caravan serve did not start")
        line = self.proc.stdout.readline()
        assert line.startswith("caravan serving"), line + (self.proc.stderr.read() if self.proc.stderr else "")
        self.url = line.rsplit(" ", 1)[1].strip()  # http://127.0.0.1:PORT/v1

    def client(self, api_key: str = "unused"):
        """The official openai client on this server (the openai package is in the test extra)."""
        import openai

        return openai.OpenAI(base_url=self.url, api_key=api_key, max_retries=0, timeout=120)

    @property
    def base_url(self) -> str:
        """http://127.0.0.1:PORT, where /health, /metrics and Ollama's /api routes are."""
        return self.url.removesuffix("/v1")

    def post(self, path: str, body: bytes, headers: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
        """(status, JSON answer) of a POST to url + path (under /v1)."""
        request = urllib.request.Request(self.url + path, data=body, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        return self._json(request, timeout)

    def get(self, path: str, timeout: float = 60) -> tuple[int, dict]:
        """(status, JSON answer) of a GET of base_url + path."""
        return self._json(urllib.request.Request(self.base_url + path), timeout)

    @staticmethod
    def _json(request: urllib.request.Request, timeout: float) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def chat_ids(model, messages):
    text = model.chat_template.render(messages, add_generation_prompt=True)
    return model.tokenizer.encode(text, special=True)


def raw_request(server: Server, method: str, path: str, headers: dict, body: bytes | None = None
                ) -> tuple[int, dict[str, str], str]:
    """(status, headers with lower-case names, body) of one request sent as given (no Host added)."""
    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for name, value in {**headers, **({"Content-Length": str(len(body))} if body is not None else {})}.items():
        conn.putheader(name, value)
    conn.endheaders(body)
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, text


def raw_get(server: Server, path: str, headers: dict) -> tuple[int, str]:
    status, _, body = raw_request(server, "GET", path, headers)
    return status, body
