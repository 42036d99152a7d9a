"""Speculative decoding with prompt lookup: tokens per pass and decode tokens/s of SmolLM2 on three
workloads kept in tests/bench/workloads (copy-heavy, code completion, open chat), at 1 and 2
threads, in one process and through 3 loopback node processes, with and without speculation;
and llama.cpp's own prompt lookup (llama-cpp-python's LlamaPromptLookupDecoding) on the same
prompt ids, the same model file and the same thread count, greedy.

    python tests/bench/bench_speculative.py [--runs 3] [--tokens 64] [--threads 1,2] [--draft-max 8]
                                            [--workloads copy_heavy,code,chat] [--drafts-in-flight N]
                                            [--no-nodes] [--no-llama-cpp] [--json]

Every measured generation runs in a process of its own, started the way `caravan bench` starts
(the CLI's flags build the model and the pipeline): for each thread count, one round is caravan
in one process, caravan through the 3 nodes and llama.cpp, one after the other, --runs rounds,
so that a machine whose load drifts slows them alike; each process warms up once before it
measures. Figures are medians over rounds of each workload's totals (its prompts' decoded
tokens over their decode time; tokens over passes), and ratios to caravan in one process
without speculation at the same thread count. Generation stops at the model's end-of-turn token
or after --tokens tokens. Greedy speculation must give the ids greedy decoding gives: each
worker checks it (`same_ids`).

Not a test: figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORKLOADS_DIR = Path(__file__).resolve().parent / "workloads"
WORKLOADS = ("copy_heavy", "code", "chat")
N_CTX = 1024
WARMUP_TOKENS = 8  # a short first generation in each process: compiled kernels loaded, pages touched


@dataclass(frozen=True)
class Prompt:
    chat: bool  # through the model's chat template (a user turn), else completed as written
    text: str


def read_workload(name: str) -> list[Prompt]:
    """The prompts of workloads/<name>.txt: each starts with a line `### chat` or `### raw`."""
    path = WORKLOADS_DIR / f"{name}.txt"
    prompts: list[Prompt] = []
    kind, lines = None, []
    for line in [*path.read_text().splitlines(), "### end"]:
        if line.startswith("### "):
            if kind is not None:
                prompts.append(Prompt(kind == "chat", "\n".join(lines).strip("\n")))
            kind, lines = line[4:].strip(), []
            if kind not in ("chat", "raw", "end"):
                raise SystemExit(f"{path}: unknown prompt kind {kind!r} (use ### chat or ### raw)")
        elif kind is not None:
            lines.append(line)
    if not prompts:
        raise SystemExit(f"{path}: no prompts (each starts with a line ### chat or ### raw)")
    return prompts


def prompt_ids(model, prompt: Prompt) -> list[int]:
    if prompt.chat:
        text = model.chat_template.render([{"role": "user", "content": prompt.text}], add_generation_prompt=True)
        return model.tokenizer.encode(text, add_bos=False, special=True)
    return model.tokenizer.encode(prompt.text, special=True)


def totals(rows: list[dict]) -> dict:
    """One workload's figures from its prompts' generations."""
    decoded = sum(r["tokens"] - 1 for r in rows)  # the first token comes with the prefill
    decode_s = sum(r["decode_s"] for r in rows)
    passes = sum(r["passes"] for r in rows)
    return {"decode_tokens_per_s": round(decoded / decode_s, 2) if decode_s else 0.0,
            "tokens_per_pass": round(decoded / passes, 3) if passes else 0.0,
            "tokens": sum(r["tokens"] for r in rows)}


# --- worker processes: one engine, one thread count, every workload, printing one JSON object ---

def caravan_worker(args: argparse.Namespace) -> dict:
    """caravan, set up as `caravan bench` sets itself up from the same flags."""
    from caravan.coordinator import cli, from_flags
    from caravan.pipeline.generate import Generation
    from caravan.pipeline.numba_config import WAITING_SPIN, spin_briefly_when_idle
    from caravan.pipeline.sampler import Sampler, SamplingParams
    from caravan.pipeline.speculative import PromptLookup

    flags = ["bench", "--json", "--threads", str(args.threads), "--draft-max", str(args.draft_max)]
    if args.drafts_in_flight:
        flags += ["--drafts-in-flight", str(args.drafts_in_flight)]
    if args.nodes:
        spin_briefly_when_idle(WAITING_SPIN)  # as cli.main does when there are nodes
        flags += ["--nodes", args.nodes]
    options = cli.build_parser().parse_args(flags)
    model = from_flags.loaded_model(options)
    greedy = SamplingParams(temperature=0)
    stops = model.tokenizer.eog_ids

    def generate(ids: list[int], tokens: int, lookup: bool) -> tuple[list[int], dict]:
        drafter = PromptLookup(args.draft_max) if lookup else None
        generation = Generation(pipeline, ids, Sampler(greedy), tokens, stops, drafter=drafter,
                                in_flight=options.drafts_in_flight)
        out = list(generation)
        t = generation.timings
        return out, {"tokens": t.generated_tokens, "decode_s": t.decode_s, "passes": t.decode_passes}

    result: dict = {}
    with from_flags.pipeline(options, model, N_CTX) as pipeline:
        generate(prompt_ids(model, read_workload(args.workloads[0])[0]), WARMUP_TOKENS, True)
        for name in args.workloads:
            rows: dict[str, list[dict]] = {"plain": [], "lookup": []}
            same = True
            for prompt in read_workload(name):
                ids = prompt_ids(model, prompt)
                plain, rows_plain = generate(ids, args.tokens, False)
                looked, rows_lookup = generate(ids, args.tokens, True)
                rows["plain"].append(rows_plain)
                rows["lookup"].append(rows_lookup)
                same = same and plain == looked
            result[name] = {mode: totals(r) for mode, r in rows.items()} | {"same_ids": same}
    return result


def llama_cpp_worker(args: argparse.Namespace) -> dict:
    """llama.cpp through llama-cpp-python: plain greedy, then with LlamaPromptLookupDecoding
    drafting as many tokens as caravan's --draft-max; passes counted as calls to eval."""
    from caravan.coordinator.reference import _quiet_stderr
    from caravan.pipeline.catalog import DEFAULT_MODEL, default_cache_dir, resolve_model
    from caravan.pipeline.loader import load_model
    from llama_cpp import Llama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    path = resolve_model(DEFAULT_MODEL, default_cache_dir(), progress=False)
    model = load_model(path)
    stops = model.tokenizer.eog_ids

    class Counted(Llama):
        evals = 0

        def eval(self, tokens):
            self.evals += 1
            return super().eval(tokens)

    def engine(lookup: bool) -> Counted:
        draft = LlamaPromptLookupDecoding(num_pred_tokens=args.draft_max) if lookup else None
        with _quiet_stderr():
            return Counted(model_path=str(path), n_ctx=N_CTX, n_threads=args.threads, n_threads_batch=args.threads,
                           n_batch=512, verbose=False, draft_model=draft)

    def generate(llm: Counted, ids: list[int], tokens: int) -> tuple[list[int], dict]:
        out, t_first = [], 0.0
        llm.evals = 0
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(token))
            if len(out) == 1:
                t_first, first_evals = time.perf_counter(), llm.evals
            if token in stops or len(out) >= tokens:
                break
        return out, {"tokens": len(out), "decode_s": time.perf_counter() - t_first, "passes": llm.evals - first_evals}

    engines = {"plain": engine(False), "lookup": engine(True)}
    warm = prompt_ids(model, read_workload(args.workloads[0])[0])
    for llm in engines.values():
        generate(llm, warm, WARMUP_TOKENS)
    result: dict = {}
    for name in args.workloads:
        rows: dict[str, list[dict]] = {"plain": [], "lookup": []}
        same = True
        for prompt in read_workload(name):
            ids = prompt_ids(model, prompt)
            outs = {}
            for mode, llm in engines.items():
                outs[mode], row = generate(llm, ids, args.tokens)
                rows[mode].append(row)
            same = same and outs["plain"] == outs["lookup"]
        result[name] = {mode: totals(r) for mode, r in rows.items()} | {"same_ids": same}
    return result


