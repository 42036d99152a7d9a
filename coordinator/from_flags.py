"""What a `caravan` verb runs on, built from its command-line flags: the model (--model,
--threads, --cache-dir), the cluster token and TLS files, the nodes (--nodes, --discover), the
pipeline over them, the LoRA adapters (--lora) and the drafters (--draft, --draft-max,
--no-speculate).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from typing import Iterator

import numba

from caravan.pipeline import warmup
from caravan.pipeline.catalog import PullError, default_cache_dir, resolve_model
from caravan.pipeline.draft_model import DraftModel, DraftModelError, check_vocabulary
from caravan.pipeline.generate import Pipeline
from caravan.pipeline.gguf_file import GGUFError
from caravan.pipeline.loader import LoadedModel, load_model
from caravan.pipeline.lora import LoraAdapter, LoraError
from caravan.pipeline.model import ModelError
from caravan.pipeline.speculative import DrafterFactory, PromptLookup
from caravan.pipeline.tokenizer import TokenizerError
from caravan.proto import wire
from caravan.proto.auth import TOKEN_FILE, ClusterToken, TLSFiles, load_token

from .cluster import HEAD_PLACES, LOCAL, Node, close_nodes, connect, measure, parse_nodes, say
from .discovery import discover
from .failover import ClusterPipeline
from .heal import Watcher
from .remote import NodeError

log = logging.getLogger(__name__)


def adapters(args: argparse.Namespace, model: LoadedModel, pipeline: Pipeline) -> tuple[tuple[str, float], ...]:
    """Open every --lora adapter, check it against the model, give it to every stage; returns
    (name, scale) of each, in order. An adapter's name is its file name without .gguf."""
    chosen: list[tuple[str, float]] = []
    for path, scale in args.lora:
        adapter = LoraAdapter.open(path, model.config)
        if any(name == adapter.name for name, _ in chosen):
            raise LoraError(f"--lora: two adapters named {adapter.name!r}; rename one of the files")
        pipeline.add_adapter(adapter)
        chosen.append((adapter.name, scale))
        log.info("adapter %s: %d matrices, alpha %g, scale %g", adapter.name, len(adapter.pairs), adapter.alpha, scale)
    return tuple(chosen)


def draft_model(args: argparse.Namespace, model: LoadedModel) -> LoadedModel | None:
    """The --draft model, opened and checked against the model's vocabulary before anything
    runs; None without --draft or with --no-speculate."""
    if args.draft is None or not args.speculate:
        return None
    try:
        path = resolve_model(args.draft, cache_dir(args), progress=not args.json)
        draft = load_model(path)
    except (PullError, GGUFError, ModelError, TokenizerError, OSError) as exc:
        reason = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.strerror else exc
        raise DraftModelError(f"--draft {args.draft}: {reason}") from exc
    check_vocabulary(model.tokenizer, draft.tokenizer, args.draft)
    log.info("draft model %s: %d layers, dim %d, from %s", draft.name, draft.config.n_layers, draft.config.dim, path)
    return draft


@contextlib.contextmanager
def drafters(args: argparse.Namespace, draft: LoadedModel | None, n_ctx: int) -> Iterator[DrafterFactory]:
    """What makes each sequence's drafter: the draft model's (its layers loaded in this process
    for the context n_ctx), else prompt lookup, else none with --no-speculate."""
    if draft is None:
        yield lambda params: PromptLookup(args.draft_max) if args.speculate else None
        return
    _compile_kernels(args, draft)
    shared = DraftModel(draft, n_ctx, args.draft_max)
    try:
        yield shared.drafter
    finally:
        shared.close()


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= threads <= limit:
        raise ValueError(f"--threads must be between 1 and {limit} (NUMBA_NUM_THREADS), got {threads}")
    numba.set_num_threads(threads)


def model_path(args: argparse.Namespace) -> Path:
    return resolve_model(args.model, cache_dir(args), progress=not args.json)


def loaded_model(args: argparse.Namespace) -> LoadedModel:
    _set_threads(args.threads)
    path = model_path(args)
    model = load_model(path)
    log.info("model %s: %d layers, dim %d, from %s", model.name, model.config.n_layers, model.config.dim, path)
    return model


