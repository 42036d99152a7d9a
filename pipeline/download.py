"""A `.gguf` file fetched over HTTP(S): from a URL, or from a Hugging Face repository.

A Hugging Face path `owner/repo/file.gguf` (a revision as `owner/repo@rev/file.gguf` or
`owner/repo/file.gguf@rev`, default `main`) stands for `{endpoint}/owner/repo/resolve/rev/file.gguf`,
where the endpoint is $CARAVAN_HF_ENDPOINT or https://huggingface.co (as huggingface_hub's
HF_ENDPOINT). The Hub answers a large file with a redirect to its storage that carries the file's
sha256 in `X-Linked-Etag` and its size in `X-Linked-Size` (as huggingface_hub's file_download
reads them); a plain URL may carry a digest as `#sha256=HEX`, as pip's URLs do.

The bytes go to `<target>.part`; a cut connection is continued with a Range request, here or by
the next pull, and the file is renamed to its target only once its size, sha256 (when the source
gives one) and GGUF header check out. A refused file and a disk-full write leave nothing behind.
"""

from __future__ import annotations

import contextlib
import email.message
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator
from urllib.parse import quote, unquote, urlsplit

from tqdm import tqdm

from .gguf_file import GGUF_MAGIC, GGUFError, GGUFFile

log = logging.getLogger(__name__)

HF_ENDPOINT_ENV = "CARAVAN_HF_ENDPOINT"
HF_ENDPOINT = "https://huggingface.co"
HF_TOKEN_ENV = "HF_TOKEN"  # huggingface_hub's name: a token for gated or private repositories
HF_REVISION = "main"
PART_SUFFIX = ".part"
ATTEMPTS = 4  # one download and its continuations after a cut connection
RETRY_PAUSE_S = 0.5  # doubled after each failed attempt
TIMEOUT_S = 30.0  # a server silent for this long counts as a cut connection
CHUNK = 1 << 20  # bytes per read, write and hash step
PROGRESS_DELAY_S = 1.0  # a download quicker than this shows no progress bar
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_HF_PATH = re.compile(
    r"(?:hf\.co/|huggingface\.co/)?"
    r"(?P<owner>[\w.-]+)/(?P<repo>[\w.-]+)(?:@(?P<rev1>[\w.-]+))?/(?P<file>[^@:]+\.gguf)(?:@(?P<rev2>[\w./-]+))?",
    re.IGNORECASE,
)
_HUB_HOSTS = ("huggingface.co", "hf.co")


class DownloadError(RuntimeError):
    """A remote file could not be fetched or was refused; the message says which and why."""


class DownloadInterrupted(DownloadError):
    """The connection failed too often; the `.part` file stays for the next pull to continue."""


@dataclass(frozen=True)
class Remote:
    spec: str  # what the user typed: a URL or a Hugging Face path
    url: str
    file_name: str  # the file's name in the cache
    sha256: str | None  # given with the spec (#sha256=), else learnt from the server's headers
    hub: bool  # on the Hub (a Hugging Face path, or a URL of its host): its headers carry the digest

    def with_sha256(self, headers: list[email.message.Message]) -> str | None:
        """The expected digest: the spec's own, else the Hub's `X-Linked-Etag` or `ETag`."""
        if self.sha256 or not self.hub:
            return self.sha256
        for message in headers:
            for name in ("X-Linked-Etag", "ETag"):
                tag = (message.get(name) or "").removeprefix("W/").strip('"').lower()
                if _SHA256.fullmatch(tag):
                    return tag
        return None


def parse_remote(spec: str, environ: Mapping[str, str] = os.environ) -> Remote | None:
    """The remote `spec` names (a Hugging Face path or an http(s) URL of a .gguf file), else None."""
    match = _HF_PATH.fullmatch(spec)
    if match and not spec.startswith(("/", ".", "~")):
        revision = match["rev1"] or match["rev2"] or HF_REVISION
        endpoint = (environ.get(HF_ENDPOINT_ENV) or HF_ENDPOINT).rstrip("/")
        url = (f"{endpoint}/{match['owner']}/{match['repo']}/resolve/{quote(revision, safe='')}/"
               f"{quote(match['file'], safe='/')}")
        return Remote(spec, url, _file_name(spec, match["file"]), None, True)
    parts = urlsplit(spec)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    hub = parts.hostname in (*_HUB_HOSTS, urlsplit(environ.get(HF_ENDPOINT_ENV) or HF_ENDPOINT).hostname)
    if hub and "/blob/" in parts.path:  # the file's web page on the Hub: its bytes are under /resolve/
        parts = parts._replace(path=parts.path.replace("/blob/", "/resolve/", 1))
    digest = None
    if parts.fragment:
        key, _, value = parts.fragment.partition("=")
        if key != "sha256" or not _SHA256.fullmatch(value.lower()):
            raise DownloadError(f"{spec}: the URL's fragment must be #sha256=<64 hex digits>, got #{parts.fragment}")
        digest = value.lower()
    return Remote(spec, parts._replace(fragment="").geturl(), _file_name(spec, unquote(parts.path)), digest, hub)


