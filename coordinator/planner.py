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
"""

from __future__ import annotations

from dataclasses import dataclass, field

from caravan.pipeline.stage import LayerRange
from caravan.proto.wire import NODE_RUNTIME_BYTES

MIB = 1 << 20


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

    @property
    def bottleneck_ms(self) -> float:
        return max(a.stage_ms for a in self.assignments)

    @property
    def total_ms(self) -> float:
        """One token through every stage in turn, and back to the coordinator."""
        return sum(a.stage_ms for a in self.assignments) + self.assignments[-1].node.crossing_ms

    def tokens_per_s(self, head_ms: float = 0.0) -> float:
        """One stream: a token passes every stage in turn, then the head."""
        return 1e3 / (self.total_ms + head_ms)

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
        compute = sum(len(a.layers) * a.node.ms_per_layer for a in plan.assignments)
        hops = plan.total_ms - compute
        return (compute + head_ms) * self.rows_factor + hops

    def tokens_per_s(self, plan: Plan, head_ms: float) -> float:
        """One stream with speculation: the tokens a pass gives over the pass's time."""
        return 1e3 * tokens_per_pass(self.acceptance, self.draft_max) / self.pass_ms(plan, head_ms)


def plan_layers(nodes: list[NodeCapacity], cost: ModelCost) -> Plan:
    if not nodes:
        raise PlanError("no nodes to place the layers on")
    caps = [min(cost.max_layers(n), cost.n_layers) for n in nodes]
    if sum(caps) < cost.n_layers:
        need = cost.n_layers * cost.per_layer
        have = sum(max(0, n.memory_bytes - cost.runtime_bytes) for n in nodes)
        raise PlanError(
            f"the model's {cost.n_layers} layers need {need / MIB:.0f} MiB with this context "
            f"({cost.per_layer / MIB:.1f} MiB each); the nodes have {have / MIB:.0f} MiB free for layers "
            f"in all (after {cost.runtime_bytes / MIB:.0f} MiB of runtime each): add a node or use a smaller --ctx"
        )

    def counts_within(budget: float) -> list[int] | None:
        counts, left = [], cost.n_layers
        for node, cap in zip(nodes, caps):
            fits = int((budget - node.crossing_ms) / node.ms_per_layer + 1e-9) if node.ms_per_layer > 0 else cap
            k = max(0, min(cap, fits, left))
            counts.append(k)
            left -= k
        return counts if left == 0 else None

    budgets = sorted({k * n.ms_per_layer + n.crossing_ms for n, cap in zip(nodes, caps) for k in range(1, cap + 1)})
    lo, hi = 0, len(budgets) - 1
    while lo < hi:  # the smallest budget that places every layer
        mid = (lo + hi) // 2
        if counts_within(budgets[mid]) is None:
            lo = mid + 1
        else:
            hi = mid
    counts = counts_within(budgets[lo])
    assert counts is not None  # the largest budget gives every node its cap, and the caps add up
    assignments, unused, start = [], [], 0
    for node, cap, k in zip(nodes, caps, counts):
        if k == 0:
            unused.append((node, "not enough memory for one layer" if cap == 0 else "not needed: faster nodes hold every layer"))
            continue
        assignments.append(Assignment(node, LayerRange(start, start + k), k * node.ms_per_layer + node.crossing_ms))
        start += k
    return Plan(tuple(assignments), tuple(unused))
