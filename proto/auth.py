"""Who may talk to a node: the cluster join token on every call, and optionally mutual TLS.

The cluster join token: every Stage RPC carries it, and a node refuses calls without it.

The token is 32 random bytes (URL-safe base64) in a file only its owner can read, created on
first use (`<cache dir>/cluster-token` by default; `caravan token` prints it and where it is).
The operator copies the coordinator's file to each node (the Ansible playbook does it), or
gives a node the token itself in CARAVAN_TOKEN. A node reads its file again when it refuses a
call, so a copy made after it started needs no restart, and its refusal names that file, so
the coordinator's error can say what to copy where. Health checks need no token, so a load
balancer or `grpc_health_probe` can still ask whether a node is up.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

TOKEN_FILE = "cluster-token"
TOKEN_ENV = "CARAVAN_TOKEN"  # a node's token, kept off its command line
# A node reads its token file again at most this often, when it refuses a call: a copied-in
# token is taken within that time, and a peer sending wrong tokens cannot make it read more.
REREAD_S = 2.0
REFUSAL_LOG_S = 10.0  # a node logs the calls it refuses at most this often
_HEADER = "authorization"
_OPEN_METHODS = ("/grpc.health.v1.Health/",)


class TokenError(ValueError):
    pass


class ClusterToken(str):
    """A cluster token, and the file it was read from (None: given as text). A str, so whatever
    sends it needs no change; the file is for messages that say what to copy where."""

    path: Path | None

    def __new__(cls, value: str, path: Path | None = None) -> "ClusterToken":
        token = super().__new__(cls, value)
        token.path = path
        return token


def check_token(text: str, where: str) -> ClusterToken:
    """`text` (stripped) if it can be a cluster token; `where` names its source in the error."""
    token = text.strip()
    if len(token) < 16 or not token.isprintable() or " " in token:
        raise TokenError(f"{where}: not a cluster token (16 or more printable characters, no spaces)")
    return ClusterToken(token)


def load_token(path: Path, create: bool = True,
               advice: str = "copy this file to every node and coordinator") -> ClusterToken:
    """The token in `path`, created (mode 0600) when missing and `create` is set (and `advice`
    logged with it). A file others can read is refused, as ssh refuses a private key anyone can read."""
    path = Path(path)
    if create and not path.exists():
        _create_token_file(path, advice)
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except FileNotFoundError:
        raise TokenError(f"{path}: no cluster token file (copy it from the coordinator)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenError(f"{path}: cannot read the cluster token ({getattr(exc, 'strerror', None) or exc})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenError(f"{path}: the cluster token must be readable by its owner only (chmod 600 {path})")
    return ClusterToken(check_token(text, str(path)), path)


def _create_token_file(path: Path, advice: str) -> None:
    """A new token in `path`, unless another process makes one there first (then theirs stays).
    The token is written whole to a private file beside it and then linked in, so a process
    starting at the same moment reads either no file or the whole token, never an empty one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, written = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
            os.link(written, path)  # unlike a rename, never replaces a token another process linked first
        finally:
            os.unlink(written)
    except FileExistsError:  # another process made it first: use theirs
        return
    except OSError as exc:
        raise TokenError(f"{path}: cannot create the cluster token ({exc.strerror}); "
                         "choose a writable place with --token-file") from None
    log.warning("created a new cluster token in %s: %s", path, advice)


# A node's refusal ends with its token file, which the coordinator reads back out of it.
_NODE_FILE = "; the node's token file is "


def refusal_details(node_file: Path | None) -> str:
    """What a node answers a call without its token."""
    return "missing or wrong cluster token" + (f"{_NODE_FILE}{node_file}" if node_file else "")


