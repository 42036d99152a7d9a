"""Chat templates render as transformers renders them, and hostile ones fail closed."""

import concurrent.futures
import ctypes
import json
import resource
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from caravan.pipeline.chat_template import (
    CHATML_TEMPLATE,
    RENDER_SECONDS,
    ChatTemplate,
    ChatTemplateError,
    ChatTemplateLimitError,
)
from support.serve import Server
from support.tiny_models import tiny_llama, write_gguf

# tokenizer.chat_template of HuggingFaceTB/SmolLM2-*-Instruct, verbatim.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Meta-Llama-3-8B-Instruct's template, verbatim: exercises bos_token and `| trim`.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# Mistral-7B-Instruct-v0.1's template, verbatim: [INST] turns, eos after each answer,
# and raise_exception when roles do not alternate.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "How are you?"},
]


def test_smollm2_full_conversation():
    text = ChatTemplate(SMOLLM2_TEMPLATE).render(CONVERSATION)
    assert text == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_smollm2_user_only_gets_default_system_prompt():
    text = ChatTemplate(SMOLLM2_TEMPLATE).render([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\n"
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_smollm2_without_generation_prompt():
    text = ChatTemplate(SMOLLM2_TEMPLATE).render(CONVERSATION[:3], add_generation_prompt=False)
    assert text.endswith("<|im_start|>assistant\nHello!<|im_end|>\n")


def test_chatml_fallback_matches_smollm2_when_a_system_prompt_is_given():
    # SmolLM2's template is ChatML plus a default system prompt.
    assert ChatTemplate.chatml().render(CONVERSATION) == ChatTemplate(SMOLLM2_TEMPLATE).render(
        CONVERSATION
    )


def test_llama3_template():
    template = ChatTemplate(LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    text = template.render(
        [{"role": "system", "content": "Be brief.  "}, {"role": "user", "content": "Hi"}]
    )
    assert text == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_mistral_template():
    template = ChatTemplate(MISTRAL_TEMPLATE, bos_token="<s>", eos_token="</s>")
    text = template.render(CONVERSATION[1:])
    assert text == "<s>[INST] Hi [/INST]Hello!</s>[INST] How are you? [/INST]"


def test_raise_exception_in_template_is_chat_template_error():
    template = ChatTemplate(MISTRAL_TEMPLATE, bos_token="<s>", eos_token="</s>")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        template.render(CONVERSATION)  # starts with a system turn


def test_blocks_are_trimmed_as_in_transformers():
    source = (
        "{% for message in messages %}\n"
        "    {% if message['role'] == 'user' %}\n"
        "U:{{ message['content'] }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
    )
    text = ChatTemplate(source).render([{"role": "user", "content": "a"}] * 2)
    assert text == "U:a\nU:a\n"


def test_tojson_keeps_non_ascii_and_tools_are_passed():
    source = "{{ tools | tojson }}|{{ messages[0]['content'] | tojson }}"
    tools = [{"name": "météo", "parameters": {}}]
    text = ChatTemplate(source).render([{"role": "user", "content": "café"}], tools=tools)
    assert text == '[{"name": "météo", "parameters": {}}]|"café"'


def test_tools_default_to_none():
    text = ChatTemplate("{% if tools is not none %}T{% else %}N{% endif %}").render([])
    assert text == "N"


def test_strftime_now():
    text = ChatTemplate("{{ strftime_now('%Y') }}").render([])
    assert text == str(datetime.now().year)


def test_syntax_error_names_the_line():
    # Compiling is the worker's job too: the error comes with the first render.
    with pytest.raises(ChatTemplateError, match="syntax error on line 3"):
        ChatTemplate("ok\nstill ok\n{% if %}").render([])


@pytest.mark.parametrize(
    "source",
    [
        "{{ lipsum.__globals__ }}",
        "{{ lipsum.__globals__['os'].popen('id').read() }}",
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ messages.__class__ }}",
        "{{ raise_exception.__globals__ }}",
    ],
)
def test_sandbox_escape_fails_without_leaking(source):
    with pytest.raises(ChatTemplateError, match="unsafe") as info:
        ChatTemplate(source).render([{"role": "user", "content": "Hi"}])
    message = str(info.value)
    # The error names the attribute, never the object it would have exposed.
    for leaked in ("<module", "<class", "builtins", "uid="):
        assert leaked not in message


def test_template_cannot_mutate_the_messages():
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% set _ = messages.append({'role': 'x'}) %}").render(messages)
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% set _ = messages[0].update({'role': 'x'}) %}").render(messages)
    assert messages == [{"role": "user", "content": "Hi"}]


