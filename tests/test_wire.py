"""The codec between arrays and messages: exact where it must be, checked against gguf-py's
Q8_0, and refusing anything that does not match what it declares."""

from __future__ import annotations

import filecmp
import subprocess
import sys

import grpc
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize, quantize

from caravan.pipeline.model import ModelConfig, ModelError
from caravan.pipeline.stage import Segment, StageError
from caravan.proto import caravan_pb2 as pb
from caravan.proto import polling, wire

CONFIG = ModelConfig(arch="llama", n_layers=4, dim=64, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim=16,
                     n_rot=16, vocab_size=300, context_length=128, norm_eps=1e-5, rope_theta=10000.0)


def hidden(rows=5, cols=64, seed=0):
    x = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    x[0, 3] = 22510.0  # a massive activation, as SmolLM2 has
    return x


def test_f32_round_trip_is_exact():
    x = hidden()
    y = wire.decode_hidden(wire.encode_hidden(x, pb.WIRE_FORMAT_F32), 64, 8)
    assert y.dtype == np.float32 and np.array_equal(x, y)


def test_f16_round_trip_is_numpys_f16():
    x = hidden()
    y = wire.decode_hidden(wire.encode_hidden(x, pb.WIRE_FORMAT_F16), 64, 8)
    assert np.array_equal(y, x.astype(np.float16).astype(np.float32))


def test_q8_0_matches_gguf_py():
    x = hidden()
    t = wire.encode_hidden(x, pb.WIRE_FORMAT_Q8_0)
    assert t.data == quantize(x, QT.Q8_0).tobytes()
    y = wire.decode_hidden(t, 64, 8)
    assert np.array_equal(y, dequantize(quantize(x, QT.Q8_0), QT.Q8_0))
    assert len(t.data) == 5 * 2 * 34  # 5 rows of two 34-byte blocks: a quarter of f32, plus scales


def test_q8_0_of_zeros_is_zeros():
    z = np.zeros((2, 64), np.float32)
    assert np.array_equal(wire.decode_hidden(wire.encode_hidden(z, pb.WIRE_FORMAT_Q8_0), 64, 2), z)


@pytest.mark.parametrize("change,message", [
    (dict(cols=32), "columns"),
    (dict(rows=0), "rows"),
    (dict(rows=9), "rows"),
    (dict(data=b"\0" * 10), "bytes"),
    (dict(format=7), "unknown wire format"),
])
def test_decode_refuses_what_does_not_match(change, message):
    t = wire.encode_hidden(hidden(), pb.WIRE_FORMAT_F32)
    for field, value in change.items():
        setattr(t, field, value)
    with pytest.raises(wire.WireError, match=message):
        wire.decode_hidden(t, 64, 8)


@pytest.mark.parametrize("fmt", [pb.WIRE_FORMAT_F32, pb.WIRE_FORMAT_F16, pb.WIRE_FORMAT_Q8_0], ids=["f32", "f16", "q8_0"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_decode_refuses_nan_and_inf(fmt, value):
    x = hidden()
    x[3, 40] = value
    with pytest.raises(wire.WireError, match=r"hidden state row 3 of 5 holds NaN or Inf"):
        wire.decode_hidden(wire.encode_hidden(x, fmt), 64, 8)


def test_f16_past_its_range_is_refused_with_the_fix():
    x = hidden()
    x[1, 0] = 70000.0  # past f16's largest finite value: Inf on the wire
    with pytest.raises(wire.WireError, match=r"row 1 of 5 holds NaN or Inf \(values past f16's range arrive as Inf: send f32\)"):
        wire.decode_hidden(wire.encode_hidden(x, pb.WIRE_FORMAT_F16), 64, 8)


def test_a_q8_0_block_with_a_nan_scale_is_refused():
    t = wire.encode_hidden(hidden(), pb.WIRE_FORMAT_Q8_0)
    data = bytearray(t.data)
    data[34 : 36] = np.array([np.nan], np.float16).tobytes()  # row 0, block 1: d
    t.data = bytes(data)
    with pytest.raises(wire.WireError, match=r"row 0 of 5 holds NaN or Inf"):
        wire.decode_hidden(t, 64, 8)


def test_q8_0_needs_whole_blocks():
    with pytest.raises(wire.WireError, match="multiple of 32"):
        wire.encode_hidden(np.zeros((1, 48), np.float32), pb.WIRE_FORMAT_Q8_0)


def test_segments_round_trip_and_are_checked():
    segments = (Segment("a", 0, 3), Segment("b", 7, 1))
    assert wire.decode_segments(wire.encode_segments(segments)) == segments
    with pytest.raises(wire.WireError, match="at least one"):
        wire.decode_segments([])
    with pytest.raises(wire.WireError, match="0 rows"):
        wire.decode_segments([pb.Segment(session_id="a", start=0, length=0)])
    with pytest.raises(wire.WireError, match="session id"):
        wire.decode_segments([pb.Segment(session_id="x" * 200, start=0, length=1)])


def test_config_round_trip():
    assert wire.decode_config(wire.encode_config(CONFIG)) == CONFIG


def family_configs() -> list[ModelConfig]:
    """Configs of every family as read from the tiny models' metadata, with their features on."""
    import dataclasses

    from support.tiny_models import tiny_model

    configs = []
    for arch, kwargs in [
        ("llama", dict(rope_freqs=True, metadata={"llama.rope.scaling.factor": 2.0})),
        ("qwen2", {}), ("phi3", dict(fused=True)), ("gemma", {}),
        ("gemma2", dict(metadata={"gemma2.attention.sliding_window": 8, "gemma2.attn_logit_softcapping": 2.0})),
        ("gemma3", dict(n_layers=7, metadata={"gemma3.attention.sliding_window": 8, "gemma3.rope.scaling.factor": 8.0,
                                              "gemma3.final_logit_softcapping": 30.0})),
    ]:
        metadata, tensors = tiny_model(arch, **kwargs)
        block = {n[len("blk.0."):] for n in tensors if n.startswith("blk.0.")}
        freqs = tensors["rope_freqs.weight"][0] if "rope_freqs.weight" in tensors else None
        configs.append(ModelConfig.from_metadata(metadata, 300, block, freqs))
    assert configs[0].rope_freq_factors and configs[2].layer_tensors[1] == "attn_qkv.weight"
    assert configs[5].sliding_layers == (True,) * 5 + (False, True) and configs[5].final_softcap == 30.0
    assert dataclasses.replace(configs[4], attn_softcap=0.0) != configs[4]
    return configs


@pytest.mark.parametrize("config", family_configs(), ids=lambda c: c.arch)
def test_every_family_config_round_trips(config):
    """Over the wire, and through the JSON a node's weight cache keeps beside each layer."""
    import dataclasses
    import json

    from caravan.proto import caravan_pb2

    assert [f.name for f in dataclasses.fields(ModelConfig)] == [f.name for f in caravan_pb2.ModelConfig.DESCRIPTOR.fields]
    assert wire.decode_config(wire.encode_config(config)) == config
    assert ModelConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(config)))) == config


