"""Render the chat template a GGUF file carries in `tokenizer.chat_template`.

The template is a Jinja2 string written for Hugging Face transformers, so it is rendered
the way transformers renders it (`transformers/utils/chat_template_utils.py`,
`_compile_jinja_template`): an `ImmutableSandboxedEnvironment` with `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that keeps non-ASCII text
as is, and the globals `raise_exception` and `strftime_now`.

The template text comes from a model file, so it is untrusted: the sandbox keeps it away
from Python internals, and an attempt to reach them is an error rather than an empty string.
The sandbox does not bound time or memory, so rendering runs in a worker process
(`worker_process.ProcessPool`) that is killed at a deadline, has its address space capped and
stops writing at an output bound; a model's template is checked once at load (`check`).
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime
from typing import Any, Iterator

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .worker_process import ProcessPool, WorkerCrashed, WorkTimeout, encode

logger = logging.getLogger(__name__)

# An honest template renders in far less; a client waiting for a runaway gets an error this soon.
RENDER_SECONDS = 2.0
# Output a template may write beyond the messages' text (counted twice over, for templates that
# repeat a message): a few turns' framing and a long system prompt need a small part of it.
RENDER_BASE_CHARS = 1 << 20
# What a render may allocate on top of its worker's start-up size.
RENDER_MEMORY_BYTES = 256 << 20
# Renders at once: a runaway holds one worker until its deadline, the others go on.
RENDER_PROCESSES = 4

# llama.cpp's fallback when a model carries no template (`llm_chat_apply_template`,
# LLM_CHAT_TEMPLATE_CHATML): every turn as `<|im_start|>{role}\n{content}<|im_end|>\n`,
# then `<|im_start|>assistant\n` to open the reply.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# llama.cpp's built-in Gemma format (`llm_chat_apply_template`, LLM_CHAT_TEMPLATE_GEMMA), for
# Gemma files that carry no template: turns as `<start_of_turn>{role}\n{content}<end_of_turn>\n`
# with "assistant" called "model", contents trimmed, system messages (Gemma has none) put
# before the next user turn's text, then `<start_of_turn>model\n` to open the reply.
GEMMA_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + message['content'] | trim -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{%- if ns.system and role != 'model' -%}{{ ns.system + '\n\n' }}{%- set ns.system = '' -%}{%- endif -%}"
    "{{ message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


class ChatTemplateError(ValueError):
    """The chat template or the messages given to it cannot be rendered."""


class ChatTemplateLimitError(ChatTemplateError):
    """The template went past a bound while rendering: time, output, memory or recursion."""


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, but reaching an unsafe attribute raises at once.

    Jinja's sandbox answers `''.__class__` or `lipsum.__globals__` with an Undefined that
    prints as an empty string; a template that probes Python internals is hostile or
    broken, and either way it should fail loudly instead of rendering a quiet prompt.
    """

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
        )


def _raise_exception(message: str) -> None:
    """Templates call this to reject a conversation (e.g. roles that do not alternate)."""
    raise ChatTemplateError(f"chat template rejected the messages: {message}")


def _strftime_now(fmt: str) -> str:
    """Llama 3.1+ templates stamp the current date into the system prompt."""
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' `tojson`: Jinja's own one escapes HTML and forces ASCII."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _where(exc: BaseException) -> str:
    """' (line N)' for the innermost template line in exc's traceback, else ''.

    Jinja rewrites tracebacks so that template code shows up as frames of a file named
    `<template>` (the name `from_string` gives) at the template's own line numbers.
    """
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return "" if line is None else f" (line {line})"


