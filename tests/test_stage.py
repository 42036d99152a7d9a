"""Stages on tiny seeded models: the whole model against the float64 reference, then the
promises of the seam: a split pipeline, chunked prefill and batched decode give the same
numbers, bit for bit, as one stage running one sequence; and bad batches are refused."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from caravan.pipeline.arena import THP_DIR, HugePages, WeightArena, huge_page_for, read_huge_pages
from caravan.pipeline.generate import Generation, Pipeline
from caravan.pipeline.gguf_file import GGUFFile
from caravan.pipeline.loader import load_model
from caravan.pipeline.model import ModelConfig, ModelError, ModelHead
from caravan.pipeline.stage import KVCache, LayerRange, LocalStage, Segment, StageBatch, StageError
from support import naive
from support.stages import build, greedy, prompt
from support.tiny_models import dequantized_weights, tiny_llama, with_block_scale, write_gguf


def decode_greedy(
    pipeline: Pipeline, ids: np.ndarray, n_new: int, session: str = "s"
) -> tuple[list[int], list[np.ndarray]]:
    """Prefill `ids` in one chunk, then greedy-decode n_new tokens one by one; returns the tokens
    and the last stage's hidden states of every step."""
    hidden = pipeline.forward([Segment(session, 0, len(ids))], ids)
    states, tokens = [hidden], []
    for step in range(n_new):
        token = int(np.argmax(pipeline.head.logits(hidden[-1:])[0]))
        tokens.append(token)
        hidden = pipeline.forward([Segment(session, len(ids) + step, 1)], np.array([token]))
        states.append(hidden)
    return tokens, states


# ---------------------------------------------------------------------------------------------
# The whole model against float64

# Max |logits - reference| / max |reference logits|. F32 weights see unrounded activations; the
# reference rounds its KV cache and softmax weights to f16 as the kernels do, but where the
# kernel's f32 value and the reference's float64 one straddle an f16 rounding midpoint they
# land one f16 step (2**-11) apart (observed <= 9e-5 over 12 seeds; <= 3e-7 before the cache
# was f16). F16 products round activations to
# f16 (2**-11 relative, observed <= 7e-4). Q8_0/Q4_0/Q4_1 products quantize activations to 8-bit
# blocks (up to amax/254 per element) before each of the model's 22 products, and the 3
# random layers pass that on: observed 0.9e-2 .. 1.8e-2. Each bound is about 3x the worst seen.
# A wiring error (RoPE pairs, GQA grouping, a residual) moves logits by O(1), far above these.
LOGIT_TOLERANCE = {QT.F32: 3e-4, QT.F16: 2e-3, QT.Q8_0: 5e-2, QT.Q4_0: 5e-2, QT.Q4_1: 5e-2}


def check_against_reference(path, n_tokens: int = 40) -> None:
    pipeline = build(path)
    ids = prompt(n_tokens)
    logits = pipeline.head.logits(pipeline.forward([Segment("s", 0, n_tokens)], ids))
    gguf = GGUFFile(path)
    ttype = gguf.tensors["blk.0.attn_q.weight"].type
    _, expected = naive.forward_model(dequantized_weights(gguf), pipeline.head.config, ids)
    scale = np.abs(expected).max()
    err = np.abs(logits - expected).max() / scale
    assert err < LOGIT_TOLERANCE[ttype], f"{ttype.name}: max logit error {err:.2e} of {scale:.1f}"


def test_logits_match_float64_reference(tiny_path):
    check_against_reference(tiny_path)


@pytest.mark.parametrize("ttype", (QT.F32, QT.Q4_1), ids=lambda t: t.name)
def test_untied_output_matches_float64_reference(tiny_model_path, ttype):
    check_against_reference(tiny_model_path(weight_type=ttype, tied_output=False, seed=1))


def test_partial_rope_matches_float64_reference(tiny_model_path):
    """rope.dimension_count 8 of head width 16: only the first 8 dims of each head rotate."""
    path = tiny_model_path(weight_type=QT.F32, n_rot=8, seed=2)
    assert build(path).head.config.n_rot == 8
    check_against_reference(path)


# ---------------------------------------------------------------------------------------------
# Same numbers however the work is cut


