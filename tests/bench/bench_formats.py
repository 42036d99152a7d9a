"""Per weight format: caravan's and llama.cpp's speed on a synthetic ~1B model in that format.

    python tests/bench/bench_formats.py [--dir DIR] [--types Q4_0,Q4_K,...] [--threads 2]
                                        [--runs 5] [--decode 64] [--prefill 256] [--json]

Models: make_synthetic.py's TinyLlama-1.1B shape with every matrix in the one format, written
into --dir the first time (0.4 to 2.2 GB each). For each format, in this one process and at the
same thread count: caravan and llama.cpp (llama-cpp-python) decode tokens/s (--decode tokens
after a short prompt) and prefill tokens/s (a --prefill-token prompt), as bench_engine.py
measures them; the ratio caravan / llama.cpp; and caravan's figure over caravan's own Q4_0
figure (the format whose kernels README's speed tables compare with llama.cpp). After a warm-up
the two engines run in turn, --runs times, and each figure is the best of its runs: on a
machine shared with other work, the run least slowed by it.

Not a test: figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import numba
from gguf import GGMLQuantizationType as QT

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_engine import TEXT, caravan_timers, llama_timers  # noqa: E402
from make_synthetic import TYPES, synthetic_llama  # noqa: E402
from support.tiny_models import write_gguf  # noqa: E402

from caravan.pipeline.loader import load_model  # noqa: E402

DEFAULT_TYPES = "Q4_0,Q5_0,Q5_1,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,BF16"
N_CTX = 1024


def model_path(folder: Path, ttype: QT) -> Path:
    path = folder / f"synthetic-1b-{ttype.name.lower()}.gguf"
    if not path.exists():
        print(f"writing {path}", file=sys.stderr)
        write_gguf(path.with_suffix(".part"), *synthetic_llama("1b", ttype))
        path.with_suffix(".part").rename(path)
    return path


def measure(path: Path, threads: int, runs: int, n_decode: int, n_prefill: int) -> dict:
    import llama_cpp

    model = load_model(path)
    pipeline = model.local_pipeline(N_CTX)
    prompt_ids = model.tokenizer.encode("The capital of France is")
    long_ids = (model.tokenizer.encode(TEXT) * 4)[:n_prefill]
    numba.set_num_threads(threads)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads,
                          n_batch=512, verbose=False)
    timers = {"caravan": caravan_timers(pipeline, prompt_ids, long_ids, n_decode),
              "llama.cpp": llama_timers(llm, prompt_ids, long_ids, n_decode)}
    figures = {"decode": {}, "prefill": {}}
    for engine, (decode, prefill) in timers.items():  # warm-up: compilation, caches, page faults
        decode(), prefill()
    for _ in range(runs):
        for engine, (decode, prefill) in timers.items():
            for phase, rate in (("decode", decode()), ("prefill", prefill())):
                figures[phase][engine] = max(figures[phase].get(engine, 0.0), rate)
    del llm, pipeline, model
    gc.collect()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/caravan-synthetic"))
    parser.add_argument("--types", default=DEFAULT_TYPES, help="comma-separated; Q4_0 is measured first in any case")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--decode", type=int, default=64, help="tokens decoded per run")
    parser.add_argument("--prefill", type=int, default=256, help="prompt tokens per prefill run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    names = ["Q4_0"] + [n for n in args.types.split(",") if n and n != "Q4_0"]
    unknown = [n for n in names if n not in {t.name for t in TYPES}]
    if unknown:
        parser.error(f"--types: {', '.join(unknown)} (choose from {', '.join(t.name for t in TYPES)})")
    args.dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        path = model_path(args.dir, QT[name])
        figures = measure(path, args.threads, args.runs, args.decode, args.prefill)
        row = {"type": name, "file_mib": round(path.stat().st_size / 2**20)}
        for phase in ("decode", "prefill"):
            ours, ref = figures[phase]["caravan"], figures[phase]["llama.cpp"]
            base = rows[0][phase]["caravan"] if rows else ours
            row[phase] = {"caravan": round(ours, 2), "llama.cpp": round(ref, 2), "ratio": round(ours / ref, 2),
                          "vs_caravan_q4_0": round(ours / base, 2)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    report = {"threads": args.threads, "runs": args.runs, "decode_tokens": args.decode, "prefill_tokens": args.prefill,
              "formats": rows}
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"threads {args.threads}, best of {args.runs} runs; decode {args.decode} tokens, prefill {args.prefill} tokens\n")
    print("| format | file | decode caravan | decode llama.cpp | ratio | vs Q4_0 | prefill caravan | prefill llama.cpp | ratio | vs Q4_0 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        d, p = row["decode"], row["prefill"]
        print(f"| {row['type']} | {row['file_mib']} MiB | {d['caravan']:.1f} tok/s | {d['llama.cpp']:.1f} tok/s | {d['ratio']:.2f} | "
              f"{d['vs_caravan_q4_0']:.2f} | {p['caravan']:.1f} tok/s | {p['llama.cpp']:.1f} tok/s | {p['ratio']:.2f} | "
              f"{p['vs_caravan_q4_0']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