# --- the driver: rounds of worker processes, medians, ratios ---

def run_worker(engine: str, args: argparse.Namespace, threads: int, nodes: str | None = None) -> dict:
    command = [sys.executable, __file__, "--worker", engine, "--threads", str(threads), "--tokens", str(args.tokens),
               "--draft-max", str(args.draft_max), "--workloads", ",".join(args.workloads),
               "--drafts-in-flight", str(args.drafts_in_flight)]
    if nodes:
        command += ["--nodes", nodes]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{engine} worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def medians(runs: list[dict], workloads: list[str]) -> dict:
    """Per workload and mode, the median of each figure over the rounds; same_ids over all of them."""
    out = {}
    for name in workloads:
        out[name] = {mode: {key: statistics.median(r[name][mode][key] for r in runs)
                            for key in runs[0][name][mode]} for mode in ("plain", "lookup")}
        out[name]["same_ids"] = all(r[name]["same_ids"] for r in runs)
    return out


def with_ratios(engines: dict[str, dict], workloads: list[str]) -> dict:
    """Each engine's decode tokens/s as a ratio to caravan in one process without speculation."""
    for name in workloads:
        base = engines["one_process"][name]["plain"]["decode_tokens_per_s"]
        for figures in engines.values():
            for mode in ("plain", "lookup"):
                row = figures[name][mode]
                row["ratio"] = round(row["decode_tokens_per_s"] / base, 3) if base else 0.0
    return engines