@pytest.mark.parametrize("ttype", (QT.F32, QT.F16, QT.Q8_0, QT.Q4_0, QT.Q4_1), ids=lambda t: t.name)
def test_split_pipeline_is_bit_identical(tiny_model_path, ttype):
    """Five layers as [5], [2, 3] and [1, 3, 1]: the same hidden states at every step and the
    same greedy tokens, bit for bit."""
    path = tiny_model_path(weight_type=ttype, n_layers=5, seed=3)
    ids = prompt(12, seed=1)
    tokens_one, states_one = decode_greedy(build(path), ids, 8)
    for splits in ([2, 3], [1, 3, 1]):
        pipeline = build(path, splits)
        assert [len(s.layers) for s in pipeline.stages] == splits
        tokens, states = decode_greedy(pipeline, ids, 8)
        assert tokens == tokens_one, splits
        for a, b in zip(states, states_one):
            np.testing.assert_array_equal(a, b)
        # The generation loop sees only the stage list: the same tokens through Generation.
        generation = Generation(pipeline, list(ids), greedy(), max_tokens=8, stop_ids=frozenset())
        assert list(generation) == tokens_one


def test_prefill_chunk_equals_token_by_token(tiny_path):
    """One chunk of 12, chunks of 5 + 7, and 12 single rows: the same logits. allclose is what a
    user needs; they are in fact bit-identical, because every kernel sums each output row in
    one fixed order whatever the number of rows (quants.py's batch invariance; attention row t
    reads positions 0 .. start + t only)."""
    ids = prompt(12, seed=4)
    whole_pipeline = build(tiny_path)
    whole = whole_pipeline.head.logits(whole_pipeline.forward([Segment("s", 0, 12)], ids))

    chunked_pipeline = build(tiny_path)
    first = chunked_pipeline.forward([Segment("s", 0, 5)], ids[:5])
    second = chunked_pipeline.forward([Segment("s", 5, 7)], ids[5:])
    chunked = chunked_pipeline.head.logits(np.concatenate([first, second]))

    single_pipeline = build(tiny_path)
    rows = [single_pipeline.forward([Segment("s", t, 1)], ids[t : t + 1]) for t in range(12)]
    single = single_pipeline.head.logits(np.concatenate(rows))

    for other in (chunked, single):
        np.testing.assert_allclose(other, whole, rtol=1e-5, atol=1e-5 * np.abs(whole).max())
        np.testing.assert_array_equal(other, whole)


def test_batched_decode_equals_each_session_alone(tiny_path):
    """Three sessions of different lengths decoded together in one StageBatch (one row each)
    give what each gives alone, bit for bit; so does a batch mixing a prefill chunk with
    decode rows."""
    prompts = {"a": prompt(5, seed=5), "b": prompt(9, seed=6), "c": prompt(3, seed=7)}
    n_steps = 3

    alone = {}
    for sid, ids in prompts.items():
        tokens, states = decode_greedy(build(tiny_path), ids, n_steps, session=sid)
        alone[sid] = (tokens, states)

    pipeline = build(tiny_path)
    for sid in ("a", "b"):
        pipeline.forward([Segment(sid, 0, len(prompts[sid]))], prompts[sid])
    # alone[sid]: states[0] is the prefill, states[k + 1] the row fed token k at position n + k.
    # "c" joins late: its prefill shares the first batch with decode rows of "a" and "b".
    for step in range(n_steps):
        rows = []  # (segment, token ids, expected hidden)
        for sid in (["b", "a", "c"] if step % 2 else ["c", "a", "b"]):
            n = len(prompts[sid])
            tokens, states = alone[sid]
            if sid == "c" and step == 0:
                rows.append((Segment(sid, 0, n), list(prompts[sid]), states[0]))
            else:
                k = step - 1 if sid == "c" else step
                rows.append((Segment(sid, n + k, 1), [tokens[k]], states[k + 1]))
        hidden = pipeline.forward([seg for seg, _, _ in rows], np.array([i for _, ids, _ in rows for i in ids]))
        at = 0
        for seg, _, expected in rows:
            np.testing.assert_array_equal(hidden[at : at + seg.length], expected, err_msg=f"{seg} at step {step}")
            at += seg.length


