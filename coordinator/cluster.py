"""From a list of nodes to a Pipeline: ask each node what it is, measure it, plan, load.

    nodes = connect(["pi1:50051", "pi2:50051", LOCAL])   # LOCAL: this process hosts layers too
    measure(nodes, model)                                # ms per layer on each, round trips
    plan = make_plan(model, nodes, n_ctx)
    cluster = deploy(model, nodes, plan, n_ctx, ...)     # cluster.pipeline runs generation
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import sys
import threading
import time
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil
from gguf import GGMLQuantizationType as QT
from tqdm import tqdm

from caravan.pipeline import warmup
from caravan.pipeline.catalog import file_sha256
from caravan.pipeline.generate import Pipeline
from caravan.pipeline.loader import LoadedModel
from caravan.pipeline.model import layer_tensor_shapes
from caravan.pipeline.quants import SUPPORTED_TYPES, Activations, matmul, packed_nbytes
from caravan.pipeline.speed import ms_per_layer
from caravan.pipeline.stage import KVCache, LayerRange, LocalStage, Stage
from caravan.proto import caravan_pb2 as pb
from caravan.proto import auth, wire

from .planner import ModelCost, NodeCapacity, Plan, PlanError, Speculation, place_head, plan_layers, tokens_per_pass
from .remote import FORWARD_TIMEOUT_S, NodeClient, NodeError, Part, RemoteStage

log = logging.getLogger(__name__)

LOCAL = "local"  # in --nodes: this process hosts a stage too



@dataclass
class Node:
    """One place layers can run: a remote node (client set) or this process (client None)."""

    address: str
    client: NodeClient | None
    info: pb.NodeInfo
    ms_per_layer: float = math.nan
    rtt_ms: float = 0.0

    @property
    def name(self) -> str:
        return self.info.name or self.address

    @property
    def label(self) -> str:
        return self.client.label if self.client else "local (this process)"


def parse_nodes(text: str) -> list[str]:
    """`host:port,host:port,local` -> addresses, checked for shape."""
    addresses = [a.strip() for a in text.split(",") if a.strip()]
    if not addresses:
        raise ValueError("--nodes needs at least one HOST:PORT")
    for a in addresses:
        if a == LOCAL:
            continue
        host, sep, port = a.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--nodes: {a!r} is not HOST:PORT")
    if len(set(addresses)) != len(addresses):
        raise ValueError("--nodes lists a node twice")
    return addresses


def _local_info() -> pb.NodeInfo:
    mem = psutil.virtual_memory()
    return pb.NodeInfo(protocol_version=wire.PROTOCOL_VERSION, name=LOCAL, memory_total=mem.total,
                       memory_available=mem.available, cores=os.cpu_count() or 1,
                       architecture=platform.machine(), state=pb.NODE_STATE_IDLE)


def local_node() -> Node:
    """This process as a place for layers, with the memory it has free now."""
    return Node(LOCAL, None, _local_info())


def connect(addresses: list[str], token: str | None = None, optional: Collection[str] = (),
            tls: auth.TLSFiles | None = None, left_out: list[NodeError] | None = None) -> list[Node]:
    """Ask every node who it is. One unreachable, untrusted or incompatible node is an error
    naming it, unless it is `optional` (found by discovery, or re-planning after a failure):
    then it is left out with a warning. Given a `left_out` list (a plan that routes around lost
    nodes), any node that is unreachable or does not answer in time is left out too, and the
    errors of the nodes left out go to the list instead of the log, for the caller to report."""
    nodes = []
    try:
        for address in addresses:
            if address == LOCAL:
                nodes.append(local_node())
                continue
            client = NodeClient(address, token, tls)
            try:
                nodes.append(Node(address, client, client.info()))
            except NodeError as exc:
                client.close()
                skipped = address in optional and (exc.lost or exc.code == grpc.StatusCode.UNAUTHENTICATED)
                if not (skipped or exc.lost and left_out is not None):
                    raise
                if left_out is None:
                    log.warning("leaving out %s", exc)
                else:
                    left_out.append(exc)
    except BaseException:
        close_nodes(nodes)
        raise
    seen: dict[str, str] = {}
    for node in nodes:
        if node.client and node.info.node_id:
            if node.info.node_id in seen:
                raise NodeError(node.label, f"is the same node as {seen[node.info.node_id]}")
            seen[node.info.node_id] = node.label
    return nodes


def close_nodes(nodes: list[Node]) -> None:
    for node in nodes:
        if node.client:
            node.client.close()


def layer_weight_type(model: LoadedModel) -> QT:
    """The format most of the layers' bytes are in: what the nodes' benchmark runs."""
    by_type: Counter[QT] = Counter()
    for name in layer_tensor_shapes(model.config, 0):
        info = model.file.tensors[name]
        by_type[info.type] += info.n_bytes
    return by_type.most_common(1)[0][0]


def measure(nodes: list[Node], model: LoadedModel) -> None:
    """Each node's ms per layer for this model's shape, and its round trip from here."""
    weight_type = layer_weight_type(model)
    for node in nodes:
        if node.client is None:
            warmup.warm(model.config, warmup.cold_formats(model.config, [weight_type]), say)
            node.ms_per_layer = ms_per_layer(model.config, weight_type)
        else:
            with _said_after(SLOW_S, f"waiting for {node.name} to time its {weight_type.name} kernels (the first "
                                     "time, it compiles them: a minute or more on a Pi; `caravan warmup` there "
                                     "does it ahead)"):
                node.ms_per_layer = node.client.benchmark(model.config, int(weight_type))
            node.rtt_ms = node.client.round_trip_ms()


SLOW_S = 1.0  # a wait longer than this is explained, or shown as a progress bar


def say(line: str) -> None:
    """A line for the user waiting at a terminal; elsewhere (a service, a test) a log line."""
    if sys.stderr.isatty():
        print(line, file=sys.stderr, flush=True)
    else:
        log.info("%s", line)


@contextlib.contextmanager
def _said_after(seconds: float, line: str) -> Iterator[None]:
    """`line` is said if the block takes longer than `seconds`."""
    timer = threading.Timer(seconds, say, (line,))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def survey_node(address: str, token: str | None, tls: auth.TLSFiles | None, model: LoadedModel) -> dict:
    """What `caravan nodes` lists of the node at `address`: its details and its speed on `model`'s
    layer shape, or why it could not be asked (unreachable, or it does not accept `token`)."""
    try:
        nodes = connect([address], token, tls=tls)
    except NodeError as exc:
        trusted = exc.code != grpc.StatusCode.UNAUTHENTICATED
        return {"address": address, "state": "unreachable" if trusted else "untrusted", "error": str(exc)}
    node = nodes[0]
    try:
        measure(nodes, model)
        info = node.info
        return {
            "name": node.name, "address": address, "id": info.node_id, "version": info.version,
            "architecture": info.architecture, "cores": info.cores, "threads": info.threads,
            "memory_total": info.memory_total, "memory_available": info.memory_available,
            "state": wire.STATE_NAMES.get(info.state, "unknown"),
            "layers": [info.layer_start, info.layer_stop] if info.layer_stop else None,
            "ms_per_layer": round(node.ms_per_layer, 4), "rtt_ms": round(node.rtt_ms, 4),
        }
    except NodeError as exc:
        return {"address": address, "error": str(exc)}
    finally:
        close_nodes(nodes)


def layer_bytes(model: LoadedModel) -> int:
    """Bytes of the largest layer once its weights are packed for the kernels."""
    largest = 0
    for layer in range(model.config.n_layers):
        total = 0
        for name in layer_tensor_shapes(model.config, layer):
            info = model.file.tensors[name]
            total += packed_nbytes(info.type, info.n_rows, info.shape[0]) if info.type in SUPPORTED_TYPES else info.n_bytes
        largest = max(largest, total)
    return largest


def head_bytes(model: LoadedModel) -> int:
    """Bytes of the output head (final norm and projection) once packed for the kernels."""
    return model.head.out.nbytes


def model_cost(model: LoadedModel, n_ctx: int, sessions: int = 1) -> ModelCost:
    kv = KVCache.bytes_for(1, model.config.kv_dim, n_ctx) * sessions
    return ModelCost(model.config.n_layers, layer_bytes(model), kv, head_bytes=head_bytes(model),
                     row_bytes=4 * model.config.dim)


# --head: where the output head runs; None lets the planner place it where it pays (place_head).
HEAD_PLACES = {"coordinator": False, "node": True, "auto": None}


def make_plan(model: LoadedModel, nodes: list[Node], n_ctx: int, head_on_node: bool | None = False) -> Plan:
    """Layers placed on `nodes` in order, and the output head here, or on the last node with
    `head_on_node`, or where it pays with None (planner.place_head). The head stays here when
    this process ends the model."""
    capacities = []
    for node in nodes:
        if math.isnan(node.ms_per_layer):
            raise ValueError(f"node {node.label} has not been measured")
        # A node's layers and KV caches go when it loads new ones: that memory is free to a plan.
        info = node.info
        free = info.memory_available + info.weight_bytes + info.kv_cache_bytes
        capacities.append(NodeCapacity(node.address, node.ms_per_layer, free, node.rtt_ms))
    cost = model_cost(model, n_ctx)
    coordinator_ms = head_ms(model) if head_on_node is None else 0.0
    plan = place_head(capacities, cost, coordinator_ms, head_on_node)
    if plan.head and plan.assignments[-1].node.name == LOCAL:
        return plan_layers(capacities, cost)
    return plan


def head_ms(model: LoadedModel, repeats: int = 5) -> float:
    """Time of the coordinator's share of a token: the output projection."""
    hidden = np.random.default_rng(0).standard_normal((1, model.config.dim), dtype=np.float32)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        matmul(model.head.output, Activations(hidden))
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]) * 1e3)


