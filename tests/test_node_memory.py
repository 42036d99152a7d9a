"""A node's memory: one copy of its layers, not also their cache files' pages, and within its
--memory-limit (weights, KV cache, runtime), with the memory it reports falling as it loads."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from gguf import GGMLQuantizationType as QT

from caravan.coordinator.remote import NodeClient, NodeError
from caravan.node.server import NodeSettings, create_server
from caravan.node.server import _load_and_warm_up as load_and_warm_up
from caravan.pipeline.loader import load_model
from caravan.pipeline.stage import KVCache, LayerRange
from caravan.proto import caravan_pb2 as pb
from caravan.proto.wire import NODE_RUNTIME_BYTES

from bench.make_synthetic import synthetic_llama
from support.nodes import NodeProcess, cluster_token
from support.tiny_models import write_gguf

SHA = "cd" * 32
N_CTX = 64
MIB = 1 << 20


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile... of a process, in bytes, from /proc/PID/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith(" kB"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def resident_under(pid: int, directory: Path) -> int:
    """Bytes of the process's memory mapped from files under `directory`, from /proc/PID/smaps."""
    total, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header: address range ... path
            inside = len(fields) > 5 and fields[5].startswith(f"{directory}/")
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A Q4_0 model of 1.1B's shapes with 6 layers (about 150 MiB of layers)."""
    path = tmp_path_factory.mktemp("synthetic") / "synthetic-0.4b.gguf"
    write_gguf(path, *synthetic_llama("0.4b", QT.Q4_0))
    model = load_model(path)
    # Compiled here, a node reads the kernels from the cache: compiling them in the node
    # would take memory of its own, while it is measured.
    load_and_warm_up(model.file, model.config, LayerRange(0, 1), N_CTX)
    return model


@contextlib.contextmanager
def node_process(cache_dir: Path, *flags: str) -> Iterator[tuple[NodeProcess, NodeClient]]:
    node = NodeProcess(cache_dir, *flags)
    client = NodeClient(node.address, token=cluster_token())
    try:
        yield node, client
    finally:
        client.close()
        node.stop()


def load_all(client: NodeClient, model) -> pb.LoadReply:
    return client.load(model.file, SHA, model.config, LayerRange(0, model.config.n_layers), N_CTX)


@pytest.mark.slow
def test_a_node_holds_one_copy_of_its_layers_after_a_push_and_after_a_restart(synthetic, tmp_path):
    for expected_source in ("pushed", "cache"):  # the second node starts on the first one's cache
        with node_process(tmp_path / "node") as (node, client):
            idle = status_kib(node.proc.pid)
            assert load_all(client, synthetic).source == expected_source
            loaded = status_kib(node.proc.pid)
            weights = client.info().weight_bytes
            assert weights > 100 * MIB
            # Each layer's cache file was mapped to be read: its pages go once the layer is copied
            # (what RssFile grows by besides is the kernels' compiler library, read as it runs).
            assert resident_under(node.proc.pid, tmp_path / "node") < MIB, expected_source
            assert loaded["RssFile"] - idle["RssFile"] < weights // 2, (expected_source, idle, loaded)
            assert loaded["VmRSS"] - idle["VmRSS"] < weights + 120 * MIB, (expected_source, idle, loaded)


def test_a_load_past_the_memory_limit_is_refused_and_the_node_keeps_serving(tmp_path, tiny_q8_path):
    model = load_model(tiny_q8_path)
    layers = LayerRange(0, model.config.n_layers)
    kv = KVCache.bytes_for(len(layers), model.config.kv_dim, N_CTX)
    weights = sum(t.n_bytes for t in model.file.tensors.values() if t.name.startswith("blk."))
    limit = NODE_RUNTIME_BYTES + weights + kv - 1024  # the layers fit, not with the runtime
    server, port, _ = create_server(NodeSettings(host="127.0.0.1", port=0, threads=1, cache_dir=tmp_path,
                                                 memory_limit=limit))
    client = NodeClient(f"127.0.0.1:{port}")
    try:
        with pytest.raises(NodeError) as caught:
            client.load(model.file, SHA, model.config, layers, N_CTX)
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        message = str(caught.value)
        assert "\n" not in message and f"its --memory-limit is {limit >> 20} MiB" in message, message
        assert f"layers {layers} need" in message and "KV cache" in message, message
        assert client.info().state == pb.NODE_STATE_IDLE
        assert client.load(model.file, SHA, model.config, LayerRange(0, 1), N_CTX).ready  # a smaller share fits
    finally:
        client.close()
        server.stop(0)


def test_the_memory_a_node_reports_falls_as_it_loads(tmp_path, tiny_q8_path):
    model = load_model(tiny_q8_path)
    limit = NODE_RUNTIME_BYTES + 64 * MIB
    server, port, _ = create_server(NodeSettings(host="127.0.0.1", port=0, threads=1, cache_dir=tmp_path,
                                                 memory_limit=limit))
    client = NodeClient(f"127.0.0.1:{port}")
    try:
        assert client.info().memory_available == limit
        client.load(model.file, SHA, model.config, LayerRange(0, model.config.n_layers), N_CTX)
        info = client.info()
        assert info.weight_bytes > 0
        assert info.memory_available == limit - info.weight_bytes - info.kv_cache_bytes
    finally:
        client.close()
        server.stop(0)