# ---------------------------------------------------------------------------------------------
# The KV cache


def test_kv_cache_grows_by_doubling_up_to_n_ctx():
    cache = KVCache(n_layers=2, n_kv_heads=2, head_dim=4, n_ctx=200, initial=64)
    assert cache.k.shape == (2, 2, 4, 64) and cache.v.shape == (2, 2, 64, 4)
    assert cache.k.dtype == cache.v.dtype == np.uint16  # f16 bits
    rng = np.random.default_rng(0)
    k = rng.standard_normal((64, 8)).astype(np.float32)
    v = rng.standard_normal((64, 8)).astype(np.float32)
    for layer in range(2):
        cache.store(layer, 0, k + layer, v - layer)
    before = (cache.k.copy(), cache.v.copy())
    cache.reserve(10)  # fits: nothing moves
    assert cache.capacity == 64
    cache.reserve(65)
    assert cache.k.shape == (2, 2, 4, 128) and cache.v.shape == (2, 2, 128, 4)
    np.testing.assert_array_equal(cache.k[..., :64], before[0])
    np.testing.assert_array_equal(cache.v[:, :, :64], before[1])
    cache.reserve(150)  # doubling would give 256: capped at n_ctx
    assert cache.capacity == 200
    np.testing.assert_array_equal(cache.k[..., :64], before[0])
    np.testing.assert_array_equal(cache.v[:, :, :64], before[1])
    assert cache.nbytes == 2 * (2 * 8 * 200 * 2)
    assert KVCache(1, 2, 4, n_ctx=16).capacity == 16  # never more than n_ctx to begin with


def test_kv_cache_stores_rows_by_head():
    """store() puts row t's head h, rounded to f16, at keys[h, :, t] and values[h, t, :]."""
    cache = KVCache(n_layers=1, n_kv_heads=3, head_dim=4, n_ctx=32, initial=8)
    k = np.random.default_rng(0).standard_normal((5, 12)).astype(np.float32)
    cache.store(0, 2, k, -k)
    keys = cache.k.view(np.float16).astype(np.float32)
    values = cache.v.view(np.float16).astype(np.float32)
    for t in range(5):
        for h in range(3):
            expected = k[t, 4 * h : 4 * h + 4].astype(np.float16).astype(np.float32)
            np.testing.assert_array_equal(keys[0, h, :, 2 + t], expected)
            np.testing.assert_array_equal(values[0, h, 2 + t], -expected)


def test_decoding_across_the_initial_cache_capacity(tiny_q8_path):
    """70 positions fed as a 60-row prefill then 10 single rows cross the cache's initial 64
    positions; the result equals one 70-row prefill, bit for bit."""
    ids = prompt(70, seed=8)
    whole = build(tiny_q8_path).forward([Segment("s", 0, 70)], ids)
    pipeline = build(tiny_q8_path)
    rows = [pipeline.forward([Segment("s", 0, 60)], ids[:60])]
    rows += [pipeline.forward([Segment("s", t, 1)], ids[t : t + 1]) for t in range(60, 70)]
    np.testing.assert_array_equal(np.concatenate(rows), whole)
    cache = pipeline.stages[0].sessions["s"]
    assert cache.length == 70 and cache.capacity == 128


# ---------------------------------------------------------------------------------------------
# Bad batches


@pytest.fixture
def stage(tiny_q8_path):
    """One LocalStage of all three layers, n_ctx 16, with session "s" holding positions 0..4."""
    pipeline = build(tiny_q8_path, n_ctx=16)
    pipeline.forward([Segment("s", 0, 5)], prompt(5))
    return pipeline.stages[0]


def rows(n: int, dim: int = 64) -> np.ndarray:
    return np.random.default_rng(9).standard_normal((n, dim)).astype(np.float32)


def run(stage, *segments, hidden=None):
    if hidden is None:
        hidden = rows(sum(s.length for s in segments))
    return stage.forward(StageBatch(tuple(segments), hidden))


def test_segment_with_a_gap_is_refused(stage):
    with pytest.raises(StageError, match=r"session s: segment starts at 7 but only 5 positions"):
        run(stage, Segment("s", 7, 1))
    assert stage.sessions["s"].length == 5  # nothing changed: the right position still works
    run(stage, Segment("s", 5, 1))
    assert stage.sessions["s"].length == 6


