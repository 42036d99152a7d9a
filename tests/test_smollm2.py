"""The real SmolLM2-135M-Instruct model, end to end, against golden ids and against llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest

from caravan.pipeline.generate import Generation
from caravan.pipeline.sampler import Sampler, SamplingParams
from caravan.pipeline.stage import Segment
from support.llama_cpp_taps import LLAMA_CPP_THREADS

# Greedy 32-token completions, caravan's own: a regression check, as any change to the numerics
# shows here. llama.cpp (llama-cpp-python 0.3.36, n_ctx 1024) gives the same 32 tokens for the
# fibonacci and counting prompts; on the others the two part at step 14, 30 and 5, where
# llama.cpp's own top two logits are 0.03, 0.14 and 0.33 apart. Those are ties within the noise
# both engines share: they round activations to 8-bit blocks, which turns any last-bit
# difference into a different rounding further on, and caravan with one ulp of noise on its
# embeddings parts from itself on those three prompts at those same steps. Each op matches
# llama.cpp's on the same inputs (test_ops_vs_llama_cpp.py); over a text the two engines' logits
# differ by up to about 1.5 (test_logits_close_to_llama_cpp), as much as caravan's own do under
# that noise, so a gap under NEAR_TIE is a coin toss. test_llama_cpp_parts_only_at_near_ties
# checks exactly that against llama.cpp itself. The ids were taken on x86-64; .ci/arm64 runs
# this test on aarch64 (qemu as a Cortex-A72 and a Cortex-A76), where passing means the same ids.
GOLDEN = {
    'The capital of France is': [
        7042, 30, 198, 198, 504, 1797, 1918, 553, 253, 2155, 282, 4723, 216, 35, 34, 33,
        2215, 701, 30, 198, 198, 504, 1797, 1918, 553, 253, 2155, 282, 4723, 216, 35, 33,
    ],
    'def fibonacci(n):\n    ': [
        3987, 46477, 24, 94, 25, 446, 3987, 46477, 24, 94, 29, 33, 25, 1232, 3987, 46477,
        24, 94, 29, 34, 2367, 1003, 3987, 46477, 24, 94, 25, 198, 198, 19, 4246, 260,
    ],
    '<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n': [
        504, 3575, 282, 4649, 314, 7042, 30, 2, 198, 2, 1, 9690, 198, 2, 198, 1,
        4093, 198, 57, 5248, 3946, 288, 7198, 253, 725, 1406, 281, 260, 2342, 30, 1812, 3301,
    ],
    '1, 2, 3, 4, 5,': [
        216, 38, 28, 216, 39, 28, 216, 40, 28, 216, 41, 28, 216, 33, 32, 28,
        216, 33, 33, 28, 216, 33, 34, 28, 216, 33, 35, 28, 216, 33, 36, 28,
    ],
    'The chemical symbol for gold is': [
        36613, 30, 198, 198, 504, 768, 2765, 3586, 282, 260, 3818, 6072, 992, 1200, 272, 4353,
        365, 57, 16049, 25, 6582, 260, 3818, 6072, 992, 1200, 272, 4353, 365, 57, 16049, 25,
    ],
}
NEAR_TIE = 0.5  # llama.cpp top-2 logit gap within the engines' shared noise (see above)

pytestmark = [pytest.mark.model, pytest.mark.slow]  # greedy runs of the real model


@pytest.fixture(scope="module")
def pipeline(smollm2):
    return smollm2.local_pipeline(1024)


def greedy(model, pipeline, prompt: str, n: int) -> list[int]:
    """n greedy tokens, running on past end-of-generation tokens as llama.cpp's generate() does."""
    ids = model.tokenizer.encode(prompt)
    return list(Generation(pipeline, ids, Sampler(SamplingParams(temperature=0)), n, frozenset()))


def test_the_capital_of_france_is_paris(smollm2, pipeline):
    text = smollm2.tokenizer.decode(greedy(smollm2, pipeline, "The capital of France is", 4))
    assert text.startswith(" Paris")


@pytest.mark.parametrize("prompt", list(GOLDEN))
def test_greedy_completion_equals_golden_ids(smollm2, pipeline, prompt):
    assert greedy(smollm2, pipeline, prompt, 32) == GOLDEN[prompt]


def test_same_seed_same_text(smollm2, pipeline):
    params = SamplingParams(temperature=0.9, seed=1234)
    runs = [
        list(Generation(pipeline, smollm2.tokenizer.encode("Once upon a time"), Sampler(params), 16, frozenset()))
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


@pytest.fixture(scope="module")
def llama(smollm2_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the reference engine) is not installed")
    return llama_cpp.Llama(model_path=str(smollm2_path), n_ctx=1024, n_threads=LLAMA_CPP_THREADS,
                           logits_all=True, verbose=False)


@pytest.mark.oracle
def test_llama_cpp_parts_only_at_near_ties(smollm2, llama):
    """llama.cpp's greedy completions equal caravan's, except that they may part where
    llama.cpp's own top two logits are within NEAR_TIE (how many prompts part is a matter of
    the last bits, see GOLDEN)."""
    for prompt, ours in GOLDEN.items():
        llama.reset()
        llama.eval(smollm2.tokenizer.encode(prompt))
        for step, token in enumerate(ours):
            scores = np.asarray(llama.scores[llama.n_tokens - 1])
            if int(np.argmax(scores)) != token:
                top2 = np.sort(scores)[-2:]
                assert top2[1] - top2[0] < NEAR_TIE, f"{prompt!r}: llama.cpp parts at step {step} by {top2[1] - top2[0]:.2f}"
                break
            llama.eval([token])


@pytest.mark.oracle
def test_logits_close_to_llama_cpp(smollm2, pipeline, llama):
    """Both engines quantize activations to 8-bit blocks; they differ in summation order and in
    llama.cpp's f16 KV cache. Over a 40-token text the top token agrees almost everywhere and
    no logit is off by more than a small fraction of the logit range."""
    ids = smollm2.tokenizer.encode(
        "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step."
    )
    llama.reset()
    llama.eval(ids)
    ref = np.asarray(llama.scores[: len(ids)])
    hidden = pipeline.forward([Segment("oracle", 0, len(ids))], np.asarray(ids))
    pipeline.end_session("oracle")
    ours = pipeline.head.logits(hidden)
    spread = ref.max(axis=1) - ref.min(axis=1)
    assert np.all(np.abs(ours - ref).max(axis=1) < 0.1 * spread)
    assert np.mean(ours.argmax(axis=1) == ref.argmax(axis=1)) >= 0.9
