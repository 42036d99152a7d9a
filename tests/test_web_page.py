"""The web chat page in a real headless browser (Debian's chromium, driven by Playwright): type a
message, see the streamed answer appear as markdown, stop it, regenerate it, keep conversations
and settings in the browser, see the cluster.

The page, its renderer and the browser are real throughout. Where a test needs an exact answer
(markdown, markup that must not run), Playwright answers the page's chat request with a fixed
Server-Sent Events body; the real server and model answer everywhere else, and the stop test
checks on the server's own /metrics that a stopped stream frees its place."""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from support.serve import Server
from support.wait import wait_for

pytestmark = [pytest.mark.model, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PAGE = Path(__file__).parent.parent / "coordinator" / "chat.html"
ANSWER_TIMEOUT_MS = 60_000  # the real model on a loaded 2-core machine
CHAT_ROUTE = "**/v1/chat/completions"
# An answer is done: the page holds `n` answers and has enabled Send again. (Conditions are
# functions: Playwright evaluates a bare expression with eval, which the page's policy forbids.)
ANSWERED = ("n => document.querySelectorAll('.msg.assistant').length == n && "
            "!document.getElementById('send').disabled")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium)")
    with sync_api.sync_playwright() as p:
        # Flags as this machine needs them: no sandbox as root, no background network calls.
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture
def page(browser, server):
    """The chat page in a fresh browser context (its own localStorage), once it knows the model."""
    context = browser.new_context()
    # What the page's Content-Security-Policy blocks, for the tests to see.
    context.add_init_script("window.blocked = []; document.addEventListener('securitypolicyviolation', "
                            "e => window.blocked.push(e.effectiveDirective + ' ' + e.blockedURI));")
    page = context.new_page()
    page.goto(server.base_url + "/")
    page.wait_for_function("() => document.getElementById('stages').textContent.includes('layers 0–29')")
    yield page
    context.close()


def sse_body(text: str, piece: int = 3) -> str:
    """An OpenAI chat stream of `text` in pieces of `piece` characters, as the server sends it."""
    chunks = [{"choices": [{"index": 0, "delta": {"content": text[i:i + piece]}, "finish_reason": None}]}
              for i in range(0, len(text), piece)]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 9, "completion_tokens": len(chunks), "total_tokens": 9 + len(chunks)}})
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def answer_with(page, *answers: str) -> list[dict]:
    """Answer the page's chat requests with `answers`, in turn; the request bodies, as they go."""
    bodies = []

    def fulfil(route):
        bodies.append(route.request.post_data_json)
        route.fulfill(status=200, content_type="text/event-stream", body=sse_body(answers[len(bodies) - 1]))

    page.route(CHAT_ROUTE, fulfil)
    return bodies


def ask(page, text: str, answers: int = 1) -> None:
    """Type `text`, send it with Enter, and wait for answer number `answers` to finish."""
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(ANSWERED, arg=answers, timeout=ANSWER_TIMEOUT_MS)


def metric(server: Server, name: str) -> float:
    with urllib.request.urlopen(server.base_url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))


def test_chat_page_streams_an_answer(page):
    page.goto(page.url + "?temperature=0")  # greedy: the answer is known
    page.wait_for_function("() => document.getElementById('stages').textContent.includes('layers 0–29')")
    assert "smollm2-135m-instruct" in page.text_content("#model")
    ask(page, "What is the capital of France? Answer in one word.")
    page.wait_for_function("() => document.getElementById('stats').textContent.includes('tokens/s')")
    assert "Paris" in page.text_content(".msg.assistant")
    assert "local: layers 0–29" in page.text_content("#stages")
    # A second turn goes with the first one's history.
    page.fill("#input", "And of Italy?")
    page.click("#send")
    page.wait_for_function(ANSWERED, arg=2, timeout=ANSWER_TIMEOUT_MS)
    assert page.locator(".msg.assistant").nth(1).text_content().strip()
    # The cluster at a glance: this process's one stage, its KV cache and the server's tokens/s.
    page.wait_for_function("() => document.getElementById('cluster-totals').textContent.includes('tokens/s')")
    assert page.locator("#nodes tr td").first.text_content() == "local"
    assert "MB" in page.text_content("#nodes")
    assert "prompt cache" in page.text_content("#cluster-totals")
    assert page.evaluate("window.blocked") == []  # the page itself keeps to its own policy


