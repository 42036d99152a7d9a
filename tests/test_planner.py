"""The placement planner, table-driven: speeds, memory caps, round trips, and refusals."""

from __future__ import annotations

import pytest

from caravan.coordinator.planner import (MIB, ModelCost, NodeCapacity, PlanError, Speculation, place_head, plan_layers,
                                         tokens_per_pass)

GIB = 1 << 30
COST = ModelCost(n_layers=30, layer_bytes=3 * MIB, kv_bytes_per_layer=1 * MIB, runtime_bytes=100 * MIB)
ROOMY = 8 * GIB


def node(name, ms=1.0, memory=ROOMY, rtt=0.0):
    return NodeCapacity(name, ms, memory, rtt)


def layers_of(plan):
    return {a.node.name: (a.layers.start, a.layers.stop) for a in plan.assignments}


@pytest.mark.parametrize("nodes,expected", [
    # equal nodes share the layers
    ([node("a")], {"a": (0, 30)}),
    ([node("a"), node("b")], {"a": (0, 15), "b": (15, 30)}),
    ([node("a"), node("b"), node("c")], {"a": (0, 10), "b": (10, 20), "c": (20, 30)}),
    # a node 4x as fast gets 4x the layers
    ([node("fast", 0.5), node("slow", 2.0)], {"fast": (0, 24), "slow": (24, 30)}),
    ([node("slow", 2.0), node("fast", 0.5)], {"slow": (0, 6), "fast": (6, 30)}),
    # memory caps: 100 MiB runtime + 4 MiB a layer; "small" holds 5 layers though it is fastest
    ([node("small", 0.1, 120 * MIB), node("big", 1.0)], {"small": (0, 5), "big": (5, 30)}),
    # a long round trip costs a node layers: half of it, the hidden state's trip there
    ([node("near", 1.0, rtt=0.0), node("far", 1.0, rtt=10.0)], {"near": (0, 18), "far": (18, 30)}),
    # four nodes, Pi 4 / Pi 5 / laptop mix
    ([node("pi4", 4.0), node("pi5", 2.0), node("laptop", 0.5), node("pi5b", 2.0)],
     {"pi4": (0, 2), "pi5": (2, 7), "laptop": (7, 27), "pi5b": (27, 30)}),  # slowest stage 10 ms
])
def test_plans(nodes, expected):
    plan = plan_layers(nodes, COST)
    assert layers_of(plan) == expected
    # contiguous, in order, covering every layer
    ranges = [a.layers for a in plan.assignments]
    assert ranges[0].start == 0 and ranges[-1].stop == 30
    assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:]))
    for a in plan.assignments:
        assert len(a.layers) <= COST.max_layers(a.node)


def test_slowest_stage_is_as_fast_as_possible():
    nodes = [node("a", 1.0), node("b", 1.5), node("c", 3.0)]
    plan = plan_layers(nodes, COST)
    # brute force over every contiguous split of 30 layers into at most 3 stages in this order
    best = min(
        max(i * 1.0, (j - i) * 1.5, (30 - j) * 3.0)
        for i in range(31) for j in range(i, 31)
    )
    assert plan.bottleneck_ms == pytest.approx(best)


def test_node_too_small_for_any_layer_is_left_out_with_the_reason():
    plan = plan_layers([node("tiny", 0.1, 102 * MIB), node("a")], COST)
    assert layers_of(plan) == {"a": (0, 30)}
    assert [(n.name, why) for n, why in plan.unused] == [("tiny", "not enough memory for one layer")]


def test_unneeded_slow_node_is_left_out():
    plan = plan_layers([node("fast", 0.01), node("snail", 1000.0)], COST)
    assert layers_of(plan) == {"fast": (0, 30)}
    assert plan.unused[0][0].name == "snail"


def test_pooled_memory_too_small_is_refused_up_front():
    nodes = [node("a", memory=150 * MIB), node("b", memory=150 * MIB)]  # 12 + 12 layers of 30
    with pytest.raises(PlanError, match=r"30 layers need 120 MiB .* 100 MiB free .* add a node or use a smaller --ctx"):
        plan_layers(nodes, COST)


def test_no_nodes():
    with pytest.raises(PlanError, match="no nodes"):
        plan_layers([], COST)


