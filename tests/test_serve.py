"""`caravan serve` as a real process, driven by the official openai client (and raw HTTP for
the requests a client library would never send)."""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from caravan.coordinator.remote import NodeClient
from caravan.pipeline.stage import Segment
from support.nodes import NodeProcess, cluster_token
from support.serve import (MODEL, N_CTX, QUESTION, RECOUNT, Server, chat_ids, raw_get, raw_request,
                           tokens_through_stop)
from support.wait import wait_for

openai = pytest.importorskip("openai", reason="the openai client is in the test extra")

pytestmark = [pytest.mark.model, pytest.mark.slow]

def test_chat_and_completions_streamed_and_not(server, smollm2, alone):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    expected = alone(chat_ids(smollm2, QUESTION), 24)
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24)
    assert reply.choices[0].message.content == expected
    assert "Paris" in expected
    assert reply.usage.prompt_tokens == len(chat_ids(smollm2, QUESTION))
    assert reply.usage.completion_tokens > 0

    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    prompt = "The capital of France is"
    expected = alone(smollm2.tokenizer.encode(prompt), 12)
    done = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12)
    assert done.choices[0].text == expected and done.choices[0].finish_reason == "length"
    streamed = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected

    cut = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12, stop=["."])
    assert cut.choices[0].text == expected.split(".")[0] and cut.choices[0].finish_reason == "stop"


def test_usage_counts_the_tokens_through_the_one_that_completes_a_stop_string(server):
    """completion_tokens after a stop string, streamed and not: the tokens through the one that
    completed it (llama-server's count), not those a pass of kept drafts brought past it."""
    client = server.client()
    asked = dict(model=MODEL, prompt=RECOUNT, temperature=0, max_tokens=40)
    whole = client.completions.create(**asked, logprobs=0)
    assert whole.choices[0].text.startswith(" 6, 7, 8, 9, 10,")
    through = tokens_through_stop(whole.choices[0].logprobs.tokens, "9")
    cut = client.completions.create(**asked, stop=["9"])
    assert cut.choices[0].text == " 6, 7, 8, " and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens == through
    chunks = list(client.completions.create(**asked, stop=["9"], stream=True))  # usage comes in the last chunk
    assert chunks[-1].usage.completion_tokens == through


def test_logprobs_are_the_models_own(server, smollm2):
    """Chat's logprobs/top_logprobs and completions' logprobs, streamed and not: each token's
    log-probability is log softmax of the model's logits (checked for the first token against
    this process), greedy tokens are their own most likely, and the tokens spell the text."""
    client = server.client()
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == reply.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.logprob == entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob <= 0
        assert bytes(entry.bytes).decode() == entry.token
    ids = chat_ids(smollm2, QUESTION)
    pipeline = smollm2.local_pipeline(N_CTX)
    logits = pipeline.head.logits(pipeline.forward([Segment("logprobs", 0, len(ids))], np.asarray(ids))[-1:])[0]
    log_p = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64) - logits.max()).sum()) - logits.max()
    assert content[0].logprob == pytest.approx(log_p.max(), abs=1e-5)

    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=4)
    assert plain.choices[0].logprobs is None

    prompt = "The capital of France is"
    done = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=6, logprobs=2)
    logprobs = done.choices[0].logprobs
    assert "".join(logprobs.tokens) == done.choices[0].text and len(logprobs.token_logprobs) == 6
    assert all(len(top) == 2 and max(top.values()) == lp for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs))
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(6)]
    streamed = [c for c in client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=6,
                                                     logprobs=2, stream=True) if c.choices and c.choices[0].logprobs]
    assert sum((c.choices[0].logprobs.token_logprobs for c in streamed), []) == logprobs.token_logprobs
    assert sum((c.choices[0].logprobs.text_offset for c in streamed), []) == logprobs.text_offset

    code, reply = server.post("/chat/completions", json.dumps({"model": MODEL, "messages": QUESTION,
                                                               "top_logprobs": 2}).encode())
    assert code == 400 and "needs logprobs" in reply["error"]["message"]


