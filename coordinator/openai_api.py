"""OpenAI's API as caravan speaks it: which fields a request may set, how each is checked, and
the shapes of what goes back (errors, choices, logprobs, stream chunks, usage).

Nothing here touches a socket or the scheduler: the routes and the running of a completion are
coordinator/server.py's; Ollama's API (coordinator/ollama.py) reuses the checks and the errors.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.responses import JSONResponse

from caravan.pipeline.grammar import ANY_JSON_OBJECT, GrammarError, Grammars
from caravan.pipeline.sampler import SamplingParams

from .scheduler import Event

if TYPE_CHECKING:
    from .tools import ToolUse

MAX_N = 8  # choices per request
MAX_STOP = 4  # stop strings, as OpenAI allows
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI allows (completions: logprobs up to 5)
OLLAMA_PREFIX = "/api/"  # the routes of Ollama's API (coordinator/ollama.py)

# A JSON escape of a UTF-16 surrogate: only then can a parsed string hold a lone one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# The top-level fields each endpoint reads: OpenAI's, and llama-server's sampling settings.
_COMMON_FIELDS = frozenset({"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty",
                            "repeat_last_n", "frequency_penalty", "presence_penalty", "logit_bias", "n", "stop",
                            "seed", "stream", "logprobs", "response_format", "json_schema", "grammar"})
CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "stream_options", "tools",
                                "tool_choice", "parallel_tool_calls"}
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt"}
# Fields that cannot change an answer, accepted and ignored: who the end user is (user), a client's
# own labels (metadata), OpenAI's storage and tier (store, service_tier) and llama-server's hint to
# reuse a cached prompt (cache_prompt). Any other field a request sets is a 400 naming it.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier", "cache_prompt"})
# Fields caravan does not implement: the values that ask for nothing (accepted as such; so is null)
# and why any other value is refused.
UNSUPPORTED_FIELDS: dict[str, tuple[tuple, str]] = {
    "functions": (([],), "function calls are not implemented"),
    "function_call": (("none",), "function calls are not implemented"),
    "echo": ((False,), "the prompt is not echoed back"),
    "suffix": (("",), "insertion before a suffix is not implemented"),
    "best_of": ((1,), "best_of above 1 is not implemented; ask for n answers instead"),
    "audio": ((), "answers are text only"),
    "modalities": ((["text"],), "answers are text only"),
    "prediction": ((), "predicted outputs are not implemented"),
    "reasoning_effort": ((), "this server runs no reasoning model"),
    "web_search_options": ((), "there is no web search"),
}
LOGIT_BIAS_RANGE = 100.0  # a logit_bias value's bound either way, as OpenAI documents it
PENALTY_RANGE = 2.0  # frequency_penalty's and presence_penalty's bound either way, as OpenAI documents them
STREAM_END = "data: [DONE]\n\n"  # a stream's last event, after the chunk with the usage


# --- requests -----------------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self, ollama: bool = False) -> JSONResponse:
        """OpenAI's error object, or Ollama's `{"error": message}` on Ollama's routes."""
        body = {"error": self.message} if ollama else {"error": {"message": self.message, "type": self.kind,
                                                                  "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def speaks_ollama(scope) -> bool:
    """Whether a request is to Ollama's API (coordinator/ollama.py), whose errors have its own shape."""
    return scope.get("path", "").startswith(OLLAMA_PREFIX)


@dataclass(frozen=True)
class Completion:
    """What a request asks for, validated."""

    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    n: int
    stop: tuple[str, ...]
    stream: bool
    model: str = ""  # the model id asked for: the base model's, or MODEL:ADAPTER
    adapters: tuple[tuple[str, float], ...] = ()  # the LoRA adapters that id stands for
    top_logprobs: int = -1  # -1: no logprobs; k >= 0: each token's logprob and its k most likely
    grammar: str = ""  # what the answer is constrained to (Grammars' compiled text); "" = free text
    tools: ToolUse | None = None  # the functions the answer may call (coordinator/tools.py)


def parse_json_object(raw: bytes) -> dict:
    """A request body as a JSON object, or a 400 naming what is wrong (a worker thread's work:
    a few MiB of JSON take a while)."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw):  # a lone surrogate is valid JSON but not text
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, "the request body has a lone UTF-16 surrogate (\\ud800-\\udfff) in a string; "
                           "send text as valid Unicode") from None
    return body


def refuse_fields(body: dict, accepted: frozenset[str], path: str) -> None:
    """A 400 naming the first field set (not null) that `path` does not take: one caravan does
    not implement (unless at a value that asks for nothing) or one it does not know."""
    for name, value in body.items():
        if value is None or name in accepted or name in IGNORED_FIELDS:
            continue
        if name in UNSUPPORTED_FIELDS:
            harmless, why = UNSUPPORTED_FIELDS[name]
            if any(value == h and type(value) is type(h) for h in harmless):
                continue
            raise APIError(400, f"{name!r} is not supported by this server ({why}); remove it from the request",
                           name, "unsupported_parameter")
        raise APIError(400, f"{name!r} is not a parameter of {path} that this server knows; remove it from the "
                       "request", name, "unknown_parameter")


def completion_request(body: dict, prompt_ids: list[int], chat: bool, n_ctx: int, vocab_size: int, model_id: str,
                       adapters: dict[str, tuple[tuple[str, float], ...]], grammar: str = "",
                       tools: ToolUse | None = None) -> Completion:
    """A request's fields, checked, as the Completion to run for `prompt_ids` (`model_id` is the base
    model's, `adapters` maps each other id served to its LoRA adapters, `grammar` constrains the answer)."""
    room = n_ctx - len(prompt_ids)
    if room <= 0:
        raise APIError(400, f"the prompt is {len(prompt_ids)} tokens; this server's context is {n_ctx}",
                       "messages", "context_length_exceeded")
    max_tokens = number_field(body, "max_tokens", None, 1, math.inf, integer=True)
    if max_tokens is None:
        max_tokens = number_field(body, "max_completion_tokens", room, 1, math.inf, integer=True)
    # Past the context the answer ends where the context does, with finish_reason "length", as
    # llama-server's does: a client asking for "as much as you like" gets an answer, not a 400.
    max_tokens = min(max_tokens, room)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"stop must be a string or a list of at most {MAX_STOP} non-empty strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, "seed must be an integer", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", "stream")
    check_stream_options(body)
    params = sampling_params(body, seed, vocab_size, n_ctx)
    n = number_field(body, "n", 1, 1, MAX_N, integer=True)
    model = body.get("model") or model_id
    return Completion(prompt_ids, params, max_tokens, n, tuple(stop), stream, model, adapters.get(model, ()),
                      top_logprobs_field(body, chat), grammar, tools)


def structured_output(body: dict, grammars: Grammars) -> str:
    """The grammar a request constrains its answer to ("" for free text): OpenAI's response_format
    (json_object, json_schema), or llama-server's json_schema (a schema) or grammar (GBNF); a 400
    naming what the constrained-decoding library refuses."""
    asked = [name for name in ("response_format", "json_schema", "grammar") if body.get(name) not in (None, "")]
    if len(asked) > 1:
        raise APIError(400, f"{' and '.join(asked)} both constrain the answer; send one of them", asked[1])
    if not asked:
        return ""
    name = asked[0]
    value = body[name]
    try:
        if name == "grammar":
            if not isinstance(value, str):
                raise APIError(400, "grammar must be a string of llama.cpp's GBNF", name)
            return grammars.gbnf(value)
        if name == "json_schema":
            if not isinstance(value, (dict, bool)):
                raise APIError(400, "json_schema must be a JSON schema (an object)", name)
            return grammars.json_schema(value)
        schema = _response_format_schema(value)
        return "" if schema is None else grammars.json_schema(schema)
    except GrammarError as exc:
        raise APIError(400, f"{name}: the schema or grammar is refused by the constrained-decoding library: "
                       f"{exc}; change or remove that part", name, "invalid_schema") from None


def _response_format_schema(value) -> dict | bool | None:
    """The JSON schema of OpenAI's response_format (None for "text"); llama-server's json_object
    may carry a schema too."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return value.get("schema") or ANY_JSON_OBJECT
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
            raise APIError(400, 'response_format.json_schema must be an object with a "schema" (a JSON schema)',
                           "response_format")
        if not isinstance(spec.get("strict", False), (bool, type(None))):
            raise APIError(400, "response_format.json_schema.strict must be true or false", "response_format")
        # Not strict asks for no more than strict does: the answer is held to the schema either way.
        return spec.get("schema", ANY_JSON_OBJECT)
    raise APIError(400, 'response_format.type must be "text", "json_object" or "json_schema"', "response_format")


def chat_messages(body: dict) -> list[dict]:
    """A chat request's messages, checked, as the chat template takes them: text content only,
    "developer" (OpenAI's newer name) as "system", an assistant's tool_calls and a tool result's
    tool_call_id kept."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "messages")
    rendered = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise APIError(400, f"messages[{i}] needs a role of system, user, assistant, developer or tool",
                           f"messages[{i}].role")
        content = m.get("content", "")
        if isinstance(content, list):  # content parts: only text ones are understood
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported",
                               f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts",
                           f"messages[{i}].content")
        rendered.append(history_message(i, {**m, "role": "system" if m["role"] == "developer" else m["role"]},
                                        content))
    return rendered


def history_message(i: int, m: dict, content: str) -> dict:
    """A chat message as templates take it: an assistant's tool_calls kept (arguments as objects,
    as Hugging Face templates expect), a tool result's tool_call_id kept."""
    message = {"role": m["role"], "content": content}
    calls = m.get("tool_calls")
    if m["role"] == "assistant" and calls:
        if not isinstance(calls, list) or not all(_is_call(c) for c in calls):
            raise APIError(400, f"messages[{i}].tool_calls must be a list of {{\"id\", \"type\": \"function\", "
                           "\"function\": {\"name\", \"arguments\"}}", f"messages[{i}].tool_calls")
        message["tool_calls"] = [{"id": c.get("id", ""), "type": "function", "function": {
            "name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}} for c in calls]
    if m["role"] == "tool" and isinstance(m.get("tool_call_id"), str):
        message["tool_call_id"] = m["tool_call_id"]
    return message


def _is_call(call) -> bool:
    function = call.get("function") if isinstance(call, dict) else None
    return (isinstance(function, dict) and isinstance(function.get("name"), str)
            and isinstance(function.get("arguments"), (str, dict)))


def _arguments(arguments: str | dict):
    try:
        return json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        return arguments


def prompt_field(body: dict) -> str | list[int]:
    """A completion's prompt, in the forms of OpenAI's that ask for one answer: a string, a list
    of token ids, or a one-element list of either."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise APIError(400, f"prompt: a batch of {len(prompt)} prompts is not supported; send one request per "
                       "prompt", "prompt")
    raise APIError(400, "prompt must be a non-empty string, a list of token ids, or a one-element list of either",
                   "prompt")


def number_field(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise APIError(400, f"{name} must be {'an integer' if integer else 'a number'}", name)
    if not (lo <= value <= hi) or (isinstance(value, float) and not math.isfinite(value)):
        bounds = f"at least {lo:g}" if hi == math.inf else f"between {lo:g} and {hi:g}"
        raise APIError(400, f"{name} must be {bounds}, got {value}", name)
    return value


def sampling_params(body: dict, seed: int | None, vocab_size: int, n_ctx: int) -> SamplingParams:
    """A request's sampling settings; those it leaves out are SamplingParams' defaults (llama-server's
    and Ollama's), not OpenAI's temperature 1 without filters, which a small model answers in noise."""
    default = SamplingParams()
    # vLLM's top_k -1 and llama.cpp's 0 both mean off; so does llama-server's repeat_last_n -1 for "the
    # whole context" (the penalties then see every token there is).
    top_k = number_field(body, "top_k", default.top_k, -1, math.inf, integer=True)
    last_n = number_field(body, "repeat_last_n", default.repeat_last_n, -1, math.inf, integer=True)
    try:
        return SamplingParams(
            temperature=number_field(body, "temperature", default.temperature, 0.0, 2.0),
            top_k=max(top_k, 0),
            top_p=number_field(body, "top_p", default.top_p, 0.0, 1.0),
            min_p=number_field(body, "min_p", default.min_p, 0.0, 1.0),
            repeat_penalty=number_field(body, "repeat_penalty", default.repeat_penalty, 0.0, math.inf),
            repeat_last_n=n_ctx if last_n < 0 else last_n,
            frequency_penalty=number_field(body, "frequency_penalty", default.frequency_penalty, -PENALTY_RANGE,
                                      PENALTY_RANGE),
            presence_penalty=number_field(body, "presence_penalty", default.presence_penalty, -PENALTY_RANGE,
                                     PENALTY_RANGE),
            logit_bias=_logit_bias(body, vocab_size),
            seed=seed,
        )
    except ValueError as exc:  # its message begins with the field's name
        raise APIError(400, str(exc), str(exc).split(" ", 1)[0]) from None


def _logit_bias(body: dict, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: {"token id": bias from -100 to 100}, ids within the vocabulary."""
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise APIError(400, 'logit_bias must be an object of token ids to biases, e.g. {"1234": -100}', "logit_bias")
    pairs = []
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and int(key) < vocab_size):
            raise APIError(400, f"logit_bias: {key!r} is not a token id of this model (0 to {vocab_size - 1})",
                           "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE):
            raise APIError(400, f"logit_bias[{key!r}] must be a number from {-LOGIT_BIAS_RANGE:g} to "
                           f"{LOGIT_BIAS_RANGE:g}, got {value!r}", "logit_bias")
        pairs.append((int(key), float(value)))
    return tuple(pairs)


def top_logprobs_field(body: dict, chat: bool) -> int:
    """-1 for no logprobs, else how many most likely tokens to list with each token: chat's
    `logprobs: true` with `top_logprobs` (0 .. 20), completions' `logprobs` (0 .. 5)."""
    if not chat:
        value = number_field(body, "logprobs", None, 0, 5, integer=True)
        return -1 if value is None else value
    wanted = body.get("logprobs", False)
    if wanted is None:
        wanted = False
    if not isinstance(wanted, bool):
        raise APIError(400, "logprobs must be true or false", "logprobs")
    top = number_field(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
    if top is not None and not wanted:
        raise APIError(400, "top_logprobs needs logprobs set to true", "top_logprobs")
    return (top or 0) if wanted else -1


def check_stream_options(body: dict) -> None:
    """OpenAI's stream_options: only include_usage, and the usage is always in a stream's last chunk."""
    options = body.get("stream_options")
    if options is None:
        return
    if not isinstance(options, dict) or not all(k == "include_usage" and isinstance(v, bool)
                                                 for k, v in options.items()):
        raise APIError(400, "stream_options may only hold include_usage (true or false)", "stream_options")


# --- answers ------------------------------------------------------------------------------


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def finish_reason_of(event: Event) -> str:
    return {"stop": "stop", "length": "length"}.get(event.finish_reason, "stop")


def usage_object(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice_object(index: int, text: str | None, finish_reason: str, logprobs: dict | None, chat: bool,
                  tool_calls: list[dict] | None = None) -> dict:
    """One choice of a non-streamed answer: chat's message (with its tool_calls, if any), or
    completions' text."""
    message = {"role": "assistant", "content": text, **({"tool_calls": tool_calls} if tool_calls else {})}
    return {"index": index, "finish_reason": finish_reason, "logprobs": logprobs,
            **({"message": message} if chat else {"text": text})}


def token_text(tokenizer, token: int) -> str:
    """A token's text as logprobs show it (its bytes, a broken UTF-8 sequence replaced)."""
    return tokenizer.token_bytes(token).decode("utf-8", errors="replace")


def logprobs_object(tokenizer, job: Completion, tokens: list[Event], chat: bool, offset: int) -> dict | None:
    """OpenAI's logprobs object for these tokens: chat's {"content": [...]}, or the legacy
    completions form; `offset` is where the first token starts in the choice's text."""
    if job.top_logprobs < 0:
        return None

    def text(token: int) -> str:
        return token_text(tokenizer, token)

    if chat:
        return {"content": [{
            "token": text(e.token), "logprob": e.logprob, "bytes": list(tokenizer.token_bytes(e.token)),
            "top_logprobs": [{"token": text(t), "logprob": lp, "bytes": list(tokenizer.token_bytes(t))} for t, lp in e.top],
        } for e in tokens]}
    offsets = []
    for e in tokens:
        offsets.append(offset)
        offset += len(text(e.token))
    return {"tokens": [text(e.token) for e in tokens], "token_logprobs": [e.logprob for e in tokens],
            "top_logprobs": [{text(t): lp for t, lp in e.top} for e in tokens] if job.top_logprobs else None,
            "text_offset": offsets}


def server_sent_event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def stream_chunk(base: dict, chat: bool, index: int, text: str | None, finish: str | None, usage: dict | None = None,
                 logprobs: dict | None = None) -> str:
    """One chunk of a streamed answer, as an event: chat's delta (text None: the opening one with
    the role) or completions' text; `base` holds the id, object, created and model."""
    if chat:
        delta = {"role": "assistant", "content": ""} if text is None else {"content": text}
        choice = {"index": index, "delta": delta if finish is None else {}, "finish_reason": finish,
                  "logprobs": logprobs}
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
    payload = {**base, "choices": [choice]}
    if usage is not None:
        payload["usage"] = usage
    return server_sent_event(payload)


def tool_calls_chunk(base: dict, index: int, calls: list[dict]) -> str:
    """The chunk that streams an answer's tool calls, each whole, as OpenAI's delta.tool_calls."""
    delta = {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}
    return server_sent_event({**base, "choices": [{"index": index, "delta": delta, "finish_reason": None,
                                                   "logprobs": None}]})


def stream_error(exc: APIError) -> str:
    """The event that ends a stream whose answer failed after its first chunk (the status is sent)."""
    return server_sent_event({"error": {"message": exc.message, "type": exc.kind}})
