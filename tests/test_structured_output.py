"""Structured output on `caravan serve`: OpenAI's response_format, llama-server's json_schema and
grammar, Ollama's format, through the official clients on the real model. Every answer parses
and validates against its schema (jsonschema), even from a 135M model, because the grammar
masks each token; a schema the constrained-decoding library refuses is a 400 saying why."""

from __future__ import annotations

import json

import numpy as np
import pytest

from caravan.pipeline.grammar import GrammarError
from caravan.pipeline.sampler import Sampler, SamplingParams, masked
from support.serve import MODEL, QUESTION

openai = pytest.importorskip("openai", reason="the openai client is in the test extra")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the test extra")

MAX_TOKENS = 160  # every schema below is bounded (maxItems, maxLength, enums) well inside this

STRING = {"type": "string", "maxLength": 40}
NAME = {"type": "string", "minLength": 1, "maxLength": 30}
# (what to ask for, the schema the answer must match)
SCHEMAS = [
    ("a person", {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0,
                                                                        "maximum": 120}},
                  "required": ["name", "age"], "additionalProperties": False}),
    ("a city", {"type": "object", "properties": {"city": NAME, "country": NAME,
                                                 "population": {"type": "integer", "minimum": 0}},
                "required": ["city", "country", "population"]}),
    ("your favourite colour", {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
                               "required": ["color"]}),
    ("whether the sky is blue", {"type": "object", "properties": {
        "answer": {"type": "boolean"}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["answer", "confidence"]}),
    ("some fruits", {"type": "object", "properties": {"fruits": {"type": "array", "items": NAME, "minItems": 1,
                                                                  "maxItems": 5}}, "required": ["fruits"]}),
    ("a person and their address", {"type": "object", "properties": {
        "name": NAME, "address": {"type": "object", "properties": {
            "street": STRING, "city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"], "additionalProperties": False}},
        "required": ["name", "address"]}),
    ("a shopping list with prices", {"type": "object", "properties": {"items": {
        "type": "array", "maxItems": 3, "items": {
            "type": "object", "properties": {"name": NAME, "price": {"type": "number", "minimum": 0, "maximum": 1000}},
            "required": ["name", "price"]}}}, "required": ["items"]}),
    ("three numbers from 1 to 10", {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 10},
                                    "minItems": 3, "maxItems": 3}),
    ("a rating of a film", {"type": "object", "properties": {"film": NAME, "stars": {"type": "integer",
                                                                                     "enum": [1, 2, 3, 4, 5]}},
                            "required": ["film", "stars"]}),
    ("the weather", {"type": "object", "properties": {
        "temperature": {"type": "number", "exclusiveMinimum": -50, "exclusiveMaximum": 60},
        "unit": {"enum": ["C", "F"]}}, "required": ["temperature", "unit"], "additionalProperties": False}),
    ("a book", {"type": "object", "properties": {"book": {"type": "object", "properties": {
        "title": STRING, "author": {"type": "object", "properties": {
            "name": NAME, "born": {"type": "integer", "minimum": 1000, "maximum": 2025}},
            "required": ["name", "born"]}}, "required": ["title", "author"]}}, "required": ["book"]}),
    ("an event", {"type": "object", "properties": {"kind": {"const": "event"}, "title": STRING,
                                                   "day": {"type": "integer", "minimum": 1, "maximum": 31}},
                  "required": ["kind", "title", "day"]}),
    ("a value", {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer"}, STRING]}},
                 "required": ["value"]}),
    ("a user profile", {"type": "object", "properties": {"username": NAME, "email": STRING,
                                                         "nickname": {"type": ["string", "null"], "maxLength": 20}},
                        "required": ["username"], "additionalProperties": False}),
    ("tags for a blog post", {"type": "object", "properties": {"tags": {"type": "array", "maxItems": 4, "items": {
        "enum": ["python", "rust", "cooking", "travel", "music"]}}}, "required": ["tags"]}),
    ("a count", {"type": "object", "properties": {"count": {"type": "integer", "multipleOf": 5, "minimum": 0,
                                                            "maximum": 100}}, "required": ["count"]}),
    ("a short code", {"type": "object", "properties": {"code": {"type": "string", "minLength": 3, "maxLength": 6},
                                                       "valid": {"type": "boolean"}},
                      "required": ["code", "valid"]}),
    ("a recipe", {"type": "object", "properties": {
        "title": STRING,
        "ingredients": {"type": "array", "maxItems": 4, "items": {"type": "object", "properties": {
            "name": NAME, "grams": {"type": "integer", "minimum": 1, "maximum": 1000}}, "required": ["name", "grams"]}},
        "steps": {"type": "array", "items": STRING, "maxItems": 3}}, "required": ["title", "ingredients", "steps"]}),
    ("a line from one point to another", {"$defs": {"point": {"type": "object", "properties": {
        "x": {"type": "number", "minimum": -100, "maximum": 100}, "y": {"type": "number", "minimum": -100,
                                                                       "maximum": 100}},
        "required": ["x", "y"]}}, "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"]}),
    ("a 2 by 2 matrix", {"type": "object", "properties": {"matrix": {"type": "array", "minItems": 2, "maxItems": 2,
                                                                     "items": {"type": "array", "minItems": 2,
                                                                               "maxItems": 2,
                                                                               "items": {"type": "number"}}}},
                         "required": ["matrix"], "additionalProperties": False}),
]