def test_unknown_session_must_start_at_zero(stage):
    with pytest.raises(StageError, match=r"session t is unknown here and does not start at position 0"):
        run(stage, Segment("t", 3, 2))
    assert "t" not in stage.sessions


def test_positions_past_the_context_are_refused(stage):
    with pytest.raises(StageError, match=r"session s: position 16 is past the context size 16"):
        run(stage, Segment("s", 5, 12))
    with pytest.raises(StageError, match=r"past the context size 16"):
        run(stage, Segment("u", 0, 17))
    run(stage, Segment("s", 5, 11))  # exactly fills the context
    assert stage.sessions["s"].length == 16
    with pytest.raises(StageError, match=r"position 16 is past"):
        run(stage, Segment("s", 16, 1))


def test_two_segments_of_one_session_are_refused(stage):
    with pytest.raises(StageError, match=r"at most one segment per session"):
        run(stage, Segment("s", 5, 1), Segment("s", 6, 1))
    assert stage.sessions["s"].length == 5


@pytest.mark.parametrize(
    "length, start", [(0, 5), (-1, 5), (1, -1)], ids=["empty", "negative-length", "negative-start"]
)
def test_empty_or_negative_segments_are_refused(stage, length, start):
    with pytest.raises(StageError, match=r"empty or negative segment|does not match the batch"):
        run(stage, Segment("s", start, length), hidden=rows(max(length, 0)))


@pytest.mark.parametrize(
    "hidden",
    [rows(1, 63), rows(1, 65), rows(2), np.zeros(64, np.float32), np.zeros((1, 1, 64), np.float32)],
    ids=["narrow", "wide", "too-many-rows", "1-d", "3-d"],
)
def test_hidden_state_of_the_wrong_shape_is_refused(stage, hidden):
    with pytest.raises(StageError, match=r"does not match the batch's segments and dim 64"):
        run(stage, Segment("s", 5, 1), hidden=hidden)
    assert stage.sessions["s"].length == 5


def test_a_refused_batch_leaves_no_session_behind(stage):
    """A batch refused because of its second segment must not register the first one's new
    session (a node would otherwise hold a cache for a session that never ran)."""
    with pytest.raises(StageError):
        run(stage, Segment("new", 0, 1), Segment("ghost", 3, 1))
    assert set(stage.sessions) == {"s"}


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_a_non_finite_hidden_state_is_refused_before_any_session_changes(stage, value):
    hidden = rows(3)
    hidden[2, 7] = value  # the new session's second row
    with pytest.raises(StageError, match=r"session new: the hidden state given to layers \[0, 3\) holds NaN or Inf"):
        run(stage, Segment("s", 5, 1), Segment("new", 0, 2), hidden=hidden)
    assert set(stage.sessions) == {"s"} and stage.sessions["s"].length == 5


@pytest.mark.parametrize("start", [5, 3], ids=["next-position", "rewound"])
def test_a_batch_that_fails_in_its_layers_leaves_no_session_and_no_stale_position(tiny_q8_path, stage, start):
    """A batch whose activations overflow in the layers (one layer's FFN norm weights made huge)
    is refused, starts no session, and leaves a session it extended only the positions before its
    segment; that session then computes as if the batch had never come."""
    kept = stage.weights[1]
    stage.weights[1] = dataclasses.replace(kept, ffn_norm=kept.ffn_norm * np.float32(1e30))
    with pytest.raises(StageError, match=r"session s, new: the hidden state became NaN or Inf in layers \[0, 3\)"):
        run(stage, Segment("s", start, 1), Segment("new", 0, 2))
    assert set(stage.sessions) == {"s"} and stage.sessions["s"].length == start
    stage.weights[1] = kept
    fresh = build(tiny_q8_path, n_ctx=16)
    fresh.forward([Segment("s", 0, 5)], prompt(5))
    x = rows(1)
    expected = fresh.stages[0].forward(StageBatch((Segment("s", start, 1),), x))
    assert np.array_equal(run(stage, Segment("s", start, 1), hidden=x), expected)


