"""OpenAI's tool calls on `caravan serve`, through the official openai client on the real model:
tools rendered into the prompt, a required or named call held to the function's parameter schema
(so even a 135M model makes a valid call), `tool_calls` streamed and not, and a second turn with
the tool's result."""

from __future__ import annotations

import json

import pytest

from caravan.coordinator.tools import CallStream, ToolUse, generic_messages, parse_tool_calls, render_chat
from support.serve import MODEL, QUESTION

openai = pytest.importorskip("openai", reason="the openai client is in the test extra")
jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the test extra")

WEATHER_PARAMETERS = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 40},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city.",
                                            "parameters": WEATHER_PARAMETERS}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a time zone.",
                                         "parameters": {"type": "object", "properties": {
                                             "zone": {"type": "string", "maxLength": 30}}, "required": ["zone"],
                                             "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
MAX_TOKENS = 100


def check_call(call, name: str = "get_weather") -> dict:
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == name
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER_PARAMETERS if name == "get_weather" else TIME["function"]["parameters"])
    return arguments



@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_required_or_named_call_validates_and_a_second_turn_completes(server, choice):
    client = server.client()
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
                                           parallel_tool_calls=False, temperature=0, max_tokens=MAX_TOKENS)
    choice0 = reply.choices[0]
    assert choice0.finish_reason == "tool_calls", choice0.message
    (call,) = choice0.message.tool_calls
    name = call.function.name if choice == "required" else "get_weather"
    check_call(call, name)
    history = [*ASK, choice0.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "sunny"})}]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER, TIME], temperature=0,
                                            max_tokens=MAX_TOKENS)
    assert second.choices[0].finish_reason in ("stop", "tool_calls"), second.choices[0]
    assert second.choices[0].message.content or second.choices[0].message.tool_calls


@pytest.mark.model
@pytest.mark.slow
def test_tool_calls_stream_as_delta_tool_calls(server):
    chunks = list(server.client().chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], seed=2, max_tokens=MAX_TOKENS, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls: dict[int, dict] = {}
    for delta in deltas:
        for part in delta.tool_calls or ():
            entry = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += part.id or ""
            entry["name"] += part.function.name or ""
            entry["arguments"] += part.function.arguments or ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert len(calls) >= 1 and all(c["name"] == "get_weather" and c["id"].startswith("call_") for c in calls.values())
    for entry in calls.values():
        jsonschema.validate(json.loads(entry["arguments"]), WEATHER_PARAMETERS)
    assert not "".join(d.content or "" for d in deltas).strip()  # the call is not also sent as text


@pytest.mark.model
@pytest.mark.slow
def test_auto_and_none_answer(server):
    """tool_choice auto leaves the model free (a call or words, either well formed); none renders no tools."""
    client = server.client()
    auto = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], temperature=0,
                                          max_tokens=MAX_TOKENS).choices[0]
    assert auto.finish_reason in ("stop", "tool_calls", "length")
    for call in auto.message.tool_calls or ():
        json.loads(call.function.arguments)
    none = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=[WEATHER], tool_choice="none",
                                          temperature=0, max_tokens=8).choices[0]
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8).choices[0]
    assert none.message.content == plain.message.content and not none.message.tool_calls


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("fields,param,says", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice",
     "'get_time'"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", "name"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "same name"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array", "uniqueItems": True}}}],
      "tool_choice": "required"}, "tools", "uniqueItems"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "send one"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]}]}, "messages[0].tool_calls",
     "tool_calls"),
])
def test_bad_tools_get_a_400_naming_them(server, fields, param, says):
    body = {"messages": ASK, **fields}
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(model=MODEL, max_tokens=2, **{k: body.pop(k) for k in ("messages",)},
                                                extra_body=body)
    error = caught.value.body
    assert error["param"] == param and says in error["message"], error


# --- in process ---------------------------------------------------------------------------

USE = ToolUse(({"name": "get_weather", "description": "", "parameters": WEATHER_PARAMETERS},))


