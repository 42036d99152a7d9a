"""Ollama's API beside OpenAI's, on the same server, model and scheduler (docs/api.md of Ollama).

    POST /api/chat       messages rendered with the model's chat template
    POST /api/generate   a prompt rendered as a user message (after `system`, if any), or as it
                         is with "raw": true; an empty prompt (or chat with no messages) only
                         answers done_reason "load": the model is always loaded
    GET  /api/tags       the model served, as NAME:latest, and MODEL:ADAPTER for each --lora adapter
    POST /api/show       its details, parameters, chat template (Jinja, not Go) and GGUF metadata
    GET  /api/ps         the model loaded: it stays so until the server stops
    GET  /api/version    caravan's own version

A request names the model as the server's id, with or without ":latest", or MODEL:ADAPTER; any
other name is a 404 `{"error": "model 'x' not found"}`. Answers stream as NDJSON unless
"stream": false (Ollama streams by default): one object a line, the last with done: true,
done_reason ("stop" or "length"), the token counts and the durations in nanoseconds
(load_duration is 0: the model was loaded when the server started). Errors are Ollama's
`{"error": message}` with the HTTP status, also mid-stream as a line of their own. Answers carry
no `context` (Ollama's deprecated token memory of /api/generate).

`options` map onto caravan's sampling: temperature, top_k, top_p, min_p, repeat_penalty,
repeat_last_n (-1: the whole context), seed (negative: a fresh one), num_predict (0 or less:
until the context is full; past it, as many as fit, done_reason "length"), stop, num_ctx (at
most serve --ctx; it bounds prompt and answer). Options left out take caravan's defaults
(SamplingParams: llama.cpp's temperature 0.8, top_k 40, top_p 0.95, min_p 0.05, no repeat
penalty), not Ollama's (top_p 0.9, repeat_penalty 1.1). Options about how Ollama runs a model on
its hardware (num_gpu, num_thread, use_mmap, ...) are accepted and ignored: serve's flags
decide those. Sampling options caravan does not implement are accepted at the value that leaves
sampling as it is and refused otherwise; a name Ollama does not know either is refused too
(Ollama only logs it): a misspelt option never goes unnoticed.

`format` constrains the answer: "json" to a JSON object, a JSON schema to JSON matching it
(pipeline/grammar.py; a schema the constrained-decoding library refuses is a 400 saying why).
/api/chat's `tools` are offered to the model as OpenAI's are with tool_choice "auto"
(coordinator/tools.py): its calls come back as message.tool_calls (arguments as objects), and
the history's assistant tool_calls and `role: tool` messages are rendered.
Refused with a 400 naming them, until caravan has them: `tools` on /api/generate, `images`,
`think`, `suffix`, `template` and `context`. `keep_alive` is checked (seconds, or a
duration such as "5m") and changes nothing.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib.metadata
import json
import math
import re
import threading
import time
from pathlib import Path
from typing import AsyncIterator

import gguf
import numpy as np
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from caravan.pipeline.catalog import default_cache_dir, file_sha256
from caravan.pipeline.grammar import ANY_JSON_OBJECT, GrammarError
from caravan.pipeline.sampler import SamplingParams

from .openai_api import MAX_TOP_LOGPROBS, OLLAMA_PREFIX, APIError, Completion, logprobs_object, number_field
from .server import API
from .tools import CallStream, ToolUse, parse_tool_calls, tool_use

LATEST = ":latest"  # the tag Ollama gives a model name that has none
MAX_OLLAMA_STOP = 16  # stop strings a request may set: Ollama sets no bound; this one keeps the scan short
NDJSON = "application/x-ndjson"
# /api/ps's expires_at: the model stays loaded while the server runs, which Ollama answers for a
# negative keep_alive with a time centuries away.
LOADED_UNTIL_STOPPED = "9999-12-31T23:59:59Z"
# Options that set caravan's sampling, or bound the request (num_ctx, num_predict).
MAPPED_OPTIONS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed",
                  "num_predict", "stop", "num_ctx")
# Ollama's options about loading and running a model on its hardware (serve's flags decide those),
# and those that matter only with an option left at its neutral value below.
IGNORED_OPTIONS = frozenset({"numa", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all",
                             "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_keep",
                             "mirostat_tau", "mirostat_eta", "penalize_newline"})
# Ollama's sampling options that caravan does not implement, with the value that leaves sampling as it is.
NEUTRAL_OPTIONS = {"typical_p": 1.0, "tfs_z": 1.0, "mirostat": 0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
# Request fields caravan does not implement yet (empty or false is as if left out).
UNSUPPORTED = {
    "tools": "tool calls on /api/generate (tools); send them to /api/chat",
    "images": "images (caravan runs text models)",
    "think": "thinking (think)",
    "suffix": "fill-in-the-middle (suffix)",
    "template": "a prompt template of the request's own (template); send raw: true with a prompt in the model's format",
    "context": "context (deprecated by Ollama); send the conversation to /api/chat",
}
# Go's time.ParseDuration syntax, which Ollama reads a keep_alive string with.
_DURATION = re.compile(r"[-+]?((\d+\.?\d*|\.\d+)|((\d+\.?\d*|\.\d+)(ns|us|µs|ms|s|m|h))+)")


def _unsupported(body: dict, where: str = "") -> None:
    for field, what in UNSUPPORTED.items():
        if body.get(field) not in (None, "", [], {}, False):
            raise APIError(400, f"{where}{field}: {what} is not supported by caravan yet; leave {field} out")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return max(int(seconds * 1e9), 0)


def _line(obj: dict) -> str:
    return json.dumps(obj) + "\n"


def _keep_alive(body: dict) -> None:
    """keep_alive as Ollama takes it (seconds, or a Go duration string; here a string of seconds
    too, as Ollama's OLLAMA_KEEP_ALIVE takes it); caravan keeps the model loaded anyway."""
    value = body.get("keep_alive")
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)):
        return
    if not isinstance(value, str) or not _DURATION.fullmatch(value.strip()):
        raise APIError(400, f"keep_alive must be a number of seconds or a duration such as \"5m\", got {value!r}")


