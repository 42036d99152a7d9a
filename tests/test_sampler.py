"""The sampler chain against float64 references and seeded empirical frequencies."""

import numpy as np
import pytest

from caravan.pipeline.sampler import (
    Sampler,
    SamplingParams,
    apply_penalties,
    top_k_candidates,
)

NO_FILTERS = dict(top_k=0, top_p=1.0, min_p=0.0)


def random_logits(vocab: int, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(vocab) * scale).astype(np.float32)


def reference_distribution(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The chain's distribution over the whole vocabulary, by full sort in float64."""
    x = logits.astype(np.float64)
    order = sorted(range(x.size), key=lambda i: (-x[i], i))
    keep = order[: p.top_k] if p.top_k else order
    if p.top_p < 1.0:
        probs = np.exp(x[keep] - x[keep].max())
        probs /= probs.sum()
        total, n = 0.0, 0
        while n < len(keep) and total < p.top_p:
            total += probs[n]
            n += 1
        keep = keep[:n]
    if p.min_p > 0.0:
        # p_i / p_max = exp(x_i - x_max), whatever the normaliser.
        keep = [i for i in keep if np.exp(x[i] - x[keep[0]]) >= p.min_p]
    out = np.zeros_like(x)
    out[keep] = np.exp((x[keep] - x[keep].max()) / p.temperature)
    return out / out.sum()


def frequencies(sampler: Sampler, logits: np.ndarray, draws: int) -> np.ndarray:
    counts = np.bincount([sampler.sample(logits) for _ in range(draws)], minlength=logits.size)
    return counts / draws


def test_greedy_is_argmax_and_consumes_no_randomness():
    logits = random_logits(1000)
    sampler = Sampler(SamplingParams(temperature=0.0, seed=3))
    state = sampler._rng.bit_generator.state
    assert sampler.sample(logits) == int(np.argmax(logits))
    assert sampler._rng.bit_generator.state == state


def test_greedy_ties_go_to_the_lowest_id():
    logits = np.array([0.0, 2.0, 1.0, 2.0], dtype=np.float32)
    assert Sampler(SamplingParams(temperature=0.0)).sample(logits) == 1


def test_logits_are_not_modified():
    logits = random_logits(500)
    before = logits.copy()
    Sampler(SamplingParams(seed=0, repeat_penalty=1.3)).sample(logits, [1, 2, 3])
    np.testing.assert_array_equal(logits, before)


def test_same_seed_same_draws_different_seed_different_draws():
    logits = np.zeros(1000, dtype=np.float32)  # uniform: every draw is informative

    def draws(seed):
        sampler = Sampler(SamplingParams(seed=seed, **NO_FILTERS))
        return [sampler.sample(logits) for _ in range(50)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


@pytest.mark.parametrize("temperature", [0.1, 1.0, 5.0, 100.0])
def test_top_k_1_is_greedy_at_any_temperature(temperature):
    logits = random_logits(2000, seed=1)
    sampler = Sampler(SamplingParams(temperature=temperature, top_k=1, top_p=1.0, min_p=0.0))
    assert {sampler.sample(logits) for _ in range(20)} == {int(np.argmax(logits))}


def test_tiny_top_p_is_greedy():
    logits = random_logits(2000, seed=2)
    sampler = Sampler(SamplingParams(temperature=2.0, top_k=0, top_p=1e-6, min_p=0.0, seed=0))
    assert {sampler.sample(logits) for _ in range(20)} == {int(np.argmax(logits))}


def test_min_p_filters_unlikely_tokens():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs).astype(np.float32)
    # p >= 0.2 * 0.5 = 0.1 keeps tokens 0, 1, 2 and drops token 3.
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2, seed=0))
    freq = frequencies(sampler, logits, 5000)
    assert freq[3] == 0.0
    assert np.all(freq[:3] > 0.0)


def test_top_k_ties_keep_the_lowest_ids():
    logits = np.array([1.0, 3.0, 2.0, 2.0, 2.0, 0.0], dtype=np.float32)
    np.testing.assert_array_equal(top_k_candidates(logits, 3), [1, 2, 3])
    np.testing.assert_array_equal(top_k_candidates(logits, 0), [1, 2, 3, 4, 0, 5])
    np.testing.assert_array_equal(top_k_candidates(logits, 99), [1, 2, 3, 4, 0, 5])


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.array([2.0, -1.0, 0.5, 3.0], dtype=np.float32)
    out = apply_penalties(logits, np.array([0, 1, 1, 1]), 2.0)
    # Each token is penalised once, however often it repeated.
    np.testing.assert_allclose(out, [1.0, -2.0, 0.5, 3.0])


def test_repeat_penalty_changes_the_argmax():
    logits = np.array([2.0, 1.9, -1.0], dtype=np.float32)
    greedy = SamplingParams(temperature=0.0, repeat_penalty=1.1)
    assert Sampler(SamplingParams(temperature=0.0)).sample(logits, [0]) == 0
    assert Sampler(greedy).sample(logits, [0]) == 1  # 2.0 / 1.1 < 1.9