def row_share(model: LoadedModel, draft_max: int) -> float:
    """Each extra row of a decode step of 1 + draft_max rows, as a share of a one-row step, timed
    here on a synthetic layer of the model's shape: nodes report one row's time only."""
    weight_type = layer_weight_type(model)
    warmup.warm(model.config, warmup.cold_formats(model.config, [weight_type]), say)
    one = ms_per_layer(model.config, weight_type)
    many = ms_per_layer(model.config, weight_type, rows=draft_max + 1)
    return max(0.0, (many - one) / (draft_max * one))


@dataclass
class Cluster:
    pipeline: Pipeline
    plan: Plan
    nodes: list[Node]
    stages: list[Stage] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # node address -> where its weights came from
    pushed: dict[str, int] = field(default_factory=dict)  # node address -> weight bytes sent to it

    def close(self) -> None:
        _close(self.stages, self.nodes)


def _close(stages: list[Stage], nodes: list[Node]) -> None:
    for stage in stages:
        stage.close()
    close_nodes(nodes)


def deploy(model: LoadedModel, nodes: list[Node], plan: Plan, n_ctx: int, cache_dir: Path,
           wire_format: int = pb.WIRE_FORMAT_F32, progress: bool = True,
           forward_timeout_s: float = FORWARD_TIMEOUT_S) -> Cluster:
    """Load each node's layers (pushing the weights it lacks) and build the pipeline: each run
    of consecutive remote nodes becomes one RemoteStage, a chain whose nodes pass the hidden
    state on to each other. With plan.head, the node that ends the model loads the output head
    too, and its chain may answer with token ids."""
    by_address = {n.address: n for n in nodes}
    stages: list[Stage] = []
    sources: dict[str, str] = {}
    pushed: dict[str, int] = {}
    chain: list[Part] = []

    def end_chain() -> None:
        if chain:
            first, *then = chain
            head = plan.head and chain[-1].layers.stop == model.config.n_layers
            stages.append(RemoteStage(first.client, first.layers, model.config.dim, wire_format, first.ms_per_layer,
                                      forward_timeout_s, then, head, model.config.vocab_size))
            chain.clear()

    try:
        sha = file_sha256(model.file.path, cache_dir)
        for assignment in plan.assignments:
            node = by_address[assignment.node.name]
            layers = assignment.layers
            if node.client is None:
                end_chain()
                stages.append(LocalStage.load(model.file, model.config, layers, n_ctx))
                sources[node.address] = "local file"
                continue
            reply, pushed[node.address] = load_layers(model, node, layers, sha, n_ctx, progress,
                                                      head=plan.head and layers.stop == model.config.n_layers)
            sources[node.address] = reply.source
            chain.append(Part(node.client, layers, 0.0 if math.isnan(node.ms_per_layer) else node.ms_per_layer))
        end_chain()
        pipeline = Pipeline(model.head, stages, n_ctx)
    except BaseException:
        _close(stages, nodes)
        raise
    return Cluster(pipeline, plan, nodes, stages, sources, pushed)


