"""Does the output head pay on the last node? One stream through 3 loopback nodes, with the head
on the coordinator (today's path) and on the last node (it answers greedy rows with token ids).

    python tests/bench/bench_head.py [--runs 5] [--tokens 64] [--threads N] [--json]

Two sets of 3 node processes (1 thread each), one ClusterPipeline on each: head_on_node False
and True (the coordinator computes with --threads, default all cores), the planner placing the layers (with the head, the last node gets fewer). Runs
interleaved (one of each in turn), medians of --runs:
- decode tokens/s, greedy, of a short prompt (one row a pass) and of a copy prompt with
  prompt lookup (up to 1 + 6 rows a pass, several passes in flight);
- the coordinator's own CPU time per generated token (what a Pi coordinator spends);
- bytes on the wire per pass and per token: every message of a pass serialized as the code
  builds it (coordinator -> node 1, node -> node, last node -> coordinator).

Not a test: figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numba
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caravan.proto.polling import poll_sockets_in_place  # noqa: E402

poll_sockets_in_place()  # as `caravan` does, before grpc is imported

from support.nodes import NodeProcess, cluster_token  # noqa: E402
from support.speculation import copy_prompt  # noqa: E402

from caravan.coordinator.failover import ClusterPipeline  # noqa: E402
from caravan.pipeline.catalog import DEFAULT_MODEL, default_cache_dir, resolve_model  # noqa: E402
from caravan.pipeline.generate import Generation  # noqa: E402
from caravan.pipeline.loader import load_model  # noqa: E402
from caravan.pipeline.sampler import Sampler, SamplingParams  # noqa: E402
from caravan.pipeline.speculative import PromptLookup  # noqa: E402
from caravan.pipeline.stage import Segment  # noqa: E402
from caravan.proto import caravan_pb2 as pb  # noqa: E402
from caravan.proto import wire  # noqa: E402

N_CTX = 512
SHORT_PROMPT = "The capital of France is"
DRAFT_MAX = 6


def pass_bytes(dim: int, rows: int, head: bool, n_nodes: int = 3) -> int:
    """Bytes of every message of one pass of `rows` rows through a chain of n_nodes."""
    segments = wire.encode_segments([Segment("s" * 32, 100, rows)])
    hidden = wire.encode_hidden(np.zeros((rows, dim), np.float32))
    relay = [f"127.0.0.1:{50000 + i}" for i in range(n_nodes - 1)]
    total = pb.ForwardRequest(id=1, segments=segments, hidden=hidden, chain="c" * 32, relay=relay,
                              reply_format=pb.WIRE_FORMAT_F32, reply_tokens=head).ByteSize()
    for hop in range(1, n_nodes):
        total += pb.ForwardRequest(id=1, segments=segments, hidden=hidden, chain="c" * 32, relay=relay[hop:],
                                   compute_us=[1000] * hop, reply_tokens=head).ByteSize()
    answer = pb.ForwardReply(id=1, compute_us=[1000] * n_nodes)
    if head:
        answer.tokens.CopyFrom(pb.Tokens(ids=[49000] * rows))
    else:
        answer.hidden.CopyFrom(hidden)
    return total + answer.ByteSize()


def one_run(pipeline, ids, tokens: int, drafter) -> dict:
    me = psutil.Process()
    cpu0 = sum(me.cpu_times()[:2])
    generation = Generation(pipeline, ids, Sampler(SamplingParams(temperature=0)), tokens, frozenset(), drafter=drafter)
    out = list(generation)
    cpu = sum(me.cpu_times()[:2]) - cpu0
    t = generation.timings
    return {"tokens": out, "decode_tokens_per_s": t.decode_tokens_per_s, "tokens_per_pass": t.tokens_per_pass,
            "coordinator_cpu_ms_per_token": 1e3 * cpu / len(out)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="the coordinator's compute threads (0: Numba's default)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        numba.set_num_threads(args.threads)
    model = load_model(resolve_model(DEFAULT_MODEL, default_cache_dir(), progress=False))
    workloads = {"short prompt": (model.tokenizer.encode(SHORT_PROMPT), lambda: None),
                 "copy prompt, prompt lookup": (copy_prompt(model), lambda: PromptLookup(draft_max=DRAFT_MAX))}
    with tempfile.TemporaryDirectory() as tmp:
        nodes = {head: [NodeProcess(Path(tmp) / f"{head}-{i}") for i in range(3)] for head in (False, True)}
        pipelines = {}
        try:
            for head, group in nodes.items():
                addresses = [n.address for n in group]
                pipelines[head] = ClusterPipeline(model, lambda a=addresses: list(a), N_CTX, Path(tmp), progress=False,
                                                  token=cluster_token(), head_on_node=head)
            results = {head: {name: [] for name in workloads} for head in pipelines}
            for name, (ids, drafter) in workloads.items():
                for head in pipelines:  # warm up: the first pass of a stage compiles nothing, but warms caches
                    one_run(pipelines[head], ids, 8, drafter())
                for _ in range(args.runs):
                    for head, pipeline in pipelines.items():
                        results[head][name].append(one_run(pipeline, ids, args.tokens, drafter()))
            report = summarize(model, pipelines, results)
        finally:
            for pipeline in pipelines.values():
                pipeline.close()
            for group in nodes.values():
                for node in group:
                    node.stop()
    print(json.dumps(report, indent=1) if args.json else render(report))


def summarize(model, pipelines, results) -> dict:
    dim = model.config.dim
    report = {"dim": dim, "head_bytes": model.head.out.nbytes, "coordinator_threads": numba.get_num_threads(),
              "configs": {}}
    for head, by_workload in results.items():
        plan = pipelines[head].plan
        config = {"layers": [[a.layers.start, a.layers.stop] for a in plan.assignments], "workloads": {}}
        for name, runs in by_workload.items():
            assert all(r["tokens"] == runs[0]["tokens"] for r in runs)
            rate = statistics.median(r["decode_tokens_per_s"] for r in runs)
            per_pass = statistics.median(r["tokens_per_pass"] for r in runs)
            rows = 1 if per_pass <= 1.0 else 1 + DRAFT_MAX
            config["workloads"][name] = {
                "decode_tokens_per_s": round(rate, 2), "runs": [round(r["decode_tokens_per_s"], 2) for r in runs],
                "tokens_per_pass": round(per_pass, 3),
                "coordinator_cpu_ms_per_token": round(statistics.median(r["coordinator_cpu_ms_per_token"] for r in runs), 2),
                "wire_bytes_per_pass_of_rows": {rows: pass_bytes(dim, rows, head)},
                "wire_bytes_per_token": round(pass_bytes(dim, rows, head) / per_pass),
            }
        report["configs"]["head on last node" if head else "head on coordinator"] = config
    same = [results[False][n][0]["tokens"] == results[True][n][0]["tokens"] for n in results[False]]
    report["same_tokens"] = all(same)
    return report


def render(report: dict) -> str:
    lines = [f"dim {report['dim']}, head {report['head_bytes'] / 1e6:.1f} MB, same tokens: {report['same_tokens']}"]
    for config, values in report["configs"].items():
        lines.append(f"{config}: layers {values['layers']}")
        for name, w in values["workloads"].items():
            lines.append(f"  {name}: {w['decode_tokens_per_s']} tok/s (runs {w['runs']}), {w['tokens_per_pass']} "
                         f"tokens/pass, coordinator {w['coordinator_cpu_ms_per_token']} ms CPU/token, "
                         f"{w['wire_bytes_per_token']} wire bytes/token")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