def test_a_wire_config_with_a_foreign_block_tensor_is_refused():
    m = wire.encode_config(CONFIG)
    m.layer_tensors.append("ffn_gate_inp.weight")
    with pytest.raises(wire.WireError, match="ffn_gate_inp.weight: not a tensor of a llama block"):
        wire.decode_config(m)


@pytest.mark.parametrize("field,value,message", [
    ("arch", "gpt2", "unknown architecture"),
    ("dim", 0, "dim"),
    ("dim", 1 << 20, "dim"),
    ("n_kv_heads", 3, "multiple"),
    ("head_dim", 15, "even"),
    ("norm_eps", 0.0, "positive"),
    ("n_layers", 0, "n_layers"),
])
def test_config_from_the_wire_is_checked(field, value, message):
    m = wire.encode_config(CONFIG)
    setattr(m, field, value)
    with pytest.raises(wire.WireError, match=message):
        wire.decode_config(m)


@pytest.mark.parametrize("exc,code", [
    (wire.WireError("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (StageError("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (ModelError("x"), grpc.StatusCode.INVALID_ARGUMENT),
    (wire.NotReadyError("x"), grpc.StatusCode.FAILED_PRECONDITION),
    (wire.ChainClosedError("x"), grpc.StatusCode.UNAVAILABLE),
    (MemoryError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PermissionError("x"), grpc.StatusCode.FAILED_PRECONDITION),
    (RuntimeError("x"), grpc.StatusCode.INTERNAL),
])
def test_one_table_maps_errors_to_status_codes(exc, code):
    assert wire.status_code(exc) == code
    assert wire.status_from_value(code.value[0]) == code


def test_committed_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools regenerates the stubs (the test extra installs it)")
    from caravan.proto.generate import PROTO_DIR, STUBS, generate

    generate(tmp_path)
    for name in STUBS:
        assert filecmp.cmp(tmp_path / name, PROTO_DIR / name, shallow=False), (
            f"proto/{name} is stale: run `python -m caravan.proto.generate`")


def test_grpc_polls_sockets_in_place_unless_the_operator_says_otherwise():
    environ: dict[str, str] = {}
    polling.poll_sockets_in_place(environ)
    assert environ == {"GRPC_EXPERIMENTS": polling.ENDPOINTS_POLLED_IN_PLACE}
    environ = {"GRPC_EXPERIMENTS": "-event_engine_client"}
    polling.poll_sockets_in_place(environ)
    assert environ == {"GRPC_EXPERIMENTS": "-event_engine_client"}


@pytest.mark.slow
def test_the_entry_points_choose_before_grpc_is_imported():
    # gRPC reads GRPC_EXPERIMENTS when it starts: what `caravan` and `caravan node` import
    # before they call poll_sockets_in_place must not import grpc.
    code = ("import sys, caravan.coordinator.__main__, caravan.pipeline.catalog, caravan.pipeline.numba_config, "
            "caravan.proto.polling; print('grpc' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
