"""The cluster join token: every Stage RPC carries it, and a node refuses calls without it.

The token is 32 random bytes (URL-safe base64) in a file only its owner can read, created on
first use (`<cache dir>/cluster-token` by default). The operator copies the coordinator's file
to each node (the Ansible playbook does it). Health checks need no token, so a load balancer or
`grpc_health_probe` can still ask whether a node is up.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

TOKEN_FILE = "cluster-token"
_HEADER = "authorization"
_OPEN_METHODS = ("/grpc.health.v1.Health/",)


class TokenError(ValueError):
    pass


def load_token(path: Path, create: bool = True) -> str:
    """The token in `path`, created (mode 0600) when missing and `create` is set. A file others
    can read is refused, as ssh refuses a private key anyone can read."""
    path = Path(path)
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
            log.warning("created a new cluster token in %s: copy this file to every node and coordinator", path)
    try:
        mode = path.stat().st_mode
        token = path.read_text().strip()
    except FileNotFoundError:
        raise TokenError(f"{path}: no cluster token file (copy it from the coordinator)") from None
    except OSError as exc:
        raise TokenError(f"{path}: cannot read the cluster token ({exc.strerror})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenError(f"{path}: the cluster token must be readable by its owner only (chmod 600 {path})")
    if len(token) < 16 or not token.isprintable() or " " in token:
        raise TokenError(f"{path}: not a cluster token (16 or more printable characters, no spaces)")
    return token


class _ClientToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str):
        self._metadata = ((_HEADER, f"Bearer {token}"),)

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return details._replace(metadata=tuple(details.metadata or ()) + self._metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def with_token(channel: grpc.Channel, token: str | None) -> grpc.Channel:
    """The channel, sending the token with every call (as is when token is None)."""
    return channel if token is None else grpc.intercept_channel(channel, _ClientToken(token))


class TokenCheck(grpc.ServerInterceptor):
    """Refuses every call but health checks unless it carries the cluster token."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith(_OPEN_METHODS):
            return handler
        sent = dict(details.invocation_metadata or ()).get(_HEADER, "")
        if hmac.compare_digest(sent.encode(), self._expected):
            return handler
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    def refuse(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster token")

    kinds = ((handler.unary_unary, grpc.unary_unary_rpc_method_handler),
             (handler.unary_stream, grpc.unary_stream_rpc_method_handler),
             (handler.stream_unary, grpc.stream_unary_rpc_method_handler),
             (handler.stream_stream, grpc.stream_stream_rpc_method_handler))
    make = next(make for behaviour, make in kinds if behaviour is not None)
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
