"""Many clients at once against `caravan serve`: aggregate decode tokens/s and time to first
token with 1, 4, 8 and 16 concurrent streams, in one process and in front of 2 nodes.

    python tests/bench/bench_serve.py [--runs 3] [--threads 1] [--json] [--one-process]

Each stream is a chat completion of 64 tokens (greedy, no early stop: the prompts ask for
long answers and ignore_eos is emulated by max_tokens on prompts that rarely end early).
Aggregate tokens/s = all completion tokens / wall time from the first request to the last
reply, prompts' prefill included; decoding tokens/s = the tokens all streams received while
every one of them was decoding (after the last first token, before the first last token) over
that time. Medians of --runs; the ratios to one stream are medians of each run's own ratio. --threads sets the server's compute threads and each node's
(`caravan serve` itself uses all cores unless told). Not a test: figures depend on the machine
and its load.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import statistics
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node_processes import NodeProcess  # noqa: E402
from test_serve import MODEL, Server  # noqa: E402

TOKENS = 64
STREAMS = (1, 4, 8, 16)


def stream_chat(url: str, content: str) -> Iterator[dict]:
    """The chunks of one streamed chat completion, read with the standard library: the server's
    own Server-Sent Events, parsed as they come. (The tests use the official openai client; here
    its per-chunk work would take a share of the cores the server is measured on.)"""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": TOKENS, "stream": True}
    connection.request("POST", parts.path + "/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
    try:
        for line in response:
            if not line.startswith(b"data: "):
                continue
            if line.startswith(b"data: [DONE]"):
                return
            yield json.loads(line[6:])
    finally:
        connection.close()


def one_round(server: Server, n: int) -> tuple[float, float, float]:
    """(completion tokens / wall time, decode tokens/s while every stream decodes, median time
    to first token) of n concurrent streams."""

    def ask(i: int) -> tuple[int, float, list[float]]:
        t0 = time.perf_counter()
        arrivals = []  # when each piece of text came, from the start of the round
        count = 0
        for chunk in stream_chat(server.url, f"Write a long story about a llama named {i}."):
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.perf_counter() - start)
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
        return count, arrivals[0] - (t0 - start), arrivals

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(ask, range(n)))
    wall = time.perf_counter() - start
    # Decode rate: from the moment the last stream got its first text to the moment the first
    # stream got its last, every stream is decoding; the pieces of text that arrived in that
    # window (one per token but for a rare multi-byte character) over its length.
    begin = max(a[0] for _, _, a in results)
    end = min(a[-1] for _, _, a in results)
    pieces = sum(sum(1 for t in a if begin < t <= end) for _, _, a in results)
    decode = pieces / (end - begin) if end > begin else 0.0
    return sum(c for c, _, _ in results) / wall, decode, statistics.median(f for _, f, _ in results)


def measure(server: Server, runs: int) -> list[dict]:
    """Per stream count: medians over `runs` runs, each run going through every count in turn
    (so a load that drifts over minutes slows them alike), and the median over runs of the
    run's rate against its own one-stream rate."""
    one_round(server, 2)  # warm up
    per_run = [{n: one_round(server, n) for n in STREAMS} for _ in range(runs)]
    rows = []
    for n in STREAMS:
        rates, decodes, firsts = zip(*(run[n] for run in per_run))
        rows.append({"streams": n, "tokens_per_s": round(statistics.median(rates), 1),
                     "decode_tokens_per_s": round(statistics.median(decodes), 1),
                     "first_token_s": round(statistics.median(firsts), 3),
                     "x_one": round(statistics.median(run[n][0] / run[1][0] for run in per_run), 2),
                     "decode_x_one": round(statistics.median(run[n][1] / run[1][1] for run in per_run), 2)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one-process", action="store_true", help="skip the 2-node setup")
    parser.add_argument("--threads", "-t", type=int, default=1, help="compute threads of the server and of each node")
    args = parser.parse_args()
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