def strict(schema):
    """The schema as OpenAI's strict mode takes it: no object may hold properties it does not
    name (which also keeps a small model from adding properties until max_tokens)."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if schema.get("type") == "object" and "properties" in schema:
            schema.setdefault("additionalProperties", False)
    elif isinstance(schema, list):
        schema = [strict(value) for value in schema]
    return schema


SCHEMAS = [(what, strict(schema)) for what, schema in SCHEMAS]


def ask(what: str) -> list[dict]:
    return [{"role": "user", "content": f"Give me {what} as JSON."}]


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("what,schema", SCHEMAS, ids=[w for w, _ in SCHEMAS])
def test_every_answer_parses_and_validates_against_its_schema(server, what, schema):
    """OpenAI's response_format json_schema (strict), through the official client, greedy."""
    reply = server.client().chat.completions.create(
        model=MODEL, messages=ask(what), temperature=0, max_tokens=MAX_TOKENS,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content  # the grammar ended it, not max_tokens
    jsonschema.validate(json.loads(choice.message.content), schema)


@pytest.mark.model
@pytest.mark.slow
def test_json_object_streamed_and_llama_servers_fields(server):
    """json_object (streamed, sampled), llama-server's json_schema on /v1/completions and its GBNF grammar."""
    client = server.client()
    chunks = client.chat.completions.create(model=MODEL, messages=ask("a cat"), seed=3, max_tokens=MAX_TOKENS,
                                            stream=True, response_format={"type": "json_object"})
    pieces = [(c.choices[0].delta.content or "", c.choices[0].finish_reason) for c in chunks if c.choices]
    text = "".join(p for p, _ in pieces)
    assert pieces[-1][1] == "stop", text
    assert isinstance(json.loads(text), dict)
    schema = SCHEMAS[0][1]
    done = client.completions.create(model=MODEL, prompt="A person as JSON:", temperature=0, max_tokens=MAX_TOKENS,
                                     extra_body={"json_schema": schema})
    jsonschema.validate(json.loads(done.choices[0].text), schema)
    yes_no = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8,
                                            extra_body={"grammar": 'root ::= "yes" | "no"'})
    assert yes_no.choices[0].message.content in ("yes", "no") and yes_no.choices[0].finish_reason == "stop"


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("fields,refused", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "array", "uniqueItems": True}}}}, "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "string", "pattern": "(?<=a)b"}}}}, "look-around"),
    ({"json_schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}, "/nowhere"),
    ({"grammar": "root ::= missing"}, "missing"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_object"}, "grammar": 'root ::= "a"'}, "send one of them"),
])
def test_a_schema_the_library_refuses_is_a_400_naming_it(server, fields, refused):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2, extra_body=fields)
    error = caught.value.body
    assert refused in error["message"] and error["param"] in fields, error
    assert server.client().chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2).choices


@pytest.mark.model
@pytest.mark.slow
def test_ollama_format_json_and_a_schema(server):
    ollama = pytest.importorskip("ollama", reason="the ollama client is in the test extra")
    client = ollama.Client(host=server.base_url, timeout=120)
    schema = SCHEMAS[5][1]
    reply = client.chat(model=MODEL, messages=ask("a person and their address"), format=schema,
                        options={"temperature": 0, "num_predict": MAX_TOKENS})
    assert reply.done_reason == "stop"
    jsonschema.validate(json.loads(reply.message.content), schema)
    streamed = "".join(part.response for part in client.generate(
        model=MODEL, prompt="Describe a dog.", format="json", stream=True, options={"seed": 1,
                                                                                   "num_predict": MAX_TOKENS}))
    assert isinstance(json.loads(streamed), dict)
    with pytest.raises(ollama.ResponseError) as refused:
        client.chat(model=MODEL, messages=QUESTION, format={"type": "array", "uniqueItems": True})
    assert refused.value.status_code == 400 and "uniqueItems" in refused.value.error


