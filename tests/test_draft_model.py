"""The draft model (`--draft`, pipeline/draft_model.py): SmolLM2 requantized to Q4_0 by
`caravan quantize` drafts for SmolLM2 (the two disagree now and then), and the text is exactly
the model's own, in one process, in the server's scheduler and through 3 real nodes."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from caravan.coordinator.cli import main
from caravan.coordinator.failover import ClusterPipeline
from caravan.coordinator.scheduler import Event, Request, Scheduler
from caravan.pipeline.draft_model import DraftModel, DraftModelError, check_vocabulary
from caravan.pipeline.generate import Generation
from caravan.pipeline.loader import load_model
from caravan.pipeline.sampler import Sampler, SamplingParams
from caravan.pipeline.stage import Segment
from caravan.pipeline.tokenizer import Tokenizer
from support.nodes import cluster_token
from support.speculation import three_nodes  # noqa: F401  (a fixture)
from support.serve import MODEL, Server
from support.stages import greedy
from support.tiny_models import tiny_llama
from support.cli import caravan, env  # noqa: F401  (env: the fixture of a private CARAVAN_HOME)

pytestmark = pytest.mark.model

N_CTX = 512
DRAFT_MAX = 4
N_TOKENS = 40

PARAGRAPH = ("The caravan crossed the desert in seven days. Each evening the travellers pitched their tents "
             "near a well, fed the camels and told stories about the cities they would reach.")
MESSAGES = [f"Repeat this paragraph exactly:\n\n{PARAGRAPH}",  # copy-heavy: drafts kept whole
            "What should I cook tonight? Give me three ideas.",  # open chat
            "Write a short poem about a llama who learns to swim."]


@pytest.fixture(scope="session")
def draft_path(smollm2_path, tmp_path_factory):
    """SmolLM2 requantized to Q4_0 with `caravan quantize`, made once."""
    path = tmp_path_factory.mktemp("draft") / "smollm2-q4_0.gguf"
    assert main(["quantize", str(smollm2_path), str(path), "--type", "Q4_0", "--json"]) == 0
    return path


@pytest.fixture(scope="module")
def draft(draft_path):
    shared = DraftModel(load_model(draft_path), N_CTX, DRAFT_MAX)
    yield shared
    shared.close()


@pytest.fixture(scope="module")
def target(smollm2):
    return smollm2.local_pipeline(N_CTX)


def chat_prompt(model, message: str) -> list[int]:
    text = model.chat_template.render([{"role": "user", "content": message}], add_generation_prompt=True)
    return model.tokenizer.encode(text, special=True)


@pytest.mark.slow
def test_the_draft_models_greedy_text_is_the_models(smollm2, target, draft):
    """Greedy ids with the draft model equal the ids without speculation, for prompts where the
    draft is rejected at its first token and where a draft of DRAFT_MAX is kept whole; each
    guess is made from a draft session that holds the sequence's history (rolled back past
    rejected guesses) and the guess but its last token, and the session is gone once the
    generation ends."""
    stage = draft.pipeline.stages[0]
    rejected_at_first = kept_whole = 0
    for message in MESSAGES:
        ids = chat_prompt(smollm2, message)
        alone = list(Generation(target, ids, greedy(), N_TOKENS, smollm2.tokenizer.eog_ids))
        drafter = draft.drafter()
        propose = drafter.propose

        def checked(history, limit, drafter=drafter, propose=propose):
            guess = propose(history, limit)
            assert drafter.fed == [*history, *guess[:-1]]  # all but the last guess fed
            assert stage.sessions[drafter.session_id].length == len(drafter.fed)
            return guess

        drafter.propose = checked
        generation = Generation(target, ids, greedy(), N_TOKENS, smollm2.tokenizer.eog_ids, drafter=drafter)
        assert list(generation) == alone, message
        assert draft.sessions == 0
        rejected_at_first += drafter.rejected_at_first
        kept_whole += drafter.kept_whole
    assert rejected_at_first > 0 and kept_whole > 0


@pytest.mark.slow
def test_sampled_text_with_greedy_or_drawn_drafts(smollm2, target, draft):
    """At temperature > 0 a seed gives the same text with greedy drafts (a point mass) as without
    the draft model; with drafts drawn at the request's settings (what run, chat and serve do)
    the same seed gives the same text again, and drafts are kept."""
    ids = chat_prompt(smollm2, MESSAGES[2])
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, seed=7)
    alone = list(Generation(target, ids, Sampler(params), N_TOKENS, smollm2.tokenizer.eog_ids))
    drafter = draft.drafter()
    generation = Generation(target, ids, Sampler(params), N_TOKENS, smollm2.tokenizer.eog_ids, drafter=drafter)
    assert list(generation) == alone
    assert generation.sequence.accepted > 0 and drafter.passes > 0
    drawn = [Generation(target, ids, Sampler(params), N_TOKENS, smollm2.tokenizer.eog_ids, drafter=draft.drafter(params))
             for _ in range(2)]
    assert list(drawn[0]) == list(drawn[1]) and drawn[0].sequence.accepted > 0
    assert draft.sessions == 0


@pytest.mark.slow
def test_every_stage_keeps_only_accepted_positions(smollm2, draft):
    """Over a pipeline of three stages: each pass starts at the sequence's accepted length, and
    after a pass that rejected draft tokens each stage's first accepted-length positions hold
    exactly the keys and values a plain prefill of the accepted tokens gives; the rows of the
    rejected tokens lie past them, to be overwritten by the next pass."""
    from caravan.pipeline.generate import Pipeline
    from caravan.pipeline.stage import LayerRange, LocalStage

    c = smollm2.config
    stages = [LocalStage.load(smollm2.file, c, LayerRange(a, b), N_CTX) for a, b in ((0, 10), (10, 20), (20, c.n_layers))]
    pipeline, plain = Pipeline(smollm2.head, stages, N_CTX), Pipeline(smollm2.head, stages, N_CTX)
    passes = []  # every batch of the generation's the first stage runs: the prompt's chunks, then the passes
    forward = stages[0].forward

    def recorded(batch):
        if batch.segments[0].session_id != "reference":
            passes.append(batch.segments[0])
        return forward(batch)
    stages[0].forward = recorded
    ids = chat_prompt(smollm2, MESSAGES[1])
    generation = Generation(pipeline, ids, greedy(), N_TOKENS, smollm2.tokenizer.eog_ids, drafter=draft.drafter())
    seq, seen, next_start, checked = generation.sequence, 0, 0, 0
    for _ in generation:
        if len(passes) == seen:
            continue  # another token of the pass already checked
        seen, last = len(passes), passes[-1]
        assert last.start == next_start
        next_start = seq.accepted_length
        for stage in stages:
            assert stage.sessions[seq.session_id].length == last.start + last.length
        rejected = last.start + last.length > seq.accepted_length  # rows of rejected tokens in the caches
        if rejected and checked < 2 and not seq.finished:
            n = seq.accepted_length
            plain.prefill("reference", seq.history[:n])
            for stage in stages:
                mine, reference = stage.sessions[seq.session_id], stage.sessions["reference"]
                np.testing.assert_array_equal(mine.k[..., :n], reference.k[..., :n])
                np.testing.assert_array_equal(mine.v[:, :, :n], reference.v[:, :, :n])
            plain.end_session("reference")
            checked += 1
    assert checked > 0 and all(stage.sessions == {} for stage in stages)


def serve(pipeline, prompts: list[list[int]], eog: frozenset[int], **settings) -> tuple[list[list[Event]], Scheduler]:
    """Each prompt's events from one scheduler (settings: Scheduler's), all submitted at once."""
    scheduler = Scheduler(pipeline, **settings)
    events: list[list[Event]] = [[] for _ in prompts]
    done = threading.Semaphore(0)
    try:
        for ids, got in zip(prompts, events):
            on_event = lambda e, got=got: (got.append(e), done.release() if e.kind != "token" else None)  # noqa: E731
            scheduler.submit(Request(ids, greedy(), 12, eog, on_event))
        for _ in prompts:
            assert done.acquire(timeout=300)
    finally:
        scheduler.close()
    return events, scheduler


def test_the_scheduler_drafts_with_the_model_and_leaks_no_session(smollm2, target, draft):
    """Many requests through the server's scheduler (two lanes drafting on the one draft model):
    the tokens are those without speculation, and no draft session outlives its request."""
    prompts = [chat_prompt(smollm2, f"{message} ({i})") for i in range(3) for message in MESSAGES]
    eog = smollm2.tokenizer.eog_ids
    plain, _ = serve(target, prompts, eog, draft_max=0)
    drafted, scheduler = serve(target, prompts, eog, drafter=draft.drafter, lanes=2)
    assert drafted == plain
    assert scheduler.draft_tokens_accepted > 0
    assert draft.sessions == 0


def test_a_draft_model_of_another_vocabulary_is_refused(smollm2, tiny_q8_path, draft_path):
    """Another number of tokens, or the same number with another text for one of them."""
    tiny = load_model(tiny_q8_path)
    with pytest.raises(DraftModelError, match=r"^--draft tiny: its vocabulary has 300 tokens, the model's 49152; "):
        check_vocabulary(smollm2.tokenizer, tiny.tokenizer, "tiny")
    metadata, _ = tiny_llama()
    tokens = list(metadata["tokenizer.ggml.tokens"])
    tokens[100], tokens[101] = tokens[101], tokens[100]
    swapped = Tokenizer.from_metadata({**metadata, "tokenizer.ggml.tokens": tokens})
    with pytest.raises(DraftModelError, match=rf"^--draft swapped: token 100 is {tokens[100]!r} there but "):
        check_vocabulary(tiny.tokenizer, swapped, "swapped")
    check_vocabulary(smollm2.tokenizer, load_model(draft_path).tokenizer, "q4_0")  # the same tokens


@pytest.mark.slow
def test_the_draft_model_through_three_nodes_and_a_node_killed_mid_speculation(smollm2, target, draft, three_nodes,
                                                                                 tmp_path):
    """Through 3 real node processes the draft model gives one process's greedy text, and every
    pass's rows, those after a rejection included, have the bits the same segments give in this
    process: the nodes attend to the accepted positions only, as LocalStage does (checked in
    test_every_stage_keeps_only_accepted_positions). A node killed right after a pass that
    rejected draft tokens changes nothing either. One pass at a time, so that the kill follows a
    rejected pass; batches in flight through a kill are test_pipelined_speculation's."""
    ids, eog = chat_prompt(smollm2, MESSAGES[1]), smollm2.tokenizer.eog_ids
    alone = list(Generation(target, ids, greedy(), N_TOKENS, eog))
    addresses = [node.address for node in three_nodes]
    pipeline = ClusterPipeline(smollm2, lambda: list(addresses), N_CTX, tmp_path, progress=False,
                               forward_timeout_s=10.0, token=cluster_token())
    passes = []  # (segment, token ids, hidden) of each decode pass, in the order the stages ran them
    forward, submit = pipeline.forward, pipeline.submit

    def recorded(segments, token_ids):
        hidden = forward(segments, token_ids)
        passes.append((segments[0], token_ids, hidden))
        return hidden

    def recorded_submit(segments, token_ids):
        answer = submit(segments, token_ids)

        def hidden():
            rows = answer()
            passes.append((segments[0], token_ids, rows))
            return rows
        return hidden

    pipeline.forward, pipeline.submit = recorded, recorded_submit
    try:
        assert len(pipeline.plan.assignments) == 3
        generation = Generation(pipeline, ids, greedy(), N_TOKENS, eog, drafter=draft.drafter(), in_flight=1)
        assert list(generation) == alone
        assert generation.sequence.drafted > generation.sequence.accepted > 0 and passes
        target.prefill("mirror", ids)
        for segment, token_ids, hidden in passes:
            mirror = target.forward([Segment("mirror", segment.start, segment.length)], token_ids)
            np.testing.assert_array_equal(hidden, mirror)
        target.end_session("mirror")

        passes.clear()
        generation = Generation(pipeline, ids, greedy(), N_TOKENS, eog, drafter=draft.drafter(), in_flight=1)
        tokens = []
        for token in generation:
            tokens.append(token)
            last = passes[-1][0] if passes else None
            rejected = last is not None and last.start + last.length > generation.sequence.accepted_length
            if rejected and not pipeline.recoveries and three_nodes[1].proc.poll() is None:
                three_nodes[1].kill()  # its rows past the accepted length are in every stage's cache
        assert tokens == alone
        assert len(pipeline.recoveries) == 1 and three_nodes[1].address in pipeline.recoveries[0]
        assert draft.sessions == 0
    finally:
        pipeline.close()


