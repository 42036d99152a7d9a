"""Render the chat template a GGUF file carries in `tokenizer.chat_template`.

The template is a Jinja2 string written for Hugging Face transformers, so it is rendered
the way transformers renders it (`transformers/utils/chat_template_utils.py`,
`_compile_jinja_template`): an `ImmutableSandboxedEnvironment` with `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that keeps non-ASCII text
as is, and the globals `raise_exception` and `strftime_now`.

The template text comes from a model file, so it is untrusted: the sandbox keeps it away
from Python internals, and an attempt to reach them is an error rather than an empty string.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

logger = logging.getLogger(__name__)

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


class ChatTemplate:
    """A compiled chat template; `render` turns a conversation into prompt text."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        try:
            self._template = _make_environment().from_string(source)
        except TemplateSyntaxError as exc:
            raise ChatTemplateError(
                f"chat template syntax error on line {exc.lineno}: {exc.message}"
            ) from exc
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
        support tool calling; as in transformers, it is `None` when there are none.
        """
        _validate_messages(messages)
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=tools,
            )
        except ChatTemplateError:
            raise
        except SecurityError as exc:
            raise ChatTemplateError(f"chat template is unsafe{_where(exc)}: {exc}") from exc
        except (TemplateError, TypeError) as exc:
            # TypeError: the template combined values it cannot (e.g. str + None).
            raise ChatTemplateError(f"chat template failed to render{_where(exc)}: {exc}") from exc