def load_layers(model: LoadedModel, node: Node, layers: LayerRange, sha: str, n_ctx: int,
                progress: bool = True, head: bool = False) -> tuple[pb.LoadReply, int]:
    """Have a remote node load `layers` (and the output head, with `head`), pushing the weights
    it lacks (a progress bar on a terminal); its reply and the bytes sent."""
    pushed = 0
    with _push_progress(model, layers, node.name, progress) as bar:
        def sent(n: int) -> None:
            nonlocal pushed
            pushed += n
            bar.update(n)
        reply = node.client.load(model.file, sha, model.config, layers, n_ctx, sent, **({"head": True} if head else {}))
    log.info("%s: layers %s ready (weights from %s)", node.label, layers, reply.source)
    return reply, pushed


class _PushProgress:
    """A progress bar of the bytes sent to one node, shown once bytes flow for more than a second
    (a node that has the layers cached sends none, and gets no bar)."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.bar: tqdm | None = None

    def update(self, n: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=self.total, unit="B", unit_scale=True, disable=not self.enabled, file=sys.stderr,
                            desc=self.desc, delay=SLOW_S, leave=False)
        self.bar.update(n)

    def __enter__(self) -> "_PushProgress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _push_progress(model: LoadedModel, layers: LayerRange, name: str, progress: bool) -> _PushProgress:
    prefixes = tuple(f"blk.{i}." for i in range(layers.start, layers.stop))
    total = sum(info.n_bytes for tensor, info in model.file.tensors.items() if tensor.startswith(prefixes))
    size = f"{total / 1e6:.0f} MB" if total >= 10e6 else f"{total / 1e6:.1f} MB"
    desc = f"sending layers {layers.start}-{layers.stop - 1}, {size}, to {name}"
    return _PushProgress(total, desc, progress and sys.stderr.isatty())


def describe_plan(plan: Plan, nodes: list[Node], model: LoadedModel, n_ctx: int, head: float,
                  speculation: Speculation | None = None) -> dict:
    """The plan as a JSON-able dict: what `caravan plan --json` prints."""
    by_address = {n.address: n for n in nodes}
    cost = model_cost(model, n_ctx)
    described = {
        "model": model.name,
        "n_layers": model.config.n_layers,
        "n_ctx": n_ctx,
        "stages": [
            {"node": by_address[a.node.name].name, "address": a.node.name, "layers": [a.layers.start, a.layers.stop],
             "ms_per_layer": round(a.node.ms_per_layer, 4), "rtt_ms": round(a.node.rtt_ms, 4),
             "stage_ms": round(a.stage_ms, 4),
             "memory_bytes": len(a.layers) * cost.per_layer + cost.runtime_bytes,
             "memory_available": a.node.memory_bytes}
            for a in plan.assignments
        ],
        "unused": [{"node": by_address[n.name].name, "address": n.name, "why": why} for n, why in plan.unused],
        "head_ms": round(plan.node_head_ms if plan.head else head, 4),  # where the plan puts the head
        "head_on_node": plan.head,
        "expected_tokens_per_s": round(plan.tokens_per_s(head), 2),
        "pipelined_tokens_per_s": round(plan.pipelined_tokens_per_s(), 2),
    }
    if speculation is not None:
        described["speculation"] = {
            "acceptance": speculation.acceptance, "draft_max": speculation.draft_max,
            "row_share": round(speculation.row_share, 4),
            "tokens_per_pass": round(tokens_per_pass(speculation.acceptance, speculation.draft_max), 4),
            "pass_ms": round(speculation.pass_ms(plan, head), 4),
            "tokens_per_s": round(speculation.tokens_per_s(plan, head), 2),
        }
    return described


__all__ = ["HEAD_PLACES", "LOCAL", "Cluster", "Node", "NodeError", "PlanError", "connect", "deploy", "describe_plan",
           "head_ms", "make_plan", "measure", "parse_nodes", "row_share"]