def test_seed_gives_the_same_sample_and_n_gives_several(server):
    client = server.client()
    a = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0.9, seed=7)
    b = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0.9, seed=7)
    assert a.choices[0].text == b.choices[0].text
    several = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0.9,
                                        seed=7, n=3)
    assert [c.index for c in several.choices] == [0, 1, 2]
    assert several.choices[0].text == a.choices[0].text


def test_n_samples_share_one_prefill(server, smollm2, alone):
    """n > 1 runs the prompt once: the other samples start from a copy of its KV caches, and a
    greedy sample is the text the prompt gets alone."""
    def prompt_tokens_computed():
        with urllib.request.urlopen(server.url.removesuffix("/v1") + "/metrics") as response:
            metrics = response.read().decode()
        return int(next(line.split()[1] for line in metrics.splitlines() if line.startswith("caravan_prompt_tokens_total")))

    prompt = "The three primary colors are"
    expected = alone(smollm2.tokenizer.encode(prompt), 10)
    before = prompt_tokens_computed()
    reply = server.client().completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=10, n=3)
    assert [c.text for c in reply.choices] == [expected] * 3
    assert prompt_tokens_computed() - before == len(smollm2.tokenizer.encode(prompt))
    sampled = server.client().completions.create(model=MODEL, prompt=prompt, temperature=0.9, seed=11, max_tokens=10, n=2)
    alone_seeded = server.client().completions.create(model=MODEL, prompt=prompt, temperature=0.9, seed=12, max_tokens=10)
    assert sampled.choices[1].text == alone_seeded.choices[0].text  # sample i is seeded seed + i


def test_sixteen_concurrent_requests_each_get_their_text_alone(server, smollm2, alone):
    questions = [f"What is {i} plus {i}?" for i in range(8)] + [f"Name a color that starts with {c}." for c in "BGRYPOWS"]
    expected = {q: alone(chat_ids(smollm2, [{"role": "user", "content": q}]), 20) for q in questions}
    client = server.client()

    def ask(question, stream):
        messages = [{"role": "user", "content": question}]
        if stream:
            chunks = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=20,
                                                    stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                              max_tokens=20).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, questions, [i % 2 == 0 for i in range(16)]))
    assert dict(zip(questions, answers)) == expected


@pytest.mark.parametrize("body,status,message", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"model": MODEL, "messages": "hi"}).encode(), 400, "messages must be a non-empty list"),
    (json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}).encode(), 400, "role"),
    (json.dumps({"model": MODEL, "messages": QUESTION, "max_tokens": "ten"}).encode(), 400, "max_tokens must be an integer"),
    (json.dumps({"model": MODEL, "messages": QUESTION, "max_tokens": 0}).encode(), 400, "max_tokens must be at least 1"),
    (json.dumps({"model": MODEL, "messages": QUESTION, "temperature": -1}).encode(), 400, "temperature"),
    (json.dumps({"model": MODEL, "messages": QUESTION, "stream": "yes"}).encode(), 400, "stream"),
    (json.dumps({"model": "gpt-4", "messages": QUESTION}).encode(), 404, "does not exist"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "word " * 2000}]}).encode(), 400,
     "context"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "{{ lipsum.__globals__ }}"}]}).encode(),
     200, ""),  # template syntax in a message is text, not template
])
def test_bad_requests_get_clear_4xx_and_the_server_goes_on(server, body, status, message):
    code, reply = server.post("/chat/completions", body)
    assert code == status, reply
    if status >= 400:
        assert message in reply["error"]["message"] and reply["error"]["type"] == "invalid_request_error"
    ok = server.client().completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    assert ok.choices[0].text