@pytest.mark.slow
def test_cli_run_with_a_draft_model_gives_the_same_tokens(env, draft_path):
    run = ("run", "The llama is a domesticated", "--json", "--temperature", "0", "--max-tokens", "16", "--threads", "1")
    plain = caravan(env, *run, "--no-speculate")
    drafted = caravan(env, *run, "--draft", str(draft_path), "--draft-max", "3")
    assert plain.returncode == 0 and drafted.returncode == 0, drafted.stderr
    plain, drafted = json.loads(plain.stdout), json.loads(drafted.stdout)
    assert drafted["tokens"] == plain["tokens"] and drafted["timings"]["tokens_per_pass"] > 1


@pytest.mark.slow
def test_cli_refuses_a_draft_it_cannot_use_in_one_line(env, tiny_q8_path, tmp_path):
    """Another vocabulary, a file that is not GGUF, a missing file: one line, exit status 1, for
    run (before anything runs) and serve (before it listens)."""
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a model at all")
    cases = [(tiny_q8_path, "its vocabulary has 300 tokens, the model's 49152"), (garbage, "not a GGUF file"),
             (tmp_path / "missing.gguf", "no such file")]
    for path, reason in cases:
        for verb in (("run", "Hello"), ("serve", "--port", "0")):
            result = caravan(env, *verb, "--draft", str(path))
            assert result.returncode == 1 and result.stdout == "", result
            assert result.stderr.startswith(f"caravan: error: --draft {path}: ") and reason in result.stderr
            assert result.stderr.count("\n") == 1, result.stderr


@pytest.mark.slow
def test_serve_with_a_draft_model_answers_each_request_as_alone(draft_path, smollm2, alone):
    """`caravan serve --draft`: concurrent greedy requests (one with n = 2) get the text each
    gets alone without speculation."""
    server = Server("--draft", str(draft_path), "--draft-max", "4")
    try:
        prompts = [f"{message} ({i})" for i in range(2) for message in MESSAGES]
        answers: dict[int, dict] = {}

        def ask(i: int) -> None:
            body = {"model": MODEL, "prompt": prompts[i], "max_tokens": 12, "temperature": 0, "n": 2 if i == 0 else 1}
            status, answers[i] = server.post("/completions", json.dumps(body).encode(), timeout=300)
            assert status == 200, answers[i]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        for i, prompt in enumerate(prompts):
            expected = alone(smollm2.tokenizer.encode(prompt), 12)
            assert [choice["text"] for choice in answers[i]["choices"]] == [expected] * (2 if i == 0 else 1)
    finally:
        server.stop()
