"""What the hops cost: caravan split over real node processes against one process.

    python tests/bench/bench_cluster.py [--runs 5] [--json]

- Per hop: one decode row sent to a node that holds one layer and back, minus that layer's
  time in this process; microseconds, median of 300, for f32, f16 and Q8_0 on the wire.
- Chain against star: one decode row through 3 nodes of one layer each, the nodes passing it
  on to each other (what caravan does) against the coordinator calling each in turn; time per
  row beyond the nodes' compute, median of 300.
- Decode tokens/s (64 tokens after a 16-token prompt, greedy) through 3 nodes on loopback
  against one process, at 1 and 2 threads (every node runs that many; one node computes at a
  time in a single stream), both measured by `caravan bench` in its own process, one run of
  each in turn; medians of --runs.
- Prefill tokens/s of a 500-token prompt (and one token), the same way: through the 3 nodes
  the prompt's chunks follow each other into the chain, so the nodes compute at once.
- A simulated Pi network: each node behind delay_proxy.py, which holds every message 0.2 ms
  and paces it at 1 Gbit/s, each way (`tc netem` would do it, but this machine's kernel has
  no sch_netem), through 2 and 4 nodes, with the share of each token spent on the hops.
- Memory per node: resident size of each node process against the bytes of its layers.
- The whole model's layers for one decode row, without the head: in one process, through the
  3 nodes as a chain (its compute and the rest), and with the coordinator calling each in turn.

Not a test: figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caravan.proto.polling import poll_sockets_in_place  # noqa: E402

poll_sockets_in_place()  # as `caravan` does, before grpc is imported: this process calls nodes too

from support.nodes import NodeProcess, cluster_token  # noqa: E402
from bench_engine import model_flags  # noqa: E402

from caravan.coordinator.cluster import connect, layer_bytes  # noqa: E402
from caravan.coordinator.remote import Part, RemoteStage  # noqa: E402
from caravan.pipeline.catalog import default_cache_dir, resolve_model  # noqa: E402
from caravan.pipeline.loader import load_model  # noqa: E402
from caravan.pipeline.stage import LayerRange, LocalStage, Segment, StageBatch  # noqa: E402
from caravan.proto.wire import WIRE_FORMATS  # noqa: E402

N_CTX = 512
DECODE_TOKENS = 64
PREFILL_TOKENS = 500  # a prompt of several chunks, within N_CTX


def even_ranges(n_layers: int, n: int) -> list[tuple[int, int]]:
    bounds = [round(i * n_layers / n) for i in range(n + 1)]
    return list(zip(bounds, bounds[1:]))


def hop_us(model, node, cache_dir, repeats: int = 300) -> dict[str, float]:
    """Round trip of one row through a one-layer node, minus the same layer run here."""
    layers = LayerRange(0, 1)
    local = LocalStage.load(model.file, model.config, layers, N_CTX)
    client = connect([node.address], cluster_token())[0].client
    client.load(model.file, "0" * 64, model.config, layers, N_CTX)
    rng = np.random.default_rng(0)

    def timed(stage, session: str) -> float:
        stage.forward(StageBatch((Segment(session, 0, 8),), rng.standard_normal((8, model.config.dim), np.float32)))
        times = []
        for pos in range(8, 8 + repeats):
            x = rng.standard_normal((1, model.config.dim), np.float32)
            t0 = time.perf_counter()
            stage.forward(StageBatch((Segment(session, pos, 1),), x))
            times.append(time.perf_counter() - t0)
        stage.end_session(session)
        return statistics.median(times) * 1e6

    compute = timed(local, "local")
    result = {}
    for name, code in WIRE_FORMATS.items():
        remote = RemoteStage(client, layers, model.config.dim, code)
        result[name] = round(timed(remote, f"hop-{name}") - compute, 1)
        remote.close()
    result["layer_compute_us"] = round(compute, 1)
    client.close()
    return result


@contextlib.contextmanager
def star_and_chain(model, nodes, layers: list[LayerRange]):
    """The nodes loaded with `layers`, seen two ways: one RemoteStage per node (the coordinator
    calls each in turn) and one chain (the nodes pass each row on)."""
    clients = [node.client for node in connect([n.address for n in nodes], cluster_token())]
    stages = []
    try:
        for client, r in zip(clients, layers):
            client.load(model.file, "0" * 64, model.config, r, N_CTX)
        dim = model.config.dim
        stages = [RemoteStage(c, r, dim) for c, r in zip(clients, layers)]
        stages.append(RemoteStage(clients[0], layers[0], dim, then=[Part(c, r) for c, r in zip(clients[1:], layers[1:])]))
        yield stages[:-1], stages[-1]
    finally:
        for stage in stages:
            stage.close()
        for client in clients:
            client.close()


def chain_vs_star(model, nodes, repeats: int = 300) -> dict[str, float]:
    """Microseconds per decode row through 3 one-layer nodes beyond their compute: as a chain,
    and with the coordinator calling each node in turn (4 network crossings against 6)."""
    rng = np.random.default_rng(0)
    result = {}
    with star_and_chain(model, nodes[:3], [LayerRange(i, i + 1) for i in range(3)]) as (star, chain):
        for name, stages in (("star_us", star), ("chain_us", [chain])):
            def run(session, pos, x):
                for stage in stages:
                    x = stage.forward(StageBatch((Segment(session, pos, len(x)),), x))
            run(name, 0, rng.standard_normal((8, model.config.dim), np.float32))
            for pos in range(8, 8 + repeats):
                run(name, pos, rng.standard_normal((1, model.config.dim), np.float32))
            result[name] = round(sum(statistics.median(list(s.hop_s)[-repeats:]) * len(s.parts) for s in stages) * 1e6, 1)
    return result


def whole_model_stages(model, nodes, ranges, repeats: int = 150) -> dict[str, float]:
    """Milliseconds per decode row through every layer, without the head: in this process, through
    the nodes as a chain, and with the coordinator calling each node in turn; plus the chain's
    time beyond the nodes' compute, and the nodes' compute."""
    local = LocalStage.load(model.file, model.config, LayerRange(0, model.config.n_layers), N_CTX)
    rng = np.random.default_rng(0)
    times: dict[str, float] = {}
    with star_and_chain(model, nodes, [LayerRange(a, b) for a, b in ranges]) as (star, chain):
        for name, stages in (("one_process_ms", [local]), ("chain_ms", [chain]), ("each_in_turn_ms", star)):
            samples = []
            for pos in range(repeats + 1):
                x = rng.standard_normal((1, model.config.dim), np.float32)
                t0 = time.perf_counter()
                for stage in stages:
                    x = stage.forward(StageBatch((Segment(name, pos, 1),), x))
                samples.append(time.perf_counter() - t0)
            times[name] = round(statistics.median(samples[1:]) * 1e3, 2)
        beyond = statistics.median(list(chain.hop_s)[-repeats:]) * len(chain.parts) * 1e3
    times["chain_beyond_compute_ms"] = round(beyond, 2)
    times["node_compute_ms"] = round(times["chain_ms"] - beyond, 2)
    return times


def node_memory(model, nodes, ranges) -> list[dict]:
    rows = []
    per_layer = layer_bytes(model)
    for node, (a, b) in zip(nodes, ranges):
        rss = psutil.Process(node.proc.pid).memory_info().rss
        rows.append({"layers": [a, b], "rss_mib": round(rss / 2**20, 1),
                     "layer_mib": round((b - a) * per_layer / 2**20, 1),
                     "overhead_mib": round((rss - (b - a) * per_layer) / 2**20, 1)})
    return rows


def caravan_bench(*args: str, runs: int, prompt_tokens: int = 16, decode_tokens: int = DECODE_TOKENS) -> dict:
    """`caravan bench --json` in its own process: the path a user takes, with the process-wide
    settings the CLI makes (an OpenMP spin that yields to the nodes, when there are nodes)."""
    done = subprocess.run([sys.executable, "-m", "caravan.coordinator", "bench", "--json", "--no-llama-cpp", "--runs", str(runs),
                           "--prompt-tokens", str(prompt_tokens), "--decode-tokens", str(decode_tokens),
                           "--ctx", str(N_CTX), *args],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def loopback(model, path, runs: int, threads: list[int]) -> dict:
    out: dict = {"decode": [], "hop_us": None, "memory": None}
    with tempfile.TemporaryDirectory(prefix="caravan-bench-") as tmp:
        for t in threads:
            nodes = [NodeProcess(Path(tmp) / f"t{t}-n{i}", threads=t) for i in range(3)]
            try:
                # One run of each side in turn, --runs times: a machine whose load drifts slows both alike.
                ones, threes = [], []
                for _ in range(runs):
                    ones.append(caravan_bench("-t", str(t), runs=1)["decode_tokens_per_s"])
                    spread = caravan_bench("-t", str(t), "--nodes", ",".join(n.address for n in nodes), runs=1)
                    threes.append(spread["decode_tokens_per_s"])
                one, three = statistics.median(ones), statistics.median(threes)
                # Prefill of a long prompt: its chunks follow each other through the chain.
                prefills = [(caravan_bench("-t", str(t), runs=1, prompt_tokens=PREFILL_TOKENS, decode_tokens=1),
                             caravan_bench("-t", str(t), "--nodes", ",".join(n.address for n in nodes), runs=1,
                                           prompt_tokens=PREFILL_TOKENS, decode_tokens=1)) for _ in range(runs)]
                prefill_one = statistics.median(a["prefill_tokens_per_s"] for a, _ in prefills)
                prefill_three = statistics.median(b["prefill_tokens_per_s"] for _, b in prefills)
                if out["memory"] is None:
                    ranges = [s["layers"] for s in spread["stages"]]
                    out["memory"] = node_memory(model, nodes, ranges)
                    numba.set_num_threads(t)
                    out["whole_model"] = whole_model_stages(model, nodes, ranges)
                out.setdefault("bench_hop_us", [s["hop_us"] for s in spread["stages"]])
                if out["hop_us"] is None:
                    numba.set_num_threads(1)
                    out["chain"] = chain_vs_star(model, nodes)
                    out["hop_us"] = hop_us(model, nodes[0], Path(tmp))
            finally:
                for n in nodes:
                    n.stop()
            out["decode"].append({"threads": t, "one_process": round(one, 1), "three_nodes": round(three, 1),
                                  "ratio": round(three / one, 3)})
            out.setdefault("prefill", []).append({"threads": t, "prompt_tokens": PREFILL_TOKENS,
                                                  "one_process": round(prefill_one, 1),
                                                  "three_nodes": round(prefill_three, 1),
                                                  "ratio": round(prefill_three / prefill_one, 3)})
    return out


class Proxied:
    """A node seen through delay_proxy.py: its address is the proxy's."""

    def __init__(self, node: NodeProcess, delay_ms: float, rate_mbit: float):
        self.node = node
        proxy = Path(__file__).resolve().parents[1] / "support" / "delay_proxy.py"
        self.proc = subprocess.Popen([sys.executable, str(proxy), node.address, str(delay_ms), str(rate_mbit)],
                                     stdout=subprocess.PIPE, text=True)
        self.address = self.proc.stdout.readline().rsplit(" ", 1)[1].strip()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def simulated_network(model, runs: int, delay_ms: float = 0.2, rate_mbit: float = 1000.0) -> dict:
    """Every coordinator <-> node message delayed delay_ms and paced at rate_mbit, each way."""
    one = caravan_bench("-t", "1", runs=runs)["decode_tokens_per_s"]
    result = {"network": f"{delay_ms} ms each way, {rate_mbit:g} Mbit/s (user-space delay proxy)",
              "one_process": round(one, 1), "nodes": []}
    with tempfile.TemporaryDirectory(prefix="caravan-bench-") as tmp:
        for n in (2, 4):
            nodes = [NodeProcess(Path(tmp) / f"n{n}-{i}") for i in range(n)]
            proxies = [Proxied(node, delay_ms, rate_mbit) for node in nodes]
            try:
                rate = caravan_bench("-t", "1", "--nodes", ",".join(p.address for p in proxies),
                                     runs=runs)["decode_tokens_per_s"]
            finally:
                for p in proxies:
                    p.stop()
                for node in nodes:
                    node.stop()
            # The share of each token spent beyond one process's time: hops, encoding, waiting.
            share = max(0.0, 1.0 / rate - 1.0 / one) * rate
            result["nodes"].append({"nodes": n, "tokens_per_s": round(rate, 1), "ratio": round(rate / one, 3),
                                    "hop_share": round(share, 3)})
    return result