def test_repeat_penalty_looks_only_at_the_last_n_tokens():
    logits = np.array([2.0, 1.9, -1.0], dtype=np.float32)
    params = SamplingParams(temperature=0.0, repeat_penalty=1.1, repeat_last_n=2)
    assert Sampler(params).sample(logits, [0, 2, 2]) == 0  # token 0 is outside the window
    assert Sampler(params).sample(logits, [2, 2, 0]) == 1


def reference_penalties(logits, recent, repeat, frequency, presence):
    """llama.cpp's penalties one token at a time, in float64."""
    out = logits.astype(np.float64)
    for token in set(int(t) for t in recent):
        count = sum(1 for t in recent if t == token)
        out[token] = out[token] * repeat if out[token] <= 0 else out[token] / repeat
        out[token] -= count * frequency + presence
    return out


@pytest.mark.parametrize(
    ("repeat", "frequency", "presence"),
    [(1.0, 0.5, 0.0), (1.0, 0.0, 1.5), (1.3, 0.7, -0.4), (0.8, -2.0, 2.0)],
)
def test_penalties_match_reference(repeat, frequency, presence):
    logits = random_logits(300, seed=11)
    recent = np.random.default_rng(12).integers(0, 40, size=64)  # repeats guaranteed
    out = apply_penalties(logits, recent, repeat, frequency, presence)
    np.testing.assert_allclose(out, reference_penalties(logits, recent, repeat, frequency, presence),
                               rtol=1e-6, atol=1e-5)
    untouched = np.setdiff1d(np.arange(300), recent)
    np.testing.assert_array_equal(out[untouched], logits[untouched])


