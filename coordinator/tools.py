"""OpenAI's tool calls: the request's tools checked, rendered into the prompt, the answer
constrained (tool_choice required or a named function) and parsed back into `tool_calls`.

The call format is Hermes' (Qwen2.5, Hermes, and the Hugging Face templates that follow them):
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one per call; an answer that is all
one call object (Llama 3.x's `{"name": ..., "parameters": {...}}`) is read as one too. A chat template that
takes `tools` renders them itself, with the history's assistant `tool_calls` and `role: tool`
messages; one that does not (SmolLM2's) gets them as llama-server's generic format does: a system
block that lists the functions and the call format, earlier calls written out in that format and
tool results as user turns wrapped in `<tool_response>`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from caravan.pipeline.chat_template import ChatTemplate
from caravan.pipeline.grammar import JSON_LAYOUT, Grammars

from .openai_api import APIError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), re.S)
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a function name, as OpenAI allows it
CHOICES = ("auto", "none", "required")


@dataclass(frozen=True)
class ToolUse:
    """What a request's tools, tool_choice and parallel_tool_calls ask for."""

    functions: tuple[dict, ...]  # {"name", "description", "parameters"} each
    choice: str = "auto"  # "auto", "required", or the one function's name that must be called
    parallel: bool = True  # more than one call in an answer

    @property
    def templated(self) -> list[dict]:
        """The tools as Hugging Face templates take them (OpenAI's form)."""
        return [{"type": "function", "function": f} for f in self.functions]


