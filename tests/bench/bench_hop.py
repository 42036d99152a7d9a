"""The hop, without speculation, against llama.cpp's RPC backend: each engine's decode tokens/s in
one process and split over 3 node processes on loopback, and its loss from the first to the second.

    tests/bench/build_llama_cpp.sh            # once: ggml-rpc-server and llama-bench
    python tests/bench/bench_hop.py [--runs 3] [--tokens 32] [--threads 1] [--json]

- llama.cpp: `llama-bench -m MODEL -p 0 -n N -t T` against `llama-bench ... -ngl 99 --rpc
  127.0.0.1:A,127.0.0.1:B,127.0.0.1:C` with three `ggml-rpc-server -t T` on loopback (llama.cpp
  splits the layers over them; the coordinating process keeps the rest).
- caravan: `caravan bench --no-speculate` in one process against `--nodes` of 3 `caravan node`
  processes with T threads each (16-token prompt, N tokens decoded).

The same model file (SmolLM2 by default), greedy, one run of each of the four in turn, --runs
times, medians: a machine whose load drifts slows them alike. Not a test: figures depend on the
machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.llama_cpp_bin import llama_cpp_bin, rpc_servers  # noqa: E402

N_CTX = 512


def llama_bench(folder: Path, model: Path, tokens: int, threads: int, rpc: list[str] | None = None) -> float:
    """Decode tokens/s of one llama-bench run (-r 1: the run of each engine in turn is the repeat)."""
    command = [str(folder / "llama-bench"), "-m", str(model), "-p", "0", "-n", str(tokens), "-t", str(threads),
               "-r", "1", "-o", "json"]
    command += ["-ngl", "99", "--rpc", ",".join(rpc)] if rpc else ["-ngl", "0"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return float(json.loads(done.stdout)[0]["avg_ts"])


def caravan_bench(tokens: int, threads: int, nodes: str | None = None) -> float:
    """Decode tokens/s of `caravan bench` without speculation, in its own process."""
    command = [sys.executable, "-m", "caravan.coordinator", "bench", "--json", "--no-llama-cpp", "--no-speculate",
               "--runs", "1", "--prompt-tokens", "16", "--decode-tokens", str(tokens), "--ctx", str(N_CTX),
               "-t", str(threads)]
    if nodes:
        command += ["--nodes", nodes]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return float(json.loads(done.stdout)["decode_tokens_per_s"])


def measure(args: argparse.Namespace, model: Path, threads: int) -> dict:
    from support.nodes import NodeProcess

    folder = llama_cpp_bin("llama-bench")
    runs: dict[str, list[float]] = {"llama.cpp_one": [], "llama.cpp_rpc3": [], "caravan_one": [], "caravan_nodes3": []}
    with tempfile.TemporaryDirectory(prefix="caravan-hop-") as tmp, rpc_servers(threads, 3) as rpc:
        nodes = [NodeProcess(Path(tmp) / f"n{i}", threads=threads) for i in range(3)]
        try:
            addresses = ",".join(n.address for n in nodes)
            for _ in range(args.runs):
                runs["llama.cpp_one"].append(llama_bench(folder, model, args.tokens, threads))
                runs["llama.cpp_rpc3"].append(llama_bench(folder, model, args.tokens, threads, rpc))
                runs["caravan_one"].append(caravan_bench(args.tokens, threads))
                runs["caravan_nodes3"].append(caravan_bench(args.tokens, threads, addresses))
        finally:
            for node in nodes:
                node.stop()
    med = {key: round(statistics.median(values), 1) for key, values in runs.items()}
    return {"threads": threads, **med, "runs_seen": runs,
            "llama.cpp_loss": round(1 - med["llama.cpp_rpc3"] / med["llama.cpp_one"], 3),
            "caravan_loss": round(1 - med["caravan_nodes3"] / med["caravan_one"], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds; medians are over them (default: 3)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens decoded a run (default: 32)")
    parser.add_argument("--threads", default="1", help="threads of every process, comma-separated (default: 1)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from caravan.pipeline.catalog import DEFAULT_MODEL, default_cache_dir, pull

    model = pull(DEFAULT_MODEL, default_cache_dir(), progress=False)
    rows = [measure(args, model, int(t)) for t in args.threads.split(",")]
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": model.name,
              "runs": args.runs, "tokens": args.tokens, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{model.name}, decode {args.tokens} tokens, median of {args.runs} rounds, no speculation")
    for r in rows:
        print(f"{r['threads']} thread(s): llama.cpp {r['llama.cpp_one']} -> {r['llama.cpp_rpc3']} tok/s over 3 RPC servers "
              f"(loss {r['llama.cpp_loss'] * 100:.0f}%); caravan {r['caravan_one']} -> {r['caravan_nodes3']} tok/s over "
              f"3 nodes (loss {r['caravan_loss'] * 100:.0f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
