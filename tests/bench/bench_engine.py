"""caravan against llama.cpp in one process run: speed, greedy agreement, perplexity.

    python tests/bench/bench_engine.py [--model PATH|NAME] [--runs 5] [--json] [--speed-only]

--speed-only skips agreement and perplexity: for synthetic models (make_synthetic.py), whose
random weights make both meaningless.

Speed: decode (128 tokens after a short prompt) and prefill (a ~500-token prompt) tokens/s,
median of --runs runs each, at 1 and 2 threads, for caravan and llama.cpp (llama-cpp-python)
in the same process, with the ratio. Numba's thread count is set per measurement; llama.cpp
gets n_threads. Both are greedy, n_ctx 1024, as in shared/REFERENCE.md, and both compute the
output head for a prompt's last row only (llama.cpp's logits read with last_logits(); a Llama
made with logits_all would compute it for every row, ~15% of SmolLM2's prefill).

Agreement: greedy 32-token completions of ordinary prompts; where they diverge, llama.cpp's
gap between its top two logits at that step says whether it was a near-tie.

Perplexity: the same windows of a public-domain English text (written below) scored by both.

Python overhead: the time greedy decode spends inside compiled kernels (every Numba dispatcher
in caravan's modules, timed by cProfile) against the same decode's time without the profiler;
the rest is Python around the kernels, numpy calls and the sampler. (cProfile's own cost
lands on the Python side, which is why the kernels' time is set against an unprofiled run.)

Bandwidth: decode reads every weight once per token, so caravan's decode rate times the bytes of
its packed weights (every layer plus the output matrix) is the read bandwidth decode achieves. It
is reported as a fraction of the machine's: the median rate at which a compiled loop sums a
1 GiB array (far past the caches), at the same thread count.

Not a test: figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numba
import numpy as np

from caravan.coordinator.reference import last_logits
from caravan.pipeline.catalog import DEFAULT_MODEL, default_cache_dir, resolve_model
from caravan.pipeline.generate import Generation
from caravan.pipeline.loader import load_model
from caravan.pipeline.perplexity import log_z  # there in older revisions too (ab.py runs them)
from caravan.pipeline.sampler import Sampler, SamplingParams
from caravan.pipeline.stage import Segment

N_CTX = 1024
DECODE_TOKENS = 128

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "The three primary colors are",
    "To make a cup of tea, first",
    "The largest planet in the solar system is",
    "import numpy as np\n\ndef softmax(x):\n",
]

# From "The Adventures of Sherlock Holmes" by Arthur Conan Doyle (1892), public domain.
TEXT = """To Sherlock Holmes she is always the woman. I have seldom heard him mention her under any
other name. In his eyes she eclipses and predominates the whole of her sex. It was not that he
felt any emotion akin to love for Irene Adler. All emotions, and that one particularly, were
abhorrent to his cold, precise but admirably balanced mind. He was, I take it, the most perfect
reasoning and observing machine that the world has seen, but as a lover he would have placed
himself in a false position. He never spoke of the softer passions, save with a gibe and a sneer.
They were admirable things for the observer, excellent for drawing the veil from men's motives
and actions. But for the trained reasoner to admit such intrusions into his own delicate and
finely adjusted temperament was to introduce a distracting factor which might throw a doubt upon
all his mental results. Grit in a sensitive instrument, or a crack in one of his own high-power
lenses, would not be more disturbing than a strong emotion in a nature such as his. And yet there
was but one woman to him, and that woman was the late Irene Adler, of dubious and questionable
memory. I had seen little of Holmes lately. My marriage had drifted us away from each other. My
own complete happiness, and the home-centred interests which rise up around the man who first
finds himself master of his own establishment, were sufficient to absorb all my attention, while
Holmes, who loathed every form of society with his whole Bohemian soul, remained in our lodgings
in Baker Street, buried among his old books, and alternating from week to week between cocaine
and ambition, the drowsiness of the drug, and the fierce energy of his own keen nature. He was
still, as ever, deeply attracted by the study of crime, and occupied his immense faculties and
extraordinary powers of observation in following out those clues, and clearing up those
mysteries which had been abandoned as hopeless by the official police. From time to time I heard
some vague account of his doings: of his summons to Odessa in the case of the Trepoff murder, of
his clearing up of the singular tragedy of the Atkinson brothers at Trincomalee, and finally of
the mission which he had accomplished so delicately and successfully for the reigning family of
Holland. Beyond these signs of his activity, however, which I merely shared with all the readers
of the daily press, I knew little of my former friend and companion. One night, it was on the
twentieth of March, 1888, I was returning from a journey to a patient, for I had now returned to
civil practice, when my way led me through Baker Street. As I passed the well-remembered door,
which must always be associated in my mind with my wooing, and with the dark incidents of the
Study in Scarlet, I was seized with a keen desire to see Holmes again, and to know how he was
employing his extraordinary powers. His rooms were brilliantly lit, and, even as I looked up, I
saw his tall, spare figure pass twice in a dark silhouette against the blind. He was pacing the
room swiftly, eagerly, with his head sunk upon his chest and his hands clasped behind him. To me,
who knew his every mood and habit, his attitude and manner told their own story. He was at work
again. He had risen out of his drug-created dreams and was hot upon the scent of some new
problem. I rang the bell and was shown up to the chamber which had formerly been in part my own."""


@numba.njit(parallel=True, cache=True)
def _sum_words(words):
    total = np.uint64(0)
    for i in numba.prange(words.shape[0]):
        total += words[i]
    return total


def read_bandwidth(runs: int, n_bytes: int = 1 << 30) -> float:
    """Bytes per second a compiled loop reads from memory at Numba's current thread count."""
    words = np.ones(n_bytes // 8, np.uint64)  # written once, so its pages are real
    _sum_words(words[:1024])  # compile

    def once():
        t = time.perf_counter()
        _sum_words(words)
        return n_bytes / (time.perf_counter() - t)

    return median_rate(once, runs)


def python_share(pipeline, prompt_ids) -> float:
    """Fraction of greedy decode time not spent inside compiled kernels, from cProfile."""
    import cProfile
    import importlib
    import pkgutil
    import pstats

    import caravan.pipeline

    kernels = set()
    for info in pkgutil.walk_packages(caravan.pipeline.__path__, "caravan.pipeline."):  # formats/ too
        for value in vars(importlib.import_module(info.name)).values():
            # module-level kernels, and those a module keeps in a registry ({format: kernel or record})
            for item in value.values() if isinstance(value, dict) else [value]:
                item = getattr(item, "kernel", item)  # a format's record holds its kernel
                if isinstance(item, numba.core.registry.CPUDispatcher):
                    code = item.py_func.__code__
                    kernels.add((code.co_filename, code.co_firstlineno, code.co_name))
    def decode(profile=None) -> float:
        generation = Generation(pipeline, prompt_ids, Sampler(SamplingParams(temperature=0)), DECODE_TOKENS, frozenset())
        iterator = iter(generation)
        next(iterator)  # the prompt's prefill is not decode
        t = time.perf_counter()
        if profile is not None:
            profile.enable()
        for _ in iterator:
            pass
        if profile is not None:
            profile.disable()
        return time.perf_counter() - t

    plain = statistics.median(decode() for _ in range(3))
    profile = cProfile.Profile()
    decode(profile)
    stats = pstats.Stats(profile).stats  # (file, line, name) -> (calls, primitive calls, tottime, cumtime, callers)
    inside = sum(entry[2] for key, entry in stats.items() if key in kernels)
    return max(0.0, 1.0 - inside / plain)


def weight_bytes_per_token(model, pipeline) -> int:
    """What decode reads per token: every layer's packed weights, plus the output matrix."""
    return sum(stage.weight_bytes for stage in pipeline.stages) + model.head.output.nbytes


def median_rate(fn, runs: int) -> float:
    fn()  # warm-up: compilation, caches, page faults
    return statistics.median(fn() for _ in range(runs))


def caravan_rates(model, pipeline, prompt_ids, long_ids, runs, decode_tokens=DECODE_TOKENS):
    decode, prefill = caravan_timers(pipeline, prompt_ids, long_ids, decode_tokens)
    return median_rate(decode, runs), median_rate(prefill, runs)


def caravan_timers(pipeline, prompt_ids, long_ids, decode_tokens=DECODE_TOKENS):
    """(decode, prefill): functions that run once and return tokens/s."""
    greedy = Sampler(SamplingParams(temperature=0))

    def decode():
        gen = Generation(pipeline, prompt_ids, greedy, decode_tokens, frozenset())
        for _ in gen:
            pass
        return gen.timings.decode_tokens_per_s

    def prefill():
        t = time.perf_counter()
        gen = Generation(pipeline, long_ids, greedy, 1, frozenset())
        for _ in gen:
            pass
        return len(long_ids) / (time.perf_counter() - t)

    return decode, prefill


def llama_rates(llm, prompt_ids, long_ids, runs, decode_tokens=DECODE_TOKENS):
    decode, prefill = llama_timers(llm, prompt_ids, long_ids, decode_tokens)
    return median_rate(decode, runs), median_rate(prefill, runs)


def llama_timers(llm, prompt_ids, long_ids, decode_tokens=DECODE_TOKENS):
    """(decode, prefill) as caravan_timers, for llama-cpp-python."""

    def decode():
        llm.reset()
        llm.eval(prompt_ids)
        tok = int(np.argmax(last_logits(llm)))
        t = time.perf_counter()
        for _ in range(decode_tokens - 1):
            llm.eval([tok])
            tok = int(np.argmax(last_logits(llm)))
        return (decode_tokens - 1) / (time.perf_counter() - t)

    def prefill():
        llm.reset()
        t = time.perf_counter()
        llm.eval(long_ids)
        np.argmax(last_logits(llm))
        return len(long_ids) / (time.perf_counter() - t)

    return decode, prefill


def agreement(model, pipeline, llm):
    rows = []
    for prompt in PROMPTS:
        ids = model.tokenizer.encode(prompt)
        ours = list(Generation(pipeline, ids, Sampler(SamplingParams(temperature=0)), 32, model.tokenizer.eog_ids))
        ref = []
        llm.reset()
        llm.eval(ids)
        while len(ref) < 32:
            scores = np.array(last_logits(llm))
            tok = int(np.argmax(scores))
            if tok in model.tokenizer.eog_ids:
                break
            if len(ref) < len(ours) and ours[len(ref)] != tok:
                top2 = np.sort(scores)[-2:]
                rows.append({"prompt": prompt, "match": False, "diverged_at": len(ref), "llama_top2_gap": float(top2[1] - top2[0])})
                break
            ref.append(tok)
            llm.eval([tok])
        else:
            rows.append({"prompt": prompt, "match": ours[:32] == ref})
            continue
        if len(rows) == 0 or rows[-1]["prompt"] != prompt:
            rows.append({"prompt": prompt, "match": ours == ref})
    return rows


def perplexities(model, pipeline, llm, window: int):
    ids = model.tokenizer.encode(TEXT, add_bos=True)
    n_windows = len(ids) // window
    nll_ours, nll_ref = [], []
    for w in range(n_windows):
        chunk = ids[w * window : (w + 1) * window]
        hidden = pipeline.forward([Segment("ppl", 0, len(chunk))], np.asarray(chunk))
        pipeline.end_session("ppl")
        ours = pipeline.head.logits(hidden).astype(np.float64)
        llm.reset()
        llm.eval(chunk)
        ref = np.asarray(llm.scores[: len(chunk)], dtype=np.float64)
        for logits, out in ((ours, nll_ours), (ref, nll_ref)):
            logp = logits[:-1] - log_z(logits[:-1])[:, None]
            out.extend(-logp[np.arange(len(chunk) - 1), chunk[1:]])
    return float(np.exp(np.mean(nll_ours))), float(np.exp(np.mean(nll_ref))), len(nll_ours)


def model_flags(doc: str) -> argparse.ArgumentParser:
    """The flags the whole-model benchmarks share (this one, bench_cluster.py): --model, --runs,
    --threads (a comma-separated list) and --json; the description is doc's first paragraph."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--json", action="store_true")
    return parser


def main() -> int:
    parser = model_flags(__doc__)
    parser.add_argument("--speed-only", action="store_true", help="skip agreement and perplexity")
    args = parser.parse_args()
    import llama_cpp

    path = resolve_model(args.model, default_cache_dir())
    model = load_model(path)
    pipeline = model.local_pipeline(N_CTX)
    prompt_ids = model.tokenizer.encode("The capital of France is")
    long_ids = model.tokenizer.encode(TEXT)[:500]
    report = {"model": str(path), "runs": args.runs, "speed": []}
    for threads in [int(t) for t in args.threads.split(",")]:
        numba.set_num_threads(threads)
        # Without logits_all: llama.cpp computes the output head for the last prompt row only, as caravan does.
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads, verbose=False)
        c_dec, c_pre = caravan_rates(model, pipeline, prompt_ids, long_ids, args.runs)
        l_dec, l_pre = llama_rates(llm, prompt_ids, long_ids, args.runs)
        bandwidth = read_bandwidth(args.runs)
        decode_bandwidth = c_dec * weight_bytes_per_token(model, pipeline)
        report["speed"].append({
            "threads": threads,
            "decode_tok_s": {"caravan": round(c_dec, 1), "llama.cpp": round(l_dec, 1), "ratio": round(c_dec / l_dec, 2)},
            "prefill_tok_s": {"caravan": round(c_pre, 1), "llama.cpp": round(l_pre, 1), "ratio": round(c_pre / l_pre, 2)},
            "decode_read_gb_s": round(decode_bandwidth / 1e9, 2),
            "machine_read_gb_s": round(bandwidth / 1e9, 2),
            "decode_bandwidth_fraction": round(decode_bandwidth / bandwidth, 2),
            "decode_python_share": round(python_share(pipeline, prompt_ids), 3),
        })
        print(json.dumps(report["speed"][-1]), file=sys.stderr)
    if args.speed_only:
        print(json.dumps(report, indent=None if args.json else 2))
        return 0
    report["agreement"] = agreement(model, pipeline, llm)
    scorer = llama_cpp.Llama(model_path=str(path), n_ctx=N_CTX, n_threads=threads, logits_all=True, verbose=False)
    ppl_ours, ppl_ref, n = perplexities(model, pipeline, scorer, 256)  # every row's logits
    report["perplexity"] = {"caravan": round(ppl_ours, 4), "llama.cpp": round(ppl_ref, 4), "n_scored": n,
                            "relative_difference": round(abs(ppl_ours - ppl_ref) / ppl_ref, 4)}
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