MARKDOWN = """# Sorting in Python

Use **sorted** to get a *new* list, or `list.sort()` in place:

```python
numbers = [3, 1, 2]
print(sorted(numbers))  # <b>not bold</b>
```

- it is stable
- it takes a `key`

1. first
2. second

See [the docs](https://docs.python.org/3/howto/sorting.html).

| name | kind |
|------|-----:|
| sorted | function |
"""


def test_a_markdown_answer_renders_as_markdown(page):
    answer_with(page, MARKDOWN)
    ask(page, "How do I sort a list?")
    answer = page.locator(".msg.assistant")
    assert answer.locator("h1").text_content() == "Sorting in Python"
    assert answer.locator("strong").text_content() == "sorted"
    assert answer.locator("em").text_content() == "new"
    code = answer.locator("pre > code")
    assert code.get_attribute("class") == "language-python"
    assert code.text_content() == "numbers = [3, 1, 2]\nprint(sorted(numbers))  # <b>not bold</b>"
    assert answer.locator("pre b").count() == 0  # markup inside code is text
    assert answer.locator("ul > li").all_text_contents() == ["it is stable", "it takes a key"]
    assert answer.locator("ul > li code").text_content() == "key"
    assert answer.locator("ol > li").all_text_contents() == ["first", "second"]
    link = answer.locator("a")
    assert link.get_attribute("href") == "https://docs.python.org/3/howto/sorting.html"
    assert link.get_attribute("rel") == "noopener noreferrer nofollow"
    assert answer.locator("table th").all_text_contents() == ["name", "kind"]
    assert answer.locator("table td").all_text_contents() == ["sorted", "function"]
    assert page.evaluate("window.blocked") == []


HOSTILE = """Here you go <script>window.pwned = "script"</script>

<img src=x onerror="window.pwned = 'img'"> and <svg onload="window.pwned = 'svg'"></svg>

[click me](javascript:window.pwned='link') and [me too](JaVaScRiPt:window.pwned='case')
[and me](java\tscript:window.pwned='tab') [data](data:text/html,<script>window.pwned='data'</script>)
![a picture](x" onerror="window.pwned='image')
<a href="javascript:window.pwned='anchor'">raw anchor</a> <iframe src="javascript:window.pwned='frame'"></iframe>

```html
<img src=x onerror="window.pwned = 'code'">
```
"""


def test_markup_in_an_answer_runs_nothing(page):
    answer_with(page, HOSTILE)
    ask(page, "Say something nasty")
    answer = page.locator(".msg.assistant")
    for label in ("click me", "me too", "and me", "data", "raw anchor"):
        page.get_by_text(label).first.click()  # a link a script could hide behind would run now
    page.wait_for_timeout(500)  # time for an image's onerror, had an image been made
    assert page.evaluate("window.pwned") is None
    found = page.evaluate("""() => {
        const log = document.getElementById('log'), all = [...log.querySelectorAll('*')];
        return {
            tags: all.map(e => e.tagName.toLowerCase()).filter(t => ['script', 'img', 'svg', 'iframe'].includes(t)),
            handlers: all.flatMap(e => [...e.attributes].map(a => a.name)).filter(n => n.startsWith('on')),
            hrefs: all.map(e => e.getAttribute('href') || e.getAttribute('src')).filter(Boolean),
        };
    }""")
    assert found == {"tags": [], "handlers": [], "hrefs": []}, found
    text = answer.text_content()
    assert "<script>window.pwned" in text and "onerror=" in text  # shown as text, not run
    assert answer.locator("pre > code").text_content() == "<img src=x onerror=\"window.pwned = 'code'\">"


def test_the_page_policy_stops_what_a_renderer_fault_would_let_in(page):
    """Defence in depth: were the renderer ever to make a script, a handler or a javascript: link
    from an answer, the page's Content-Security-Policy would still stop them."""
    policy = page.goto(page.url).headers["content-security-policy"]
    assert "default-src 'none'" in policy and "unsafe" not in policy and "frame-ancestors 'none'" in policy
    page.evaluate("""() => {
        const log = document.getElementById('log');
        const img = document.createElement('img');
        img.setAttribute('onerror', "window.pwned = 'img'");
        img.src = 'x';
        const script = document.createElement('script');
        script.textContent = "window.pwned = 'script'";
        const a = document.createElement('a');
        a.href = "javascript:window.pwned = 'link'";
        log.append(img, script, a);
        a.click();
    }""")
    page.wait_for_function("() => window.blocked.length >= 3", timeout=5_000)
    page.wait_for_timeout(300)
    assert page.evaluate("window.pwned") is None