@pytest.mark.model
@pytest.mark.slow
def test_masks_apply_per_row_in_a_batch(server, smollm2, alone):
    """A constrained request with n=3 (its samples share one prefill and decode as rows of one
    batch) beside a free one in the same batches: every sample validates, and the free request's
    greedy text is what it is alone."""
    from concurrent.futures import ThreadPoolExecutor

    from support.serve import chat_ids

    what, schema = SCHEMAS[6]
    client = server.client()
    with ThreadPoolExecutor(2) as pool:
        constrained = pool.submit(client.chat.completions.create, model=MODEL, messages=ask(what), n=3, seed=7,
                                  max_tokens=MAX_TOKENS, response_format={"type": "json_schema", "json_schema": {
                                      "name": "list", "schema": schema}})
        free = pool.submit(client.chat.completions.create, model=MODEL, messages=QUESTION, temperature=0,
                           max_tokens=24)
        choices, plain = constrained.result().choices, free.result().choices[0].message.content
    assert len(choices) == 3
    for choice in choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)
    assert plain == alone(chat_ids(smollm2, QUESTION), 24)


# --- in process: the sampler's constraint --------------------------------------------------


def test_the_constraint_masks_every_token_and_ends_with_the_grammar(smollm2):
    """Whatever the logits favour, the sampler draws only what the grammar allows, and once the
    grammar is complete nothing but an end-of-generation token."""
    grammars = smollm2.grammars
    assert grammars is smollm2.grammars  # built once per model
    constraint = grammars.constraint(grammars.gbnf('root ::= "yes" | "no"'))
    sampler = Sampler(SamplingParams(temperature=0.8, seed=0), constraint)
    rng = np.random.default_rng(0)
    tokens = []
    while not constraint.finished:
        tokens.append(sampler.sample(rng.standard_normal(smollm2.tokenizer.vocab_size).astype(np.float32)))
    assert smollm2.tokenizer.decode(tokens) in ("yes", "no")
    assert sampler.sample(rng.standard_normal(smollm2.tokenizer.vocab_size).astype(np.float32)) in \
        smollm2.tokenizer.eog_ids


def test_masks_for_draft_tokens_in_one_call(smollm2):
    """allowed_rows: the mask now and after each draft token, for checking speculated tokens, and
    the constraint's place unmoved."""
    grammars = smollm2.grammars
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    constraint = grammars.constraint(grammars.json_schema(schema))
    draft = smollm2.tokenizer.encode('{"ok": true}', add_bos=False)
    rows = constraint.allowed_rows(draft)
    assert rows.shape == (len(draft) + 1, smollm2.tokenizer.vocab_size)
    assert all(rows[i, t] for i, t in enumerate(draft))
    assert rows[-1][sorted(smollm2.tokenizer.eog_ids)].all()
    assert np.array_equal(rows[0], constraint.allowed())
    logits = np.zeros((len(draft) + 1, smollm2.tokenizer.vocab_size), dtype=np.float32)
    assert np.isneginf(masked(logits, rows)).sum() == (~rows).sum()
    for token in draft[:3]:
        constraint.advance(token)
    assert np.array_equal(constraint.allowed(), rows[3])
    constraint.rollback(3)  # the draft's tokens rejected after all
    assert np.array_equal(constraint.allowed(), rows[0])
    wrong = smollm2.tokenizer.encode('{"no', add_bos=False)
    assert not constraint.allowed_rows(wrong)[-1].any()  # past a refused draft token nothing is allowed


def test_a_refused_schema_is_a_grammar_error(smollm2):
    with pytest.raises(GrammarError, match="uniqueItems"):
        smollm2.grammars.json_schema({"type": "array", "uniqueItems": True})
    with pytest.raises(GrammarError):
        smollm2.grammars.gbnf("root ::= (")


def test_greedy_checks_the_argmax_alone_and_masks_only_when_refused(smollm2):
    """Greedy with a constraint takes the unmasked argmax when the grammar accepts it (no whole
    mask) and the masked argmax otherwise: every token is the masked argmax, both ways are taken,
    and accepts() agrees with the mask."""
    grammars = smollm2.grammars
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    constraint = grammars.constraint(grammars.json_schema(schema))
    reference = grammars.constraint(grammars.json_schema(schema))  # the same grammar, always masked
    sampler = Sampler(SamplingParams(temperature=0), constraint)
    rng = np.random.default_rng(1)
    accepted = refused = 0
    for _ in range(24):
        logits = rng.standard_normal(smollm2.tokenizer.vocab_size).astype(np.float32)
        allowed = reference.allowed()
        probes = [int(np.argmax(logits)), *rng.integers(0, len(allowed), 8).tolist()]
        assert [constraint.accepts(t) for t in probes] == [bool(allowed[t]) for t in probes]
        accepted, refused = accepted + allowed[probes[0]], refused + (not allowed[probes[0]])
        expected = int(np.argmax(masked(logits, allowed)))
        assert sampler.sample(logits) == expected
        reference.advance(expected)
        if reference.finished:
            break
    assert accepted and refused
