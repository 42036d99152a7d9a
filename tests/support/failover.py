"""Pieces of the failover tests that other cluster tests share: a greedy run of a fixed prompt,
its expected tokens, node processes started on demand, a ClusterPipeline over them."""

from __future__ import annotations

import os
import signal

import pytest

from caravan.coordinator.failover import ClusterPipeline
from caravan.pipeline.generate import Generation
from caravan.pipeline.sampler import Sampler, SamplingParams

from .nodes import NodeProcess, cluster_token

N_CTX = 256
PROMPT = "Once upon a time, in a small village,"
N_TOKENS = 24


def generation(pipeline, model):
    return Generation(pipeline, model.tokenizer.encode(PROMPT), Sampler(SamplingParams(temperature=0)), N_TOKENS,
                      stop_ids=frozenset())


@pytest.fixture(scope="module")
def expected(smollm2):
    return list(generation(smollm2.local_pipeline(N_CTX), smollm2))


@pytest.fixture
def nodes(tmp_path):
    started: list[NodeProcess] = []

    def start(*args, cache_dir=None, **kwargs):
        node = NodeProcess(cache_dir or tmp_path / f"node{len(started)}", *args, **kwargs)
        started.append(node)
        return node

    yield start
    for node in started:
        if node.proc.poll() is None:
            os.kill(node.proc.pid, signal.SIGCONT)
        node.stop()


def cluster(model, addresses, tmp_path, timeout_s=10.0):
    return ClusterPipeline(model, lambda: list(addresses), N_CTX, tmp_path, progress=False,
                           forward_timeout_s=timeout_s, token=cluster_token())