def test_the_page_never_hands_text_to_the_html_parser():
    """Safety by construction: the page builds every node itself, so no answer text can become markup."""
    source = PAGE.read_text(encoding="utf-8")
    # The comments may name what the code avoids.
    code = re.sub(r"^\s*//.*$|\s//\s.*$", "", source, flags=re.MULTILINE)
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "createContextualFragment", "DOMParser", "srcdoc", "setAttribute(\"on"):
        assert sink not in code, sink
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=|https?://(?!127\.0\.0\.1)", source.split("<script>")[0])


STREAMED = """## Step {n}

Some **bold** text, `code` and a [link](https://example.org/{n}) in a paragraph
that runs over two lines.

- one
- two
  - nested

```python
for i in range({n}):
    print(i)

print("done")
```

"""


def test_streamed_rendering_keeps_finished_blocks_and_costs_about_its_length(page):
    """A few thousand tokens, rendered after every one: finished blocks keep their nodes (no
    flicker), the result equals rendering the whole text at once, and the cost stays far below
    rendering everything again on every token."""
    result = page.evaluate("""template => {
        const {AnswerView, renderMarkdown} = window.caravan;
        const text = Array.from({length: 100}, (_, n) => template.replaceAll('{n}', n)).join('');
        const pieces = text.match(/[\\s\\S]{1,4}/g);
        const streamed = document.createElement('div'), view = new AnswerView(streamed);
        let start = performance.now(), first = null;
        for (const piece of pieces) {
            view.append(piece);
            view.render();
            if (!first && view.kept > 0) first = streamed.firstChild;
        }
        view.finish();
        const streamMs = performance.now() - start;
        start = performance.now();
        for (let i = 0; i < 5; i++) renderMarkdown(text);
        const wholeMs = (performance.now() - start) / 5;
        const once = document.createElement('div'), oneView = new AnswerView(once);
        oneView.append(text);
        oneView.finish();
        return {pieces: pieces.length, streamMs, wholeMs, kept: first === streamed.firstChild,
                same: once.innerHTML === streamed.innerHTML, blocks: streamed.querySelectorAll('pre > code').length};
    }""", STREAMED)
    assert result["pieces"] > 4000 and result["blocks"] == 100
    assert result["kept"] and result["same"]
    # Rendering everything again on every token would cost about pieces / 2 whole renders.
    naive_ms = result["pieces"] / 2 * result["wholeMs"]
    assert result["streamMs"] < naive_ms / 10, result


def test_stop_halts_a_stream_and_frees_the_server(page, server):
    page.goto(page.url + "?temperature=0&max_tokens=400")
    page.wait_for_function("() => document.getElementById('stages').textContent.includes('layers 0–29')")
    page.fill("#input", "Count from 1 to 500, one number per line.")
    page.press("#input", "Enter")
    page.wait_for_function("() => document.querySelector('.msg.assistant').textContent.length > 20",
                           timeout=ANSWER_TIMEOUT_MS)
    assert metric(server, "caravan_requests_in_flight") == 1  # still generating
    page.click("#stop")
    page.wait_for_function(ANSWERED, arg=1, timeout=10_000)
    assert "Stopped." in page.text_content(".msg.assistant .note")
    wait_for(lambda: metric(server, "caravan_requests_in_flight") == 0, 10, "the stopped sequence freed")
    text, generated = page.text_content(".msg.assistant"), metric(server, "caravan_generated_tokens_total")
    time.sleep(1.5)
    assert page.text_content(".msg.assistant") == text  # no more text arrives
    assert metric(server, "caravan_generated_tokens_total") == generated  # nor is any computed
    # The partial answer is kept, and can be asked for again; Esc stops that one.
    stored = page.evaluate("JSON.parse(localStorage.getItem('caravan-chats')).list[0].messages")
    assert stored[1]["stopped"] is True and stored[1]["content"].strip()
    page.click("#regenerate")
    page.wait_for_function("() => document.querySelector('.msg.assistant').textContent.length > 20 && "
                           "document.getElementById('send').disabled", timeout=ANSWER_TIMEOUT_MS)
    page.keyboard.press("Escape")
    page.wait_for_function(ANSWERED, arg=1, timeout=10_000)
    wait_for(lambda: metric(server, "caravan_requests_in_flight") == 0, 10, "the second stopped sequence freed")
    assert page.locator(".msg.assistant").count() == 1 and "Stopped." in page.text_content(".msg.assistant .note")