def tool_use(body: dict) -> ToolUse | None:
    """A chat request's tools, checked; None when it has none or tool_choice is "none"."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool) and parallel is not None:
        raise APIError(400, "parallel_tool_calls must be true or false", "parallel_tool_calls")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools to choose from", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise APIError(400, "tools must be a list of {\"type\": \"function\", \"function\": {...}}", "tools")
    functions = tuple(_function(i, tool) for i, tool in enumerate(tools))
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: two functions have the same name", "tools")
    if choice is None or choice in CHOICES:
        if choice == "none":
            return None
        return ToolUse(functions, choice or "auto", parallel is not False)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not (isinstance(choice, dict) and choice.get("type") == "function" and isinstance(name, str)):
        raise APIError(400, 'tool_choice must be "auto", "none", "required" or {"type": "function", "function": '
                       '{"name": ...}}', "tool_choice")
    if name not in names:
        raise APIError(400, f"tool_choice names {name!r}, which is not one of the tools ({', '.join(names)})",
                       "tool_choice")
    return ToolUse(functions, name, parallel is not False)


def _function(i: int, tool) -> dict:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(function, dict)):
        raise APIError(400, f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., "parameters": '
                       '...}}', "tools")
    name, parameters = function.get("name"), function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise APIError(400, f"tools[{i}].function.name must be 1 to 64 letters, digits, _ or -", "tools")
    if not isinstance(parameters, dict):
        raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema (an object)", "tools")
    description = function.get("description", "")
    return {"name": name, "description": description if isinstance(description, str) else "",
            "parameters": parameters}


# --- the prompt ---------------------------------------------------------------------------


def render_chat(template: ChatTemplate, messages: list[dict], use: ToolUse | None) -> str:
    """The prompt of a conversation with tools: through the template's own `tools` where it
    takes them (Hugging Face's convention), else in the generic format (generic_messages)."""
    if "tools" in template.source:
        return template.render(messages, add_generation_prompt=True, tools=use.templated if use else None)
    return template.render(generic_messages(messages, use), add_generation_prompt=True)


def generic_messages(messages: list[dict], use: ToolUse | None) -> list[dict]:
    """The conversation for a template that knows nothing of tools: the tools described in the
    system message, calls and results written out as text."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(_call_text(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + calls})
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if use is None:
        return out
    if out and out[0]["role"] == "system":
        return [{"role": "system", "content": out[0]["content"] + "\n\n" + _tools_block(use)}, *out[1:]]
    return [{"role": "system", "content": _tools_block(use)}, *out]


def _call_text(name: str, arguments) -> str:
    return CALL_OPEN + json.dumps({"name": name, "arguments": arguments}) + CALL_CLOSE


def _tools_block(use: ToolUse) -> str:
    listed = "\n".join(json.dumps(f) for f in use.functions)
    return ("You can call functions to answer. They are listed in <tools></tools>:\n"
            f"<tools>\n{listed}\n</tools>\n"
            "To call one, answer with its name and arguments as JSON in <tool_call></tool_call> tags, e.g.\n"
            + _call_text(use.functions[0]["name"], {"...": "..."}))


# --- the answer ---------------------------------------------------------------------------


def tool_grammar(use: ToolUse, grammars: Grammars) -> str:
    """The grammar that holds an answer to tool calls (tool_choice required or a named function):
    each call's arguments match that function's parameters."""
    functions = [f for f in use.functions if use.choice in ("auto", "required") or f["name"] == use.choice]
    calls = [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
              "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
    schema = {**(calls[0] if len(calls) == 1 else {"anyOf": calls}), "x-guidance": JSON_LAYOUT}
    # A named function is called once, as OpenAI's forced function call is.
    repeat = ' ("\\n" call)*' if use.parallel and use.choice == "required" else ""
    lark = (f"start: call{repeat}\ncall: {json.dumps(CALL_OPEN)} body {json.dumps(CALL_CLOSE)}\n"
            f"body: %json {json.dumps(schema)}")
    return grammars.lark(lark)


def parse_tool_calls(text: str, use: ToolUse) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of an answer: the calls to functions among the tools (_call_objects),
    each with an id and its arguments as a JSON string; the text outside them is the content (None
    if empty). Without any call the whole text is the content."""
    calls = []
    for call in _call_objects(text):
        name = call.get("name") if isinstance(call, dict) else None
        if name not in {f["name"] for f in use.functions}:
            continue
        arguments = call.get("arguments", call.get("parameters", {}))
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": name, "arguments": json.dumps(arguments)}})
        if not use.parallel:
            break
    if not calls:
        return text, []
    if CALL_OPEN not in text:  # the whole answer was the call
        return None, calls
    # A call the answer did not finish (max_tokens) is neither a call nor content.
    content = _CALL.sub("", text).split(CALL_OPEN, 1)[0].strip()
    return content or None, calls


def _call_objects(text: str) -> list:
    """The JSON of each call in an answer: Hermes' tagged calls, else (Llama 3.x's format) an
    answer that is all one call object or a list of them."""
    tagged = [found.group(1) for found in _CALL.finditer(text)]
    objects = []
    for found in tagged or [text.strip()]:
        try:
            value = json.loads(found)
        except ValueError:
            continue
        objects += value if isinstance(value, list) and not tagged else [value]
    return objects


class CallStream:
    """A streamed answer's text split as it comes: content to send at once, and what may be a
    tool call, held until the answer is whole (then parse_tool_calls)."""

    def __init__(self) -> None:
        self.text = ""
        self._sent = 0
        self._held = False  # a call has begun: everything from here waits

    def push(self, piece: str) -> str:
        """The content that is safe to send now."""
        self.text += piece
        if not self._sent and self.text.lstrip()[:1] in ("{", "["):
            self._held = True  # the answer may be all one call (_call_objects): wait for it whole
        if not self._held:
            start = self.text.find(CALL_OPEN, self._sent)
            if start >= 0:
                self._held = True
                ready = self.text[self._sent:start]
            else:  # a tag may be arriving: keep its possible beginning back
                ready = self.text[self._sent:max(self._sent, len(self.text) - len(CALL_OPEN) + 1)]
            self._sent += len(ready)
            return ready
        return ""

    def finish(self, use: ToolUse) -> tuple[str, list[dict]]:
        """(the content not yet sent, the tool calls), once the answer is whole."""
        content, calls = parse_tool_calls(self.text[self._sent:], use)
        return content or "", calls
