"""The output head on the last of 3 real node processes (SmolLM2, loopback): greedy sessions get
their tokens from the node, and the text is one process's, token for token, with prompt lookup
or without, across a node's loss; a seeded sampled session keeps today's path (hidden states to
the coordinator) and its text."""

from __future__ import annotations

import json

import numpy as np
import pytest

from caravan.coordinator.failover import ClusterPipeline
from caravan.pipeline.generate import Generation
from caravan.pipeline.sampler import Sampler, SamplingParams
from caravan.pipeline.speculative import PromptLookup
from caravan.pipeline.stage import Segment
from support.cli import caravan, env  # noqa: F401  (env: a fixture)
from support.nodes import cluster_token, cluster_token_file
from support.speculation import copy_prompt, three_nodes  # noqa: F401  (three_nodes: a fixture)

pytestmark = [pytest.mark.model, pytest.mark.slow]

N_CTX = 512
N_TOKENS = 40
SEEDED = SamplingParams(temperature=0.8, seed=7)


def greedy() -> Sampler:
    return Sampler(SamplingParams(temperature=0))


def texts(pipeline, model, ids):
    """Greedy without and with prompt lookup, and seeded sampling without."""
    eog = model.tokenizer.eog_ids
    return (list(Generation(pipeline, ids, greedy(), N_TOKENS, eog)),
            list(Generation(pipeline, ids, greedy(), N_TOKENS, eog, drafter=PromptLookup(draft_max=6))),
            list(Generation(pipeline, ids, Sampler(SEEDED), N_TOKENS, eog)))


@pytest.fixture(scope="module")
def one_process(smollm2):
    return texts(smollm2.local_pipeline(N_CTX), smollm2, copy_prompt(smollm2))


def head_cluster(model, nodes, tmp_path):
    addresses = [node.address for node in nodes]
    return ClusterPipeline(model, lambda: list(addresses), N_CTX, tmp_path, progress=False, forward_timeout_s=10.0,
                           token=cluster_token(), head_on_node=True)


def test_the_last_node_picks_greedy_tokens_and_changes_none(smollm2, one_process, three_nodes, tmp_path):
    pipeline = head_cluster(smollm2, three_nodes, tmp_path)
    try:
        plan = pipeline.plan
        assert plan.head and len(plan.assignments) == 3
        assert pipeline.cluster.pipeline.stages[-1].holds_head
        ids = copy_prompt(smollm2)
        # a greedy session's rows come back as token ids, a sampled one's as hidden states
        pipeline.choose_greedily("greedy")
        picked = pipeline.forward([Segment("greedy", 0, 8)], np.asarray(ids[:8]))
        hidden = pipeline.forward([Segment("sampled", 0, 8)], np.asarray(ids[:8]))
        assert picked.shape == (8,) and hidden.shape == (8, smollm2.config.dim)
        assert picked.tolist() == np.argmax(smollm2.head.logits(hidden), axis=1).tolist()
        pipeline.end_session("greedy")
        pipeline.end_session("sampled")
        assert texts(pipeline, smollm2, ids) == one_process
    finally:
        pipeline.close()


def test_a_lost_node_with_the_head_placed_changes_no_token(smollm2, one_process, three_nodes, tmp_path):
    """The node that holds the head is killed mid-generation: the re-plan over the other two
    gives the head to the new last node, refills the caches from the coordinator's tokens, and
    the text goes on unchanged; so does a seeded sampled one after a middle node's loss."""
    pipeline = head_cluster(smollm2, three_nodes, tmp_path)
    ids, eog = copy_prompt(smollm2), smollm2.tokenizer.eog_ids
    try:
        tokens = []
        for token in Generation(pipeline, ids, greedy(), N_TOKENS, eog, drafter=PromptLookup(draft_max=6)):
            tokens.append(token)
            if len(tokens) >= 5 and three_nodes[2].proc.poll() is None:
                three_nodes[2].kill()
        assert tokens == one_process[1]
        assert len(pipeline.recoveries) == 1 and three_nodes[2].address in pipeline.recoveries[0]
        assert pipeline.plan.head and pipeline.cluster.pipeline.stages[-1].holds_head
        sampled = []
        for token in Generation(pipeline, ids, Sampler(SEEDED), N_TOKENS, eog):
            sampled.append(token)
            if len(sampled) == 5:
                three_nodes[1].kill()
        assert sampled == one_process[2]
        assert len(pipeline.recoveries) == 2
    finally:
        pipeline.close()


def test_run_and_plan_with_the_head_on_the_node(env, three_nodes):
    """`caravan run --head node` gives one process's tokens; `caravan plan --head node` says
    where the head runs, and the last node's stage counts its time."""
    nodes = ",".join(node.address for node in three_nodes)
    common = ("--token-file", str(cluster_token_file()), "-t", "1")
    run = ("run", "The capital of France is", "--temperature", "0", "-n", "12", "--json", *common)
    local, remote = caravan(env, *run), caravan(env, *run, "--nodes", nodes, "--head", "node")
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout)["tokens"] == json.loads(local.stdout)["tokens"]
    planned = caravan(env, "plan", "--nodes", nodes, "--head", "node", "--json", "--ctx", "512", *common)
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    assert plan["head_on_node"] and plan["head_ms"] > 0
    last = plan["stages"][-1]
    assert last["stage_ms"] > (last["layers"][1] - last["layers"][0]) * last["ms_per_layer"]