def test_regenerate_replaces_the_last_answer(page):
    bodies = answer_with(page, "The **first** answer.", "The *second* answer.")
    ask(page, "Tell me something")
    assert page.text_content(".msg.assistant") == "The first answer."
    page.click("#regenerate")
    page.wait_for_function("() => document.querySelector('.msg.assistant').textContent == 'The second answer.' && "
                           "!document.getElementById('send').disabled", timeout=10_000)
    assert page.locator(".msg.assistant").count() == 1 and page.locator(".msg.user").count() == 1
    assert page.text_content(".msg.assistant em") == "second"
    assert [m["role"] for m in bodies[1]["messages"]] == ["user"]  # the old answer is not sent again


def test_conversations_survive_a_reload(page):
    answer_with(page, "Hello **there**.", "A second chat.")
    page.on("dialog", lambda dialog: dialog.accept())  # "Delete this conversation?"
    ask(page, "First chat")
    page.reload()
    page.wait_for_selector(".msg.assistant strong")
    assert page.text_content(".msg.user") == "First chat"
    assert page.text_content(".msg.assistant") == "Hello there."

    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    ask(page, "Second chat")
    assert page.locator("#chats .open").all_text_contents() == ["Second chat", "First chat"]
    page.click("#chats .open >> text=First chat")
    assert page.text_content(".msg.user") == "First chat"
    page.reload()
    assert page.text_content(".msg.user") == "First chat"  # the chat shown is kept too

    page.click("#chats .delete >> nth=1")  # the older one, shown now
    assert page.locator("#chats .open").all_text_contents() == ["Second chat"]
    assert page.text_content(".msg.user") == "Second chat"
    page.reload()
    assert page.locator("#chats .open").all_text_contents() == ["Second chat"]


def test_settings_reach_the_request(page):
    bodies = answer_with(page, "One.", "Two.")
    page.fill("#system", "You are terse.")
    page.fill("#temperature", "0.3")
    page.fill("#top_p", "0.9")
    page.fill("#top_k", "20")
    page.fill("#min_p", "0.1")
    page.fill("#max_tokens", "64")
    ask(page, "Hi")
    body = bodies[0]
    assert body["messages"] == [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    assert {k: body[k] for k in ("temperature", "top_p", "top_k", "min_p", "max_tokens")} == {
        "temperature": 0.3, "top_p": 0.9, "top_k": 20, "min_p": 0.1, "max_tokens": 64}
    assert "seed" not in body and body["stream"] is True and body["model"] == "smollm2-135m-instruct"

    # Settings are kept in the browser; cleared ones are left to the server.
    page.reload()
    assert page.input_value("#temperature") == "0.3" and page.input_value("#system") == "You are terse."
    page.click("#defaults")
    page.fill("#system", "")
    ask(page, "Again", answers=2)
    assert not {"temperature", "top_p", "top_k", "min_p", "max_tokens", "seed"} & set(bodies[1])
    assert [m["role"] for m in bodies[1]["messages"]] == ["user", "assistant", "user"]


def test_an_invalid_setting_is_shown_not_sent(page):
    bodies = answer_with(page, "Unused.")
    page.fill("#temperature", "5")  # past the field's maximum
    page.fill("#input", "Hi")
    page.press("#input", "Enter")
    page.wait_for_timeout(300)
    assert bodies == [] and page.locator(".msg").count() == 0
    assert page.input_value("#input") == "Hi"  # the message waits for the fix


def test_keyboard_and_phone_width(page):
    answer_with(page, "Fine.")
    page.set_viewport_size({"width": 360, "height": 640})
    page.fill("#input", "line one")
    page.press("#input", "Shift+Enter")
    page.type("#input", "line two")
    assert page.input_value("#input") == "line one\nline two"  # Shift+Enter is a new line
    page.press("#input", "Enter")
    page.wait_for_function(ANSWERED, arg=1, timeout=10_000)
    assert page.text_content(".msg.user") == "line one\nline two"
    assert page.evaluate("document.documentElement.scrollWidth") <= 360  # nothing runs off the side
    assert page.is_hidden("#sidebar") and page.is_visible("#menu")
    page.click("#menu")
    assert page.is_visible("#settings") and page.get_attribute("#menu", "aria-expanded") == "true"