def _file_name(spec: str, path: str) -> str:
    name = path.rstrip("/").rpartition("/")[2]
    if not name.lower().endswith(".gguf") or name.startswith(".") or any(c in name for c in "\\\0\n"):
        raise DownloadError(f"{spec}: does not name a .gguf file (give the URL or path of the .gguf file itself)")
    return name


def download(remote: Remote, target: Path, progress: bool = True) -> str:
    """Fetch `remote` into `target` (continuing an earlier `.part`); returns its sha256."""
    part = target.with_name(target.name + PART_SUFFIX)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(part, remote) as file:
        try:
            digest = _fetch(remote, file, progress)
            _check_gguf(remote, part)
        except DownloadInterrupted:
            raise
        except DownloadError:
            _discard(part)
            raise
        except OSError as exc:
            if exc.errno not in NO_ROOM:
                raise
            _discard(part)
            raise DownloadError(f"no room for {target.name} in {target.parent} ({exc.strerror}); "
                                "free some space and pull again") from None
        os.replace(part, target)
    _origin(part).unlink(missing_ok=True)
    log.info("%s: saved to %s (sha256 %s)", remote.spec, target, digest)
    return digest


def _origin(part: Path) -> Path:
    """Beside a `.part` file: the URL it is a prefix of."""
    return part.with_name(part.name + ".json")


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _origin(part).unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(part: Path, remote: Remote) -> Iterator[BinaryIO]:
    """The `.part` file, held by this process alone; begun afresh when it came from another URL."""
    with open(part, "a+b") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DownloadError(f"another caravan pull is downloading {part.name[:-len(PART_SUFFIX)]}; "
                                "wait for it to finish") from None
        origin = _origin(part)
        try:
            same = json.loads(origin.read_text()).get("url") == remote.url
        except (OSError, ValueError, AttributeError):
            same = False
        if not same:
            file.truncate(0)
            origin.write_text(json.dumps({"url": remote.url}))
        yield file


def _fetch(remote: Remote, file: BinaryIO, progress: bool) -> str:
    """Append the rest of the file to `file`, continuing after a cut connection; its sha256."""
    pause = RETRY_PAUSE_S
    digest = _Digest(file)
    for attempt in range(1, ATTEMPTS + 1):
        offset = file.seek(0, os.SEEK_END)
        try:
            expected, total = _receive(remote, file, digest, offset, progress)
            break
        except (OSError, urllib.error.URLError, _Transient) as exc:
            if isinstance(exc, OSError) and exc.errno in NO_ROOM:
                raise
            reason = getattr(exc, "reason", None) or exc
            got = file.seek(0, os.SEEK_END)
            if attempt == ATTEMPTS and not got:  # nothing to continue from: the part file goes
                raise DownloadError(f"{remote.spec}: cannot download it ({reason})") from None
            if attempt == ATTEMPTS:
                raise DownloadInterrupted(f"{remote.spec}: download stopped at {got} bytes ({reason}); "
                                          "run the same pull again to continue") from None
            log.warning("%s: %s after %d bytes; trying again in %.1f s", remote.spec, reason, got, pause)
            time.sleep(pause)
            pause *= 2
    file.flush()
    os.fsync(file.fileno())
    size = file.seek(0, os.SEEK_END)
    if total is not None and size != total:
        raise DownloadError(f"{remote.spec}: received {size} bytes, the server announced {total}")
    digest.catch_up(size)
    actual = digest.hash.hexdigest()
    if expected and actual != expected:
        raise DownloadError(f"{remote.spec}: sha256 {actual} does not match the expected {expected}; "
                            "the download is corrupt or the file changed")
    return actual


class _Transient(Exception):
    """A response worth asking again for: a server error, or a body cut short."""


