"""Placement: which node runs which contiguous range of layers.

The planner makes the slowest stage as fast as possible (that stage sets the pace of a
pipeline kept busy), never giving a node more than its memory holds: weights, the KV cache
for the requested context, and the node's runtime. It says what it expects before anything
runs, and refuses up front when the pooled memory is not enough.

Nodes keep the order given: with a fixed order, giving each node as many layers as a time
budget allows is the best contiguous split for that budget, so a binary search over the
candidate budgets (k layers on node i, plus the hidden state's trip to it) finds the smallest.

Nodes pass the hidden state on to each other and the last answers the coordinator, so a
token crosses the network once into each node and once more back: half a round trip each.

The output head (final norm and projection) runs on the coordinator, or on the node that ends
the model when that pays (`place_head`): that node then answers greedy rows with token ids, and
carries the head's bytes and time, so it gets fewer layers. The head's time on a node is taken
as its bytes read at the node's measured speed per layer byte (decode reads every weight once).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from caravan.pipeline.stage import LayerRange
from caravan.proto.wire import NODE_RUNTIME_BYTES

MIB = 1 << 20
LINK_BYTES_PER_MS = 125_000  # 1 GbE, a Raspberry Pi's port: what the last hop's hidden state costs beyond latency


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class NodeCapacity:
    name: str
    ms_per_layer: float  # one decode token through one layer, measured on the node
    memory_bytes: int  # free for caravan on that node
    rtt_ms: float = 0.0  # coordinator <-> node round trip

    @property
    def crossing_ms(self) -> float:
        """A hidden state's one-way trip to the node (from the node before it, on the same LAN)."""
        return self.rtt_ms / 2


