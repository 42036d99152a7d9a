"""Ollama's API on `caravan serve`, driven by the official ollama client (and raw HTTP for what
a client library would never send): the same answers as OpenAI's routes and as this process."""

from __future__ import annotations

import json
import socket
import time

import pytest

from caravan.pipeline.generate import Generation
from caravan.pipeline.sampler import Sampler, SamplingParams
from support.serve import (MODEL, N_CTX, QUESTION, RECOUNT, Server, chat_ids, raw_get, raw_request,
                           tokens_through_stop)
from support.wait import wait_for

ollama = pytest.importorskip("ollama", reason="the ollama client is in the test extra")
openai = pytest.importorskip("openai", reason="the openai client is in the test extra")

pytestmark = [pytest.mark.model, pytest.mark.slow]

TAGGED = MODEL + ":latest"
GREEDY = {"temperature": 0}


def base_url(server: Server) -> str:
    return server.url.removesuffix("/v1")


def client(server: Server) -> "ollama.Client":
    return ollama.Client(host=base_url(server), timeout=120)


def host(server: Server) -> dict:
    return {"Host": base_url(server).split("//", 1)[1]}


def post(server: Server, path: str, body: dict | bytes) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, text = raw_request(server, "POST", path, {**host(server), "Content-Type": "application/json"}, data)
    return status, json.loads(text)


def metrics(server: Server) -> dict[str, float]:
    _, text = raw_get(server, "/metrics", host(server))
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}


def test_list_show_ps_and_version(server):
    c = client(server)
    [listed] = c.list().models
    assert listed.model == TAGGED and listed.size > 0 and len(listed.digest) == 64
    assert listed.details.format == "gguf" and listed.details.family == "llama"
    assert listed.details.parameter_size.endswith("M") and listed.details.quantization_level
    for name in (MODEL, TAGGED):
        shown = c.show(name)
        assert shown.details == listed.details and shown.capabilities == ["completion"]
        assert shown.modelinfo["general.architecture"] == "llama" and shown.modelinfo["tokenizer.ggml.tokens"] == []
        assert "num_ctx" in shown.parameters and "temperature" in shown.parameters and "im_start" in shown.template
    [running] = c.ps().models
    assert running.model == running.name == TAGGED and running.context_length == N_CTX and running.size == listed.size
    status, text = raw_get(server, "/api/version", host(server))
    assert status == 200 and json.loads(text)["version"]
    # The server's own refusals, before any route, in Ollama's shape too.
    status, text = raw_get(server, "/api/tags", {**host(server), "Origin": "https://evil.example"})
    assert status == 403 and "Origin" in json.loads(text)["error"]


def test_chat_and_generate_are_the_greedy_text_of_this_process_and_of_openai(server, smollm2, alone):
    c = client(server)
    ids = chat_ids(smollm2, QUESTION)
    expected = alone(ids, 24)
    assert "Paris" in expected
    reply = c.chat(model=MODEL, messages=QUESTION, options={**GREEDY, "num_predict": 24})
    assert reply.message.role == "assistant" and reply.message.content == expected
    assert reply.done and reply.done_reason == "stop" and reply.prompt_eval_count == len(ids)
    assert reply.eval_count > 0 and reply.total_duration >= reply.eval_duration > 0
    parts = list(c.chat(model=TAGGED, messages=QUESTION, options={**GREEDY, "num_predict": 24}, stream=True))
    assert "".join(p.message.content for p in parts) == expected
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].eval_count == reply.eval_count and parts[-1].done_reason == "stop"
    openai_reply = server.client().chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    assert openai_reply.choices[0].message.content == expected

    # generate renders its prompt as a user message; raw: true sends it as it is.
    generated = c.generate(model=MODEL, prompt=QUESTION[0]["content"], options={**GREEDY, "num_predict": 24})
    assert generated.response == expected and generated.prompt_eval_count == len(ids)
    prompt = "The capital of France is"
    expected = alone(smollm2.tokenizer.encode(prompt), 12)
    raw = c.generate(model=MODEL, prompt=prompt, raw=True, options={**GREEDY, "num_predict": 12})
    assert raw.response == expected and raw.done_reason == "length" and raw.eval_count == 12
    streamed = list(c.generate(model=MODEL, prompt=prompt, raw=True, options={**GREEDY, "num_predict": 12}, stream=True))
    assert "".join(p.response for p in streamed) == expected and streamed[-1].done_reason == "length"
    completion = server.client().completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12)
    assert completion.choices[0].text == expected


