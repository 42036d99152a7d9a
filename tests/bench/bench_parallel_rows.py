"""Serial against thread-per-row activation work, by row count: where each *_PARALLEL_ROWS
threshold (Q8_PARALLEL_ROWS, Q8_K_PARALLEL_ROWS, GATED_PARALLEL_ROWS) should sit.

    python tests/bench/bench_parallel_rows.py [--cols 2048,5632] [--rows 1,2,4,8,16,32,64] [--repeats 200]

Each figure is the best of --repeats calls in microseconds, at Numba's thread count; the
parallel kernel pays for waking the threads, so it wins only from some row count on. Not a
test: figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np

from caravan.pipeline import ops
from caravan.pipeline.formats import activations, kquants


def best_us(kernel, args: tuple, repeats: int) -> float:
    kernel(*args)  # compile or load
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        kernel(*args)
        best = min(best, time.perf_counter() - start)
    return best * 1e6


def cases(x: np.ndarray) -> dict:
    """name -> (serial kernel, parallel kernel, arguments) for activation rows x (T, cols)."""
    n, cols = x.shape
    q8 = (x, np.empty((n, cols), np.int8), *(np.empty((n, cols // 32), np.float32) for _ in range(2)),
          np.empty((n, cols // 32), np.int32))
    q8_k = (x, np.empty((n, cols), np.int8), np.empty((n, cols // 256), np.float32), np.empty((n, cols // 16), np.int16))
    gated = (x, x, 0, np.empty_like(x), np.empty(0, np.float32))  # SwiGLU
    return {
        "q8": (activations._quantize_q8, activations._quantize_q8_parallel, q8),
        "q8_k": (kquants._quantize_q8_k, kquants._quantize_q8_k_parallel, q8_k),
        "gated": (ops._gated, ops._gated_parallel, gated),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cols", default="2048,5632")
    parser.add_argument("--rows", default="1,2,4,8,16,32,64")
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    print(f"threads: {numba.get_num_threads()}; best of {args.repeats}, microseconds serial / parallel")
    rng = np.random.default_rng(0)
    for cols in map(int, args.cols.split(",")):
        for rows in map(int, args.rows.split(",")):
            x = rng.standard_normal((rows, cols)).astype(np.float32)
            figures = [f"{name} {best_us(serial, a, args.repeats):7.1f} / {best_us(parallel, a, args.repeats):7.1f}"
                       for name, (serial, parallel, a) in cases(x).items()]
            print(f"cols {cols:5d} rows {rows:3d}  " + "   ".join(figures))


if __name__ == "__main__":
    main()
