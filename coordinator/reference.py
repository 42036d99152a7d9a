"""llama.cpp, through llama-cpp-python, as the yardstick in `caravan bench`.

Where llama-cpp-python is installed, `caravan bench` runs the same prompt and the same number
of greedy tokens through llama.cpp in the same process, with the same thread count and
context, and reports both engines' figures and their ratios. It is optional: without it the
bench reports caravan alone and says why.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Rates:
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    first_token_s: float


def llama_cpp_available() -> str | None:
    """None when llama-cpp-python imports, else why not (one line)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return f"llama-cpp-python is not installed ({exc.name or exc})"
    return None


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp logs model loading to file descriptor 2 even with verbose=False."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def last_logits(llm) -> np.ndarray:
    """(n_vocab,) f32: the logits of the last token a llama_cpp.Llama evaluated, read from its
    context (a view, valid until the next eval). Llama.scores holds them only when the Llama was
    made with logits_all, which makes llama.cpp compute the output head for every prompt row:
    about 15% of SmolLM2's prefill time."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def llama_cpp_rates(path: Path, prompt: Sequence[int], decode_tokens: int, n_ctx: int, threads: int,
                    runs: int) -> tuple[Rates, list[int]]:
    """Medians of `runs` runs (after one warm-up) of llama.cpp on the same prompt: prefill
    tokens/s and time to the first token (the prompt evaluated and its argmax taken), then
    greedy decode tokens/s over `decode_tokens` tokens; and the greedy tokens themselves."""
    from llama_cpp import Llama

    with _quiet_stderr():
        llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                    n_batch=min(512, n_ctx), verbose=False)
    prompt = list(prompt)

    def next_token() -> int:
        return int(np.argmax(last_logits(llm)))

    def once() -> tuple[Rates, list[int]]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        tokens = [next_token()]
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(decode_tokens - 1):
            llm.eval(tokens[-1:])
            tokens.append(next_token())
        decode_s = time.perf_counter() - start
        return Rates(len(prompt) / first, (decode_tokens - 1) / decode_s if decode_tokens > 1 else 0.0, first), tokens

    try:
        once()  # warm-up: page faults, thread start
        results = [once() for _ in range(runs)]
    finally:
        llm.close()
    rates = Rates(*(statistics.median(getattr(r, field) for r, _ in results) for field in Rates.__dataclass_fields__))
    return rates, results[-1][1]


def llama_cpp_comparison(result: dict, path: Path, prompt: Sequence[int], tokens: Sequence[int], n_ctx: int,
                         enabled: bool = True) -> dict:
    """`caravan bench`'s llama.cpp entries for its `result` (whose greedy `tokens` these were):
    llama.cpp's rates on the same run and caravan's ratios to them, or why llama.cpp was not run."""
    skipped = "--no-llama-cpp" if not enabled else llama_cpp_available()
    if skipped is not None:
        return {"llama.cpp": {"skipped": skipped}}
    reference, reference_tokens = llama_cpp_rates(path, prompt, result["decode_tokens"], n_ctx, result["threads"],
                                                  result["runs"])
    entry = {key: round(value, 6) for key, value in asdict(reference).items()}
    # How many greedy tokens, from the first, both engines chose alike: a check that they did the same work.
    entry["same_tokens"] = next((i for i, (a, b) in enumerate(zip(tokens, reference_tokens)) if a != b),
                                min(len(tokens), len(reference_tokens)))
    ratios = {  # above 1: caravan is faster
        "prefill": round(result["prefill_tokens_per_s"] / reference.prefill_tokens_per_s, 3),
        "decode": round(result["decode_tokens_per_s"] / reference.decode_tokens_per_s, 3),
        "first_token": round(reference.first_token_s / result["first_token_s"], 3),
    }
    return {"llama.cpp": entry, "ratios": ratios}
