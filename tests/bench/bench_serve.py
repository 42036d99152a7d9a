"""Many clients at once against `caravan serve`: aggregate decode tokens/s and time to first
token with 1, 4, 8 and 16 concurrent streams, in one process and in front of 2 nodes.

    python tests/bench/bench_serve.py [--runs 3] [--threads 1] [--json] [--one-process]
    python tests/bench/bench_serve.py --anchor [--runs 3] [--threads 2] [--json]

Each stream is a chat completion of 64 tokens (greedy, no early stop: the prompts ask for
long answers and ignore_eos is emulated by max_tokens on prompts that rarely end early).
Aggregate tokens/s = all completion tokens / wall time from the first request to the last
reply, prompts' prefill included; decoding tokens/s = the tokens all streams received while
every one of them was decoding (after the last first token, before the first last token) over
that time. Medians of --runs; the ratios to one stream are medians of each run's own ratio. --threads sets the server's compute threads and each node's
(`caravan serve` itself uses all cores unless told).

--anchor runs, in one process, `caravan serve` beside llama-server (`--parallel 8`, 512 tokens of
context a slot as caravan's, the same model file and threads; tests/bench/build_llama_cpp.sh
builds it): 1 and 8 streams of the requests above ("plain"), then of requests that share a long
system prompt, which a warm-up round left in both servers' prompt caches, and hold the answer to a
JSON schema (llama-server's `json_schema` field, which caravan takes too): "cached_schema". Every
round goes to one server and then the other; each ratio caravan / llama-server is the median of
the runs' own. Not a test: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import statistics
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.llama_cpp_bin import LlamaServer  # noqa: E402
from support.nodes import NodeProcess  # noqa: E402
from support.serve import MODEL, N_CTX, Server  # noqa: E402

TOKENS = 64
STREAMS = (1, 4, 8, 16)
ANCHOR_STREAMS = (1, 8)
ANCHOR_PARALLEL = 8  # llama-server's slots: the anchor for 8 streams
WORKLOADS = ("plain", "cached_schema")
# About 300 tokens shared by every cached_schema request, as a chat client's system prompt.
SYSTEM = ("You tell stories of the caravan: llamas that cross the desert at night, rest in the shade of the "
          "dunes by day and carry the load one after another. Every story has a name, a place and a list of "
          "short sentences, each one event of the journey. ") * 5
# Twenty sentences at least: 64 tokens never close the object, so the grammar never ends a stream early.
STORY_SCHEMA = {"type": "object", "properties": {"title": {"type": "string"}, "place": {"type": "string"},
                                                 "sentences": {"type": "array", "minItems": 20,
                                                               "items": {"type": "string"}}},
                "required": ["title", "place", "sentences"], "additionalProperties": False}


def request(i: int, workload: str = "plain", round_no: int = 0) -> dict:
    """The body of stream i's chat completion; cached_schema's differ by round after the system prompt."""
    messages = [{"role": "user", "content": f"Write a long story about a llama named {i}."}]
    extra = {}
    if workload == "cached_schema":
        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"Write a long story about a llama named {i}, part {round_no}."}]
        extra = {"json_schema": STORY_SCHEMA}
    return {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": TOKENS, "stream": True,
            "stream_options": {"include_usage": True}, **extra}


class Stream:
    """One streamed chat completion on a plain socket: the HTTP/1.1 request written by hand, the
    chunked body decoded and its Server-Sent Events parsed as the bytes come. One thread reads
    every stream of a round through a selector: with a thread per stream and http.client, the
    client took about 0.1 ms of CPU a token on the two cores the server is measured on (3-4% of
    8 streams' throughput); the tests use the official openai client instead."""

    def __init__(self, url: str, request_body: dict, round_start: float):
        parts = urllib.parse.urlsplit(url)
        body = json.dumps(request_body).encode()
        head = (f"POST {parts.path}/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        self.submitted = time.perf_counter() - round_start
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=120)
        self.sock.sendall(head + body)
        self.sock.setblocking(False)
        self._raw = b""  # received, not yet decoded from the chunked coding
        self._events = b""  # decoded, not yet split into events
        self._in_body = False
        self.done = False
        self.arrivals: list[float] = []  # when each piece of text came, from the round's start
        self.completion_tokens = 0

    def receive(self, now: float) -> None:
        data = self.sock.recv(1 << 16)
        if not data:
            raise RuntimeError("the server closed a stream before its end")
        self._raw += data
        if not self._in_body:
            end = self._raw.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self._raw.startswith(b"HTTP/1.1 200 "):
                raise RuntimeError(f"server answered {self._raw[:200]!r}")
            self._raw, self._in_body = self._raw[end + 4 :], True
        while (eol := self._raw.find(b"\r\n")) >= 0:
            size = int(self._raw[:eol].split(b";")[0], 16)
            if len(self._raw) < eol + 2 + size + 2:
                break
            self._events += self._raw[eol + 2 : eol + 2 + size]
            self._raw = self._raw[eol + 2 + size + 2 :]
            self.done = size == 0
        while (end := self._events.find(b"\n\n")) >= 0:
            event, self._events = self._events[:end], self._events[end + 2 :]
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue
            chunk = json.loads(event[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                self.arrivals.append(now)
            if chunk.get("usage"):
                self.completion_tokens = chunk["usage"]["completion_tokens"]


def one_round(url: str, n: int, workload: str = "plain", round_no: int = 0) -> tuple[float, float, float]:
    """(completion tokens / wall time, decode tokens/s while every stream decodes, median time
    to first token) of n concurrent streams to the server at url."""
    start = time.perf_counter()
    streams = [Stream(url, request(i, workload, round_no), start) for i in range(n)]
    with selectors.DefaultSelector() as selector:
        for stream in streams:
            selector.register(stream.sock, selectors.EVENT_READ, stream)
        while selector.get_map():
            ready = selector.select(timeout=120)
            if not ready:
                raise RuntimeError("no reply from the server in 120 s")
            now = time.perf_counter() - start
            for key, _ in ready:
                stream = key.data
                stream.receive(now)
                if stream.done:
                    selector.unregister(stream.sock)
                    stream.sock.close()
    wall = time.perf_counter() - start
    # Decode rate: from the moment the last stream got its first text to the moment the first
    # stream got its last, every stream is decoding; the pieces of text that arrived in that
    # window (one per token but for a rare multi-byte character) over its length.
    begin = max(s.arrivals[0] for s in streams)
    end = min(s.arrivals[-1] for s in streams)
    pieces = sum(sum(1 for t in s.arrivals if begin < t <= end) for s in streams)
    decode = pieces / (end - begin) if end > begin else 0.0
    first = statistics.median(s.arrivals[0] - s.submitted for s in streams)
    return sum(s.completion_tokens for s in streams) / wall, decode, first


def measure(server: Server, runs: int) -> list[dict]:
    """Per stream count: medians over `runs` runs, each run going through every count in turn
    (so a load that drifts over minutes slows them alike), and the median over runs of the
    run's rate against its own one-stream rate."""
    one_round(server.url, 2)  # warm up
    per_run = [{n: one_round(server.url, n) for n in STREAMS} for _ in range(runs)]
    rows = []
    for n in STREAMS:
        rates, decodes, firsts = zip(*(run[n] for run in per_run))
        rows.append({"streams": n, "tokens_per_s": round(statistics.median(rates), 1),
                     "decode_tokens_per_s": round(statistics.median(decodes), 1),
                     "first_token_s": round(statistics.median(firsts), 3),
                     "x_one": round(statistics.median(run[n][0] / run[1][0] for run in per_run), 2),
                     "decode_x_one": round(statistics.median(run[n][1] / run[1][1] for run in per_run), 2)})
    return rows


def measure_anchor(urls: dict[str, str], runs: int) -> list[dict]:
    """Per workload and stream count: each engine's medians and caravan / llama-server, the
    median of the runs' own ratios."""
    for url in urls.values():  # warm up; leaves the system prompt in every cache and slot
        one_round(url, ANCHOR_PARALLEL)
        one_round(url, ANCHOR_PARALLEL, "cached_schema", -1)
    seen = {}
    for run in range(runs):
        for workload in WORKLOADS:
            for n in ANCHOR_STREAMS:
                for name, url in urls.items():
                    seen.setdefault((workload, n, name), []).append(one_round(url, n, workload, run))
    rows = []
    for workload in WORKLOADS:
        for n in ANCHOR_STREAMS:
            ours, theirs = seen[(workload, n, "caravan")], seen[(workload, n, "llama_server")]
            row = {"workload": workload, "streams": n}
            for name, results in (("caravan", ours), ("llama_server", theirs)):
                row[name] = {"tokens_per_s": round(statistics.median(r[0] for r in results), 1),
                             "decode_tokens_per_s": round(statistics.median(r[1] for r in results), 1),
                             "first_token_s": round(statistics.median(r[2] for r in results), 3)}
            row["x_llama_server"] = round(statistics.median(c[0] / a[0] for c, a in zip(ours, theirs)), 2)
            row["decode_x_llama_server"] = round(statistics.median(c[1] / a[1] for c, a in zip(ours, theirs)
                                                                   if a[1]), 2)
            row["runs_seen"] = [round(c[0] / a[0], 2) for c, a in zip(ours, theirs)]
            rows.append(row)
    return rows


def main_anchor(args: argparse.Namespace) -> int:
    from caravan.pipeline.catalog import DEFAULT_MODEL, default_cache_dir, pull

    server = Server("-t", str(args.threads))
    try:
        anchor = LlamaServer(pull(DEFAULT_MODEL, default_cache_dir(), progress=False), threads=args.threads,
                             ctx=N_CTX * ANCHOR_PARALLEL, parallel=ANCHOR_PARALLEL)
        try:
            rows = measure_anchor({"caravan": server.url, "llama_server": anchor.url}, args.runs)
        finally:
            anchor.stop()
    finally:
        server.stop()
    if args.json:
        print(json.dumps({"threads": args.threads, "runs": args.runs, "rows": rows}, indent=1))
        return 0
    print(f"one process beside llama-server --parallel {ANCHOR_PARALLEL} ({args.threads} thread(s) each):")
    for r in rows:
        c, a = r["caravan"], r["llama_server"]
        print(f"  {r['workload']:>13}, {r['streams']} stream(s): caravan {c['tokens_per_s']:.1f} tokens/s "
              f"(decoding {c['decode_tokens_per_s']:.1f}, first token {c['first_token_s'] * 1e3:.0f} ms), "
              f"llama-server {a['tokens_per_s']:.1f} (decoding {a['decode_tokens_per_s']:.1f}, first token "
              f"{a['first_token_s'] * 1e3:.0f} ms): {r['x_llama_server']:.2f}x (decoding "
              f"{r['decode_x_llama_server']:.2f}x), runs {r['runs_seen']}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one-process", action="store_true", help="skip the 2-node setup")
    parser.add_argument("--threads", "-t", type=int, default=1, help="compute threads of the server and of each node")
    parser.add_argument("--anchor", action="store_true", help="one process beside llama-server, in turn")
    args = parser.parse_args()
    if args.anchor:
        return main_anchor(args)
    result = {}
    threads = ("-t", str(args.threads))
    server = Server(*threads)
    try:
        result["one_process"] = measure(server, args.runs)
    finally:
        server.stop()
    if not args.one_process:
        with tempfile.TemporaryDirectory(prefix="caravan-bench-") as tmp:
            nodes = [NodeProcess(Path(tmp) / f"n{i}", threads=args.threads) for i in range(2)]
            server = Server(*threads, "--nodes", ",".join(n.address for n in nodes))
            try:
                result["two_nodes"] = measure(server, args.runs)
            finally:
                server.stop()
                for n in nodes:
                    n.stop()
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    for setup, rows in result.items():
        print(setup.replace("_", " ") + f" ({args.threads} thread(s)):")
        for r in rows:
            print(f"  {r['streams']:>2} streams: {r['tokens_per_s']:>6.1f} tokens/s ({r['x_one']:.2f}x one), "
                  f"decoding {r['decode_tokens_per_s']:>6.1f} tokens/s ({r['decode_x_one']:.2f}x one), "
                  f"first token {r['first_token_s'] * 1e3:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
