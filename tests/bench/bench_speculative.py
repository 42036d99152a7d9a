"""Decode tokens/s of SmolLM2 in one process with and without prompt lookup (speculative
decoding), on a prompt whose answer copies a paragraph and on an open chat prompt; greedy, one
thread by default. Each case runs twice and the second run is reported (the first compiles
and warms up). Prints one JSON object.

    python tests/bench/bench_speculative.py [--threads 1] [--tokens 96] [--draft-max 8]
"""

from __future__ import annotations

import argparse
import json

import numba

from caravan.pipeline.catalog import DEFAULT_MODEL, default_cache_dir, pull
from caravan.pipeline.generate import Generation
from caravan.pipeline.loader import load_model
from caravan.pipeline.sampler import Sampler, SamplingParams
from caravan.pipeline.speculative import DRAFT_MAX, PromptLookup

PARAGRAPH = ("The caravan crossed the desert in seven days. Each evening the travellers pitched their tents "
             "near a well, fed the camels and told stories about the cities they would reach. On the last "
             "day a sandstorm hid the road, but the old guide found the way by the stars.")
PROMPTS = {
    "copy": f"Repeat this paragraph exactly, word for word:\n\n{PARAGRAPH}",
    "chat": "Tell me about your favourite season and why you like it.",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--draft-max", type=int, default=DRAFT_MAX)
    args = parser.parse_args()
    numba.set_num_threads(args.threads)
    model = load_model(pull(DEFAULT_MODEL, default_cache_dir(), progress=False))
    pipeline = model.local_pipeline(1024)
    results = {}
    for name, text in PROMPTS.items():
        chat = model.chat_template.render([{"role": "user", "content": text}], add_generation_prompt=True)
        ids = model.tokenizer.encode(chat, special=True)
        for speculate in (False, True):
            for _ in range(2):
                drafter = PromptLookup(args.draft_max) if speculate else None
                generation = Generation(pipeline, ids, Sampler(SamplingParams(temperature=0)), args.tokens,
                                        model.tokenizer.eog_ids, drafter=drafter)
                tokens = list(generation)
            results[f"{name}_{'lookup' if speculate else 'plain'}"] = {
                "decode_tokens_per_s": round(generation.timings.decode_tokens_per_s, 1),
                "tokens_per_pass": round(generation.timings.tokens_per_pass, 2),
                "tokens": len(tokens), "drafted": generation.sequence.drafted,
                "accepted": generation.sequence.accepted}
    print(json.dumps({"threads": args.threads, **results}))


if __name__ == "__main__":
    main()