def test_in_front_of_two_nodes_and_a_dropped_client_frees_its_sessions(smollm2, alone, tmp_path):
    nodes = [NodeProcess(tmp_path / f"n{i}") for i in range(2)]
    s = Server("--nodes", ",".join(n.address for n in nodes))
    try:
        client = s.client()
        expected = alone(chat_ids(smollm2, QUESTION), 24)
        reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24)
        assert reply.choices[0].message.content == expected
        shared = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=24, n=2)
        assert [c.message.content for c in shared.choices] == [expected] * 2  # the copy went to both nodes

        # A prompt of several steps' worth, alone in its lane: its chunks pipeline through both
        # nodes in one call, and the text is the same (also for two samples sharing it).
        long_prompt = "The caravan crossed the desert, and every animal carried part of the load. " * 12
        long_expected = alone(smollm2.tokenizer.encode(long_prompt), 12)
        assert len(smollm2.tokenizer.encode(long_prompt)) > 2 * 64
        done = client.completions.create(model=MODEL, prompt=long_prompt, temperature=0, max_tokens=12, n=2)
        assert [c.text for c in done.choices] == [long_expected] * 2

        stream = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=400,
                                                stream=True)
        next(iter(stream))
        stream.close()  # the client goes away mid-answer
        clients = [NodeClient(n.address, cluster_token()) for n in nodes]
        wait_for(lambda: not any(c.info().sessions for c in clients), 20, "the sessions freed on both nodes")
        for c in clients:
            c.close()
    finally:
        s.stop()
        for n in nodes:
            n.stop()


def test_only_localhost_pages_reach_a_loopback_server(server):
    port = server.url.split(":")[2].split("/")[0]
    local = {"Host": f"127.0.0.1:{port}"}
    assert raw_get(server, "/v1/models", local)[0] == 200
    assert raw_get(server, "/v1/models", {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"})[0] == 200
    status, body = raw_get(server, "/v1/models", {"Host": f"evil.example:{port}"})  # DNS rebinding
    assert status == 403 and "Host" in body
    status, headers, body = raw_request(server, "GET", "/v1/models", {**local, "Origin": "https://evil.example"})
    assert status == 403 and "Origin" in body  # a page elsewhere
    assert "access-control-allow-origin" not in headers
    # A sandboxed frame's POST, and any POST from a page elsewhere, however it is sent.
    question = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 1}).encode()
    for origin in ("null", "https://evil.example", f"http://evil.example:{port}"):
        for media in ("application/json", "text/plain"):
            status, headers, body = raw_request(server, "POST", "/v1/completions",
                                                {**local, "Origin": origin, "Content-Type": media}, question)
            assert status == 403 and "Origin" in body and json.loads(body)["error"]["code"] == "forbidden_origin"
            assert "access-control-allow-origin" not in headers
    # A text/plain POST needs no preflight in a browser: refused whatever its Origin.
    status, _, body = raw_request(server, "POST", "/v1/completions", {**local, "Content-Type": "text/plain"}, question)
    assert status == 415 and "application/json" in json.loads(body)["error"]["message"]
    status, _, body = raw_request(server, "POST", "/v1/completions", {**local, "Origin": f"http://localhost:{port}",
                                                                      "Content-Type": "application/json"}, question)
    assert status == 200 and json.loads(body)["choices"]


def test_health_and_metrics(server):
    port = server.url.split(":")[2].split("/")[0]
    status, body = raw_get(server, "/health", {"Host": f"127.0.0.1:{port}"})
    assert status == 200 and json.loads(body)["status"] == "ok"
    server.client().completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
    status, text = raw_get(server, "/metrics", {"Host": f"127.0.0.1:{port}"})
    assert status == 200
    metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
    assert metrics["caravan_generated_tokens_total"] >= 4
    assert metrics["caravan_queue_length"] == 0
    assert metrics['caravan_kv_cache_bytes{stage="local",layers="0-29"}'] >= 0
    assert "caravan_tokens_per_second" in metrics and "caravan_requests_in_flight" in metrics
