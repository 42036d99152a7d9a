"""Chat templates render as transformers renders them, and hostile ones fail closed."""

import ctypes
from datetime import datetime

import pytest

from caravan.pipeline.chat_template import ChatTemplate, ChatTemplateError

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
    with pytest.raises(ChatTemplateError, match="line 3"):
        ChatTemplate("ok\nstill ok\n{% if %}")


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
