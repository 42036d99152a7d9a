"""A cluster that heals and grows while it serves: a watcher of the node pool behind `caravan serve`.

Every PROBE_PERIOD_S, on its own thread (never a serving one), the watcher asks each node it
knows of (--nodes, and what --discover finds) for its Info. A node that has answered for a
settle time without a miss and is not in the current plan is measured, and the plan over it and
the plan's other nodes is offered to the pipeline when the planner's own cost says it is better:
fewer layers on this process, or a slowest stage at most REPLAN_GAIN of today's. A node of the
plan that answers without its layers (it restarted) makes the watcher re-plan as well. The
nodes that serve no stage of today's plan are sent their layers first, while serving goes on
(ClusterPipeline.load_ahead); then the pipeline moves at its next call boundary, between
scheduler steps (ClusterPipeline.adopt), refilling every session from its tokens, so the text
of running requests is unchanged, and serving pauses only while the plan's own nodes reload
(from their caches, most often) and the sessions refill, not while weights cross the network.

A node that flaps is not taken at every blink: each time it stopped answering within
FLAP_WINDOW_S doubles its settle time after the first, up to MAX_SETTLE_S. A node lost by
the plan is routed around by the pipeline itself at the next batch (failover.py).

It also says which --nodes are missing from the pool, for /health.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from caravan.pipeline.stage import LayerRange
from caravan.proto import auth
from caravan.proto import caravan_pb2 as pb

from .cluster import LOCAL, Node, close_nodes, connect, make_plan, measure
from .failover import ClusterPipeline
from .planner import Plan, PlanError
from .remote import NodeClient, NodeError

log = logging.getLogger(__name__)

PROBE_PERIOD_S = 2.0  # how often every node is asked whether it answers
PROBE_TIMEOUT_S = 3.0  # a node busy with a batch still answers Info within this
SETTLE_S = 4.0  # a node answers this long without a miss before it is given layers
FLAP_WINDOW_S = 300.0  # times a node stopped answering within this long lengthen its settle time
MAX_SETTLE_S = 60.0  # the longest a flapping node waits
REPLAN_GAIN = 0.8  # a plan is worth moving to when its slowest stage takes at most this share of today's
NOT_ASKED = "not asked yet"


@dataclass
class _Seen:
    """What the probes found of one address."""

    since: float | None = None  # when its current run of answers began; None while it does not answer
    info: pb.NodeInfo | None = None  # its last answer
    error: str = NOT_ASKED  # why it does not answer
    losses: list[float] = field(default_factory=list)  # when it stopped answering, within FLAP_WINDOW_S


def local_layers(plan: Plan | None) -> int:
    """Layers this process carries under `plan`."""
    return sum(len(a.layers) for a in plan.assignments if a.node.name == LOCAL) if plan else 0


def better(new: Plan, old: Plan | None) -> bool:
    """Whether moving from `old` to `new` pays, by the planner's cost: this process gives layers
    back to nodes, or the slowest stage gets clearly faster."""
    if old is None:
        return True
    if local_layers(new) != local_layers(old):
        return local_layers(new) < local_layers(old)
    return new.bottleneck_ms <= REPLAN_GAIN * old.bottleneck_ms


def _holds(info: pb.NodeInfo | None, layers: LayerRange) -> bool:
    return info is None or (info.layer_start, info.layer_stop) == (layers.start, layers.stop)


class Watcher:
    """The background watcher of one ClusterPipeline's nodes; `missing()` for /health."""

    def __init__(self, pipeline: ClusterPipeline, addresses: Callable[[], list[str]], configured: Sequence[str],
                 token: str | None = None, tls: auth.TLSFiles | None = None, period_s: float = PROBE_PERIOD_S,
                 settle_s: float = SETTLE_S):
        self.pipeline = pipeline
        self.addresses = addresses  # every node to watch, in pipeline order: --nodes, then what --discover finds
        self.configured = [a for a in configured if a != LOCAL]  # the ones /health misses
        self.token, self.tls = token, tls
        self.period_s, self.settle_s = period_s, settle_s
        self._seen: dict[str, _Seen] = {}
        self._lock = threading.Lock()  # guards _seen (read by /health's thread)
        self._considered: tuple = ()  # the pool and plan last found not worth a move
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="caravan-heal", daemon=True)
        cluster = pipeline.cluster
        now = time.monotonic()
        for node in cluster.nodes if cluster else []:
            if node.client is not None:  # answered for the first plan just now: settled
                self._seen[node.address] = _Seen(now - settle_s, node.info, "")

    def start(self) -> "Watcher":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=PROBE_TIMEOUT_S * 4)

    def missing(self) -> list[dict]:
        """The configured nodes that do not answer, or answer again but have not joined the pool
        yet, each with why. One that has settled and that the planner leaves out is not missing."""
        cluster = self.pipeline.cluster
        pooled = {n.address for n in cluster.nodes} if cluster else set()
        now = time.monotonic()
        rows = []
        with self._lock:
            for address in self.configured:
                seen = self._seen.get(address) or _Seen()
                if seen.since is None:
                    rows.append({"node": address, "error": seen.error})
                elif address not in pooled and now - seen.since < self._settle(seen):
                    rows.append({"node": address, "error": "answers again; joins the pool once it has settled"})
        return rows

    def _run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:  # noqa: BLE001  (a bug must not end the watching; serving goes on)
                log.exception("watching the nodes failed")
            if self._stop.wait(self.period_s):
                return

    def tick(self) -> None:
        """Probe every node once, then re-plan if the pool calls for it."""
        try:
            addresses = self.addresses()
        except NodeError as exc:  # --discover found none: the pool is --nodes alone
            log.debug("%s", exc)
            addresses = list(self.configured)
        for address in addresses:
            if address != LOCAL and not self._stop.is_set():
                self._probe(address)
        if not self._stop.is_set():
            self._consider(addresses)

    def _probe(self, address: str) -> None:
        # A new channel each time: one to a dead address backs off reconnecting for minutes.
        client = NodeClient(address, self.token, self.tls)
        try:
            info, error = client.info(timeout=PROBE_TIMEOUT_S), ""
        except NodeError as exc:
            info, error = None, str(exc)
        finally:
            client.close()
        now = time.monotonic()
        with self._lock:
            seen = self._seen.setdefault(address, _Seen())
            seen.losses = [t for t in seen.losses if now - t < FLAP_WINDOW_S]
            if info is not None and seen.since is None:
                log.info("node %s answers; it joins once it has answered for %.0f s", client.label, self._settle(seen))
                seen.since = now
            elif info is None and seen.since is not None:
                log.info("%s; it left the pool", error)
                seen.losses.append(now)
                seen.since = None
            elif info is None and seen.error == NOT_ASKED:
                log.info("node %s is missing: %s", address, error)
            seen.info, seen.error = info, error or seen.error

    def _settle(self, seen: _Seen) -> float:
        return min(MAX_SETTLE_S, self.settle_s * 2 ** max(0, len(seen.losses) - 1))

    def _consider(self, addresses: list[str]) -> None:
        """Offer the pipeline a plan over the settled nodes when new ones are among them and it
        is better, or when a node of the plan lost its layers."""
        generation, cluster = self.pipeline.generation, self.pipeline.cluster
        if self.pipeline.replanning:  # a failure's re-plan is under way: look again at the next tick
            return
        held = {n.address: n for n in cluster.nodes} if cluster else {}
        now = time.monotonic()
        with self._lock:
            answering = [a for a in addresses if a == LOCAL or (a in self._seen and self._seen[a].since is not None)]
            settled = [a for a in answering if a == LOCAL or now - self._seen[a].since >= self._settle(self._seen[a])]
            stale = [a.node.name for a in cluster.plan.assignments if a.node.name in self._seen
                     and not _holds(self._seen[a.node.name].info, a.layers)] if cluster else []
        stale = [address for address in stale if not self._holds_now(address, cluster)]  # asked since the plan
        joining = [a for a in settled if a not in held]
        key = (generation, tuple(joining), tuple(stale))
        if not (joining or stale or cluster is None) or key == self._considered:
            return
        pool = [a for a in answering if a in settled or a in held]
        nodes = self._measured(pool, held)
        if not nodes:
            return
        try:
            plan = make_plan(self.pipeline.router.model, nodes, self.pipeline.n_ctx)
        except PlanError as exc:
            log.debug("no plan over %s: %s", ", ".join(pool), exc)
            plan = None
        if plan is None or not (stale or better(plan, cluster.plan if cluster else None)):
            self._considered = key
            close_nodes(nodes)
            return
        self._move(nodes, plan, generation, joining, stale)

    def _holds_now(self, address: str, cluster) -> bool:
        """Whether the node at `address` still holds its layers of `cluster`'s plan, asked now."""
        self._probe(address)
        layers = next(a.layers for a in cluster.plan.assignments if a.node.name == address)
        with self._lock:
            return _holds(self._seen[address].info, layers)

    def _measured(self, pool: list[str], held: dict[str, Node]) -> list[Node]:
        """The nodes of `pool`, connected anew; the ones the plan has keep their measurements."""
        try:
            nodes = connect(pool, self.token, pool, self.tls, [])
        except NodeError as exc:
            log.debug("connecting to %s: %s", ", ".join(pool), exc)
            return []
        try:
            for node in nodes:
                known = held.get(node.address)
                if known is not None and known.info.node_id == node.info.node_id:
                    node.ms_per_layer, node.rtt_ms = known.ms_per_layer, known.rtt_ms
                elif node.client is not None:
                    measure([node], self.pipeline.router.model)
                else:  # this process, not in the plan: timing its kernels would slow the serving lanes
                    raise NodeError(LOCAL, "not measured")
        except NodeError as exc:
            log.debug("measuring %s: %s", ", ".join(pool), exc)
            close_nodes(nodes)
            return []
        return nodes

    def _move(self, nodes: list[Node], plan: Plan, generation: int, joining: list[str], stale: list[str]) -> None:
        """Load the layers of the nodes that serve no stage yet while serving goes on, then have the
        pipeline move to `plan` at its next call boundary, where it loads the others' layers."""
        names = {node.address: node.client.label for node in nodes if node.client is not None}
        why = "; ".join(filter(None, [f"joined: {', '.join(names.get(a, a) for a in joining)}" if joining else "",
                                       f"lost their layers: {', '.join(names.get(a, a) for a in stale)}" if stale else ""]))
        t0 = time.monotonic()
        try:
            ahead = self.pipeline.load_ahead(nodes, plan, generation, stale)
            if ahead:
                log.info("loaded the layers of %s in %.1f s while serving went on", ", ".join(names[a] for a in ahead),
                         time.monotonic() - t0)
            was, t0 = self.pipeline.layout(), time.monotonic()
            moved = self.pipeline.adopt(nodes, plan, generation)
        except Exception as exc:  # noqa: BLE001  (the pipeline re-plans at its next call; the watcher goes on)
            log.warning("re-planning (%s) failed: %s", why or "no plan", exc)
            close_nodes(nodes)
            return
        if moved:
            for address in joining:
                log.info("node %s joined the pool", names.get(address, address))
            log.info("re-planned in %.1f s (%s): was %s; now %s", time.monotonic() - t0, why or "no plan", was,
                     self.pipeline.layout())
