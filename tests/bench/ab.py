"""Two revisions of caravan measured in turn: a benchmark that prints one JSON object runs
against each revision alternately for several rounds, so that a host whose speed drifts
(this machine's runs differ by 10-20% from one minute to the next) slows both alike.

    python tests/bench/ab.py [--rounds 5] [--keys decode,prefill] REV_A REV_B -- COMMAND ...

    python tests/bench/ab.py HEAD~1 WORKTREE -- python tests/bench/bench_engine.py --runs 1 --json --speed-only

A revision is anything git names (a commit, a branch, HEAD~1), or WORKTREE for the files as
they are now, uncommitted changes included. Each revision is checked out in a temporary git
worktree and put first on PYTHONPATH as the `caravan` package, with a Numba cache of its own
(Numba would otherwise take one revision's compiled kernels for the other's); COMMAND runs from
the repository root, so the benchmark script itself is the current one. Every number in the
JSON is reported: the median over rounds for each revision, and B / A.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "node", "coordinator", "proto")  # caravan.<name> lives in <name>/ (pyproject.toml)


def checkout(rev: str, scratch: Path) -> Path:
    """A folder to put on PYTHONPATH that holds `caravan` as revision `rev` has it."""
    if rev == "WORKTREE":
        tree = REPO
    else:
        tree = scratch / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--quiet", str(tree), rev], check=True)
    package = scratch / "path" / "caravan"
    package.mkdir(parents=True)
    for name in PACKAGES:
        (package / name).symlink_to(tree / name, target_is_directory=True)
    return scratch / "path"


def environment(path: Path, scratch: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(path), env.get("PYTHONPATH"))))
    env["NUMBA_CACHE_DIR"] = str(scratch / "numba")
    found = subprocess.run([sys.executable, "-c", "import caravan.pipeline as p; print(p.__path__[0])"],
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    if not found.startswith(str(path)):
        raise SystemExit(f"caravan imports from {found}, not from {path}: is something ahead of PYTHONPATH?")
    return env


def numbers(value, prefix: str = "") -> dict[str, float]:
    """Every number in a JSON value, by its path (decode[0].caravan)."""
    if isinstance(value, bool):
        return {}
    if isinstance(value, (int, float)):
        return {prefix: float(value)}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    found = {}
    for key, item in items:
        found.update(numbers(item, f"{prefix}[{key}]" if isinstance(key, int) else f"{prefix}.{key}" if prefix else key))
    return found


def run(command: list[str], env: dict[str, str]) -> dict[str, float]:
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    start = result.stdout.find("{")
    if start < 0:
        raise SystemExit(f"{' '.join(command)} printed no JSON object:\n{result.stdout[-2000:]}")
    return numbers(json.loads(result.stdout[start:]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keys", default="", help="report only numbers whose path contains one of these (comma-separated)")
    parser.add_argument("rev_a")
    parser.add_argument("rev_b")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the benchmark command, which prints JSON")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the benchmark command after --")
    wanted = [key for key in args.keys.split(",") if key]
    with tempfile.TemporaryDirectory(prefix="caravan-ab-") as tmp:
        revs = {"A": args.rev_a, "B": args.rev_b}
        envs = {}
        try:
            for side, rev in revs.items():
                scratch = Path(tmp) / side
                envs[side] = environment(checkout(rev, scratch), scratch)
            results: dict[str, dict[str, list[float]]] = {"A": {}, "B": {}}
            for round_ in range(args.rounds):
                for side in ("A", "B") if round_ % 2 == 0 else ("B", "A"):  # neither always goes first
                    for key, value in run(command, envs[side]).items():
                        results[side].setdefault(key, []).append(value)
                print(f"round {round_ + 1} of {args.rounds} done", file=sys.stderr, flush=True)
        finally:
            for side in revs:
                if (Path(tmp) / side / "tree").exists():
                    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(Path(tmp) / side / "tree")], check=False)
    print(f"A = {args.rev_a}, B = {args.rev_b}, medians of {args.rounds} rounds")
    for key in results["A"]:
        if wanted and not any(w in key for w in wanted):
            continue
        a, b = statistics.median(results["A"][key]), statistics.median(results["B"].get(key, [float("nan")]))
        ratio = f"{b / a:.3f}" if a else "-"
        print(f"{key:50s} A {a:12.4g}  B {b:12.4g}  B/A {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
