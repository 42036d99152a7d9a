"""The Stage protocol declares everything a stage offers: LocalStage and RemoteStage have every
member, a LocalStage's submit gives forward's bits, and stats() tells what metrics, /health and
bench need without anyone reaching into a stage."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import numpy as np

from caravan.coordinator.failover import ClusterPipeline
from caravan.coordinator.remote import RemoteStage
from caravan.pipeline.generate import Pipeline
from caravan.pipeline.stage import LocalStage, Segment, Stage, StageBatch, StageStats
from support.stages import build, prompt

ROOT = Path(__file__).resolve().parents[1]


def declared() -> set[str]:
    """The names the protocol declares: its attributes and its methods."""
    methods = {name for name, value in vars(Stage).items() if inspect.isfunction(value) and not name.startswith("_")}
    return methods | set(Stage.__annotations__)


def test_local_and_remote_stages_offer_every_member_the_protocol_declares():
    assert {"depth", "submit", "stats", "close", "forward", "end_session"} <= declared()
    for cls in (LocalStage, RemoteStage):
        missing = [name for name in declared() - {"layers"} if not hasattr(cls, name)]
        assert not missing, f"{cls.__name__} lacks {missing}"


def test_local_submit_gives_forwards_bits_and_stats_count_the_cache(tiny_q8_path):
    ids = prompt(9)
    one, other = build(tiny_q8_path), build(tiny_q8_path)
    stage = one.stages[0]
    hidden = one.head.embed(ids)
    expected = other.stages[0].forward(StageBatch((Segment("s", 0, len(ids)),), hidden))
    result = stage.submit(StageBatch((Segment("s", 0, len(ids)),), hidden))
    assert stage.depth == 1 and one.prefill_depth == 1
    assert np.array_equal(result(), expected)
    (row,) = one.stats()
    assert row == StageStats(stage.layers, "local", None, sessions=1, cached_positions=len(ids),
                             kv_bytes=stage.sessions["s"].nbytes, weight_bytes=stage.weight_bytes,
                             prompt_cache=stage.prompt_cache.stats())
    one.close()
    assert one.stats()[0].sessions == 0


def test_no_caller_reaches_into_a_stage_with_hasattr_getattr_or_isinstance():
    """The seam's users ask the protocol, not the class: no `isinstance(stage, ...)`,
    `getattr(stage, ...)` or `hasattr(stage, ...)` in the code that holds stages."""
    files = ["pipeline/generate.py", "coordinator/metrics.py", "coordinator/server.py", "coordinator/bench.py",
             "coordinator/cluster.py", "coordinator/failover.py", "coordinator/remote.py", "coordinator/cli.py"]
    probe = re.compile(r"\b(?:isinstance|getattr|hasattr)\((?:self\.)?(?:stage|pipeline|scheduler\.pipeline)\b")
    found = [f"{name}: {line.strip()}" for name in files
             for line in (ROOT / name).read_text(encoding="utf-8").splitlines() if probe.search(line)]
    assert not found, found


def test_cluster_pipeline_offers_every_public_method_of_a_pipeline_with_its_signature():
    """The scheduler, CLI, server and bench take either: ClusterPipeline holds a Pipeline (it is
    not one) and answers the same calls the same way."""
    assert not issubclass(ClusterPipeline, Pipeline)
    for name, member in vars(Pipeline).items():
        if name.startswith("_"):
            continue
        assert hasattr(ClusterPipeline, name), f"ClusterPipeline lacks {name}"
        if inspect.isfunction(member):
            assert inspect.signature(getattr(ClusterPipeline, name)) == inspect.signature(member), name