def refused_token_advice(token: str | None, details: str) -> str:
    """The coordinator's side of a refusal: which file to copy where. `token` is the one sent
    (its file, when read from one), `details` the node's refusal."""
    _, said, node_file = (details or "").partition(_NODE_FILE)
    ours = token.path if isinstance(token, ClusterToken) else None
    refused = "refused this coordinator's cluster token"
    if ours is None:
        return f"{refused}: give the node the same token" + (f" (its token file is {node_file})" if said else "")
    if said:
        return (f"{refused}: copy {ours} (this coordinator's token file) to the node's token file ({node_file}), "
                "or start the node with --token-file pointing at a copy of it")
    return (f"{refused}: copy {ours} (this coordinator's token file) to the node and start it with --token-file "
            f"pointing at the copy, or give the node that token in {TOKEN_ENV}")


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
    """Refuses every call but health checks unless it carries the cluster token. A token read
    from `path` is read again when a call is refused (at most every `reread_s`)."""

    def __init__(self, token: str, path: Path | None = None, reread_s: float = REREAD_S):
        self._expected = f"Bearer {token}".encode()
        self._token = token
        self._path = path
        self._reread_s = reread_s
        self._lock = threading.Lock()
        self._next_reread = 0.0  # time.monotonic() from which the file may be read again
        self._next_warning = 0.0  # time.monotonic() from which a refusal is logged again
        self._details = refusal_details(path)
        # Refuses before reading the request, whatever kind of call was made: gRPC starts a
        # streaming handler without a deserializer at once and never receives the message, so a
        # peer without the token makes the node neither hold nor parse what it sends.
        self._refusal = grpc.stream_stream_rpc_method_handler(self._refuse)

    @property
    def token(self) -> str:
        """The token expected now (what this node sends to the next nodes of a chain)."""
        return self._token

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith(_OPEN_METHODS):
            return handler
        sent = dict(details.invocation_metadata or ()).get(_HEADER, "").encode()
        if hmac.compare_digest(sent, self._expected) or (self._reread() and hmac.compare_digest(sent, self._expected)):
            return handler
        return self._refusal

    def _reread(self) -> bool:
        """Read the token file again, unless it was read within reread_s; True when it now holds
        another token."""
        now = time.monotonic()
        with self._lock:
            if self._path is None or now < self._next_reread:
                return False
            self._next_reread = now + self._reread_s
        try:
            token = load_token(self._path, create=False)
        except TokenError as exc:
            log.warning("%s; the token read before stays in use", exc)
            return False
        if token == self._token:
            return False
        self._token, self._expected = token, f"Bearer {token}".encode()
        log.warning("%s: the cluster token changed; calls with the new one are taken from now on", self._path)
        return True

    def _refuse(self, request_iterator, context):
        now = time.monotonic()
        with self._lock:
            warn = now >= self._next_warning
            if warn:
                self._next_warning = now + REFUSAL_LOG_S
        if warn:
            where = f"copy the coordinator's token file to {self._path}" if self._path else "give this node its token"
            log.warning("refused %s: missing or wrong cluster token (%s; `caravan token` on the coordinator says "
                        "where its file is)", context.peer(), where)
        context.abort(grpc.StatusCode.UNAUTHENTICATED, self._details)
        yield  # a generator: the call is answered with its status alone


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


def add_auth_flags(parser, *, token_file: str, tls_cert: str, tls_ca: str, token: str | None = None) -> None:
    """The authentication flags of the coordinator's and the node's command lines: --token-file
    (and --token, exclusive with it, where `token` gives its help), --tls-cert, --tls-key and
    --tls-ca. Each argument is a flag's help, since the two sides present different things."""
    tokens = parser.add_mutually_exclusive_group() if token else parser
    tokens.add_argument("--token-file", type=Path, default=None, metavar="PATH", help=token_file)
    if token:
        tokens.add_argument("--token", default=None, metavar="TOKEN", help=token)
    parser.add_argument("--tls-cert", type=Path, default=None, metavar="PEM", help=tls_cert)
    parser.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="its private key")
    parser.add_argument("--tls-ca", type=Path, default=None, metavar="PEM", help=tls_ca)


def server_credentials(tls: TLSFiles) -> grpc.ServerCredentials:
    cert, key, ca = tls.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def open_channel(address: str, tls: TLSFiles | None, options: list[tuple[str, object]]) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    cert, key, ca = tls.read()
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    return grpc.secure_channel(address, credentials, options=options)