def with_value(tensors, name, value):
    """tensors with one value of the float matrix or vector `name` set to value."""
    array, ttype = tensors[name]
    array = array.copy()
    array.reshape(-1)[array.size // 2] = value
    return {**tensors, name: (array, ttype)}


@pytest.mark.parametrize("ttype, name, value, in_scales", [
    (QT.Q8_0, "blk.1.attn_q.weight", np.nan, True),
    (QT.Q4_1, "blk.2.ffn_down.weight", np.inf, True),
    (QT.Q4_0, "token_embd.weight", -np.inf, True),
    (QT.F16, "blk.0.attn_v.weight", np.inf, False),
    (QT.F32, "blk.2.ffn_gate.weight", np.nan, False),
    (QT.Q8_0, "blk.1.ffn_norm.weight", np.nan, False),
], ids=["q8_0-scale", "q4_1-scale", "q4_0-embedding-scale", "f16-value", "f32-value", "norm-weight"])
def test_non_finite_weights_are_one_error_at_load_naming_the_tensor(tmp_path, ttype, name, value, in_scales):
    metadata, tensors = tiny_llama(weight_type=ttype)
    if in_scales:
        tensors, expected = with_block_scale(tensors, name, value, row=3, block=1), " in its block scales;"
    else:
        tensors, expected = with_value(tensors, name, value), ";"
    path = write_gguf(tmp_path / "damaged.gguf", metadata, tensors)
    with pytest.raises(ModelError, match=re.escape(f"{name}: non-finite values (NaN or Inf){expected}")):
        load_model(path).local_pipeline(16)


def test_an_empty_batch_is_refused_as_a_stage_error(stage):
    with pytest.raises(StageError):
        run(stage, hidden=np.zeros((0, 64), np.float32))


def test_pipeline_stages_must_tile_the_layers(tiny_q8_path):
    gguf = GGUFFile(tiny_q8_path)
    config = ModelConfig.from_metadata(gguf.metadata, 300)
    head = ModelHead(gguf, config)

    def stage_of(start, stop):
        return LocalStage.load(gguf, config, LayerRange(start, stop), 16)

    Pipeline(head, [stage_of(0, 1), stage_of(1, 3)], 16)  # fine
    with pytest.raises(ValueError, match=r"gap or overlap at layer 1 \(next stage starts at 2\)"):
        Pipeline(head, [stage_of(0, 1), stage_of(2, 3)], 16)
    with pytest.raises(ValueError, match=r"gap or overlap at layer 2 \(next stage starts at 1\)"):
        Pipeline(head, [stage_of(0, 2), stage_of(1, 3)], 16)
    with pytest.raises(ValueError, match=r"gap or overlap at layer 0"):
        Pipeline(head, [stage_of(1, 3)], 16)
    with pytest.raises(ValueError, match=r"cover layers \[0, 2\) of 3"):
        Pipeline(head, [stage_of(0, 2)], 16)
    with pytest.raises(ValueError, match=r"past the model's 3 layers"):
        stage_of(2, 4)
    with pytest.raises(ValueError, match=r"empty or negative"):
        LayerRange(2, 2)


# ---------------------------------------------------------------------------------------------
# Ending sessions


def test_end_session_frees_the_cache(stage):
    run(stage, Segment("t", 0, 3))
    stage.end_session("s")
    assert set(stage.sessions) == {"t"}
    with pytest.raises(StageError, match="unknown here"):
        run(stage, Segment("s", 5, 1))
    stage.end_session("never-seen")  # ending an unknown session is a no-op
    run(stage, Segment("s", 0, 1))  # a new session of the same name starts over
    assert stage.sessions["s"].length == 1


def test_copied_session_decodes_as_if_it_had_prefilled(tiny_path):
    """copy_session gives a session the source's cached prompt (positions 0 .. n - 1, even
    when the source went further): it then decodes bit for bit as one that ran the prompt."""
    ids = prompt(70, seed=3)  # past the cache's initial 64 positions
    tokens, states = decode_greedy(build(tiny_path, splits=[1, 2]), ids, 3)
    pipeline = build(tiny_path, splits=[1, 2])
    pipeline.forward([Segment("source", 0, len(ids))], ids)
    pipeline.forward([Segment("source", len(ids), 1)], np.array([7]))  # the source moves on
    pipeline.copy_session("source", "copy", len(ids))
    for step in range(3):
        hidden = pipeline.forward([Segment("copy", len(ids) + step, 1)], np.array([tokens[step]]))
        np.testing.assert_array_equal(hidden, states[step + 1])


def test_copy_session_refuses_what_it_cannot_copy(stage):
    run(stage, Segment("s", 0, 3))
    with pytest.raises(StageError, match="unknown here"):
        stage.copy_session("nope", "t", 1)
    with pytest.raises(StageError, match="cannot copy 4"):
        stage.copy_session("s", "t", 4)
    run(stage, Segment("t", 0, 1))
    with pytest.raises(StageError, match="exists already"):
        stage.copy_session("s", "t", 2)


def test_generation_frees_every_stage_cache(tiny_q8_path):
    pipeline = build(tiny_q8_path, [1, 2])
    generation = Generation(pipeline, list(prompt(6)), greedy(), max_tokens=3, stop_ids=frozenset())
    tokens = list(generation)
    assert len(tokens) == 3 and generation.finish_reason == "length"
    assert all(not stage.sessions for stage in pipeline.stages)

    generation = Generation(pipeline, list(prompt(6)), greedy(), max_tokens=50, stop_ids=frozenset())
    iterator = iter(generation)
    next(iterator)
    assert all(generation.sequence.session_id in stage.sessions for stage in pipeline.stages)
    iterator.close()  # a client that goes away
    assert all(not stage.sessions for stage in pipeline.stages)


# ---------------------------------------------------------------------------------------------
# Through the loader


def test_loader_builds_the_same_pipeline(tiny_q8_path):
    from caravan.pipeline.loader import load_model

    model = load_model(tiny_q8_path)
    assert model.config == build(tiny_q8_path).head.config
    assert model.tokenizer.vocab_size == 300
    ids = np.array(model.tokenizer.encode("the theory is here", add_bos=True))
    assert ids[0] == 299 and len(ids) < len("the theory is here")  # BOS, and merges applied
    pipeline = model.local_pipeline(64)
    assert pipeline.n_ctx == 64
    got = pipeline.forward([Segment("s", 0, len(ids))], ids)
    np.testing.assert_array_equal(got, build(tiny_q8_path, n_ctx=64).forward([Segment("s", 0, len(ids))], ids))
    assert model.local_pipeline(10_000).n_ctx == 256  # capped at the trained context


def test_generation_stops_at_the_context(tiny_q8_path):
    """n_ctx 16 and a 10-token prompt: positions 10..15 take six generated tokens, and the
    seventh, sampled from position 15's logits, is the last (it is never fed back)."""
    from caravan.pipeline.generate import ContextFullError

    pipeline = build(tiny_q8_path, n_ctx=16)
    generation = Generation(pipeline, list(prompt(10)), greedy(), max_tokens=100, stop_ids=frozenset())
    assert len(list(generation)) == 7 and generation.finish_reason == "length"
    with pytest.raises(ContextFullError, match="prompt of 16 tokens does not fit the context of 16 tokens"):
        Generation(pipeline, list(prompt(16)), greedy(), max_tokens=1, stop_ids=frozenset())


def test_generation_stops_at_an_end_of_generation_token(tiny_q8_path):
    pipeline = build(tiny_q8_path)
    first = list(Generation(pipeline, list(prompt(6)), greedy(), max_tokens=8, stop_ids=frozenset()))
    # Stop at the first token not seen before it (or at once, if greedy repeats one token).
    cut = next((i for i in range(1, len(first)) if first[i] not in first[:i]), 0)
    generation = Generation(pipeline, list(prompt(6)), greedy(), max_tokens=8, stop_ids=frozenset({first[cut]}))
    assert list(generation) == first[:cut] and generation.finish_reason == "stop"


# ---------------------------------------------------------------------------------------------
# The weights' memory


def _mapping_flags(address: int) -> list[str]:
    """VmFlags of the mapping of this process that holds `address` (Linux's /proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        first = line.split()[0]
        if "-" in first and ":" not in first:
            lo, hi = (int(x, 16) for x in first.split("-"))
            inside = lo <= address < hi
        elif inside and first == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("ttype", [QT.Q8_0, QT.Q4_1, QT.F32])
def test_a_stages_matrices_share_one_block(tiny_model_path, ttype):
    stage = build(tiny_model_path(weight_type=ttype)).stages[0]
    run = [*stage.qkv, *stage.gate_up, *(m for w in stage.weights for m in (w.attn_output, w.ffn_down))]
    parts = [m for w in stage.weights for m in (w.attn_q, w.attn_k, w.attn_v, w.ffn_gate, w.ffn_up)]  # views of the stacks
    block = run[0].arrays[0]
    while isinstance(block.base, np.ndarray):
        block = block.base
    start = block.ctypes.data
    for a in (a for m in run for a in m.arrays):
        assert a.flags.c_contiguous and a.ctypes.data % 64 == 0
    for a in (a for m in run + parts for a in m.arrays):
        assert start <= a.ctypes.data and a.ctypes.data + a.nbytes <= start + block.nbytes


def _thp_dir(tmp_path: Path, enabled: str, pmd_size: int | None = None) -> Path:
    """A stand-in for /sys/kernel/mm/transparent_hugepage."""
    (tmp_path / "enabled").write_text(enabled + "\n")
    if pmd_size is not None:
        (tmp_path / "hpage_pmd_size").write_text(f"{pmd_size}\n")
    return tmp_path


def test_huge_pages_follow_the_kernels_page_size_and_setting(tmp_path):
    assert [huge_page_for(page) for page in (4 << 10, 16 << 10, 64 << 10)] == [2 << 20, 32 << 20, 512 << 20]
    assert read_huge_pages(_thp_dir(tmp_path, "always [madvise] never", 32 << 20), 16 << 10) == HugePages(16 << 10, 32 << 20, True)
    assert read_huge_pages(_thp_dir(tmp_path, "[always] madvise never"), 16 << 10).enabled
    assert read_huge_pages(_thp_dir(tmp_path, "always madvise [never]", 2 << 20), 4 << 10) == HugePages(4 << 10, 2 << 20, False)
    # A kernel built without transparent huge pages has no such directory.
    assert read_huge_pages(tmp_path / "missing", 16 << 10) == HugePages(16 << 10, 32 << 20, False)


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_the_arena_advises_whole_huge_pages_from_their_boundary(tmp_path):
    """With 32 MiB huge pages (a 16 KiB-page kernel's): a 40 MiB arena starts on a 32 MiB boundary,
    its first 32 MiB advised and its tail not. The advice holds where this kernel has
    transparent huge pages at all."""
    pages = read_huge_pages(_thp_dir(tmp_path, "always [madvise] never", 32 << 20))
    arena = WeightArena(40 << 20, pages)
    start = arena.take((1,), np.uint8).ctypes.data
    if os.path.exists(THP_DIR):
        assert arena.huge_bytes == 32 << 20
    if arena.huge_bytes:
        assert start % (32 << 20) == 0
        assert "hg" in _mapping_flags(start) and "hg" not in _mapping_flags(start + (32 << 20))
    else:
        assert "hg" not in _mapping_flags(start)


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc/self/smaps")
def test_the_arena_asks_for_no_huge_pages_where_they_are_off(tmp_path):
    pages = read_huge_pages(_thp_dir(tmp_path, "always madvise [never]", 2 << 20))
    arena = WeightArena(5 << 20, pages)
    assert arena.huge_bytes == 0
    assert "hg" not in _mapping_flags(arena.take((1,), np.uint8).ctypes.data)




def test_the_arena_hands_out_aligned_arrays_until_it_is_full():
    arena = WeightArena(100)  # rounded up to one page
    a = arena.take((3, 5), np.uint16)
    b = arena.concatenate([np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((1, 3), np.float32)])
    assert a.ctypes.data % 64 == 0 and b.ctypes.data % 64 == 0 and b.ctypes.data - a.ctypes.data == 64
    assert np.array_equal(b, [[0, 1, 2], [3, 4, 5], [1, 1, 1]])
    with pytest.raises(MemoryError, match="full"):
        arena.take((2 << 20,), np.uint8)
