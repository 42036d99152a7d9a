"""Time to first token of a conversation's second turn against its first (issue 24's prompt
cache): `caravan serve` on SmolLM2, in one process or in front of N nodes, a first turn whose
prompt is about HISTORY_TOKENS long, then the next turn (that history, the answer, a new
question), each streamed; prints one JSON object.

    python tests/bench/bench_prompt_cache.py [--nodes 2] [--cache-budget 0] [--runs 3] [--threads 1]
    python tests/bench/bench_prompt_cache.py --anchor [--nodes 2]   # beside llama-server

--cache-budget 0 runs the same turns with the prompt cache off, for comparison. --anchor runs
llama-server (tests/bench/build_llama_cpp.sh builds it) on the same model file, context and
threads beside caravan, with its `cache_prompt` on the same conversation, the two in turn each
run; with --nodes N its layers go to N ggml-rpc-servers on loopback. Every run's conversation
opens with its own line, so no run finds the one before it in a cache. Medians of --runs; the
ratio is the median of each run's own. Not a test: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.llama_cpp_bin import LlamaServer, rpc_servers  # noqa: E402
from support.nodes import NodeProcess  # noqa: E402
from support.serve import MODEL, Server  # noqa: E402

HISTORY_TOKENS = 1500
N_CTX = 2048
ANSWER_TOKENS = 16
REQUEST_TIMEOUT_S = 300.0
PARAGRAPH = ("The caravan crossed the desert at night, when the sand was cool, and rested by day in the "
             "shade of the dunes; each llama carried part of the load, one after another. ")  # about 40 tokens


def first_token_s(url: str, messages: list[dict]) -> tuple[float, str]:
    """Seconds from sending a streamed chat request to the server at url to its first token, and
    the whole answer."""
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)
    t0 = time.perf_counter()
    stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                            max_tokens=ANSWER_TOKENS, stream=True)
    first, pieces = None, []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - t0
            pieces.append(chunk.choices[0].delta.content)
    return first, "".join(pieces)


def conversation(url: str, run: int) -> dict:
    """The two turns of run `run`'s conversation against the server at url."""
    opening = f"Evening {run + 1} of the journey. "
    history = [{"role": "system", "content": opening + PARAGRAPH * (HISTORY_TOKENS // 40)},
               {"role": "user", "content": "Summarize the story in one sentence."}]
    first_s, answer = first_token_s(url, history)
    second = history + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Who carried the load?"}]
    second_s, _ = first_token_s(url, second)
    return {"first_turn_ttft_s": first_s, "second_turn_ttft_s": second_s, "ratio": second_s / first_s}


def medians(runs: list[dict]) -> dict:
    out = {key: round(statistics.median(r[key] for r in runs), 4 if key == "ratio" else 3) for key in runs[0]}
    return {**out, "ratios_seen": [round(r["ratio"], 4) for r in runs]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--nodes", type=int, default=0, help="nodes to start on loopback (default: one process)")
    p.add_argument("--cache-budget", default=None, help="passed to caravan serve")
    p.add_argument("--runs", type=int, default=1, help="conversations; medians are over them (default: 1)")
    p.add_argument("--threads", "-t", type=int, default=1, help="compute threads of every process (default: 1)")
    p.add_argument("--anchor", action="store_true", help="run llama-server beside caravan, in turn, and compare")
    args = p.parse_args()
    flags = ["-t", str(args.threads)]
    flags += ["--cache-budget", args.cache_budget] if args.cache_budget is not None else []
    runs: dict[str, list[dict]] = {"caravan": [], "llama_server": []}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        nodes = [NodeProcess(Path(tmp) / f"node{i}", threads=args.threads) for i in range(args.nodes)]
        for node in nodes:
            stack.callback(node.stop)
        if nodes:
            flags += ["--nodes", ",".join(n.address for n in nodes)]
        server = Server(*flags, ctx=N_CTX)
        stack.callback(server.stop)
        anchor = None
        if args.anchor:
            from caravan.pipeline.catalog import DEFAULT_MODEL, default_cache_dir, pull

            rpc = stack.enter_context(rpc_servers(args.threads, args.nodes)) if args.nodes else ()
            anchor = LlamaServer(pull(DEFAULT_MODEL, default_cache_dir(), progress=False), threads=args.threads,
                                 ctx=N_CTX, rpc=rpc)
            stack.callback(anchor.stop)
        for run in range(args.runs):
            runs["caravan"].append(conversation(server.url, run))
            if anchor:
                runs["llama_server"].append(conversation(anchor.url, run))
    result = {"nodes": args.nodes, "cache_budget": args.cache_budget, "threads": args.threads, "runs": args.runs,
              **medians(runs["caravan"])}
    if anchor:
        result["llama_server"] = medians(runs["llama_server"])
        pairs = zip(runs["caravan"], runs["llama_server"])
        result["second_turn_vs_llama_server"] = round(statistics.median(
            c["second_turn_ttft_s"] / a["second_turn_ttft_s"] for c, a in pairs), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