def test_calls_are_parsed_out_of_the_answer_and_the_stream():
    text = 'Let me look.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}' \
           '</tool_call>\n<tool_call>{"name": "nowhere", "arguments": {}}</tool_call>'
    content, calls = parse_tool_calls(text, USE)
    assert content == "Let me look." and len(calls) == 1
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "unit": "celsius"}
    assert parse_tool_calls("Just words.", USE) == ("Just words.", [])
    stream = CallStream()
    sent = "".join(stream.push(text[i:i + 3]) for i in range(0, len(text), 3))
    assert sent == "Let me look.\n"
    assert stream.finish(USE)[1][0]["function"]["name"] == "get_weather"


def test_a_template_without_tools_gets_them_as_text():
    history = [{"role": "user", "content": "Weather in Oslo?"},
               {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                   "name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}}]},
               {"role": "tool", "content": "18 C", "tool_call_id": "call_1"}]
    out = generic_messages(history, USE)
    assert out[0]["role"] == "system" and '"get_weather"' in out[0]["content"] and "<tool_call>" in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": '<tool_call>{"name": "get_weather", "arguments": {"city": '
                                                      '"Oslo", "unit": "celsius"}}</tool_call>'}
    assert out[3] == {"role": "user", "content": "<tool_response>\n18 C\n</tool_response>"}


# The shape of Qwen2.5's template around tools: it takes `tools`, an assistant's tool_calls (their
# arguments as objects) and `role: tool` results.
HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n"
    "</tools><|im_end|>\n{% endif %}"
    "{%- for message in messages %}{%- if message.role == 'assistant' and message.tool_calls %}"
    "<|im_start|>assistant\n{% for call in message.tool_calls %}<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}\n'
    "</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}{%- endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_that_takes_tools_renders_them_itself():
    from caravan.coordinator.openai_api import chat_messages
    from caravan.pipeline.chat_template import ChatTemplate

    body = {"messages": [{"role": "user", "content": "Weather in Oslo?"},
                         {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                          "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
                         {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]}
    text = render_chat(ChatTemplate(HERMES_TEMPLATE), chat_messages(body), USE)
    assert '"name": "get_weather"' in text.split("</tools>")[0]  # the tools through the template's variable
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}' in text
    assert "<tool_response>\n18 C\n</tool_response>" in text and text.endswith("<|im_start|>assistant\n")


def test_an_answer_that_is_all_one_call_is_read_as_one():
    """Llama 3.x's format: the whole answer one JSON call, with "parameters"."""
    content, calls = parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Rome", "unit": "celsius"}}', USE)
    assert content is None and json.loads(calls[0]["function"]["arguments"])["city"] == "Rome"
    stream = CallStream()
    assert stream.push('{"name": "get_weather", ') == "" and stream.push('"parameters": {}}') == ""
    assert stream.finish(USE)[1][0]["function"]["name"] == "get_weather"
    assert parse_tool_calls('{"answer": 42}', USE) == ('{"answer": 42}', [])


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_ollama_chat_with_tools(server, stream):
    """Ollama's /api/chat through its client: an answer held (by format) to one call object comes back
    as message.tool_calls with arguments that validate, streamed and not; a second turn with the
    call and its result in the history completes."""
    ollama = pytest.importorskip("ollama", reason="the ollama client is in the test extra")
    client = ollama.Client(host=server.base_url, timeout=120)
    call_schema = {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER_PARAMETERS},
                   "required": ["name", "arguments"], "additionalProperties": False}
    options = {"temperature": 0, "num_predict": MAX_TOKENS}
    parts = client.chat(model=MODEL, messages=ASK, tools=[WEATHER], format=call_schema, options=options, stream=stream)
    calls = [call for part in (parts if stream else [parts]) for call in part.message.tool_calls or ()]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(dict(calls[0].function.arguments), WEATHER_PARAMETERS)
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": dict(calls[0].function.arguments)}}]},
        {"role": "tool", "content": "18 C, sunny"}]
    second = client.chat(model=MODEL, messages=history, tools=[WEATHER], options=options)
    assert second.done and second.done_reason in ("stop", "length") and second.message.content