def test_options_map_onto_caravans_sampling(server, smollm2):
    c = client(server)
    prompt = "Once upon a time"
    plain = {"top_k": 0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0}  # the OpenAI route's sampling
    seeded = {**plain, "temperature": 0.9, "seed": 7, "num_predict": 16}
    a = c.generate(model=MODEL, prompt=prompt, raw=True, options=seeded)
    b = c.generate(model=MODEL, prompt=prompt, raw=True, options=seeded)
    assert a.response == b.response and a.eval_count == 16
    openai_sample = server.client().completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0.9,
                                                       top_p=1.0, seed=7, extra_body={"top_k": 0, "min_p": 0.0})
    assert openai_sample.choices[0].text == a.response

    counted = c.generate(model=MODEL, prompt=prompt, raw=True, options={**GREEDY, "num_predict": 5})
    assert counted.eval_count == 5 and counted.done_reason == "length"
    expected = c.generate(model=MODEL, prompt="The capital of France is", raw=True,
                          options={**GREEDY, "num_predict": 12}).response
    cut = c.generate(model=MODEL, prompt="The capital of France is", raw=True,
                     options={**GREEDY, "num_predict": 12, "stop": ["."]})
    assert "." in expected and cut.response == expected.split(".")[0] and cut.done_reason == "stop"
    # num_ctx bounds prompt and answer; num_predict -1 runs until that context is full.
    n_prompt = len(smollm2.tokenizer.encode("1, 2, 3, 4,"))
    bounded = c.generate(model=MODEL, prompt="1, 2, 3, 4,", raw=True,
                         options={**GREEDY, "num_ctx": n_prompt + 6, "num_predict": -1})
    assert bounded.eval_count == 6 and bounded.done_reason == "length"
    # Options about Ollama's own hardware are accepted; keep_alive is checked and changes nothing.
    ok = c.chat(model=MODEL, messages=QUESTION, keep_alive="5m",
                options={**GREEDY, "num_predict": 2, "num_gpu": 1, "num_thread": 8, "typical_p": 1.0})
    assert ok.done and ok.eval_count == 2
    # Bounds past what they can mean are what they mean: the whole vocabulary, the whole context.
    huge = {"top_k": 10**12, "repeat_last_n": 10**12, "seed": 2**70, "num_predict": 10**12, "num_ctx": N_CTX}
    again = c.generate(model=MODEL, prompt="1, 2, 3, 4,", raw=True, keep_alive="-1", options={**huge, "temperature": 0,
                                                                                          "num_predict": 3})
    assert again.eval_count == 3
    assert c.generate(model=MODEL, prompt="Hi", raw=True, keep_alive=-1, options={**huge, "stop": ["\n"]}).done
    loaded = c.chat(model=MODEL, messages=[], keep_alive=0)
    assert loaded.done and loaded.done_reason == "load" and loaded.message.content == ""


def test_eval_count_after_a_stop_string_is_the_openai_routes_usage(server):
    """eval_count of an answer cut at a stop string, streamed and not: the tokens through the one
    that completed it (as Ollama's runner and llama-server count), not those a pass of kept
    drafts brought past it."""
    whole = server.client().completions.create(model=MODEL, prompt=RECOUNT, temperature=0, max_tokens=40, logprobs=0)
    through = tokens_through_stop(whole.choices[0].logprobs.tokens, "9")
    options = {**GREEDY, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0, "num_predict": 40,
               "stop": ["9"]}
    cut = client(server).generate(model=MODEL, prompt=RECOUNT, raw=True, options=options)
    assert cut.response == " 6, 7, 8, " and cut.done_reason == "stop" and cut.eval_count == through
    *_, last = client(server).generate(model=MODEL, prompt=RECOUNT, raw=True, options=options, stream=True)
    assert last.done and last.eval_count == through


def test_logprobs_are_the_openai_routes(server):
    c = client(server)
    reply = c.chat(model=MODEL, messages=QUESTION, options={**GREEDY, "num_predict": 6}, logprobs=True, top_logprobs=2)
    assert "".join(lp.token for lp in reply.logprobs) == reply.message.content
    assert all(lp.top_logprobs[0].token == lp.token and lp.logprob <= 0 for lp in reply.logprobs)
    openai_reply = server.client().chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=6,
                                                           logprobs=True, top_logprobs=2)
    assert [lp.logprob for lp in reply.logprobs] == [e.logprob for e in openai_reply.choices[0].logprobs.content]


ASK = {"model": MODEL, "messages": QUESTION, "stream": False}