def _stream_flag(body: dict) -> bool:
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false")
    return stream


def _human_number(n: int) -> str:
    """A parameter count as Ollama's details show it: 134.52M, 8.0B."""
    for size, unit, digits in ((1e9, "B", 1), (1e6, "M", 2), (1e3, "K", 2)):
        if n >= size:
            return f"{n / size:.{digits}f}{unit}"
    return str(n)


class OllamaAPI:
    """Ollama's routes on `api`, the OpenAI API's object: its body parsing, authorization,
    prompt rendering, scheduler, stop strings and cancellation serve both."""

    def __init__(self, api: API, cache_dir: Path | None = None):
        self.api = api
        self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
        self._digest: str | None = None
        self._digest_lock = threading.Lock()

    def routes(self) -> list[Route]:
        return [
            Route(OLLAMA_PREFIX + "chat", self.chat, methods=["POST"]),
            Route(OLLAMA_PREFIX + "generate", self.generate, methods=["POST"]),
            Route(OLLAMA_PREFIX + "tags", self.tags, methods=["GET"]),
            Route(OLLAMA_PREFIX + "show", self.show, methods=["POST"]),
            Route(OLLAMA_PREFIX + "ps", self.ps, methods=["GET"]),
            Route(OLLAMA_PREFIX + "version", self.version, methods=["GET"]),
        ]

    # --- names and details -----------------------------------------------------------------------

    def _tagged(self) -> str:
        model_id = self.api.model_id
        return model_id if ":" in model_id else model_id + LATEST

    def _model(self, body: dict, field: str = "model") -> tuple[str, tuple[tuple[str, float], ...]]:
        """The model name asked for, and the LoRA adapters it stands for."""
        name = body.get(field)
        if not isinstance(name, str) or not name:
            raise APIError(400, f"{field} is required (this server runs '{self._tagged()}')")
        if name in (self.api.model_id, self._tagged()):
            return name, ()
        if name in self.api.adapters:
            return name, self.api.adapters[name]
        served = ", ".join(f"'{m}'" for m in (self._tagged(), *self.api.adapters))
        raise APIError(404, f"model '{name}' not found; this server runs {served}")

    def _details(self) -> dict:
        metadata = self.api.model.file.metadata
        family = str(metadata.get("general.architecture", self.api.model.config.arch))
        file_type = metadata.get("general.file_type")
        try:
            level = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            level = "unknown"
        return {"parent_model": "", "format": "gguf", "family": family, "families": [family],
                "parameter_size": _human_number(self._parameter_count()), "quantization_level": level}

    def _parameter_count(self) -> int:
        return sum(int(np.prod(t.shape, dtype=np.int64)) for t in self.api.model.file.tensors.values())

    def _entry(self) -> dict:
        """What /api/tags and /api/ps say of the model file (on a worker thread: the first call may
        read the whole file for its sha256)."""
        path = self.api.model.file.path
        with self._digest_lock:
            if self._digest is None:
                self._digest = file_sha256(path, self.cache_dir)
        modified = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
        return {"modified_at": modified.isoformat().replace("+00:00", "Z"), "size": self.api.model.file.file_size,
                "digest": self._digest, "details": self._details()}

    def _parameters(self) -> dict:
        defaults = SamplingParams()
        return {"temperature": defaults.temperature, "top_k": defaults.top_k, "top_p": defaults.top_p,
                "min_p": defaults.min_p, "repeat_penalty": defaults.repeat_penalty,
                "repeat_last_n": defaults.repeat_last_n, "num_ctx": self.api.scheduler.pipeline.n_ctx}

    def _model_info(self, verbose: bool) -> dict:
        """The GGUF metadata, arrays (the vocabulary) left empty unless `verbose`, as Ollama does."""
        info = {"general.parameter_count": self._parameter_count()}
        for key, value in self.api.model.file.metadata.items():
            if isinstance(value, (list, np.ndarray)):
                value = (value.tolist() if isinstance(value, np.ndarray) else list(value)) if verbose else []
            info[key] = value
        return info

    # --- endpoints -------------------------------------------------------------------------------

    async def version(self, request: HTTPRequest) -> Response:
        try:
            version = importlib.metadata.version("caravan")
        except importlib.metadata.PackageNotFoundError:
            version = "0.0.0"
        return JSONResponse({"version": version})

    async def _authorized_entry(self, request: HTTPRequest) -> dict:
        self.api._authorize(request)
        return await run_in_threadpool(self._entry)

    async def tags(self, request: HTTPRequest) -> Response:
        try:
            entry = await self._authorized_entry(request)
        except APIError as exc:
            return exc.response(ollama=True)
        return JSONResponse({"models": [{"name": name, "model": name, **entry}
                                        for name in (self._tagged(), *self.api.adapters)]})

    async def ps(self, request: HTTPRequest) -> Response:
        try:
            entry = await self._authorized_entry(request)
        except APIError as exc:
            return exc.response(ollama=True)
        del entry["modified_at"]
        name = self._tagged()
        return JSONResponse({"models": [{"name": name, "model": name, **entry, "expires_at": LOADED_UNTIL_STOPPED,
                                         "size_vram": 0, "context_length": self.api.scheduler.pipeline.n_ctx}]})

    async def show(self, request: HTTPRequest) -> Response:
        try:
            body = await self.api._json_body(request)
            self._model(body, "model" if "model" in body else "name")  # older clients send "name"
            verbose = body.get("verbose", False)
            if not isinstance(verbose, bool):
                raise APIError(400, "verbose must be true or false")
        except APIError as exc:
            return exc.response(ollama=True)
        entry = await run_in_threadpool(self._entry)
        parameters = self._parameters()
        metadata = self.api.model.file.metadata
        modelfile = "\n".join([f"# Modelfile of {self.api.model_id}, as caravan serves it; its chat template is "
                               "Jinja (template), which Ollama's TEMPLATE does not take",
                               f"FROM {self.api.model.file.path}",
                               *(f"PARAMETER {key} {value}" for key, value in parameters.items())])
        return JSONResponse({
            "modelfile": modelfile,
            "parameters": "\n".join(f"{key:<30} {value}" for key, value in parameters.items()),
            "template": str(metadata.get("tokenizer.chat_template") or self.api.model.chat_template.source),
            "license": str(metadata.get("general.license", "")),
            "details": entry["details"],
            "model_info": await run_in_threadpool(self._model_info, verbose),
            "capabilities": ["completion"],
            "modified_at": entry["modified_at"],
        })

    async def chat(self, request: HTTPRequest) -> Response:
        return await self._complete(request, chat=True)

    async def generate(self, request: HTTPRequest) -> Response:
        return await self._complete(request, chat=False)

    # --- completions -----------------------------------------------------------------------------

    def _messages(self, body: dict) -> list[dict]:
        """A chat's messages, in the OpenAI form the API's _chat_ids renders."""
        messages = body.get("messages")
        if messages is None:
            return []
        if not isinstance(messages, list):
            raise APIError(400, "messages must be a list")
        for i, message in enumerate(messages):
            if isinstance(message, dict):
                _unsupported({"images": message.get("images")}, f"messages[{i}].")
        return [{"role": m.get("role"), "content": m.get("content", ""),
                 **({"tool_calls": m["tool_calls"]} if m.get("tool_calls") else {})} if isinstance(m, dict) else m
                for m in messages]

    async def _prompt_ids(self, body: dict, chat: bool, tools: ToolUse | None = None) -> list[int] | None:
        """The prompt's tokens (rendered and tokenized on a worker thread), or None when there are no
        messages or no prompt."""
        if chat:
            messages = self._messages(body)
            return await run_in_threadpool(self.api._chat_ids, {"messages": messages}, tools) if messages else None
        prompt = body.get("prompt")
        if prompt is None or prompt == "":
            return None
        if not isinstance(prompt, str):
            raise APIError(400, "prompt must be a string")
        return await run_in_threadpool(self._generate_ids, body)

    def _generate_ids(self, body: dict) -> list[int]:
        """A generate request's prompt, tokenized (on a worker thread): rendered as a user message
        after `system`, or as it is with raw."""
        prompt, system, raw = body.get("prompt"), body.get("system"), body.get("raw", False)
        if not isinstance(raw, bool):
            raise APIError(400, "raw must be true or false")
        if system is not None and not isinstance(system, str):
            raise APIError(400, "system must be a string")
        if raw:
            if system:
                raise APIError(400, "system is not used with raw: true; put it in the prompt")
            return self.api._prompt_ids({"prompt": prompt})
        messages = [{"role": "system", "content": system}] if system else []
        return self.api._chat_ids({"messages": [*messages, {"role": "user", "content": prompt}]})

    def _job(self, body: dict, prompt_ids: list[int], model: str, adapters, tools: ToolUse | None) -> Completion:
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise APIError(400, "options must be an object")
        for key, value in options.items():
            if key in NEUTRAL_OPTIONS and value not in (None, NEUTRAL_OPTIONS[key]):
                raise APIError(400, f"options.{key}: caravan does not implement it yet; leave it out or set it to "
                               f"{NEUTRAL_OPTIONS[key]}")
            if key not in MAPPED_OPTIONS and key not in IGNORED_OPTIONS and key not in NEUTRAL_OPTIONS:
                raise APIError(400, f"options.{key} is not an option caravan knows (it maps "
                               f"{', '.join(MAPPED_OPTIONS)})")
        named = {f"options.{key}": value for key, value in options.items()}  # number_field names what it refuses
        n_ctx = self.api.scheduler.pipeline.n_ctx
        num_ctx = number_field(named, "options.num_ctx", n_ctx, 1, math.inf, integer=True)
        if num_ctx > n_ctx:
            raise APIError(400, f"options.num_ctx {num_ctx} is more than this server's context of {n_ctx} "
                           "(caravan serve --ctx sets it)")
        room = num_ctx - len(prompt_ids)
        if room <= 0:
            raise APIError(400, f"the prompt is {len(prompt_ids)} tokens; this request's context is {num_ctx}")
        predict = number_field(named, "options.num_predict", -1, -math.inf, math.inf, integer=True)
        defaults = SamplingParams()
        seed = number_field(named, "options.seed", None, -math.inf, math.inf, integer=True)
        last_n = number_field(named, "options.repeat_last_n", defaults.repeat_last_n, -1, math.inf, integer=True)
        top_k = number_field(named, "options.top_k", defaults.top_k, 0, math.inf, integer=True)
        vocab = self.api.model.tokenizer.vocab_size
        try:
            params = SamplingParams(
                temperature=number_field(named, "options.temperature", defaults.temperature, 0.0, math.inf),
                top_k=top_k if top_k < vocab else 0,  # 0: the whole vocabulary, which a larger k means too
                top_p=number_field(named, "options.top_p", defaults.top_p, 0.0, 1.0),
                min_p=number_field(named, "options.min_p", defaults.min_p, 0.0, 1.0),
                repeat_penalty=number_field(named, "options.repeat_penalty", defaults.repeat_penalty, 0.0, math.inf),
                repeat_last_n=num_ctx if last_n == -1 else min(last_n, num_ctx),  # no more tokens than that to look at
                seed=None if seed is None or seed < 0 else seed,
            )
        except ValueError as exc:
            raise APIError(400, f"options: {exc}") from None
        return Completion(prompt_ids, params, room if predict <= 0 else min(predict, room), 1, _stop(options),
                          _stream_flag(body), model, adapters, _top_logprobs(body), self._format(body), tools)

    def _format(self, body: dict) -> str:
        """The grammar of Ollama's `format`: "json" for a JSON object, or a JSON schema ("" for free text)."""
        value = body.get("format")
        if value in (None, ""):
            return ""
        if value != "json" and not isinstance(value, dict):
            raise APIError(400, f'format must be "json" or a JSON schema (an object), got {value!r}')
        try:
            return self.api.model.grammars.json_schema(ANY_JSON_OBJECT if value == "json" else value)
        except GrammarError as exc:
            raise APIError(400, f"format: the schema is refused by the constrained-decoding library: {exc}; "
                           "change or remove that part") from None

    async def _complete(self, request: HTTPRequest, chat: bool) -> Response:
        started = time.perf_counter()
        try:
            body = await self.api._json_body(request)
            model, adapters = self._model(body)
            _unsupported({key: value for key, value in body.items() if not (chat and key == "tools")})
            _keep_alive(body)
            tools = tool_use({"tools": body.get("tools")}) if chat else None
            ids = await self._prompt_ids(body, chat, tools)
            if ids is None:  # nothing to answer: Ollama's way to load a model, which is loaded
                _stream_flag(body)
                return JSONResponse({**self._reply(model, chat, ""), "done": True, "done_reason": "load"})
            # a schema takes a while to compile
            job = await run_in_threadpool(self._job, body, ids, model, adapters, tools)
        except APIError as exc:
            return exc.response(ollama=True)
        runs = self.api._start(job, asyncio.get_running_loop())
        if job.stream:
            return StreamingResponse(self._stream(job, runs, chat, started), media_type=NDJSON)
        try:
            text, reason, tokens = await self.api._await_answer(self.api._whole(job, *runs[0]), runs, request)
        except APIError as exc:
            return exc.response(ollama=True)
        content, calls = parse_tool_calls(text, job.tools) if job.tools else (text, [])
        reply = self._reply(job.model, chat, content or "", self._logprobs(job, tokens), calls)
        return JSONResponse(self._done(job, runs[0][0], len(tokens), reply, reason, started))

    def _reply(self, model: str, chat: bool, text: str, logprobs: list | None = None,
               calls: list[dict] | None = None) -> dict:
        """One object of an answer; `calls` (OpenAI's tool_calls) as Ollama's, arguments as objects."""
        message = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = [{"function": {"name": c["function"]["name"],
                                                   "arguments": json.loads(c["function"]["arguments"])}}
                                     for c in calls]
        reply = {"model": model, "created_at": _now(), **({"message": message} if chat else {"response": text}),
                 "done": False}
        if logprobs is not None:
            reply["logprobs"] = logprobs
        return reply

    def _logprobs(self, job: Completion, tokens) -> list | None:
        """Ollama's logprobs: OpenAI chat's content entries (token, logprob, bytes, top_logprobs)."""
        found = logprobs_object(self.api.model.tokenizer, job, tokens, True, 0)
        return None if found is None else found["content"]

    def _done(self, job: Completion, request, generated: int, reply: dict, reason: str, started: float) -> dict:
        """The last object of an answer: why it ended, its counts and durations (nanoseconds);
        `generated` counts its tokens as the OpenAI routes' usage does."""
        end = time.perf_counter()
        prompt_s = request.first_token_s
        return {**reply, "done": True, "done_reason": reason, "total_duration": _ns(end - started),
                "load_duration": 0, "prompt_eval_count": len(job.prompt_ids), "prompt_eval_duration": _ns(prompt_s),
                "eval_count": generated, "eval_duration": _ns(end - request.submitted - prompt_s)}

    async def _stream(self, job: Completion, runs, chat: bool, started: float) -> AsyncIterator[str]:
        request, events = runs[0]
        reason, calls, generated = "length", CallStream() if job.tools else None, 0
        try:
            async for piece, finish, tokens in self.api._pieces(job, request, events):
                reason = finish or reason
                generated += len(tokens)
                piece = calls.push(piece) if calls else piece
                if piece or (tokens and job.top_logprobs >= 0):
                    yield _line(self._reply(job.model, chat, piece, self._logprobs(job, tokens)))
            if calls:  # what was held back: the rest of the content, and the calls
                tail, found = calls.finish(job.tools)
                if tail or found:
                    yield _line(self._reply(job.model, chat, tail, None, found))
            yield _line(self._done(job, request, generated, self._reply(job.model, chat, ""), reason, started))
        except APIError as exc:
            yield _line({"error": exc.message})
        finally:  # the client may be gone: free the sequence's caches
            request.cancel()


def _stop(options: dict) -> tuple[str, ...]:
    stop = options.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > MAX_OLLAMA_STOP or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"options.stop must be a string or a list of at most {MAX_OLLAMA_STOP} non-empty strings")
    return tuple(stop)


def _top_logprobs(body: dict) -> int:
    """-1 for no logprobs, else how many most likely tokens to list with each token."""
    wanted = body.get("logprobs") or False
    if not isinstance(wanted, bool):
        raise APIError(400, "logprobs must be true or false")
    top = number_field(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
    if top is not None and not wanted:
        raise APIError(400, "top_logprobs needs logprobs set to true")
    return (top or 0) if wanted else -1
