"""Bounded load: 32 clients for 60 seconds against `caravan serve` in front of 2 nodes. Every
request completes without an error, and memory stays flat after warm-up (server and nodes)."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import psutil
import pytest

from node_processes import NodeProcess
from test_serve import MODEL, Server

pytestmark = pytest.mark.model

CLIENTS = 32
SECONDS = 60.0
WARM_UP = 15.0
MAX_GROWTH = 64 << 20  # resident bytes a process may add between the end of warm-up and the end


def test_thirty_two_clients_for_a_minute(tmp_path):
    nodes = [NodeProcess(tmp_path / f"n{i}") for i in range(2)]
    server = Server("--nodes", ",".join(n.address for n in nodes), "--max-batch", "32")
    processes = [psutil.Process(server.proc.pid)] + [psutil.Process(n.proc.pid) for n in nodes]
    stop_at = time.monotonic() + SECONDS
    done, errors = [], []
    lock = threading.Lock()

    def client(i: int) -> None:
        openai_client = server.client()
        n = 0
        while time.monotonic() < stop_at:
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
                with lock:
                    done.append(len(text))
            except Exception as exc:  # noqa: BLE001  (counted: the assertion below reports them)
                with lock:
                    errors.append(repr(exc))

    try:
        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(client, i) for i in range(CLIENTS)]
            time.sleep(WARM_UP)
            warm = [p.memory_info().rss for p in processes]
            for f in futures:
                f.result(timeout=SECONDS + 120)
        end = [p.memory_info().rss for p in processes]
        growth = [e - w for w, e in zip(warm, end)]
        print(f"{len(done)} requests in {SECONDS:.0f} s from {CLIENTS} clients, {len(errors)} errors; "
              f"resident growth after warm-up (server, node, node): {[g >> 20 for g in growth]} MiB")
        assert not errors, errors[:3]
        assert len(done) >= CLIENTS and sum(done) > 0  # a sampled answer may be empty (end of text first)
        assert all(g < MAX_GROWTH for g in growth), growth
    finally:
        server.stop()
        for n in nodes:
            n.stop()