def main() -> int:
    args = model_flags(__doc__).parse_args()
    path = resolve_model(args.model, default_cache_dir(), progress=False)
    model = load_model(path)
    result = {"model": model.name, "runs": args.runs,
              **loopback(model, path, args.runs, [int(t) for t in args.threads.split(",")]),
              "simulated_network": simulated_network(model, args.runs)}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{model.name}, decode {DECODE_TOKENS} tokens, median of {args.runs} runs")
    hop = result["hop_us"]
    print(f"per hop on loopback (one decode row, there and back): f32 {hop['f32']} us, f16 {hop['f16']} us, "
          f"q8_0 {hop['q8_0']} us (one layer computes in {hop['layer_compute_us']} us)")
    print(f"3 one-layer nodes, per decode row beyond compute: chain {result['chain']['chain_us']} us, "
          f"coordinator calling each in turn {result['chain']['star_us']} us")
    print(f"per node during decode through 3 nodes (caravan bench): {result['bench_hop_us']} us")
    whole = result["whole_model"]
    print(f"one decode row through every layer: one process {whole['one_process_ms']} ms, chain {whole['chain_ms']} ms "
          f"({whole['node_compute_ms']} computing, {whole['chain_beyond_compute_ms']} beyond), each node in turn "
          f"{whole['each_in_turn_ms']} ms")
    for row in result["decode"]:
        print(f"{row['threads']} thread(s): one process {row['one_process']} tok/s, 3 nodes {row['three_nodes']} "
              f"tok/s ({row['ratio']}x)")
    for row in result["prefill"]:
        print(f"{row['threads']} thread(s), prefill of {row['prompt_tokens']} tokens: one process {row['one_process']} "
              f"tok/s, 3 nodes {row['three_nodes']} tok/s ({row['ratio']}x)")
    for row in result["memory"]:
        print(f"node with layers {row['layers']}: RSS {row['rss_mib']} MiB = layers {row['layer_mib']} MiB "
              f"+ {row['overhead_mib']} MiB")
    sim = result["simulated_network"]
    print(f"simulated Pi network ({sim['network']}), 1 thread: one process {sim['one_process']} tok/s")
    for row in sim["nodes"]:
        print(f"  {row['nodes']} nodes: {row['tokens_per_s']} tok/s ({row['ratio']}x), "
              f"{row['hop_share'] * 100:.0f}% of each token spent on the hops")
    return 0


if __name__ == "__main__":
    sys.exit(main())