def llama_cpp_bias_and_penalties(logits, recent, bias, last_n, repeat, frequency, presence):
    """The logits after llama.cpp's own logit-bias and penalties samplers (a chain, as
    common_sampler builds it), fed `recent` as the tokens so far."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ctypes = pytest.importorskip("ctypes")
    vocab = logits.size
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    biases = (llama_cpp.llama_logit_bias * len(bias))(*[llama_cpp.llama_logit_bias(t, b) for t, b in bias])
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_logit_bias(vocab, len(bias), biases))
    llama_cpp.llama_sampler_chain_add(
        chain, llama_cpp.llama_sampler_init_penalties(vocab, last_n, repeat, frequency, presence))
    try:
        for token in recent:
            llama_cpp.llama_sampler_accept(chain, int(token))
        data = (llama_cpp.llama_token_data * vocab)(
            *[llama_cpp.llama_token_data(i, float(x), 0.0) for i, x in enumerate(logits)])
        array = llama_cpp.llama_token_data_array(data, vocab, -1, False)
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(array))
        out = np.empty(vocab, dtype=np.float32)
        for i in range(array.size):
            out[data[i].id] = data[i].logit
        return out
    finally:
        llama_cpp.llama_sampler_free(chain)


@pytest.mark.parametrize(
    ("repeat", "frequency", "presence", "last_n"),
    [(1.0, 0.5, 0.0, 64), (1.0, 0.0, 1.5, 64), (1.3, 0.7, -0.4, 32), (0.8, -2.0, 2.0, 8)],
)
def test_bias_and_penalties_match_llama_cpp(repeat, frequency, presence, last_n):
    logits = random_logits(300, seed=13)
    recent = np.random.default_rng(14).integers(0, 40, size=100)
    bias = ((3, -100.0), (5, 7.5), (250, 2.0))
    params = SamplingParams(repeat_penalty=repeat, frequency_penalty=frequency, presence_penalty=presence,
                            repeat_last_n=last_n, logit_bias=bias)
    sampler = Sampler(params)
    ours = sampler._penalised(sampler._biased(logits), list(recent))
    theirs = llama_cpp_bias_and_penalties(logits, recent, bias, last_n, repeat, frequency, presence)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-5)


def test_frequency_penalty_counts_occurrences_presence_does_not():
    logits = np.array([3.0, 2.5, 0.0], dtype=np.float32)
    freq = SamplingParams(temperature=0.0, frequency_penalty=0.3)
    pres = SamplingParams(temperature=0.0, presence_penalty=0.3)
    # Once: 3.0 - 0.3 still beats 2.5; twice: 3.0 - 0.6 does not. Presence stays at one 0.3.
    assert Sampler(freq).sample(logits, [0]) == 0
    assert Sampler(freq).sample(logits, [0, 0]) == 1
    assert Sampler(pres).sample(logits, [0, 0, 0, 0]) == 0


def test_penalties_in_the_chain_match_the_reference_distribution():
    logits = random_logits(10, seed=5, scale=1.0)
    recent = [0, 0, 3, 7, 7, 7]
    params = SamplingParams(temperature=0.9, top_k=6, top_p=0.95, min_p=0.05, repeat_penalty=1.2,
                            frequency_penalty=0.2, presence_penalty=0.1, seed=4)
    penalised = reference_penalties(logits, recent, 1.2, 0.2, 0.1).astype(np.float32)
    expected = reference_distribution(penalised, params)
    sampler = Sampler(params)
    freq = np.bincount([sampler.sample(logits, recent) for _ in range(20_000)], minlength=10) / 20_000
    np.testing.assert_array_equal(freq > 0, expected > 0)
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_logit_bias_is_added_before_the_chain():
    logits = np.array([2.0, 1.0, 0.5, -1.0], dtype=np.float32)
    assert Sampler(SamplingParams(temperature=0.0, logit_bias=((0, -100.0),))).sample(logits) == 1
    assert Sampler(SamplingParams(temperature=0.0, logit_bias=((3, 100.0),))).sample(logits) == 3
    # Before top-k: a token outside the top 1 by its own logit is the one kept.
    biased = SamplingParams(top_k=1, logit_bias=((2, 5.0),), seed=0)
    assert {Sampler(biased).sample(logits) for _ in range(20)} == {2}
    # Before the penalties: the bias lifts token 0 to 5.0, which the repeat penalty then halves.
    both = SamplingParams(temperature=0.0, repeat_penalty=2.0, logit_bias=((0, 3.0), (1, 1.6)))
    assert Sampler(both).sample(logits, [0]) == 1  # 2.5 < 2.6


def test_logit_bias_outside_the_vocabulary_raises():
    with pytest.raises(ValueError, match="logit_bias"):
        Sampler(SamplingParams(logit_bias=((7, 1.0),))).sample(np.zeros(4, dtype=np.float32))


def test_temperature_1_without_filters_matches_softmax():
    logits = np.array([1.0, 0.5, -0.3, 2.0], dtype=np.float32)
    expected = np.exp(logits - logits.max())
    expected /= expected.sum()
    sampler = Sampler(SamplingParams(temperature=1.0, seed=42, **NO_FILTERS))
    freq = frequencies(sampler, logits, 20_000)
    # The largest standard error is sqrt(0.25 / 20000) ~ 0.0035; allow about 4 of them.
    np.testing.assert_allclose(freq, expected, atol=0.015)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.35, seed=1),
        SamplingParams(temperature=1.5, top_k=0, top_p=0.8, min_p=0.0, seed=2),
        SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.1, seed=3),
    ],
)
def test_full_chain_matches_reference_distribution(params):
    # On these logits each case cuts the tail: the first at min-p after top-k and top-p.
    logits = random_logits(10, seed=5, scale=1.0)
    expected = reference_distribution(logits, params)
    freq = frequencies(Sampler(params), logits, 20_000)
    np.testing.assert_array_equal(freq > 0, expected > 0)  # same support
    np.testing.assert_allclose(freq, expected, atol=0.015)


def test_large_vocabulary_with_defaults():
    logits = random_logits(150_000, seed=9)
    sampler = Sampler(SamplingParams(seed=0, repeat_penalty=1.1))
    token = sampler.sample(logits, list(range(100)))
    assert 0 <= token < logits.size
    assert token in set(top_k_candidates(logits, 200).tolist())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", -0.01),
        ("min_p", 1.01),
        ("repeat_penalty", 0.0),
        ("repeat_last_n", -1),
        ("frequency_penalty", float("inf")),
        ("presence_penalty", float("nan")),
        ("logit_bias", ((-1, 1.0),)),
        ("logit_bias", ((1, float("nan")),)),
        ("seed", -5),
    ],
)
def test_invalid_params_raise(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize(
    ("logits", "previous", "expected"),
    [
        (np.zeros((2, 3), dtype=np.float32), (), "1-D"),
        (np.zeros(0, dtype=np.float32), (), "1-D"),
        (np.arange(4, dtype=np.int32), (), "floating"),
        (np.array([0.0, np.nan], dtype=np.float32), (), "NaN"),
        (np.full(3, -np.inf, dtype=np.float32), (), "-inf"),
        (np.zeros(3, dtype=np.float32), (0, 3), "previous_tokens"),
    ],
)
def test_bad_logits_raise(logits, previous, expected):
    sampler = Sampler(SamplingParams(seed=0, repeat_penalty=1.1))
    with pytest.raises(ValueError, match=expected):
        sampler.sample(logits, previous)


@pytest.mark.parametrize(
    ("logits", "expected"),
    [
        (np.zeros((2, 3), dtype=np.float32), "1-D"),
        (np.arange(4, dtype=np.int32), "floating"),
        (np.array([0.0, 1.0, np.nan, 2.0], dtype=np.float32), "NaN"),
        (np.full(3, -np.inf, dtype=np.float32), "-inf"),
    ],
)
def test_bad_logits_raise_in_greedy_too(logits, expected):
    """Greedy without a penalty checks the logits in its one argmax pass."""
    with pytest.raises(ValueError, match=expected):
        Sampler(SamplingParams(temperature=0)).sample(logits, [1, 2])
