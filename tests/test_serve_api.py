"""What `caravan serve` makes of a request's fields, through the official openai client: defaults
that answer in words, the sampling fields llama-server and OpenAI take (checked against the
sampler run in this process on the real model's logits), a 400 naming any field caravan does not
implement, max_tokens past the context cut to it, and /v1/models/{id}."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from caravan.pipeline.generate import Generation
from caravan.pipeline.sampler import Sampler, SamplingParams
from support.serve import MODEL, N_CTX, QUESTION, raw_get

openai = pytest.importorskip("openai", reason="the openai client is in the test extra")

pytestmark = [pytest.mark.model, pytest.mark.slow]

SEA = [{"role": "user", "content": "Write two sentences about the sea."}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def pipeline(smollm2):
    return smollm2.local_pipeline(N_CTX)


def in_process(smollm2, pipeline, prompt_ids: list[int], params: SamplingParams, max_tokens: int) -> str:
    """The answer the server should give, computed here with the same sampler on the same logits."""
    g = Generation(pipeline, prompt_ids, Sampler(params), max_tokens, smollm2.tokenizer.eog_ids)
    return smollm2.tokenizer.decode(list(g))


@pytest.mark.parametrize("seed", range(4))
def test_defaults_answer_in_words(server, seed):
    """No sampling settings, as the web page sends: two sentences come back as two sentences of
    ordinary words. The old defaults (temperature 1, no top-k or min-p) ran on, at seed 1, into
    hundreds of tokens of noise ("somt2rem 875 1931 laureja889") and never stopped."""
    reply = server.client().chat.completions.create(model=MODEL, messages=SEA, seed=seed, max_tokens=200)
    text = reply.choices[0].message.content
    words = text.split()
    assert reply.choices[0].finish_reason == "stop", text  # it ends by itself, well before 200 tokens
    assert 5 <= len(words) <= 100, text
    assert 2 <= np.mean([len(w) for w in words]) <= 10 and max(len(w) for w in words) <= 25, text
    plain = [w for w in words if re.fullmatch(r"[\"'(]?[A-Za-z]+(['-][A-Za-z]+)*[.,;:!?\"')]*", w)]
    assert len(plain) >= 0.9 * len(words), text


def test_logit_bias_bans_and_forces_tokens(server, smollm2, pipeline):
    client = server.client()
    ids = smollm2.tokenizer.encode(PROMPT)
    greedy = in_process(smollm2, pipeline, ids, SamplingParams(temperature=0), 4)
    first = list(Generation(pipeline, ids, Sampler(SamplingParams(temperature=0)), 1, smollm2.tokenizer.eog_ids))[0]
    banned = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=4,
                                       logit_bias={str(first): -100})
    expected = in_process(smollm2, pipeline, ids, SamplingParams(temperature=0, logit_bias=((first, -100.0),)), 4)
    assert banned.choices[0].text == expected and expected != greedy
    assert not expected.startswith(smollm2.tokenizer.decode([first]))
    forced_id = smollm2.tokenizer.encode(" banana", add_bos=False)[0]
    forced = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3, seed=1,
                                            logit_bias={str(forced_id): 100})
    assert forced.choices[0].message.content == smollm2.tokenizer.decode([forced_id] * 3)


@pytest.mark.parametrize("fields,params", [
    ({"frequency_penalty": 1.5}, dict(frequency_penalty=1.5)),
    ({"presence_penalty": 2.0}, dict(presence_penalty=2.0)),
    ({"extra_body": {"repeat_penalty": 1.5, "repeat_last_n": 16}}, dict(repeat_penalty=1.5, repeat_last_n=16)),
    ({"extra_body": {"top_k": 3, "min_p": 0.2}, "temperature": 1.2, "seed": 5},
     dict(top_k=3, min_p=0.2, temperature=1.2, seed=5)),
])
def test_sampling_fields_as_the_sampler_in_process(server, smollm2, pipeline, fields, params):
    """Each field changes the answer as the sampler does on the real model's logits (prompt tokens
    counted by the penalties, as llama.cpp counts them)."""
    prompt = "The cat sat on the mat. The cat sat on the"
    ids = smollm2.tokenizer.encode(prompt)
    base = {"temperature": 0, **{k: v for k, v in fields.items() if k != "extra_body"}}
    reply = server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                               extra_body=fields.get("extra_body"), **base)
    expected = in_process(smollm2, pipeline, ids, SamplingParams(**{"temperature": 0, **params}), 12)
    plain = in_process(smollm2, pipeline, ids, SamplingParams(temperature=0), 12)
    assert reply.choices[0].text == expected
    if "seed" not in params:
        assert expected != plain  # the field made a difference


@pytest.mark.parametrize("field,value", [
    ("functions", [{"name": "weather", "parameters": {"type": "object"}}]),
    ("mirostat", 2),
    ("frobnicate", True),
])
def test_chat_fields_caravan_lacks_get_a_400_naming_them(server, field, value):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2,
                                                extra_body={field: value})
    error = caught.value.body
    assert error["param"] == field and repr(field) in error["message"], error


@pytest.mark.parametrize("fields", [{"echo": True}, {"suffix": " and so on."}, {"best_of": 2}])
def test_completion_fields_caravan_lacks_get_a_400_naming_them(server, fields):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, **fields)
    (field,) = fields
    assert caught.value.body["param"] == field and repr(field) in caught.value.body["message"]


def test_fields_that_ask_for_nothing_are_accepted(server):
    reply = server.client().chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=2, temperature=0, user="someone", metadata={"k": "v"},
        stream=False, response_format={"type": "text"}, extra_body={"tools": [], "cache_prompt": True})
    assert reply.choices[0].message.content
    done = server.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, echo=False, best_of=1,
                                              suffix=None, temperature=0)
    assert done.choices[0].text
    chunks = list(server.client().chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, stream=True,
                                                          stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens > 0


@pytest.mark.parametrize("fields,param", [
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"logit_bias": {"1": 101}}, "logit_bias"),
    ({"logit_bias": {"hello": 1}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"logit_bias": [[1, 2]]}, "logit_bias"),
    ({"top_k": 1.5}, "top_k"),
    ({"min_p": 2}, "min_p"),
    ({"repeat_penalty": 0}, "repeat_penalty"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options"),
])
def test_sampling_fields_out_of_range_get_a_400(server, fields, param):
    code, reply = server.post("/chat/completions", json.dumps({"model": MODEL, "messages": QUESTION,
                                                               "max_tokens": 2, **fields}).encode())
    assert code == 400 and reply["error"]["param"] == param, reply


def test_max_tokens_past_the_context_is_cut_to_it(server, smollm2):
    """Once a 400; now the answer runs to the end of the context, as llama-server's does."""
    client = server.client()
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=N_CTX - 5, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")  # it may end by itself first
    # A prompt that leaves 6 tokens of room, of a text that never ends: 6 tokens, then "length".
    prompt = smollm2.tokenizer.encode("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, " * 60)[: N_CTX - 6]
    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10**6, temperature=0)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 6
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=10**6, temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 6


def test_one_model_by_id_and_a_json_404_for_others(server):
    client = server.client()
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model" and model.owned_by == "caravan"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4")
    assert caught.value.body["code"] == "model_not_found" and "gpt-4" in caught.value.body["message"]
    port = server.url.split(":")[2].split("/")[0]
    status, body = raw_get(server, "/v1/no/such/route", {"Host": f"127.0.0.1:{port}"})
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
