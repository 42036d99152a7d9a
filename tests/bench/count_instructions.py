"""Instructions per weight block in the inner loop of the compiled products, per instruction set.

    python tests/bench/count_instructions.py [--cpu NAME --features +a,+b,...] [--json]

Compiles one group product (eight weight rows against one activation row, and against four)
of Q4_0, Q4_1, Q8_0 and Q4_K for every instruction set in pipeline/vector.py's ISAS on the CPU
Numba compiles for, takes the assembly (Numba's inspect_asm), finds the loop over weight blocks
(the one loop of the product: the longest span from a label to a branch back to it) and counts
its instructions. LLVM may unroll that loop, and the dot-product path's one-row Q4_0, Q4_1 and
Q8_0 take two blocks a pass: the fused multiply-adds per block are known (one
<8 x float> chain per block and token, two with minima), so the count of fma instructions in
the loop gives the unroll factor. A block is 32 weights (Q4_K: a 256-weight superblock).

--cpu and --features set NUMBA_CPU_NAME / NUMBA_CPU_FEATURES before Numba loads, so the code is
compiled as that CPU's LLVM would (the host must run it: for an aarch64 board, the arm64 root
of .ci/arm64 under QEMU_CPU=NAME). Not a test: a measure of code size where there is no board
to time on; the figures are in tests/bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

FORMATS = ("q4_0", "q4_1", "q8_0", "q4_k")
FMAS_PER_BLOCK = {"q4_0": 1, "q4_1": 2, "q8_0": 1, "q4_k": 2}  # <8 x float> fma chains per block and token row
# An instruction line of either assembly: indented, not a directive or a comment.
_INSTRUCTION = re.compile(r"^\s+([a-z][\w.]*)")
_LABEL = re.compile(r"^(\.?L?[\w.$]+):")
_BRANCH_TARGET = re.compile(r"(\.LBB\w+)\s*$")


def _loops(asm: str) -> tuple[list[str], list[tuple[int, int]]]:
    """The lines of `asm` and its loops as (first line, last line): from a label to a branch back
    to it, in the compiled function only (not Numba's wrappers that unbox Python arguments)."""
    lines = asm.splitlines()
    labels, loops, wrapper = {}, [], False
    for n, line in enumerate(lines):
        label = _LABEL.match(line)
        if label:
            if not label.group(1).startswith(".L"):  # a function: Numba's wrappers have "cpython" or "cfunc" in their names
                wrapper = "cpython" in label.group(1) or "cfunc" in label.group(1)
            labels[label.group(1)] = n
            continue
        target = _BRANCH_TARGET.search(line)
        if not wrapper and _INSTRUCTION.match(line) and target and target.group(1) in labels:
            loops.append((labels[target.group(1)], n))
    return lines, loops


def loop_counts(asm: str, inner_trips: int = 1) -> tuple[int, int]:
    """(instructions, fma instructions) of one pass of the widest loop in `asm`, a loop inside it
    counted inner_trips times."""
    lines, loops = _loops(asm)
    if not loops:
        return 0, 0
    first, last = max(loops, key=lambda loop: loop[1] - loop[0])
    weights = [1] * len(lines)
    for start, end in loops:
        if first <= start and end <= last and (start, end) != (first, last):
            weights[start : end + 1] = [inner_trips] * (end + 1 - start)
    ops = [(m.group(1), weights[n]) for n, m in enumerate(map(_INSTRUCTION.match, lines)) if m and first <= n <= last]
    return sum(w for _, w in ops), sum(w for op, w in ops if op.startswith(("vfmadd", "vfmsub", "fmla", "fmadd")))


def _signature(name: str):
    from numba import types

    u8, u16, i8, i16, i32, f32 = (types.Array(t, 2, "C") for t in (types.uint8, types.uint16, types.int8, types.int16, types.int32, types.float32))
    if name.endswith("_k"):  # wq, wd, wdmin, wmeta, xq, xd, xbs, out
        return (u8, u16, u16, i8, i8, f32, i16, f32)
    return (u8, u16, u16, i8, f32, f32, i32, f32)  # wq, wd, wm, xq, xd, xs, xn, out


def _product(name: str, n_tokens: int, isa: str):
    import numba as nb

    from caravan.pipeline.formats import kquants, legacy

    intrinsic = kquants.INTRINSICS[(name, n_tokens, isa)] if name.endswith("_k") else legacy.GROUP_INTRINSICS[(name, n_tokens, isa)]

    if name.endswith("_k"):
        def one_group(wq, wd, wdmin, wmeta, xq, xd, xbs, out):
            intrinsic(wq, wd, wdmin, wmeta, 0, xq, xd, xbs, out, 0, 8)
    else:
        def one_group(wq, wd, wm, xq, xd, xs, xn, out):
            intrinsic(wq, wd, wm, 0, xq, xd, xs, xn, out, 0, 8)

    return nb.njit(_signature(name), nogil=True)(one_group)


def count(name: str, n_tokens: int, isa: str, arch: str) -> dict:
    """Instructions per block (and per block and token row) of one product."""
    product = _product(name, n_tokens, isa)
    instructions, fmas = loop_counts(product.inspect_asm(product.signatures[0]))
    per_fma = 1 if arch == "x86_64" else 2  # an <8 x float> fma is two NEON fmla
    unroll = max(1, fmas // (FMAS_PER_BLOCK[name] * n_tokens * per_fma))
    return {"format": name, "tokens": n_tokens, "isa": isa, "loop": instructions, "unroll": unroll,
            "per_block": instructions / unroll, "per_block_token": instructions / unroll / n_tokens}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", help="NUMBA_CPU_NAME, e.g. cortex-a76 (with --features)")
    parser.add_argument("--features", default="", help="NUMBA_CPU_FEATURES, e.g. +neon,+dotprod")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    if args.cpu:
        os.environ["NUMBA_CPU_NAME"], os.environ["NUMBA_CPU_FEATURES"] = args.cpu, args.features
    import platform

    from caravan.pipeline import vector

    arch = "x86_64" if platform.machine().lower() in ("x86_64", "amd64") else "aarch64"
    cpu = args.cpu or os.environ.get("NUMBA_CPU_NAME") or "host"
    rows = [count(name, n, isa, arch) for name in FORMATS for n in (1, 4) for isa in vector.ISAS]
    if args.json:
        json.dump({"cpu": cpu, "machine": platform.machine(), "isas": vector.ISAS, "counts": rows}, sys.stdout)
        print()
        return 0
    print(f"cpu {cpu} ({platform.machine()}), instruction sets {', '.join(vector.ISAS)}")
    print("| format | token rows | isa | loop | unroll | per block | per block and row |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['tokens']} | {r['isa']} | {r['loop']} | {r['unroll']} | {r['per_block']:.0f} | {r['per_block_token']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
