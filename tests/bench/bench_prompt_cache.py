"""Time to first token of a conversation's second turn against its first (issue 24's prompt
cache): `caravan serve` on SmolLM2, in one process or in front of N nodes, a first turn whose
prompt is about HISTORY_TOKENS long, then the next turn (that history, the answer, a new
question), each streamed; prints one JSON object.

    python tests/bench/bench_prompt_cache.py [--nodes 2] [--cache-budget 0]

--cache-budget 0 runs the same turns with the prompt cache off, for comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.nodes import NodeProcess  # noqa: E402
from support.serve import MODEL, Server  # noqa: E402

HISTORY_TOKENS = 1500
N_CTX = 2048
PARAGRAPH = ("The caravan crossed the desert at night, when the sand was cool, and rested by day in the "
             "shade of the dunes; each llama carried part of the load, one after another. ")  # about 40 tokens


def first_token_s(server: Server, messages: list[dict]) -> tuple[float, str]:
    """Seconds from sending a streamed chat request to its first token, and the whole answer."""
    t0 = time.perf_counter()
    stream = server.client().chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16,
                                                     stream=True)
    first, pieces = None, []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - t0
            pieces.append(chunk.choices[0].delta.content)
    return first, "".join(pieces)


def run(server: Server) -> dict:
    history = [{"role": "system", "content": PARAGRAPH * (HISTORY_TOKENS // 40)},
               {"role": "user", "content": "Summarize the story in one sentence."}]
    first_s, answer = first_token_s(server, history)
    second = history + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Who carried the load?"}]
    second_s, _ = first_token_s(server, second)
    return {"first_turn_ttft_s": round(first_s, 3), "second_turn_ttft_s": round(second_s, 3),
            "ratio": round(second_s / first_s, 4)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, default=0, help="nodes to start on loopback (default: one process)")
    p.add_argument("--cache-budget", default=None, help="passed to caravan serve")
    args = p.parse_args()
    flags = ["--cache-budget", args.cache_budget] if args.cache_budget is not None else []
    with tempfile.TemporaryDirectory() as tmp:
        nodes = [NodeProcess(Path(tmp) / f"node{i}") for i in range(args.nodes)]
        try:
            if nodes:
                flags += ["--nodes", ",".join(n.address for n in nodes)]
            server = Server(*flags, ctx=N_CTX)
            try:
                result = run(server)
            finally:
                server.stop()
        finally:
            for node in nodes:
                node.stop()
    print(json.dumps({"nodes": args.nodes, "cache_budget": args.cache_budget, **result}))


if __name__ == "__main__":
    main()