def test_runtime_type_error_is_chat_template_error():
    with pytest.raises(ChatTemplateError, match="line 2"):
        ChatTemplate("fine\n{{ 'a' + none }}").render([])


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ({"role": "user", "content": "Hi"}, "must be a list"),
        ("Hi", "must be a list"),
        (["Hi"], r"messages\[0\] must be a dict"),
        ([{"content": "Hi"}], r"messages\[0\] has no 'role'"),
        ([{"role": "user"}], r"messages\[0\] has no 'content'"),
        ([{"role": "user", "content": None}], r"messages\[0\]\['content'\] must be a str"),
        (
            [{"role": "user", "content": "Hi"}, {"role": 1, "content": "x"}],
            r"messages\[1\]\['role'\] must be a str",
        ),
    ],
)
def test_bad_messages(messages, expected):
    with pytest.raises(ChatTemplateError, match=expected):
        ChatTemplate(SMOLLM2_TEMPLATE).render(messages)


GEMMA_CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "  Be brief. "}, {"role": "user", "content": "Hi!\n"},
     {"role": "assistant", "content": " Hello."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
]


@pytest.mark.oracle
@pytest.mark.parametrize("messages", GEMMA_CONVERSATIONS, ids=["user", "system-and-turns", "ends-with-model"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_gemma_fallback_matches_llama_cpp_builtin(messages, add_generation_prompt):
    """A Gemma file without a template renders as llama.cpp's built-in "gemma" format."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the reference engine) is not installed")
    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages])
    buf = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_chat_apply_template(b"gemma", chat, len(messages), add_generation_prompt, buf, len(buf))
    expected = buf.raw[:n].decode()
    template = ChatTemplate.fallback(["<pad>", "<start_of_turn>", "<end_of_turn>"])
    assert template.render(messages, add_generation_prompt) == expected


def test_fallback_without_gemma_tokens_is_chatml():
    assert ChatTemplate.fallback(["<|im_start|>", "a"]).source == ChatTemplate.chatml().source


# --- bounds: a model's template is foreign code --------------------------------------------------

# The hang of issue 22: ten billion iterations that write nothing.
NESTED_LOOPS = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"
HI = [{"role": "user", "content": "Hi"}]
# Margin over RENDER_SECONDS for a loaded machine (a fresh worker's start is not counted in the bound).
SLACK_SECONDS = 10.0


def bounded(call, seconds: float = RENDER_SECONDS + SLACK_SECONDS):
    """call() in a daemon thread: its result or exception, or a test failure (not a hang) when it
    has not returned in `seconds`."""
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"render did not return within {seconds:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_nested_loops_end_in_an_error_within_the_time_bound():
    ChatTemplate.chatml().render(HI)  # a worker already running: its start is not what is timed
    peak = peak_rss_mib()
    start = time.monotonic()
    with pytest.raises(ChatTemplateLimitError, match=f"took longer than {RENDER_SECONDS:g} s"):
        bounded(lambda: ChatTemplate(NESTED_LOOPS).render(HI))
    assert RENDER_SECONDS - 0.1 < time.monotonic() - start < RENDER_SECONDS + SLACK_SECONDS
    assert peak_rss_mib() - peak < 50


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        # Writes ten bytes an iteration: stopped at the output bound while it writes.
        ("{% for i in range(99999) %}{% for j in range(99999) %}xxxxxxxxxx{% endfor %}{% endfor %}",
         r"wrote more than \d+ characters"),
        ("{{ 'x' * 10**9 }}", "needed more than 256 MiB"),
        # Doubles a string until the worker's memory bound stops it.
        ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
         "needed more than 256 MiB|wrote more than"),
    ],
    ids=["loops", "repeat", "doubling"],
)
def test_output_and_memory_bombs_are_errors(source, expected):
    peak = peak_rss_mib()
    with pytest.raises(ChatTemplateLimitError, match=expected):
        bounded(lambda: ChatTemplate(source).render(HI))
    assert peak_rss_mib() - peak < 50  # the bomb went off in the worker, not here


def test_recursive_macro_is_a_chat_template_error():
    source = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"
    with pytest.raises(ChatTemplateLimitError, match="recurses too deeply"):
        bounded(lambda: ChatTemplate(source).render(HI))


@pytest.mark.parametrize("source", ["{{ 1 / 0 }}", "{{ 'abc'.index('z') }}", "{{ 10.0 ** 400 }}"])
def test_any_exception_of_the_template_is_a_chat_template_error(source):
    with pytest.raises(ChatTemplateError, match="failed to render"):
        ChatTemplate(source).render(HI)


def test_after_a_killed_runaway_the_next_render_works():
    with pytest.raises(ChatTemplateLimitError):
        bounded(lambda: ChatTemplate(NESTED_LOOPS).render(HI))
    text = bounded(lambda: ChatTemplate(SMOLLM2_TEMPLATE).render(CONVERSATION), SLACK_SECONDS)
    assert text == ChatTemplate.chatml().render(CONVERSATION)


def test_renders_from_many_threads_do_not_wait_for_a_runaway():
    smollm2 = ChatTemplate(SMOLLM2_TEMPLATE)
    opened = smollm2.render(CONVERSATION).removesuffix("<|im_start|>assistant\n")

    def render(i: int) -> str:
        return smollm2.render(CONVERSATION + [{"role": "user", "content": str(i)}])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(render, range(16)))  # workers already running: their start is not what is timed
        runaway = pool.submit(ChatTemplate(NESTED_LOOPS).render, HI)
        time.sleep(0.2)  # the runaway holds its worker
        start = time.monotonic()
        texts = list(pool.map(render, range(200)))
        elapsed = time.monotonic() - start
        with pytest.raises(ChatTemplateLimitError):
            runaway.result(timeout=RENDER_SECONDS + SLACK_SECONDS)
    assert texts == [opened + f"<|im_start|>user\n{i}<|im_end|>\n<|im_start|>assistant\n" for i in range(200)]
    assert elapsed < RENDER_SECONDS, f"{elapsed:.2f} s: renders waited for the runaway"


@pytest.mark.slow
def test_check_renders_a_two_message_conversation_once():
    ChatTemplate(SMOLLM2_TEMPLATE).check()
    ChatTemplate(MISTRAL_TEMPLATE, bos_token="<s>", eos_token="</s>").check()  # no system role: user, assistant
    ChatTemplate.fallback(["<start_of_turn>", "<end_of_turn>"]).check()
    with pytest.raises(ChatTemplateError, match="rejected the messages: no"):
        ChatTemplate("{{ raise_exception('no') }}").check()
    start = time.monotonic()
    with pytest.raises(ChatTemplateLimitError, match="took longer than"):
        bounded(lambda: ChatTemplate(NESTED_LOOPS).check(), 2 * RENDER_SECONDS + SLACK_SECONDS)
    assert time.monotonic() - start < 2 * RENDER_SECONDS  # a runaway gets no second try


# --- a model with such a template, served -----------------------------------------------------


def model_with_template(path: Path, source: str) -> Path:
    metadata, tensors = tiny_llama(n_layers=1, ctx=64)
    return write_gguf(path, {**metadata, "tokenizer.chat_template": source}, tensors)


def caravan(*args: str, stdin: str = "", timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "caravan.coordinator", *args, "-t", "1"], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_model_whose_template_runs_away_fails_at_load(tmp_path):
    path = model_with_template(tmp_path / "bomb.gguf", NESTED_LOOPS)
    expected = (f"caravan: error: {path}: its chat template cannot render a two-message conversation: "
                f"chat template took longer than {RENDER_SECONDS:g} s to render (a loop without end?)")
    for args in (["serve", "--port", "0"], ["chat"]):
        result = caravan(*args, "--model", str(path), stdin="Hi\n")
        assert result.returncode == 1, result.stderr
        assert result.stderr.splitlines() == [expected]
        assert result.stdout == ""
    # A raw completion never renders the template: the model still runs.
    result = caravan("run", "Hi", "--model", str(path), "--max-tokens", "2")
    assert result.returncode == 0, result.stderr


def post_chat(server: Server, messages: list[dict]) -> tuple[int, dict]:
    return server.post("/chat/completions", json.dumps({"messages": messages, "max_tokens": 2}).encode())


@pytest.mark.slow
def test_a_runaway_on_a_longer_conversation_is_a_400_and_the_server_stays_up(tmp_path):
    # ChatML, but a runaway once a conversation has more than two messages: it passes the load check.
    source = "{% if messages | length > 2 %}" + NESTED_LOOPS + "{% endif %}" + CHATML_TEMPLATE
    path = model_with_template(tmp_path / "late-bomb.gguf", source)
    server = Server("--model", str(path), ctx=None)
    try:
        assert post_chat(server, HI)[0] == 200
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            bomb = pool.submit(post_chat, server, CONVERSATION)
            time.sleep(0.3)  # the request is in its render
            while not bomb.done():
                start = time.monotonic()
                assert server.get("/health", timeout=5)[0] == 200
                assert time.monotonic() - start < 1.0, "/health waited for the template"
                time.sleep(0.1)
            status, body = bomb.result()
        assert status == 400
        assert "took longer than" in body["error"]["message"] and body["error"]["param"] == "messages"
        assert post_chat(server, HI)[0] == 200
    finally:
        server.stop()