def test_expected_speed():
    plan = plan_layers([node("a", 1.0, rtt=0.5), node("b", 1.0, rtt=0.5)], COST)
    assert plan.total_ms == pytest.approx(30.75)  # 15 layers each, three one-way trips of 0.25 ms
    assert plan.tokens_per_s(head_ms=4.0) == pytest.approx(1e3 / 34.75)
    assert plan.pipelined_tokens_per_s() == pytest.approx(1e3 / 15.25)


@pytest.mark.parametrize("acceptance,draft_max,expected", [
    (0.0, 8, 1.0),  # every draft rejected: the model's own token only
    (1.0, 8, 9.0),  # every draft kept, and the model's next token
    (0.5, 1, 1.5),
    (0.5, 3, 1.875),  # 1 + 1/2 + 1/4 + 1/8
    (0.8, 4, (1 - 0.8 ** 5) / 0.2),
])
def test_tokens_per_pass(acceptance, draft_max, expected):
    assert tokens_per_pass(acceptance, draft_max) == pytest.approx(expected)


@pytest.mark.parametrize("acceptance", [-0.1, 1.5, float("nan")])
def test_acceptance_outside_0_1_is_refused(acceptance):
    with pytest.raises(PlanError, match=r"^--acceptance must be between 0 and 1 .*got"):
        tokens_per_pass(acceptance, 4)


def test_speculative_pass_time_and_rate():
    nodes = [node("a", 1.0, rtt=2.0), node("b", 1.0, rtt=2.0), node("c", 1.0, rtt=2.0)]
    plan = plan_layers(nodes, COST)  # 10 layers each: 30 ms of compute, 4 hops of 1 ms
    speculation = Speculation(acceptance=0.5, draft_max=3, row_share=0.1)
    # compute and head grow by 1 + 3 * 0.1; the hops do not
    assert speculation.pass_ms(plan, head_ms=2.0) == pytest.approx((30 + 2) * 1.3 + 4)
    assert speculation.tokens_per_s(plan, head_ms=2.0) == pytest.approx(1e3 * 1.875 / 45.6)
    assert plan.tokens_per_s(head_ms=2.0) == pytest.approx(1e3 / 36)


# A model whose output head weighs as much as six of its layers, and a hidden state row of 4 KiB.
HEAD_COST = ModelCost(n_layers=30, layer_bytes=3 * MIB, kv_bytes_per_layer=1 * MIB, runtime_bytes=100 * MIB,
                      head_bytes=18 * MIB, row_bytes=4096)


def test_the_head_on_the_last_node_costs_it_layers_and_memory():
    nodes = [node("a"), node("b"), node("c")]
    plan = plan_layers(nodes, HEAD_COST, head=True)  # the head is 6 ms on a node of 1 ms a layer
    assert plan.head and plan.node_head_ms == pytest.approx(6.0)
    assert layers_of(plan) == {"a": (0, 12), "b": (12, 24), "c": (24, 30)}
    assert plan.bottleneck_ms == pytest.approx(12.0)
    # memory: c has room for 10 layers, or 5 and the head: the others take one more each
    tight = plan_layers([node("a"), node("b"), node("c", memory=100 * MIB + 10 * 4 * MIB)], HEAD_COST, head=True)
    assert layers_of(tight) == {"a": (0, 13), "b": (13, 26), "c": (26, 30)} and tight.bottleneck_ms == 13.0
    with pytest.raises(PlanError, match="room for the output head"):
        plan_layers([node("a", memory=100 * MIB + 30 * 4 * MIB)], HEAD_COST, head=True)


@pytest.mark.parametrize("coordinator_head_ms,on_node,expected", [
    # a coordinator as fast as the nodes keeps it: on c, 12 ms of a stage would pace the
    # pipeline instead of 10 (one stream's token takes as long either way)
    (6.0, None, False),
    (13.0, None, True),  # a coordinator whose head is slower than a stage paces the pipeline: it moves
    (1.0, True, True),  # told
    (13.0, False, False),
])
def test_place_head_moves_it_where_it_pays(coordinator_head_ms, on_node, expected):
    nodes = [node("a"), node("b"), node("c")]
    plan = place_head(nodes, HEAD_COST, coordinator_head_ms, on_node)
    assert plan.head == expected
    if not expected:
        assert plan.node_head_ms == 0.0 and layers_of(plan)["c"] == (20, 30)
