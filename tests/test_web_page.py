"""The web chat page in a real headless browser (Debian's chromium, driven by Playwright):
type a message, see the streamed answer appear, with tokens/s and the stages that served it."""

from __future__ import annotations

import shutil

import pytest

from support.serve import Server
pytestmark = [pytest.mark.model, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


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


def test_chat_page_streams_an_answer(browser):
    server = Server()
    try:
        page = browser.new_page()
        page.goto(server.url.removesuffix("/v1") + "/?temperature=0")  # greedy: the answer is known
        page.wait_for_function("document.getElementById('stages').textContent.includes('layers 0–29')")
        assert "smollm2-135m-instruct" in page.text_content("#model")
        page.fill("#input", "What is the capital of France? Answer in one word.")
        page.keyboard.press("Enter")
        page.wait_for_selector(".msg.user")
        page.wait_for_function("document.getElementById('stats').textContent.includes('tokens/s')", timeout=60_000)
        answer = page.text_content(".msg.assistant")
        assert "Paris" in answer
        assert "local: layers 0–29" in page.text_content("#stages")
        # A second turn goes with the first one's history.
        page.fill("#input", "And of Italy?")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll('.msg.assistant').length == 2 && "
                               "!document.getElementById('send').disabled", timeout=60_000)
        assert page.locator(".msg.assistant").nth(1).text_content()
    finally:
        server.stop()