class _RecordRedirects(urllib.request.HTTPRedirectHandler):
    """Keeps the headers of each redirect: the Hub puts the file's digest on the first one."""

    def __init__(self, seen: list[email.message.Message]):
        self.seen = seen

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.seen.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _receive(remote: Remote, file: BinaryIO, digest: _Digest, offset: int,
             progress: bool) -> tuple[str | None, int | None]:
    """One GET, from `offset` when there is a part; returns (expected sha256, total size)."""
    seen: list[email.message.Message] = []
    request = urllib.request.Request(remote.url, headers={"Accept-Encoding": "identity"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    token = os.environ.get(HF_TOKEN_ENV)
    if remote.hub and token:
        request.add_unredirected_header("Authorization", f"Bearer {token}")  # never sent on to the storage
    opener = urllib.request.build_opener(_RecordRedirects(seen))
    try:
        response = opener.open(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the part is no prefix of the file: start again
            file.truncate(0)
            raise _Transient("the partial file did not fit the server's") from None
        if exc.code >= 500:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from None
        raise DownloadError(_http_error(remote, exc.code, exc.reason)) from None
    with response:
        seen.append(response.headers)
        expected = remote.with_sha256(seen)
        start, total = _content_range(response, offset)
        if start != offset:  # the server sent the whole file, not the rest
            file.truncate(0)
        digest.catch_up(start)
        _check_room(file, total, start)
        linked = next((m.get("X-Linked-Size") for m in seen if m.get("X-Linked-Size")), None)
        total = int(linked) if total is None and linked and linked.isdigit() else total
        with tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=remote.file_name,
                  disable=not progress, file=sys.stderr, delay=PROGRESS_DELAY_S) as bar:
            _copy(remote, response, file, digest, start, total, bar)
    return expected, total


def _content_range(response, offset: int) -> tuple[int, int | None]:
    """(first byte sent, size of the whole file or None) of a 200 or 206 answer."""
    length = response.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if response.status == 206:
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", ""))
        if match and int(match[1]) == offset:
            return offset, int(match[3]) if match[3] != "*" else None
        raise _Transient(f"unexpected Content-Range {response.headers.get('Content-Range')!r}")
    return 0, length


def _check_room(file: BinaryIO, total: int | None, start: int) -> None:
    if total is None:
        return
    free = shutil.disk_usage(os.path.dirname(file.name) or ".").free
    if total - start > free:
        raise DownloadError(f"{os.path.basename(file.name)[:-len(PART_SUFFIX)]} needs {total - start} more bytes "
                            f"and {os.path.dirname(file.name)} has {free} free; free some space and pull again")


def _copy(remote: Remote, response, file: BinaryIO, digest: _Digest, start: int, total: int | None,
          bar: tqdm) -> None:
    written = start
    while chunk := response.read(CHUNK):
        if written == 0 and not chunk.startswith(GGUF_MAGIC[: len(chunk)]):
            raise DownloadError(_not_gguf(remote, response.headers.get("Content-Type"), chunk))
        file.write(chunk)
        digest.update(chunk)
        written += len(chunk)
        bar.update(len(chunk))
    if total is not None and written < total:
        raise _Transient(f"connection closed after {written} of {total} bytes")


class _Digest:
    """The sha256 of the part file's first `n` bytes, kept up as they arrive, so a large file
    is read again only where an earlier run left it."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.hash = hashlib.sha256()
        self.n = 0

    def catch_up(self, size: int) -> None:
        """Hash the file's bytes up to `size` (starting over when the file was cut shorter)."""
        if size < self.n:
            self.hash, self.n = hashlib.sha256(), 0
        self.file.seek(self.n)
        while self.n < size and (chunk := self.file.read(min(CHUNK, size - self.n))):
            self.update(chunk)

    def update(self, chunk: bytes) -> None:
        self.hash.update(chunk)
        self.n += len(chunk)


def _check_gguf(remote: Remote, part: Path) -> None:
    try:
        GGUFFile(part)
    except GGUFError as exc:
        raise DownloadError(f"{remote.spec}: not a usable GGUF file: {str(exc).removeprefix(str(part) + ': ')}") from None


def _not_gguf(remote: Remote, content_type: str | None, head: bytes) -> str:
    start = head[:40].decode("utf-8", "replace").split("\n")[0].strip()
    return (f"{remote.spec}: the server sent {content_type or 'something'} starting {start!r}, not a GGUF file; "
            "check the URL (a web page's address is not the file's)")


def _http_error(remote: Remote, code: int, reason: str) -> str:
    if code == 404:
        return f"{remote.spec}: not found (HTTP 404 from {remote.url}); check the name, the file and the revision"
    if code in (401, 403) and remote.hub:
        return (f"{remote.spec}: HTTP {code} {reason}: the repository is gated or private; accept its terms on "
                f"the Hub and set {HF_TOKEN_ENV} to an access token")
    return f"{remote.spec}: HTTP {code} {reason} from {remote.url}"
