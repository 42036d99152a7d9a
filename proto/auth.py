"""Who may talk to a node: the cluster join token on every call, and optionally mutual TLS.

The cluster join token: every Stage RPC carries it, and a node refuses calls without it.

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
from dataclasses import dataclass
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
        return _REFUSAL


def _refuse(request_iterator, context):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong cluster token")
    yield  # a generator: the call is answered with its status alone


# Refuses before reading the request, whatever kind of call was made: gRPC starts a streaming
# handler without a deserializer at once and never receives the message, so a peer without the
# token makes the node neither hold nor parse what it sends.
_REFUSAL = grpc.stream_stream_rpc_method_handler(_refuse)


# --- mutual TLS ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSFiles:
    """PEM files for mutual TLS: this side's certificate and key, and the CA that signed the
    other side's. Nodes require a client certificate from that CA; coordinators check that the
    node's certificate names the address they dial (a SAN with its IP or host name)."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_flags(cls, cert: Path | None, key: Path | None, ca: Path | None) -> "TLSFiles | None":
        given = [f for f in (cert, key, ca) if f is not None]
        if not given:
            return None
        if len(given) != 3:
            raise TokenError("mutual TLS needs all three of --tls-cert, --tls-key and --tls-ca")
        return cls(Path(cert), Path(key), Path(ca))

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(certificate chain, private key, CA certificates), PEM."""
        parts = []
        for what, path in (("certificate", self.cert), ("key", self.key), ("CA certificate", self.ca)):
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise TokenError(f"{path}: cannot read the TLS {what} ({exc.strerror})") from None
            if b"-----BEGIN " not in data:
                raise TokenError(f"{path}: not a PEM file (the TLS {what})")
            parts.append(data)
        return parts[0], parts[1], parts[2]


def server_credentials(tls: TLSFiles) -> grpc.ServerCredentials:
    cert, key, ca = tls.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def open_channel(address: str, tls: TLSFiles | None, options: list[tuple[str, object]]) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    cert, key, ca = tls.read()
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(address, credentials, options=options)
