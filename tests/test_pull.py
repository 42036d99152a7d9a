"""`caravan pull` of a URL or a Hugging Face path, `caravan list` and `caravan rm`.

A threaded http.server on 127.0.0.1 plays the Hub: `/OWNER/REPO/resolve/REV/FILE` answers with
a redirect carrying X-Linked-Etag (the sha256), X-Linked-Size and X-Repo-Commit, and the storage
behind it serves the bytes with Range support. Nothing here reaches a real hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import os
import resource
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from caravan.pipeline import download as download_module
from caravan.pipeline.catalog import PullError, list_models, pull_remote, remove_model, resolve_model
from caravan.pipeline.download import HF_ENDPOINT_ENV, PART_SUFFIX, parse_remote
from support.tiny_models import write_tiny_llama

HF_PATH = "owner/repo/tiny.gguf"
HTML = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>\n"


class Hub:
    """What the loopback server serves and how it misbehaves; it records every request."""

    def __init__(self, blob: bytes):
        self.blob = blob
        self.sha256 = hashlib.sha256(blob).hexdigest()
        self.linked_sha256 = self.sha256  # what X-Linked-Etag says
        self.cuts = 0  # this many GETs of the file end mid-body
        self.requests: list[tuple[str, str | None, str | None]] = []  # (path, Range, Authorization)


class Handler(http.server.BaseHTTPRequestHandler):
    hub: Hub

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        hub = self.server.hub
        hub.requests.append((self.path, self.headers.get("Range"), self.headers.get("Authorization")))
        if self.path.startswith("/owner/repo/resolve/") and self.path.endswith("/tiny.gguf"):
            self.send_response(302)
            self.send_header("Location", f"/storage/{hub.sha256}")
            self.send_header("X-Linked-Etag", f'"{hub.linked_sha256}"')
            self.send_header("X-Linked-Size", str(len(hub.blob)))
            self.send_header("X-Repo-Commit", "0" * 40)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path in (f"/storage/{hub.sha256}", "/files/tiny.gguf"):
            self._send_blob(hub)
        elif self.path == "/files/page.gguf":
            self._send(200, HTML, "text/html; charset=utf-8")
        else:
            self._send(404, b"Entry not found", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_blob(self, hub: Hub) -> None:
        start = 0
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes=") and ranged.endswith("-"):
            start = int(ranged[6:-1])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(hub.blob) - 1}/{len(hub.blob)}")
        else:
            self.send_response(200)
        body = hub.blob[start:]
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if hub.cuts:
            hub.cuts -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # the connection drops mid-body
            return
        self.wfile.write(body)


@pytest.fixture
def hub(tmp_path):
    blob = write_tiny_llama(tmp_path / "fixture.gguf").read_bytes()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.hub = Hub(blob)
    server.hub.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.hub
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def env(tmp_path, hub, monkeypatch):
    """Where the CLI subprocesses and this process look for models and for the Hub."""
    cache = tmp_path / "home"
    monkeypatch.setenv(HF_ENDPOINT_ENV, hub.endpoint)
    monkeypatch.setattr(download_module, "RETRY_PAUSE_S", 0.01)
    return {**os.environ, "CARAVAN_HOME": str(cache), HF_ENDPOINT_ENV: hub.endpoint, "PYTHONIOENCODING": "utf-8"}


def caravan(env, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "caravan.coordinator", *args], capture_output=True, text=True,
                          env=env, timeout=120, **kwargs)


def one_error_line(result: subprocess.CompletedProcess, *words: str) -> str:
    """The error is one line (after any warnings that the download is being retried)."""
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("WARNING ")]
    assert len(lines) == 1 and lines[0].startswith("caravan: error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def models_dir(env) -> list[str]:
    folder = Path(env["CARAVAN_HOME"]) / "models"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_parse_remote_maps_hub_paths_and_urls(monkeypatch):
    monkeypatch.setenv(HF_ENDPOINT_ENV, "http://127.0.0.1:9")
    remote = parse_remote("bartowski/Llama-3.2-1B-Instruct-GGUF/Llama-3.2-1B-Instruct-Q4_0.gguf")
    assert remote.url == ("http://127.0.0.1:9/bartowski/Llama-3.2-1B-Instruct-GGUF/resolve/main/"
                          "Llama-3.2-1B-Instruct-Q4_0.gguf")
    assert remote.file_name == "Llama-3.2-1B-Instruct-Q4_0.gguf" and remote.hub and remote.sha256 is None
    assert parse_remote("o/r/sub/f.gguf@v1.0").url == "http://127.0.0.1:9/o/r/resolve/v1.0/sub/f.gguf"
    assert parse_remote("o/r@abc/f.gguf").url == "http://127.0.0.1:9/o/r/resolve/abc/f.gguf"
    url = parse_remote("https://example.org/m/x%20y.gguf#sha256=" + "A" * 64)
    assert (url.url, url.file_name, url.sha256, url.hub) == ("https://example.org/m/x%20y.gguf", "x y.gguf", "a" * 64, False)
    page = parse_remote("https://huggingface.co/o/r/blob/main/f.gguf")  # the file's web page, as users copy it
    assert (page.url, page.hub) == ("https://huggingface.co/o/r/resolve/main/f.gguf", True)
    assert parse_remote("hf.co/o/r/f.gguf").url == "http://127.0.0.1:9/o/r/resolve/main/f.gguf"
    assert parse_remote("smollm2-135m-instruct") is None and parse_remote("./models/x.gguf") is None
    with pytest.raises(download_module.DownloadError, match="does not name a .gguf file"):
        parse_remote("https://example.org/models/")


@pytest.mark.slow
def test_pull_from_the_hub_then_list_use_and_rm(env, hub):
    result = caravan(env, "pull", HF_PATH)
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path == Path(env["CARAVAN_HOME"]) / "models" / "tiny.gguf" and path.read_bytes() == hub.blob
    assert models_dir(env) == ["tiny.gguf", "tiny.gguf.source.json"]
    assert [r[0] for r in hub.requests] == ["/owner/repo/resolve/main/tiny.gguf", f"/storage/{hub.sha256}"]

    again = caravan(env, "pull", HF_PATH, "--json")  # cached: no request
    assert again.returncode == 0 and again.stdout.strip() == f'{{"path": "{path}"}}' and len(hub.requests) == 2

    listing = caravan(env, "list")
    assert listing.returncode == 0, listing.stderr
    header, row = listing.stdout.strip().splitlines()
    assert header.split() == ["NAME", "SIZE", "TYPE", "PATH"] and row.split()[0] == "tiny.gguf" and str(path) in row
    # The pulled file answers to its file name, its name without .gguf and its Hub path.
    for name in ("tiny.gguf", "tiny", HF_PATH):
        tokens = caravan(env, "tokenize", "hi", "--model", name, "--json")
        assert tokens.returncode == 0 and '"tokens"' in tokens.stdout, tokens.stderr

    removed = caravan(env, "rm", "tiny")
    assert removed.returncode == 0 and removed.stdout.strip() == f"removed {path}", removed.stderr
    assert models_dir(env) == [] and caravan(env, "list").stdout.strip().splitlines()[1:] == []
    one_error_line(caravan(env, "rm", "tiny.gguf"), "no model 'tiny.gguf' in the cache")
    one_error_line(caravan(env, "tokenize", "hi", "--model", HF_PATH), "no such file", f"caravan pull {HF_PATH}")


def test_a_cut_connection_is_continued_with_a_range_request(env, hub):
    hub.cuts = 1
    path = pull_remote(parse_remote(HF_PATH), Path(env["CARAVAN_HOME"]), progress=False)
    assert path.read_bytes() == hub.blob
    ranges = [r[1] for r in hub.requests if r[0].startswith("/storage/")]
    assert ranges == [None, f"bytes={len(hub.blob) // 2}-"]
    assert models_dir(env) == ["tiny.gguf", "tiny.gguf.source.json"]


@pytest.mark.slow
def test_a_download_that_keeps_failing_leaves_a_part_the_next_pull_continues(env, hub):
    hub.cuts = download_module.ATTEMPTS
    result = caravan(env, "pull", HF_PATH)
    one_error_line(result, "download stopped at", "run the same pull again to continue")
    assert "tiny.gguf" not in models_dir(env) and "tiny.gguf" + PART_SUFFIX in models_dir(env)
    part = Path(env["CARAVAN_HOME"]) / "models" / ("tiny.gguf" + PART_SUFFIX)
    kept = part.stat().st_size
    assert 0 < kept < len(hub.blob)
    assert list_models(Path(env["CARAVAN_HOME"])) == []  # a part is no model

    hub.requests.clear()
    result = caravan(env, "pull", HF_PATH)
    assert result.returncode == 0, result.stderr
    assert [r[1] for r in hub.requests if r[0].startswith("/storage/")] == [f"bytes={kept}-"]
    assert Path(result.stdout.strip()).read_bytes() == hub.blob
    assert models_dir(env) == ["tiny.gguf", "tiny.gguf.source.json"]


@pytest.mark.slow
def test_a_wrong_sha256_is_refused_and_nothing_stays(env, hub):
    hub.linked_sha256 = "0" * 64
    one_error_line(caravan(env, "pull", HF_PATH), "does not match the expected " + "0" * 64)
    assert models_dir(env) == []
    wrong = f"{hub.endpoint}/files/tiny.gguf#sha256={'1' * 64}"
    one_error_line(caravan(env, "pull", wrong), "does not match the expected " + "1" * 64)
    assert models_dir(env) == []
    right = caravan(env, "pull", f"{hub.endpoint}/files/tiny.gguf#sha256={hub.sha256}")
    assert right.returncode == 0 and Path(right.stdout.strip()).read_bytes() == hub.blob


@pytest.mark.slow
def test_an_html_page_a_404_and_a_non_gguf_url_are_one_line_each(env, hub):
    one_error_line(caravan(env, "pull", f"{hub.endpoint}/files/page.gguf"), "text/html", "not a GGUF file")
    one_error_line(caravan(env, "pull", "owner/repo/missing.gguf"), "not found (HTTP 404")
    one_error_line(caravan(env, "pull", f"{hub.endpoint}/files/"), "does not name a .gguf file")
    one_error_line(caravan(env, "rm", "../hashes.json"), "not a model in the cache")
    closed = hub.endpoint.rsplit(":", 1)[0] + ":1/tiny.gguf"  # nothing listens on port 1
    one_error_line(caravan(env, "pull", closed), "cannot download it", "Connection refused")
    assert models_dir(env) == []


@pytest.mark.slow
def test_a_full_disk_leaves_no_partial_file(env, hub):
    def small_files():  # writes past this many bytes fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(hub.blob) // 3, len(hub.blob) // 3))

    result = caravan(env, "pull", HF_PATH, preexec_fn=small_files)
    one_error_line(result, "no room for tiny.gguf", "free some space")
    assert models_dir(env) == []


@pytest.mark.slow
def test_the_token_goes_to_the_hub_and_not_to_its_storage(env, hub):
    assert caravan({**env, "HF_TOKEN": "hf_secret"}, "pull", HF_PATH).returncode == 0
    assert [(path.split("/")[1], auth) for path, _, auth in hub.requests] == [
        ("owner", "Bearer hf_secret"), ("storage", None)]


def test_a_download_shows_a_progress_bar(env, hub, monkeypatch):
    monkeypatch.setattr(download_module, "PROGRESS_DELAY_S", 0.0)  # the tiny file takes less than the delay
    monkeypatch.setattr(download_module, "CHUNK", 4096)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        pull_remote(parse_remote(HF_PATH), Path(env["CARAVAN_HOME"]), progress=True)
    assert "tiny.gguf" in err.getvalue() and "100%" in err.getvalue()


def test_remove_and_resolve_in_process(env, hub):
    cache = Path(env["CARAVAN_HOME"])
    url = f"{hub.endpoint}/files/tiny.gguf"
    path = resolve_model(url, cache, progress=False)  # a URL is pulled on first use
    assert [m.name for m in list_models(cache)] == ["tiny.gguf"] and list_models(cache)[0].file_type == "Q8_0"
    with pytest.raises(PullError, match="already holds a tiny.gguf from " + url):
        pull_remote(parse_remote(HF_PATH), cache, progress=False)
    assert remove_model(url, cache) == [path, path.with_name("tiny.gguf.source.json")]
