"""What the HTTP server lets through, and how it runs: who may reach it, and how much of it one
client may take.

Bound to loopback (the default), it answers only requests whose Host names loopback and whose
Origin, if any, is a loopback page; bound elsewhere, an Origin must be the server's own page
(BrowserGuard). A body is bounded (--max-body, 413 past it) and must arrive within
--read-timeout (BodyLimits), as must a request's headers (the header-timeout protocol); past
--max-connections new requests get a 503. SIGTERM lets requests finish for SHUTDOWN_GRACE_S,
then cancels the rest (run_http).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import uvicorn
from starlette.requests import ClientDisconnect

from .openai_api import APIError, speaks_ollama

if TYPE_CHECKING:
    from .server import API

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 2**20  # a request body's bound unless serve --max-body says otherwise
READ_TIMEOUT_S = 30.0  # time for a request's headers, and then for its body (serve --read-timeout)
MAX_CONNECTIONS = 1000  # open connections past which requests get a 503 (serve --max-connections)
KEEP_ALIVE_S = 5.0  # an idle connection between two requests is closed after this long
SHUTDOWN_GRACE_S = 3.0  # on SIGTERM, how long requests in flight may finish before they are cancelled
CLOSE = {"Connection": "close"}  # on a refusal that leaves part of a request unread


@dataclass(frozen=True)
class ServeLimits:
    """What one client may take of the HTTP server (serve's flags)."""

    max_body: int = MAX_BODY_BYTES  # bytes in a request body
    read_timeout: float = READ_TIMEOUT_S  # seconds for a request's headers, then for its body
    max_connections: int = MAX_CONNECTIONS  # open connections before requests are refused


def _hostname(host: str) -> str:
    """'localhost:8080' -> 'localhost', '[::1]:8080' -> '::1', '127.0.0.1' -> '127.0.0.1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_loopback_host(host: str) -> bool:
    name = _hostname(host)
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _authority(url_or_host: str, scheme: str) -> str:
    """'http://Example:80' -> 'example:80', 'example' (with scheme http) -> 'example:80'."""
    if "://" in url_or_host:
        scheme, url_or_host = url_or_host.split("://", 1)
    authority = url_or_host.strip().lower().rstrip("/")
    if ":" not in authority.rsplit("]", 1)[-1]:
        authority += ":" + {"http": "80", "https": "443"}.get(scheme.lower(), "")
    return authority


def _browser_refusal(scope, loopback_only: bool) -> APIError | None:
    """The refusal of a request that may come from a web page that must not reach this server."""
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    host, origin = headers.get("host", ""), headers.get("origin")
    if loopback_only and not _is_loopback_host(host):
        return APIError(403, "this server answers only requests addressed to localhost (Host header)",
                        code="forbidden_host")
    if origin is None:
        return None
    if origin.strip().lower() == "null":
        return APIError(403, "requests from sandboxed frames and local files are refused (Origin: null)",
                        code="forbidden_origin")
    if loopback_only:
        own = _is_loopback_host(origin.split("://", 1)[-1].rstrip("/"))
    else:
        own = _authority(origin, "http") == _authority(host, scope.get("scheme", "http"))
    return None if own else APIError(403, "requests from web pages on other sites are refused (Origin header)",
                                     code="forbidden_origin")


class BrowserGuard:
    """ASGI middleware: refuse requests from web pages other than this server's own (a foreign
    or null Origin, on every route) and, bound to loopback, those whose Host is not a loopback
    name (DNS rebinding)."""

    def __init__(self, app, loopback_only: bool):
        self.app = app
        self.loopback_only = loopback_only

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = _browser_refusal(scope, self.loopback_only)
            if refusal is not None:
                await refusal.response(speaks_ollama(scope))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _too_large(max_body: int) -> APIError:
    return APIError(413, f"the request body is larger than this server takes ({max_body} bytes; "
                    "serve --max-body raises it)", code="request_too_large", headers=CLOSE)


class BodyLimits:
    """ASGI middleware: a request body is at most `max_body` bytes, by its Content-Length and
    counted as it comes in (a chunked upload has none), and arrives within `read_timeout`
    seconds; a client that leaves mid-upload costs one line in the log."""

    def __init__(self, app, max_body: int, read_timeout: float):
        self.app, self.max_body, self.read_timeout = app, max_body, read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"").strip()
        if length.isdigit() and int(length) > self.max_body:
            await _too_large(self.max_body).response(speaks_ollama(scope))(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout
        received, done, started = 0, False, False

        async def bounded_receive():
            nonlocal received, done
            if done:  # after the body: waiting for a disconnect, as long as it takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                raise APIError(408, f"the request body did not arrive within {self.read_timeout:g} s "
                               "(serve --read-timeout)", code="request_timeout", headers=CLOSE) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise _too_large(self.max_body)
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, bounded_receive, tracked_send)
        except ClientDisconnect:
            log.info("%s left while sending its request to %s", describe_peer(scope.get("client")), scope.get("path"))
        except APIError as exc:  # from bounded_receive, where no endpoint caught it
            if started:
                raise
            await exc.response(speaks_ollama(scope))(scope, receive, send)


def describe_peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "a client"


def _header_timeout_protocol(timeout: float) -> type:
    """uvicorn's HTTP protocol, closing a connection whose next request's headers have not all
    come `timeout` seconds after it opened or after its last answer: uvicorn closes a silent
    keep-alive connection, but neither one that never sends a request nor one that sends a
    byte now and then."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class HeaderTimeout(AutoHTTPProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(timeout, self._headers_late)

        def _headers_late(self) -> None:
            if self.cycle is None or self.cycle.response_complete:  # no request under way
                self.transport.close()

    return HeaderTimeout


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_exit):
        super().__init__(config)
        self.on_exit = on_exit  # called as the server starts to stop

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self.on_exit()

    @contextlib.contextmanager
    def capture_signals(self):
        """As uvicorn's, without raising SIGINT or SIGTERM again once the server has stopped:
        `serve` still has its scheduler and the nodes' sessions to close."""
        if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
            yield
            return
        handlers = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


def run_http(api: API, sock, limits: ServeLimits) -> None:
    """Serve `api` on `sock` until SIGINT or SIGTERM, with `limits` on every connection."""
    config = uvicorn.Config(api.app, log_level="warning", lifespan="off",
                            http=_header_timeout_protocol(limits.read_timeout),
                            limit_concurrency=limits.max_connections,
                            timeout_keep_alive=min(KEEP_ALIVE_S, limits.read_timeout),
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    _Server(config, on_exit=api.stop).run(sockets=[sock])
