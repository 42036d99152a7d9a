"""`caravan perplexity` gives llama-perplexity's figure: the same windows, the same BOS rule and
the same scored half, checked against llama.cpp's own logits on a model that adds no BOS
(SmolLM2) and one that does (Gemma 3)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from caravan.pipeline import perplexity
from support.llama_cpp_taps import LLAMA_CPP_THREADS

pytestmark = [pytest.mark.model, pytest.mark.oracle]

N_CTX = 128
N_WINDOWS = 3
# Public domain (Jane Austen, Pride and Prejudice, 1813).
TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be on "
    "his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
    "families, that he is considered the rightful property of some one or other of their daughters. "
    "\"My dear Mr. Bennet,\" said his lady to him one day, \"have you heard that Netherfield Park is let "
    "at last?\" Mr. Bennet replied that he had not. \"But it is,\" returned she; \"for Mrs. Long has just "
    "been here, and she told me all about it.\" Mr. Bennet made no answer. \"Do you not want to know who "
    "has taken it?\" cried his wife impatiently. \"You want to tell me, and I have no objection to hearing "
    "it.\" This was invitation enough. \"Why, my dear, you must know, Mrs. Long says that Netherfield is "
    "taken by a young man of large fortune from the north of England; that he came down on Monday in a "
    "chaise and four to see the place, and was so much delighted with it, that he agreed with Mr. Morris "
    "immediately; that he is to take possession before Michaelmas, and some of his servants are to be in "
    "the house by the end of next week.\" \"What is his name?\" \"Bingley.\" \"Is he married or single?\" "
    "\"Oh! Single, my dear, to be sure! A single man of large fortune; four or five thousand a year. What "
    "a fine thing for our girls!\" \"How so? How can it affect them?\" \"My dear Mr. Bennet,\" replied his "
    "wife, \"how can you be so tiresome! You must know that I am thinking of his marrying one of them.\" "
    "\"Is that his design in settling here?\" \"Design! Nonsense, how can you talk so! But it is very "
    "likely that he may fall in love with one of them, and therefore you must visit him as soon as he "
    "comes.\""
)


def llama_cpp_perplexity(model_path, text: str, n_ctx: int, n_windows: int) -> tuple[float, int]:
    """llama-perplexity's procedure on llama.cpp's own tokens and logits (llama-cpp-python ships
    no llama-perplexity binary)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the reference engine) is not installed")
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=LLAMA_CPP_THREADS,
                          logits_all=True,
                          verbose=False)
    # common_tokenize(text, add_special=true, parse_special=false): a BOS only where the model adds one.
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    bos = llm.tokenize(b"", add_bos=True, special=False)  # [BOS] where llama.cpp adds one, else []
    assert len(ids) >= n_windows * n_ctx, f"the text is {len(ids)} tokens; the test needs {n_windows * n_ctx}"
    first, nll = n_ctx // 2, []
    for w in range(n_windows):
        window = list(ids[w * n_ctx : (w + 1) * n_ctx])
        if bos:
            window[0] = bos[0]
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[first : n_ctx - 1], dtype=np.float64)  # (scored, vocab)
        nll.extend(perplexity.log_z(logits) - logits[np.arange(len(logits)), window[first + 1 :]])
    return math.exp(float(np.mean(nll))), len(nll)


def caravan_perplexity(model_path, tmp_path, n_ctx: int, n_windows: int) -> dict:
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT * 2, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "caravan.coordinator", "perplexity", str(text_file), "--model", str(model_path),
         "--ctx", str(n_ctx), "--max-windows", str(n_windows), "--json", "-t", "2"],
        capture_output=True, text=True, env={**os.environ, "PYTHONIOENCODING": "utf-8"}, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# Each model's tolerance is well inside what a wrong BOS rule does to its figure: a BOS before
# SmolLM2's text moves it by about 3% here, Gemma 3's windows without one more than double it.
@pytest.mark.parametrize("model, tolerance", [("smollm2_path", 0.01), ("gemma3_path", 0.02)])
def test_perplexity_is_llama_perplexitys(model, tolerance, request, tmp_path):
    """SmolLM2's metadata says to add no BOS; Gemma 3's says to add one, to every window."""
    path = request.getfixturevalue(model)
    reference, n_scored = llama_cpp_perplexity(path, TEXT * 2, N_CTX, N_WINDOWS)
    ours = caravan_perplexity(path, tmp_path, N_CTX, N_WINDOWS)
    assert ours["n_scored"] == n_scored == N_WINDOWS * (N_CTX - 1 - N_CTX // 2)
    # The two engines round differently, so their figures agree closely, not exactly.
    assert ours["ppl"] == pytest.approx(reference, rel=tolerance), (ours["ppl"], reference)


def test_windows_follow_the_bos_metadata(smollm2, gemma3):
    text = TEXT * 2
    plain = perplexity.windows(smollm2.tokenizer, text, N_CTX)
    assert not smollm2.tokenizer.add_bos
    assert plain.reshape(-1).tolist() == smollm2.tokenizer.encode(text, special=False)[: plain.size]
    with_bos = perplexity.windows(gemma3.tokenizer, text, N_CTX)
    assert gemma3.tokenizer.add_bos
    assert (with_bos[:, 0] == gemma3.tokenizer.bos_id).all()
    ids = gemma3.tokenizer.encode(text, special=False)
    assert with_bos[1, 1:].tolist() == ids[N_CTX + 1 : 2 * N_CTX]
