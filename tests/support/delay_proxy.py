"""A TCP proxy that holds every byte for a fixed delay plus its time on a link of a given rate,
each direction, to stand in for a LAN between Pis where `tc netem` is not available (this
machine's kernel has no sch_netem).

    python tests/support/delay_proxy.py TARGET_HOST:PORT DELAY_MS RATE_MBIT

Prints `listening on 127.0.0.1:PORT`, then forwards until killed. Threads and time.sleep, not
asyncio: the event loop rounds timeouts up to whole milliseconds, five times the delay.
"""

from __future__ import annotations

import queue
import socket
import sys
import threading
import time


def pump(src: socket.socket, dst: socket.socket, delay_s: float, bytes_per_s: float) -> None:
    due: queue.Queue = queue.Queue()

    def deliver() -> None:
        while True:
            when, data = due.get()
            if data is None:
                break
            wait = when - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            try:
                dst.sendall(data)
            except OSError:
                break
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    sender = threading.Thread(target=deliver, daemon=True)
    sender.start()
    link_free = 0.0  # when the simulated link has sent everything queued so far
    while True:
        try:
            data = src.recv(1 << 16)
        except OSError:
            data = b""
        if not data:
            break
        now = time.perf_counter()
        link_free = max(link_free, now) + len(data) / bytes_per_s
        due.put((link_free + delay_s, data))
    due.put((0.0, None))
    sender.join()


def serve(target: tuple[str, int], delay_s: float, bytes_per_s: float) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    print(f"listening on 127.0.0.1:{listener.getsockname()[1]}", flush=True)
    while True:
        client, _ = listener.accept()
        upstream = socket.create_connection(target)
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=pump, args=(client, upstream, delay_s, bytes_per_s), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client, delay_s, bytes_per_s), daemon=True).start()


if __name__ == "__main__":
    host, port = sys.argv[1].rsplit(":", 1)
    serve((host, int(port)), float(sys.argv[2]) / 1e3, float(sys.argv[3]) * 1e6 / 8)
