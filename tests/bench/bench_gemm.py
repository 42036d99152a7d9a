"""One big product per weight format: caravan's kernel on a (rows, cols) matrix of random blocks
times T activation rows, in GOPS (2 * rows * cols * T per second) and against Q4_0's.

    python tests/bench/bench_gemm.py [--types Q4_0,Q4_K,...] [--rows 5632] [--cols 2048]
                                     [--tokens 128] [--threads 1] [--runs 5]

The default shape is a 1.1B model's ffn_gate/ffn_up (5632 x 2048) under a 128-token prefill
chunk; each figure is the best of --runs, activation quantization (Q8_0 / Q8_K / bf16
rounding) included, as a prefill pays it. Not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import time

import numba
import numpy as np
from gguf import GGMLQuantizationType as QT

from caravan.pipeline.quants import Activations, matmul, pack
from caravan.pipeline.speed import random_blocks

DEFAULT_TYPES = "Q4_0,Q8_0,Q5_0,Q5_1,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,BF16"


def gops(ttype: QT, rows: int, cols: int, tokens: int, runs: int) -> float:
    rng = np.random.default_rng(0)
    w = pack(ttype, random_blocks(ttype, rows, cols, rng, 0.02), ttype.name)
    x = rng.standard_normal((tokens, cols)).astype(np.float32)
    out = np.empty((tokens, rows), np.float32)
    matmul(w, Activations(x), out)  # compile or load, warm the caches
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        matmul(w, Activations(x), out)
        best = min(best, time.perf_counter() - start)
    return 2.0 * rows * cols * tokens / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default=DEFAULT_TYPES)
    parser.add_argument("--rows", type=int, default=5632)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    numba.set_num_threads(args.threads)
    results = {name: gops(QT[name], args.rows, args.cols, args.tokens, args.runs) for name in args.types.split(",")}
    base = results.get("Q4_0")
    if args.json:
        print(json.dumps(results))
        return
    for name, value in results.items():
        against = f"  {value / base:.2f}x Q4_0" if base else ""
        print(f"{name:5s} {value:7.1f} GOPS{against}")


if __name__ == "__main__":
    main()
