"""`caravan node`: serve a stage of layers to coordinators and advertise it on the LAN.

    caravan node [--host H] [--port P] [--name N] [--threads T] [--cache-dir DIR]
                 [--model PATH] [--token-file PATH | --token TOKEN] [--no-advertise]

The first line on stdout says where it listens (`caravan node NAME listening on HOST:PORT`),
so scripts and tests that pass --port 0 learn the port. It serves until SIGINT or SIGTERM.
Without -v it logs warnings and its own INFO lines: which coordinator it serves with which layers.
"""

from __future__ import annotations

import argparse
import re
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

import numba

from caravan.pipeline.catalog import default_cache_dir
from caravan.pipeline.gguf_file import GGUFError
from caravan.pipeline.numba_config import NODE_SPIN, spin_briefly_when_idle
from caravan.pipeline.warmup import nothing_compiled
from caravan.pipeline.prompt_cache import CACHE_SHARE_OF_FREE

from caravan.proto.auth import TOKEN_ENV, TOKEN_FILE, ClusterToken, TLSFiles, add_auth_flags, check_token, load_token
from caravan.proto.wire import PROTOCOL_VERSION, STATE_NAMES

from .advertise import Advertisement
from .server import VERSION, NodeSettings, create_server
from .weights import lock_cache_dir

log = logging.getLogger(__name__)

DEFAULT_PORT = 50051
STOP_GRACE_S = 0.5  # on SIGTERM, for the calls under way (a batch, an Info) to finish


def build_parser(prog: str = "caravan node") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Serve a range of a model's layers to caravan coordinators.")
    p.add_argument("--host", default="0.0.0.0",
                   help="address to listen on (default: 0.0.0.0, every interface; 127.0.0.1 keeps it on this machine)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT}; 0 picks a free one)")
    p.add_argument("--name", default=None, help="name shown to coordinators (default: HOSTNAME-PORT)")
    p.add_argument("--threads", "-t", type=int, default=None, metavar="N",
                   help=f"compute threads (default: all, {numba.config.NUMBA_NUM_THREADS})")
    p.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                   help="where received layers are kept (default: $CARAVAN_HOME, else ~/.cache/caravan)")
    p.add_argument("--model", "-m", type=Path, default=None, metavar="PATH",
                   help="a local copy of a model file: its layers load from it instead of the network")
    p.add_argument("--memory-limit", type=_size, default=None, metavar="SIZE",
                   help="offer at most SIZE of memory to coordinators, runtime included (e.g. 2G, 512M)")
    p.add_argument("--cache-budget", type=_size, default=None, metavar="SIZE",
                   help="keep finished sessions' KV caches, up to SIZE, for later requests that begin alike "
                        f"(the next turn of a chat) to copy; 0 keeps none (default: {CACHE_SHARE_OF_FREE * 100:g}%% of the "
                        "memory the layers leave free)")
    add_auth_flags(p,
                   token_file="the cluster join token, copied from the coordinator (`caravan token` there says where "
                   "it is); read again when a call is refused, so a new copy needs no restart (default: "
                   f"${TOKEN_ENV} if set, else CACHE_DIR/cluster-token, created if missing)",
                   token="the cluster join token itself, as `caravan token` prints it; other users of this "
                   f"machine can read it in the process list: prefer --token-file or ${TOKEN_ENV}",
                   tls_cert="mutual TLS: this node's certificate, naming its address (with --tls-key, --tls-ca)",
                   tls_ca="the CA whose certificates coordinators must present")
    p.add_argument("--no-advertise", action="store_true", help="do not announce the node with zeroconf")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log to stderr (-v info, -vv debug)")
    return p


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str) -> int:
    """'2G', '512M', '1.5GiB', '1000000' -> bytes (powers of 1024, as free(1) shows them)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 2G, 512M)")
    return int(float(match[1]) * _UNITS[match[2]])


def main(argv: list[str] | None = None) -> int:
    spin_briefly_when_idle(NODE_SPIN)
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("caravan").setLevel(level)
    # The node's own few INFO lines (whom it serves, with which layers) belong in its journal.
    logging.getLogger("caravan.node").setLevel(min(level, logging.INFO))
    try:
        return serve(args)
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError) as exc:  # bad flags, a port in use, an unreadable --model
        print(f"caravan node: error: {exc}", file=sys.stderr)
        return 1


def serve(args: argparse.Namespace) -> int:
    limit = numba.config.NUMBA_NUM_THREADS
    if args.threads is not None and not 1 <= args.threads <= limit:
        raise ValueError(f"--threads must be between 1 and {limit}, got {args.threads}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    cache_dir = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    advert: Advertisement | None = None

    def on_state(state: int) -> None:
        if advert is not None:
            advert.update(state=STATE_NAMES.get(state, "unknown"))

    cache_lock = lock_cache_dir(cache_dir)  # before anything reads or writes the directory
    token = cluster_token(args, cache_dir)
    settings = NodeSettings(host=args.host, port=args.port, name=args.name or "", threads=args.threads,
                            cache_dir=cache_dir, model_path=args.model, memory_limit=args.memory_limit, token=token,
                            token_file=token.path, cache_budget=args.cache_budget, tls=TLSFiles.from_flags(args.tls_cert, args.tls_key, args.tls_ca))
    try:
        server, port, servicer = create_server(settings, on_state)
    except GGUFError as exc:
        raise ValueError(f"--model: {exc}") from None
    name = args.name or f"{socket.gethostname()}-{port}"
    servicer.settings = dataclasses.replace(settings, port=port, name=name)
    if not args.no_advertise:
        info = servicer.Info(None, None)
        advert = Advertisement(name, args.host, port, {
            "id": info.node_id, "name": name, "version": VERSION, "protocol": str(PROTOCOL_VERSION),
            "mem": str(info.memory_total), "cores": str(info.cores), "arch": info.architecture,
            "state": STATE_NAMES[info.state],
        })
    print(f"caravan node {name} listening on {args.host}:{port}", flush=True)
    if nothing_compiled():
        log.info("no kernels compiled yet: the first coordinator waits while they compile (a minute or more per "
                 "format on a Pi); `caravan warmup` compiles them ahead")

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("stopping")
    shut_down(server, servicer, advert)
    if cache_lock is not None:
        cache_lock.close()
    return 0


def cluster_token(args: argparse.Namespace, cache_dir: Path) -> ClusterToken:
    """--token, else --token-file, else $CARAVAN_TOKEN, else the cache directory's token file."""
    if args.token is not None:
        log.warning("--token can be read by every user of this machine in the process list: prefer --token-file "
                    "or the environment variable %s", TOKEN_ENV)
        return check_token(args.token, "--token")
    if args.token_file is None and os.environ.get(TOKEN_ENV):
        return check_token(os.environ[TOKEN_ENV], TOKEN_ENV)
    return load_token(args.token_file or cache_dir / TOKEN_FILE, advice=(
        "until the coordinator's token file is copied over it (`caravan token` on the coordinator says where it is), "
        "this node refuses every coordinator"))


def shut_down(server, servicer, advert: Advertisement | None) -> None:
    """Stop within about STOP_GRACE_S: the advertisement's goodbye goes out while the server
    stops, and open streams end at once instead of holding the grace period to its end
    (a coordinator's streams never end by themselves)."""
    goodbye = None
    if advert is not None:
        goodbye = threading.Thread(target=advert.close, name="caravan-goodbye")
        goodbye.start()
    servicer.close()
    server.stop(grace=STOP_GRACE_S).wait()
    if goodbye is not None:
        goodbye.join(timeout=STOP_GRACE_S)