def measure_threads(args: argparse.Namespace, threads: int) -> dict:
    from support.nodes import NodeProcess

    runs: dict[str, list[dict]] = {"one_process": [], "three_nodes": [], "llama.cpp": []}
    with tempfile.TemporaryDirectory(prefix="caravan-bench-") as tmp:
        nodes = [] if args.no_nodes else [NodeProcess(Path(tmp) / f"n{i}", threads=threads) for i in range(3)]
        try:
            for _ in range(args.runs):  # one of each in turn: a drifting load slows them alike
                runs["one_process"].append(run_worker("caravan", args, threads))
                if nodes:
                    runs["three_nodes"].append(run_worker("caravan", args, threads, ",".join(n.address for n in nodes)))
                if not args.no_llama_cpp:
                    runs["llama.cpp"].append(run_worker("llama_cpp", args, threads))
        finally:
            for node in nodes:
                node.stop()
    engines = {engine: medians(r, args.workloads) for engine, r in runs.items() if r}
    return with_ratios(engines, args.workloads)


def report(result: dict) -> list[str]:
    lines = [f"SmolLM2, greedy, at most {result['tokens']} tokens a prompt, draft at most {result['draft_max']}, "
             f"median of {result['runs']} rounds; ratio = decode tokens/s over caravan one process without speculation"]
    for threads, engines in result["threads"].items():
        for name in result["workloads"]:
            for engine, figures in engines.items():
                plain, lookup = figures[name]["plain"], figures[name]["lookup"]
                lines.append(f"{threads} thread(s) {name:<10} {engine:<11} plain {plain['decode_tokens_per_s']:6.1f} tok/s "
                             f"({plain['ratio']:.2f}x)  lookup {lookup['decode_tokens_per_s']:6.1f} tok/s "
                             f"({lookup['ratio']:.2f}x, {lookup['tokens_per_pass']:.2f} tokens/pass)"
                             f"{'' if figures[name]['same_ids'] else '  ids differ'}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="rounds; medians are over them (default: 3)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens a prompt at most (default: 64)")
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated (default: 1,2)")
    parser.add_argument("--draft-max", type=int, default=8, help="draft tokens a pass at most, both engines (default: 8)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"default: {','.join(WORKLOADS)}")
    parser.add_argument("--drafts-in-flight", type=int, default=0,
                        help="passes of one stream in flight through the nodes at most (default: 0, one per node)")
    parser.add_argument("--no-nodes", action="store_true", help="skip the 3 loopback nodes")
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp's prompt lookup")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", choices=("caravan", "llama_cpp"), help=argparse.SUPPRESS)
    parser.add_argument("--nodes", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.workloads = args.workloads.split(",")
    for name in args.workloads:
        read_workload(name)  # a missing or malformed file fails before anything starts
    if args.worker:
        args.threads = int(args.threads)
        work = caravan_worker if args.worker == "caravan" else llama_cpp_worker
        print(json.dumps(work(args)))
        return 0
    if not args.no_llama_cpp:
        from caravan.coordinator.reference import llama_cpp_available
        if (why := llama_cpp_available()) is not None:
            print(f"llama.cpp skipped: {why}", file=sys.stderr)
            args.no_llama_cpp = True
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": args.runs, "tokens": args.tokens,
              "draft_max": args.draft_max, "workloads": args.workloads,
              "threads": {t: measure_threads(args, int(t)) for t in args.threads.split(",")}}
    print(json.dumps(result, indent=1) if args.json else "\n".join(report(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