def _validate_messages(messages: Any) -> None:
    """Messages arrive from a client; check the shape every template assumes."""
    if not isinstance(messages, list):
        raise ChatTemplateError(
            f"messages must be a list of {{'role': str, 'content': str}} dicts, "
            f"got {type(messages).__name__}"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatTemplateError(
                f"messages[{i}] must be a dict with 'role' and 'content', "
                f"got {type(message).__name__}"
            )
        for key in ("role", "content"):
            if key not in message:
                raise ChatTemplateError(f"messages[{i}] has no {key!r} key")
            if not isinstance(message[key], str):
                raise ChatTemplateError(
                    f"messages[{i}][{key!r}] must be a str, got {type(message[key]).__name__}"
                )


# --- in the worker process ------------------------------------------------------------------

_COMPILED_KEPT = 8  # templates kept compiled in a worker: one per model served, and the fallbacks
_compiled: dict[str, jinja2.Template] = {}
_environment: ImmutableSandboxedEnvironment | None = None


class _OutputTooLong(Exception):
    pass


def _compile(source: str) -> jinja2.Template:
    global _environment
    if source not in _compiled:
        if _environment is None:
            _environment = _make_environment()
        if len(_compiled) >= _COMPILED_KEPT:
            _compiled.clear()
        try:
            _compiled[source] = _environment.from_string(source)
        except TemplateSyntaxError as exc:
            raise ChatTemplateError(f"chat template syntax error on line {exc.lineno}: {exc.message}") from exc
    return _compiled[source]


def _bounded(chunks: Iterator[str], max_chars: int) -> str:
    """The chunks joined, stopping as soon as they pass `max_chars`."""
    parts, n = [], 0
    for chunk in chunks:
        n += len(chunk)
        if n > max_chars:
            raise _OutputTooLong
        parts.append(chunk)
    return "".join(parts)


def render_request(request: dict) -> dict:
    """The worker's handler: {"text": prompt} or {"error": one line, "limit": bool}."""
    try:
        template = _compile(request["source"])
        context = {key: request[key] for key in ("messages", "add_generation_prompt", "bos_token", "eos_token",
                                                 "tools")}
        return {"text": _bounded(template.generate(**context), request["max_chars"])}
    except ChatTemplateError as exc:
        return {"error": str(exc), "limit": False}
    except SecurityError as exc:
        return {"error": f"chat template is unsafe{_where(exc)}: {exc}", "limit": False}
    except _OutputTooLong:
        return {"error": f"chat template wrote more than {request['max_chars']} characters "
                         "(a loop without end?)", "limit": True}
    except RecursionError as exc:
        return {"error": f"chat template nests or recurses too deeply{_where(exc)}: a macro that calls itself "
                         "without end?", "limit": True}
    except MemoryError as exc:
        return {"error": f"chat template needed more than {RENDER_MEMORY_BYTES >> 20} MiB to render{_where(exc)}",
                "limit": True}
    except Exception as exc:  # noqa: BLE001 - the template is foreign code: any error it raises is its failure
        return {"error": f"chat template failed to render{_where(exc)}: {exc}", "limit": False}


# --- in the caller's process ----------------------------------------------------------------

_pool: ProcessPool | None = None
_pool_lock = threading.Lock()


def _render_pool() -> ProcessPool:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ProcessPool(f"{__name__}:render_request", seconds=RENDER_SECONDS,
                                memory_bytes=RENDER_MEMORY_BYTES, size=RENDER_PROCESSES)
        return _pool


# Two-message conversations a template must render at load: a first request with a system
# prompt, and, for templates without a system role (Gemma, early Mistral), a finished exchange.
_CHECK_CONVERSATIONS: tuple[tuple[list[dict], bool], ...] = (
    ([{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello!"}], True),
    ([{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi! How can I help?"}], False),
)


class ChatTemplate:
    """A model's chat template; `render` turns a conversation into prompt text, in a worker
    process and within RENDER_SECONDS and the output and memory bounds."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    @classmethod
    def chatml(cls) -> ChatTemplate:
        """The template to use when the model file has none, as llama.cpp does."""
        logger.info("model has no chat template; falling back to ChatML")
        return cls(CHATML_TEMPLATE)

    @classmethod
    def fallback(cls, tokens: list[str]) -> ChatTemplate:
        """For a file without a template: Gemma's turns where the vocabulary has Gemma's turn
        tokens (some Gemma GGUF files carry no template), else ChatML."""
        if "<start_of_turn>" in tokens and "<end_of_turn>" in tokens:
            logger.info("model has no chat template; its vocabulary has Gemma's turn tokens: using Gemma's format")
            return cls(GEMMA_TEMPLATE)
        return cls.chatml()

    def render(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict] | None = None,
    ) -> str:
        """The prompt text for `messages`; `add_generation_prompt` opens the reply turn.

        `tools` (JSON-schema function descriptions) are passed through to templates that
        support tool calling; as in transformers, it is `None` when there are none. Safe to
        call from any thread; blocks at most RENDER_SECONDS (plus a worker's start).
        """
        _validate_messages(messages)
        try:
            given = sum(len(m["role"]) + len(m["content"]) for m in messages) + len(encode(tools))
            max_chars = RENDER_BASE_CHARS + 2 * given
            data = encode({"source": self.source, "messages": messages, "tools": tools, "max_chars": max_chars,
                           "add_generation_prompt": bool(add_generation_prompt), "bos_token": self.bos_token,
                           "eos_token": self.eos_token})
        except (TypeError, ValueError, RecursionError) as exc:
            raise ChatTemplateError(f"messages and tools must be plain JSON data: {exc}") from exc
        try:
            # A reply is JSON: a character is at most six bytes there (`\u001f`).
            reply = _render_pool().call(data, max_reply_bytes=6 * max_chars + 4096)
        except WorkTimeout as exc:
            raise ChatTemplateLimitError(f"chat template took longer than {RENDER_SECONDS:g} s to render "
                                         "(a loop without end?)") from exc
        except WorkerCrashed as exc:
            raise ChatTemplateLimitError(f"chat template crashed its render process: {exc}") from exc
        if isinstance(reply, dict) and isinstance(reply.get("text"), str):
            return reply["text"]
        if isinstance(reply, dict) and isinstance(reply.get("error"), str):
            raise (ChatTemplateLimitError if reply.get("limit") else ChatTemplateError)(reply["error"])
        raise ChatTemplateLimitError("chat template's render process sent an invalid reply")

    def check(self) -> None:
        """Render a two-message conversation once, within the bounds; ChatTemplateError if the
        template cannot. A template past a bound fails at once (it is not given a second try)."""
        error: ChatTemplateError | None = None
        for messages, add_generation_prompt in _CHECK_CONVERSATIONS:
            try:
                self.render(messages, add_generation_prompt)
                return
            except ChatTemplateLimitError:
                raise
            except ChatTemplateError as exc:
                error = exc
        assert error is not None
        raise error