@pytest.mark.parametrize("path,body,status,message", [
    ("/api/chat", {**ASK, "model": "gpt-4"}, 404, "model 'gpt-4' not found"),
    ("/api/chat", {**ASK, "model": MODEL + ":7b"}, 404, "not found"),
    ("/api/generate", {"model": "gpt-4", "prompt": "hi"}, 404, "model 'gpt-4' not found"),
    ("/api/show", {"model": "gpt-4"}, 404, "model 'gpt-4' not found"),
    ("/api/chat", {**ASK, "model": ""}, 400, "model is required"),
    ("/api/chat", {**ASK, "format": "yaml"}, 400, "format"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "format": {"type": "objekt"}}, 400, "format"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "tools"),
    ("/api/chat", {**ASK, "tools": [{"type": "function", "function": {"name": "bad name!"}}]}, 400, "tools[0]"),
    ("/api/chat", {**ASK, "messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}, 400,
     "messages[0].images"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "images": ["aGk="]}, 400, "images"),
    ("/api/chat", {**ASK, "think": True}, 400, "think"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "suffix": "end"}, 400, "suffix"),
    ("/api/chat", {**ASK, "options": {"temperature": "hot"}}, 400, "options.temperature must be a number"),
    ("/api/chat", {**ASK, "options": {"temperature": -1}}, 400, "options.temperature"),
    ("/api/chat", {**ASK, "options": {"top_k": 1.5}}, 400, "options.top_k must be an integer"),
    ("/api/chat", {**ASK, "options": {"temprature": 0}}, 400, "options.temprature is not an option"),
    ("/api/chat", {**ASK, "options": {"mirostat": 2}}, 400, "options.mirostat"),
    ("/api/chat", {**ASK, "options": {"num_ctx": 10 * N_CTX}}, 400, "--ctx"),
    ("/api/chat", {**ASK, "options": {"stop": [""]}}, 400, "options.stop"),
    ("/api/chat", {**ASK, "options": "hot"}, 400, "options must be an object"),
    ("/api/chat", {**ASK, "keep_alive": "forever"}, 400, "keep_alive"),
    ("/api/chat", {**ASK, "stream": "yes"}, 400, "stream"),
    ("/api/chat", {**ASK, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("/api/generate", {"model": MODEL, "prompt": "word " * 2000}, 400, "context"),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "raw": True, "system": "Be brief."}, 400, "raw"),
    ("/api/chat", b"{not json", 400, "not valid JSON"),
    ("/api/pull", {"model": MODEL}, 404, "no route /api/pull"),
])
def test_bad_requests_get_ollamas_errors_and_the_server_goes_on(server, path, body, status, message):
    code, reply = post(server, path, body)
    assert code == status, reply
    assert isinstance(reply["error"], str) and message in reply["error"], reply
    assert client(server).generate(model=MODEL, prompt="Hello", raw=True, options={"num_predict": 2}).response


def test_the_client_sees_the_errors_as_ollamas():
    """A schema in format that the constrained-decoding library refuses, through the client: a 400
    naming format, never a silent answer. The server wants an API key (--api-key): both clients
    are refused without it."""
    s = Server("--api-key", "letmein")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert s.client("letmein").models.list().data[0].id == MODEL
        c = ollama.Client(host=base_url(s), headers={"Authorization": "Bearer letmein"}, timeout=120)
        with pytest.raises(ollama.ResponseError) as refused:
            c.chat(model=MODEL, messages=QUESTION, format={"type": "array", "uniqueItems": True})
        assert refused.value.status_code == 400 and "format" in refused.value.error
        with pytest.raises(ollama.ResponseError) as missing:
            c.chat(model="llama3.2", messages=QUESTION, stream=True).__next__()
        assert missing.value.status_code == 404 and missing.value.error.startswith("model 'llama3.2' not found")
        with pytest.raises(ollama.ResponseError) as unauthorized:
            ollama.Client(host=base_url(s), timeout=120).list()
        assert unauthorized.value.status_code == 401 and "API key" in unauthorized.value.error
        assert c.list().models[0].model == TAGGED
    finally:
        s.stop()


COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"  # greedy, the model counts on past LONG tokens (checked below)
LONG = 300


def leave_a_stream(server: Server) -> None:
    parts = client(server).generate(model=MODEL, prompt=COUNTING, raw=True, stream=True,
                                    options={**GREEDY, "num_predict": LONG})
    assert next(parts).response
    parts.close()  # the client goes away mid-answer


def leave_an_answer(server: Server) -> None:
    body = json.dumps({"model": MODEL, "prompt": COUNTING, "raw": True, "stream": False,
                       "options": {**GREEDY, "num_predict": LONG}}).encode()
    host_port = host(server)["Host"]
    hostname, port = host_port.rsplit(":", 1)
    sock = socket.create_connection((hostname, int(port)), timeout=30)
    sock.sendall(f"POST /api/generate HTTP/1.1\r\nHost: {host_port}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    wait_for(lambda: metrics(server)["caravan_requests_in_flight"], 30, "the request in flight")
    sock.close()  # before the answer is written


@pytest.fixture(scope="module")
def counting_runs_long(smollm2):
    """Greedy, COUNTING runs the whole LONG tokens in this process (checked once for every way of
    leaving): only a cancellation ends the request early."""
    ids = smollm2.tokenizer.encode(COUNTING)
    pipeline = smollm2.local_pipeline(N_CTX)
    long = len(list(Generation(pipeline, ids, Sampler(SamplingParams(temperature=0)), LONG, smollm2.tokenizer.eog_ids)))
    assert long == LONG


@pytest.mark.parametrize("leave", [leave_a_stream, leave_an_answer])
def test_a_client_that_leaves_frees_its_sequence(server, smollm2, counting_runs_long, leave):
    before = metrics(server)["caravan_generated_tokens_total"]
    leave(server)
    wait_for(lambda: not metrics(server)["caravan_requests_in_flight"], 20, "no request in flight")
    after = metrics(server)
    assert after["caravan_requests_in_flight"] == 0
    assert after["caravan_generated_tokens_total"] - before < LONG
    assert after[f'caravan_kv_cache_bytes{{stage="local",layers="0-{smollm2.config.n_layers - 1}"}}'] == 0