def addresses(args: argparse.Namespace) -> list[str]:
    """--nodes, then the nodes --discover finds (skipping ones already listed)."""
    addresses = parse_nodes(args.nodes) if args.nodes else []
    if args.discover:
        found = discover(args.discover_seconds)
        if not found and not addresses:
            raise NodeError("discovery", f"no caravan nodes answered on the LAN within {args.discover_seconds:g} s; "
                            "start `caravan node` on each machine, or give --nodes HOST:PORT,...")
        addresses += [a.address for a in found if a.address not in addresses]
    return addresses


def _explicit(args: argparse.Namespace) -> list[str]:
    return parse_nodes(args.nodes) if args.nodes else []


def token(args: argparse.Namespace) -> ClusterToken:
    return load_token(args.token_file or cache_dir(args) / TOKEN_FILE)


def tls(args: argparse.Namespace) -> TLSFiles | None:
    return TLSFiles.from_flags(args.tls_cert, args.tls_key, args.tls_ca)


def measured_nodes(args: argparse.Namespace, model: LoadedModel) -> list[Node]:
    """The nodes to plan with: every --nodes entry must answer; discovered ones that are
    unreachable or do not accept our token are left out with a warning."""
    every = addresses(args)
    explicit = _explicit(args)
    nodes = connect(every, token(args), optional=[a for a in every if a not in explicit], tls=tls(args))
    try:
        measure(nodes, model)
    except BaseException:
        close_nodes(nodes)
        raise
    return nodes


@contextlib.contextmanager
def pipeline(args: argparse.Namespace, model: LoadedModel, n_ctx: int) -> Iterator[Pipeline]:
    """Every layer in this process, or spread over the nodes given by --nodes / --discover
    (asked again at every re-plan, so a node that comes back is used)."""
    if not (args.nodes or args.discover):
        _compile_kernels(args, model)
        yield model.local_pipeline(n_ctx)
        return
    n_ctx = model.context_size(n_ctx)
    explicit = _explicit(args)
    cluster = ClusterPipeline(model, lambda: addresses(args), n_ctx, cache_dir(args), wire.wire_format(args.wire),
                              progress=not args.json, token=token(args), optional=lambda a: a not in explicit,
                              tls=tls(args), head_on_node=HEAD_PLACES[args.head])
    try:
        summary = ", ".join(f"{a.node.name if a.node.name == LOCAL else _node_name(cluster, a.node.name)} {a.layers}"
                            for a in cluster.plan.assignments)
        log.info("layers placed: %s", summary)
        if not args.json:
            print(f"layers: {summary}", file=sys.stderr)
        yield cluster
    finally:
        cluster.close()


@contextlib.contextmanager
def watched(args: argparse.Namespace, pipeline: Pipeline) -> Iterator[Watcher | None]:
    """For `serve` and `chat` over nodes: the watcher that lets nodes that come back, or new ones,
    join the plan while it serves (coordinator/heal.py); None when every layer runs in this process."""
    if not (args.nodes or args.discover):
        yield None
        return
    watcher = Watcher(pipeline, lambda: addresses(args), _explicit(args), token(args), tls(args)).start()
    try:
        yield watcher
    finally:
        watcher.close()


def _compile_kernels(args: argparse.Namespace, model: LoadedModel) -> None:
    """On a first run, compile the model's kernels before anything else, saying so on a terminal
    (elsewhere in the log): otherwise the first prompt waits a minute or more in silence."""
    cold = warmup.cold_formats(model.config, warmup.model_formats(model.file))
    if not cold:
        return
    done = warmup.warm(model.config, cold, log.info if args.json else say)
    warmup.warm_head(model.head, model.config)
    log.info("kernels compiled in %.1f s", sum(w.seconds for w in done))


def _node_name(pipeline: ClusterPipeline, address: str) -> str:
    return next((n.name for n in pipeline.cluster.nodes if n.address == address), address)


def cache_dir(args: argparse.Namespace) -> Path:
    return args.cache_dir if args.cache_dir is not None else default_cache_dir()
