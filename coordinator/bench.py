"""`caravan bench`: prefill and decode tokens/s, time to the first token, each stage's hop and
memory, measured on the pipeline a verb builds; the report as one JSON object or as lines of text.

llama.cpp's figures for the same run come from coordinator/reference.py.
"""

from __future__ import annotations


import numba
import numpy as np
import psutil

from caravan.pipeline.generate import Generation, Pipeline
from caravan.pipeline.sampler import Sampler, SamplingParams
from caravan.pipeline.speculative import DrafterFactory
from caravan.pipeline.tokenizer import Tokenizer

from .cluster import LOCAL
from .remote import NodeError

# Filler for `bench` prompts: ordinary English, repeated to the length asked for.
BENCH_TEXT = ("The caravan moved slowly across the desert, each animal carrying part of the load. "
              "At every oasis the travellers rested, traded news and counted their water. ")


def bench_prompt(tokenizer: Tokenizer, n_tokens: int) -> list[int]:
    """`n_tokens` token ids of BENCH_TEXT repeated, after the BOS token if the model wants one."""
    filler = tokenizer.encode(BENCH_TEXT, add_bos=False)
    prefix = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    return (prefix + filler * (n_tokens // len(filler) + 1))[:n_tokens]


def timed_runs(pipeline: Pipeline, prompt: list[int], decode_tokens: int, runs: int,
               drafter: DrafterFactory = lambda params: None, in_flight: int = 0) -> tuple[list[dict], list[int]]:
    """The timings of `runs` greedy generations after a warm-up one, and the tokens of the last;
    `drafter` makes each generation's drafter (speculative decoding) or None; `in_flight`, the
    drafts in flight at once (Generation.in_flight)."""
    greedy = SamplingParams(temperature=0)
    timings = []
    for run in range(runs + 1):  # the first warms up: compiled kernels loaded, pages touched
        generation = Generation(pipeline, prompt, Sampler(greedy), decode_tokens, stop_ids=frozenset(),
                                drafter=drafter(greedy), in_flight=in_flight)
        tokens = list(generation)
        if run:
            timings.append(generation.timings.as_dict())
    return timings, tokens


def stage_rows(pipeline: Pipeline) -> list[dict]:
    """Each stage's layers and weights; a node's also its resident size and median hop."""
    stages = []
    for st in pipeline.stats():
        if st.weight_bytes is None:
            raise NodeError(st.address, "did not answer when asked for its memory; is it still running?")
        row: dict = {"layers": [st.layers.start, st.layers.stop]}
        if st.address is not None:
            row.update(node=st.node, address=st.address, hop_us=st.hop_us, rss_bytes=st.rss_bytes,
                       weight_bytes=st.weight_bytes)
        else:
            row.update(node=LOCAL, weight_bytes=st.weight_bytes)
        stages.append(row)
    return stages


def summary(model_name: str, prompt: list[int], decode_tokens: int, timings: list[dict], stages: list[dict]) -> dict:
    """The bench's result: the medians of `timings`, this process's resident size and the stages."""
    return {
        "model": model_name,
        "threads": numba.get_num_threads(),
        "prompt_tokens": len(prompt),
        "decode_tokens": decode_tokens,
        "runs": len(timings),
        **{key: round(float(np.median([r[key] for r in timings])), 3) for key in timings[0]},
        "coordinator_rss_bytes": psutil.Process().memory_info().rss,
        "stages": stages,
    }


def report_lines(result: dict) -> list[str]:
    """`result` (summary's, with llama.cpp's comparison) as lines of text."""
    lines = [f"{result['model']}, {result['threads']} thread(s), median of {result['runs']} runs",
             f"prefill {result['prefill_tokens_per_s']:.1f} tokens/s ({result['prompt_tokens']} tokens), "
             f"decode {result['decode_tokens_per_s']:.1f} tokens/s ({result['decode_tokens']} tokens), "
             f"first token {result['first_token_s'] * 1e3:.0f} ms, {result['tokens_per_pass']:.2f} tokens a decode pass"]
    for st in result["stages"]:
        hop = f", hop {st['hop_us']:.0f} us" if st.get("hop_us") is not None else ""
        rss = f", resident {st['rss_bytes'] / 2**20:.0f} MiB" if "rss_bytes" in st else ""
        lines.append(f"  {st['node']}: layers {st['layers'][0]}-{st['layers'][1] - 1}, "
                     f"weights {st['weight_bytes'] / 2**20:.1f} MiB{rss}{hop}")
    lines.append(f"coordinator resident {result['coordinator_rss_bytes'] / 2**20:.0f} MiB")
    reference = result["llama.cpp"]
    if "skipped" in reference:
        lines.append(f"llama.cpp: not run ({reference['skipped']})")
        return lines
    ratios = result["ratios"]
    lines.append(f"llama.cpp, same prompt and threads, whole model in this process: prefill "
                 f"{reference['prefill_tokens_per_s']:.1f} tokens/s, decode {reference['decode_tokens_per_s']:.1f} "
                 f"tokens/s, first token {reference['first_token_s'] * 1e3:.0f} ms")
    lines.append(f"caravan vs llama.cpp: prefill {ratios['prefill']:.2f}x, decode {ratios['decode']:.2f}x, "
                 f"first token {ratios['first_token']:.2f}x as fast; the first {reference['same_tokens']} of "
                 f"{result['decode_tokens']} greedy tokens the same")
    return lines