@dataclass(frozen=True)
class ModelCost:
    n_layers: int
    layer_bytes: int  # weights of one layer, as the kernels hold them
    kv_bytes_per_layer: int  # keys and values of one layer for the whole context, all sessions
    runtime_bytes: int = NODE_RUNTIME_BYTES
    head_bytes: int = 0  # the output head (final norm and projection), as the kernels hold it
    row_bytes: int = 0  # one row's hidden state in f32: what the last node sends back without the head

    def head_ms(self, node: NodeCapacity) -> float:
        """The head's time on `node`: its bytes at the node's speed per layer byte."""
        return node.ms_per_layer * self.head_bytes / self.layer_bytes if self.layer_bytes else 0.0

    @property
    def per_layer(self) -> int:
        return self.layer_bytes + self.kv_bytes_per_layer

    def max_layers(self, node: NodeCapacity) -> int:
        return max(0, (node.memory_bytes - self.runtime_bytes) // self.per_layer)


@dataclass(frozen=True)
class Assignment:
    node: NodeCapacity
    layers: LayerRange
    stage_ms: float  # its layers' time plus the hidden state's trip to it


@dataclass(frozen=True)
class Plan:
    assignments: tuple[Assignment, ...]
    unused: tuple[tuple[NodeCapacity, str], ...] = field(default=())  # node, why it got no layers
    head: bool = False  # the last node holds the output head
    node_head_ms: float = 0.0  # the head's time there, counted in its stage_ms

    @property
    def bottleneck_ms(self) -> float:
        return max(a.stage_ms for a in self.assignments)

    @property
    def total_ms(self) -> float:
        """One token through every stage in turn, and back to the coordinator."""
        return sum(a.stage_ms for a in self.assignments) + self.assignments[-1].node.crossing_ms

    def tokens_per_s(self, head_ms: float = 0.0) -> float:
        """One stream: a token passes every stage in turn, then the head (`head_ms` on the
        coordinator, unless the last node holds it)."""
        return 1e3 / (self.total_ms + (0.0 if self.head else head_ms))

    def pipelined_tokens_per_s(self) -> float:
        """Many streams keeping every stage busy: the slowest stage sets the pace."""
        return 1e3 / self.bottleneck_ms


def check_speculation(acceptance: float, draft_max: int) -> None:
    if not 0.0 <= acceptance <= 1.0:  # also refuses NaN
        raise PlanError(f"--acceptance must be between 0 and 1 (the chance that a draft token is kept), got {acceptance:g}")
    if draft_max < 1:
        raise PlanError(f"--draft-max must be at least 1, got {draft_max}")


def tokens_per_pass(acceptance: float, draft_max: int) -> float:
    """Tokens a pass of a token and `draft_max` draft tokens gives when each draft token is kept
    with probability `acceptance`, given the ones before it (Leviathan et al. 2023, eq. 1):
    the kept prefix plus the model's own next token."""
    check_speculation(acceptance, draft_max)
    if acceptance == 1.0:
        return float(draft_max + 1)
    return (1.0 - acceptance ** (draft_max + 1)) / (1.0 - acceptance)


@dataclass(frozen=True)
class Speculation:
    """What `caravan plan --acceptance A --draft-max K` assumes of speculative decoding."""

    acceptance: float  # the chance that a draft token is kept, given the ones before it
    draft_max: int  # draft tokens a pass: every pass is taken to carry this many
    row_share: float  # each extra row of a pass, as a share of one row's compute (measured on the coordinator)

    @property
    def rows_factor(self) -> float:
        """A pass of 1 + draft_max rows against one row: the weights are read once for all rows."""
        return 1.0 + self.draft_max * self.row_share

    def pass_ms(self, plan: Plan, head_ms: float) -> float:
        """One pass through every stage and the head: the stages' and the head's compute grows by
        rows_factor; the hops carry a few more rows of dim floats, which costs latency, not bandwidth."""
        compute = sum(len(a.layers) * a.node.ms_per_layer for a in plan.assignments) + plan.node_head_ms
        hops = plan.total_ms - compute
        return (compute + (0.0 if plan.head else head_ms)) * self.rows_factor + hops

    def tokens_per_s(self, plan: Plan, head_ms: float) -> float:
        """One stream with speculation: the tokens a pass gives over the pass's time."""
        return 1e3 * tokens_per_pass(self.acceptance, self.draft_max) / self.pass_ms(plan, head_ms)


def place_head(nodes: list[NodeCapacity], cost: ModelCost, head_ms: float, on_node: bool | None = None) -> Plan:
    """The plan with the head on the coordinator (`head_ms` there), or on the node that ends the
    model when that pays: one stream's token takes no longer (the head's time moves, and the
    last hop carries a token id instead of a hidden state over a Pi's link) and the slowest
    stage, the coordinator's head counted as one, is no slower. `on_node` decides instead."""
    without = plan_layers(nodes, cost)
    if on_node is False or not cost.head_bytes or on_node is None and not cost.row_bytes:
        return without
    try:
        with_head = plan_layers(nodes, cost, head=True)
    except PlanError:
        if on_node:
            raise
        return without
    if on_node:
        return with_head
    saved_ms = head_ms + cost.row_bytes / LINK_BYTES_PER_MS  # per row: the coordinator's head and the hop's bytes
    pays = (with_head.total_ms <= without.total_ms + saved_ms
            and with_head.bottleneck_ms <= max(without.bottleneck_ms, head_ms))
    return with_head if pays else without


def plan_layers(nodes: list[NodeCapacity], cost: ModelCost, head: bool = False) -> Plan:
    """Every layer placed, the slowest stage as fast as possible; with `head`, the node that ends
    the model also holds the output head, its bytes and its time."""
    if not nodes:
        raise PlanError("no nodes to place the layers on")
    caps = [min(cost.max_layers(n), cost.n_layers) for n in nodes]
    # With the head, a node ends the model only if it also has room and time for the head.
    head_caps = [min(max(0, (n.memory_bytes - cost.runtime_bytes - cost.head_bytes) // cost.per_layer), cost.n_layers)
                 if head else cap for n, cap in zip(nodes, caps)]
    extra = [cost.head_ms(n) if head else 0.0 for n in nodes]
    if sum(caps) < cost.n_layers:
        need = cost.n_layers * cost.per_layer
        have = sum(max(0, n.memory_bytes - cost.runtime_bytes) for n in nodes)
        raise PlanError(
            f"the model's {cost.n_layers} layers need {need / MIB:.0f} MiB with this context "
            f"({cost.per_layer / MIB:.1f} MiB each); the nodes have {have / MIB:.0f} MiB free for layers "
            f"in all (after {cost.runtime_bytes / MIB:.0f} MiB of runtime each): add a node or use a smaller --ctx"
        )

    def fits(node: NodeCapacity, budget: float, cap: int) -> int:
        return int((budget - node.crossing_ms) / node.ms_per_layer + 1e-9) if node.ms_per_layer > 0 else cap

    def counts_within(budget: float) -> list[int] | None:
        counts, left = [], cost.n_layers
        for node, cap, head_cap, more in zip(nodes, caps, head_caps, extra):
            if left and min(head_cap, fits(node, budget - more, head_cap)) >= left:
                k = left  # it ends the model, head and all
            else:
                k = max(0, min(cap, fits(node, budget, cap), left - 1 if head else left))
            counts.append(k)
            left -= k
        return counts if left == 0 else None

    budgets = sorted({k * n.ms_per_layer + n.crossing_ms + head_time for n, cap, more in zip(nodes, caps, extra)
                      for k in range(1, cap + 1) for head_time in {0.0, more}})
    if head and counts_within(budgets[-1]) is None:
        raise PlanError("no node that could end the model has room for the output head as well")
    lo, hi = 0, len(budgets) - 1
    while lo < hi:  # the smallest budget that places every layer
        mid = (lo + hi) // 2
        if counts_within(budgets[mid]) is None:
            lo = mid + 1
        else:
            hi = mid
    counts = counts_within(budgets[lo])
    assert counts is not None  # the largest budget gives every node its cap, and the caps add up
    assignments, unused, start, node_head_ms = [], [], 0, 0.0
    for node, cap, k, more in zip(nodes, caps, counts, extra):
        if k == 0:
            unused.append((node, "not enough memory for one layer" if cap == 0 else "not needed: faster nodes hold every layer"))
            continue
        start += k
        head_time = more if start == cost.n_layers else 0.0  # it ends the model: the head's time is its own
        node_head_ms += head_time
        assignments.append(Assignment(node, LayerRange(start - k, start), k * node.ms_per_layer + node.crossing_ms + head_time))
    return Plan(tuple(assignments), tuple(unused), head, node_head_ms)
