"""LoRA adapters in llama.cpp's GGUF format on tiny seeded models: the same tokens and close
logits as llama.cpp with the same adapter; a row's numbers do not depend on the adapters of the
rows batched with it; split stages, a node in this process and real node processes give the
same bits as one stage; bad adapters are one clear error each."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import grpc
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from caravan.coordinator.cluster import model_cost
from caravan.coordinator.planner import NODE_RUNTIME_BYTES
from caravan.coordinator.remote import NodeClient, RemoteStage, _adapter_chunks
from caravan.node.server import NodeSettings, create_server
from caravan.pipeline.generate import Generation, Pipeline
from caravan.pipeline.gguf_file import GGUFFile
from caravan.pipeline.loader import load_model, model_config
from caravan.pipeline.lora import LoraAdapter, LoraError
from caravan.pipeline.model import ModelHead
from caravan.pipeline.sampler import Sampler, SamplingParams
from caravan.pipeline.stage import LayerRange, LocalStage, Segment, StageBatch, StageError
from caravan.proto import caravan_pb2 as pb
from support.llama_cpp_taps import LLAMA_CPP_THREADS
from support.serve import Server
from support.tiny_models import tiny_llama, tiny_lora, write_gguf, write_tiny_model


N_CTX = 256
PROMPT = [299, 17, 204, 81, 3, 150, 42, 260, 77, 5]


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def adapter_path(lora_dir):
    """path_for(**tiny_lora kwargs): an adapter file, written once."""
    written = {}

    def path_for(**kwargs):
        key = tuple(sorted(kwargs.items()))
        if key not in written:
            name = "-".join(f"{k}={getattr(v, 'name', v)}" for k, v in key).replace("(", "").replace(")", "")
            name = name.replace(",", "_").replace(" ", "").replace("'", "") or "default"
            written[key] = write_gguf(lora_dir / f"lora-{name}.gguf", *tiny_lora(**kwargs))
        return written[key]

    return path_for


def build(path, splits=None) -> Pipeline:
    gguf = GGUFFile(path)
    config = model_config(gguf, gguf.tensors["token_embd.weight"].n_rows)
    stages, start = [], 0
    for n in splits or [config.n_layers]:
        stages.append(LocalStage.load(gguf, config, LayerRange(start, start + n), N_CTX))
        start += n
    return Pipeline(ModelHead(gguf, config), stages, N_CTX)


def greedy(pipeline, n: int, adapters=(), prompt=PROMPT) -> list[int]:
    return list(Generation(pipeline, prompt, Sampler(SamplingParams(temperature=0)), n, frozenset(), adapters))


def prompt_logits(pipeline, adapters=()) -> np.ndarray:
    hidden = pipeline.forward([Segment("logits", 0, len(PROMPT), adapters)], np.asarray(PROMPT))
    pipeline.end_session("logits")
    return pipeline.head.logits(hidden)


# ---------------------------------------------------------------------------------------------
# Against llama.cpp


def llama_cpp_run(model_path, adapter_path, scale: float, n: int) -> tuple[list[int], np.ndarray]:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the reference engine) is not installed")
    llama = llama_cpp.Llama(model_path=str(model_path), n_ctx=N_CTX, n_threads=LLAMA_CPP_THREADS,
                            logits_all=True, verbose=False,
                            lora_path=str(adapter_path), lora_scale=scale)
    llama.eval(PROMPT)
    logits = np.asarray(llama.scores[: len(PROMPT)]).copy()
    llama.reset()
    tokens = []
    for token in llama.generate(PROMPT, temp=0.0, top_k=1):
        tokens.append(token)
        if len(tokens) == n:
            break
    return tokens, logits


# (base weights, adapter: tiny_lora kwargs, scale, logit tolerance relative to the largest
# |logit|). Observed over 3 model seeds x 2 adapter seeds: F32 base weights (activations not
# rounded, except for the F16 adapter and both engines' f16 KV caches) up to 2.3e-3; quantized
# base weights or a Q8_0 adapter (activations quantized to 8-bit blocks, rounded differently at
# block edges by the two engines) up to 3.7e-2. Each bound is about 2.5x the worst seen.
CASES = {
    "f32-base-f32-adapter": (QT.F32, {}, 1.0, 6e-3),
    "f32-base-f16-adapter-scale-0.5": (QT.F32, {"weight_type": QT.F16}, 0.5, 6e-3),
    "f32-base-no-alpha-scale-0.25": (QT.F32, {"alpha": None}, 0.25, 6e-3),
    "f32-base-some-layers-and-matrices": (QT.F32, {"layers": (0, 2), "targets": ("attn_v", "ffn_up", "attn_output")},
                                          1.0, 6e-3),
    "q8_0-base-q8_0-adapter-rank-32": (QT.Q8_0, {"weight_type": QT.Q8_0, "rank": 32, "alpha": 32.0}, 1.0, 0.1),
    "q4_1-base-f32-adapter-scale-2": (QT.Q4_1, {"alpha": 4.0}, 2.0, 0.1),
}


@pytest.mark.oracle
@pytest.mark.parametrize("case", list(CASES))
def test_matches_llama_cpp(tiny_model_path, adapter_path, case):
    """Greedy tokens equal llama.cpp's with the same adapter and scale, prompt logits are close,
    and the adapter changes the model (a delta left out would show)."""
    base_type, kwargs, scale, tolerance = CASES[case]
    model_path = tiny_model_path(weight_type=base_type, seed=5)
    path = adapter_path(seed=11, **kwargs)
    pipeline = build(model_path)
    adapter = LoraAdapter.open(path, pipeline.head.config)
    pipeline.add_adapter(adapter)
    chosen = ((adapter.name, scale),)
    ref_tokens, ref_logits = llama_cpp_run(model_path, path, scale, 16)
    ours = prompt_logits(pipeline, chosen)
    spread = np.abs(ref_logits).max()
    assert np.abs(ours - ref_logits).max() < tolerance * spread
    assert np.abs(ours - prompt_logits(pipeline)).max() > 0.2 * spread  # the adapter matters
    assert greedy(pipeline, 16, chosen) == ref_tokens


@pytest.mark.oracle
def test_phi3_fused_matrices_match_llama_cpp(lora_dir):
    """Phi-3 adapts its fused matrices whole, as llama.cpp's phi3 graph does (build_lora_mm on
    wqkv, and on ffn_up inside build_ffn): an adapter of attn_qkv (Q, K and V rows) and ffn_up
    (gate and up rows) gives llama.cpp's greedy tokens and prompt logits within the F32 bound."""
    model_path = write_tiny_model(lora_dir / "phi3.gguf", "phi3", weight_type=QT.F32, fused=True, seed=5)
    path = write_gguf(lora_dir / "phi3-lora.gguf", *tiny_lora(arch="phi3", seed=11,
                                                               targets=("attn_qkv", "attn_output", "ffn_up", "ffn_down")))
    pipeline = build(model_path)
    assert pipeline.stages[0].weights[0].ffn_gate is None and pipeline.stages[0].weights[0].attn_qkv is not None
    adapter = LoraAdapter.open(path, pipeline.head.config)
    assert {p.base.split(".")[2] for p in adapter.pairs.values()} == {"attn_qkv", "attn_output", "ffn_up", "ffn_down"}
    pipeline.add_adapter(adapter)
    chosen = ((adapter.name, 1.0),)
    ref_tokens, ref_logits = llama_cpp_run(model_path, path, 1.0, 16)
    ours = prompt_logits(pipeline, chosen)
    spread = np.abs(ref_logits).max()
    assert np.abs(ours - ref_logits).max() < 6e-3 * spread
    assert np.abs(ours - prompt_logits(pipeline)).max() > 0.2 * spread
    assert greedy(pipeline, 16, chosen) == ref_tokens


# ---------------------------------------------------------------------------------------------
# The same bits however the work is batched or split


@pytest.fixture(scope="module")
def two_adapters(adapter_path):
    return adapter_path(seed=21), adapter_path(seed=22, targets=("attn_q", "ffn_down"), weight_type=QT.F16)


def add_both(pipeline, paths) -> None:
    for name, path in zip(("first", "second"), paths):
        pipeline.add_adapter(LoraAdapter.open(path, pipeline.head.config, name=name))


CHOICES = {"base": (), "first": (("first", 1.0),), "both": (("first", 0.5), ("second", 1.5))}


def run_sessions(pipeline, together: bool, n_steps: int = 4) -> dict[str, list[np.ndarray]]:
    """Prefill three sessions (different prompts and adapters), then decode n_steps greedy
    tokens each: all in shared batches, or each session alone."""
    prompts = {name: np.random.default_rng(i).integers(0, 299, 6 + i) for i, name in enumerate(CHOICES)}
    states = {name: [] for name in CHOICES}
    last = {}

    def step(items):  # items: (session, start, ids)
        segments = [Segment(s, start, len(ids), CHOICES[s]) for s, start, ids in items]
        hidden = pipeline.forward(segments, np.concatenate([ids for _, _, ids in items]))
        row = 0
        for s, _, ids in items:
            out = hidden[row : row + len(ids)]
            states[s].append(out)
            last[s] = int(np.argmax(pipeline.head.logits(out[-1:])[0]))
            row += len(ids)

    groups = [list(CHOICES)] if together else [[s] for s in CHOICES]
    for group in groups:
        step([(s, 0, prompts[s]) for s in group])
    for t in range(n_steps):
        for group in groups:
            step([(s, len(prompts[s]) + t, np.array([last[s]])) for s in group])
    for s in CHOICES:
        pipeline.end_session(s)
    return states


def test_rows_do_not_depend_on_their_batch(tiny_model_path, two_adapters):
    """Sessions with no adapter, one adapter, and two stacked adapters at other scales, decoded
    together in shared batches: the same hidden states, bit for bit, as each decoded alone."""
    pipeline = build(tiny_model_path(weight_type=QT.Q8_0, seed=5))
    add_both(pipeline, two_adapters)
    alone, together = run_sessions(pipeline, False), run_sessions(pipeline, True)
    for name in CHOICES:
        for a, b in zip(alone[name], together[name]):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(alone["base"][0], alone["first"][0][: len(alone["base"][0])])


def test_split_stages_are_bit_identical(tiny_model_path, two_adapters):
    """Each stage holds the adapters' matrices of its own layers only; [1, 2] and [2, 1] give the
    same numbers as one stage."""
    path = tiny_model_path(weight_type=QT.Q4_0, seed=5)
    one = build(path)
    add_both(one, two_adapters)
    expected = run_sessions(one, True)
    for splits in ([1, 2], [2, 1]):
        pipeline = build(path, splits)
        add_both(pipeline, two_adapters)
        held = [sorted(pipeline.stages[i].adapters["first"]) for i in range(2)]
        assert all(name.startswith(tuple(f"blk.{layer}." for layer in stage.layers))
                   for stage, names in zip(pipeline.stages, held) for name in names)
        got = run_sessions(pipeline, True)
        for name in CHOICES:
            for a, b in zip(expected[name], got[name]):
                np.testing.assert_array_equal(a, b)


def test_unknown_adapter_is_refused_before_anything_changes(tiny_q8_path):
    pipeline = build(tiny_q8_path)
    stage = pipeline.stages[0]
    with pytest.raises(LoraError, match="session s: adapter 'nope' is not loaded on this stage"):
        stage.forward(StageBatch((Segment("s", 0, 3, (("nope", 1.0),)),), np.zeros((3, 64), np.float32)))
    assert stage.sessions == {}


# ---------------------------------------------------------------------------------------------
# Bad adapters


def broken(**changes):
    """tiny_lora's (metadata, tensors) with changes: metadata keys (None deletes), or a
    'tensors' callable that edits the tensor dict."""
    metadata, tensors = tiny_lora(seed=3, layers=(0,), targets=("attn_q", "ffn_down"))
    edit = changes.pop("tensors", None)
    for key, value in changes.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    if edit:
        edit(tensors)
    return metadata, tensors


def _bigger(tensors):
    tensors.clear()
    tensors.update(tiny_lora(dim=128, hidden_dim=96, layers=(0,), targets=("attn_q",))[1])


BAD = {
    "a model, not an adapter": (lambda: tiny_llama(), "not an adapter (general.type is None"),
    "another architecture": (lambda: broken(**{"general.architecture": "gemma"}), "adapter for architecture 'gemma'"),
    "a control vector": (lambda: broken(**{"adapter.type": "control_vector"}), "only 'lora' adapters"),
    "an aLoRA": (lambda: broken(**{"adapter.alora.invocation_tokens": [1, 2]}), "aLoRA"),
    "another model's shapes": (lambda: broken(tensors=_bigger), "do not fit the base matrix [64, 64]"),
    "a layer past the model": (lambda: broken(tensors=lambda t: t.update(
        {k.replace("blk.0.", "blk.7."): v for k, v in t.items()})), "blk.7.attn_q.weight does not exist"),
    "a half pair": (lambda: broken(tensors=lambda t: t.pop("blk.0.ffn_down.weight.lora_b")),
                    "blk.0.ffn_down.weight has a lora_a tensor but no lora_b"),
    "the token embedding": (lambda: broken(tensors=lambda t: t.update({
        "token_embd.weight.lora_a": (np.zeros((8, 300), np.float32), QT.F32),
        "token_embd.weight.lora_b": (np.zeros((64, 8), np.float32), QT.F32)})), "adapts token_embd.weight"),
    "an unknown tensor": (lambda: broken(tensors=lambda t: t.update(
        {"blk.0.attn_q.weight.lora_c": (np.zeros((8, 64), np.float32), QT.F32)})), "neither a .lora_a nor a .lora_b"),
    "ranks that disagree": (lambda: broken(tensors=lambda t: t.update(
        {"blk.0.attn_q.weight.lora_b": (np.zeros((64, 4), np.float32), QT.F32)})), "disagree on the rank"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_is_one_clear_error(tiny_q8_path, tmp_path, case):
    make, message = BAD[case]
    path = write_gguf(tmp_path / "bad.gguf", *make())
    config = load_model(tiny_q8_path).config
    with pytest.raises(LoraError) as info:
        LoraAdapter.open(path, config)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_an_adapter_with_a_non_finite_value_is_refused_when_added(tiny_q8_path, tmp_path):
    def poison(tensors):
        b, ttype = tensors["blk.0.ffn_down.weight.lora_b"]
        b = b.copy()
        b[5, 2] = np.nan
        tensors["blk.0.ffn_down.weight.lora_b"] = (b, ttype)

    path = write_gguf(tmp_path / "nan.gguf", *broken(tensors=poison))
    stage = build(tiny_q8_path).stages[0]
    adapter = LoraAdapter.open(path, stage.config)
    with pytest.raises(LoraError, match=r"adapter 'nan': blk\.0\.ffn_down\.weight\.lora_b: non-finite values \(NaN or Inf\); "):
        stage.add_adapter(adapter)
    assert stage.adapters == {}


def test_norm_tensors_are_skipped_as_llama_cpp_does(tiny_q8_path, tmp_path):
    path = write_gguf(tmp_path / "norms.gguf", *broken(tensors=lambda t: t.update(
        {"blk.0.attn_norm.weight": (np.ones(64, np.float32), QT.F32)})))
    adapter = LoraAdapter.open(path, load_model(tiny_q8_path).config)
    assert sorted(adapter.pairs) == ["blk.0.attn_q.weight", "blk.0.ffn_down.weight"]


# ---------------------------------------------------------------------------------------------
# A node in this process


@pytest.fixture
def node(tmp_path):
    server, port, servicer = create_server(NodeSettings(host="127.0.0.1", port=0, threads=1, cache_dir=tmp_path))
    client = NodeClient(f"127.0.0.1:{port}")
    yield client, servicer
    client.close()
    server.stop(0)


def test_node_applies_only_its_layers(tiny_q8_path, two_adapters, node):
    """A node holding layers [1, 3) receives just those layers' adapter tensors, and its stage
    gives the same bits as a local one for sessions with different adapters in one batch."""
    client, servicer = node
    model = load_model(tiny_q8_path)
    layers = LayerRange(1, 3)
    client.load(model.file, "ab" * 32, model.config, layers, 64)
    remote = RemoteStage(client, layers, model.config.dim)
    local = LocalStage.load(model.file, model.config, layers, 64)
    adapters = [LoraAdapter.open(p, model.config, name=n) for n, p in zip(("first", "second"), two_adapters)]
    sent = [c.header for c in _adapter_chunks(adapters[0], layers) if c.WhichOneof("part") == "header"][0]
    assert sent.tensors and all(t.name.startswith(("blk.1.", "blk.2.")) for t in sent.tensors)
    for adapter in adapters:
        remote.add_adapter(adapter)
        local.add_adapter(adapter)
    assert sorted(servicer._stage.adapters["first"]) == sorted(local.adapters["first"])
    rng = np.random.default_rng(0)
    batches = [
        StageBatch((Segment("a", 0, 5, CHOICES["first"]), Segment("b", 0, 4, CHOICES["both"]), Segment("c", 0, 3)),
                   rng.standard_normal((12, 64), dtype=np.float32)),
        StageBatch((Segment("a", 5, 1, CHOICES["first"]), Segment("b", 4, 1, CHOICES["both"])),
                   rng.standard_normal((2, 64), dtype=np.float32)),
    ]
    for batch in batches:
        np.testing.assert_array_equal(remote.forward(batch), local.forward(batch))
    with pytest.raises(StageError, match="adapter 'third' is not loaded"):
        remote.forward(StageBatch((Segment("d", 0, 1, (("third", 1.0),)),), np.zeros((1, 64), np.float32)))
    remote.close()


@pytest.mark.slow
def test_node_refuses_bad_adapter_streams(tiny_q8_path, adapter_path, node):
    client, _ = node
    model = load_model(tiny_q8_path)
    adapter = LoraAdapter.open(adapter_path(seed=11), model.config)

    def send(chunks):
        with pytest.raises(grpc.RpcError) as info:
            client.stub.LoadAdapter(iter(chunks), timeout=10)
        return info.value.code(), info.value.details()

    chunks = list(_adapter_chunks(adapter, LayerRange(0, 3)))
    assert send(chunks)[0] == grpc.StatusCode.FAILED_PRECONDITION  # no layers loaded yet
    client.load(model.file, "ab" * 32, model.config, LayerRange(1, 3), 64)
    code, details = send(chunks)  # layer 0's tensors are not this node's
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "layers [0]" in details
    mine = list(_adapter_chunks(adapter, LayerRange(1, 3)))
    code, details = send(mine[:-1] + [pb.AdapterChunk(sha256=hashlib.sha256(b"x").hexdigest())])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "sha256" in details
    code, details = send(mine[:1] + [pb.AdapterChunk(data=b"\0" * (1 << 20))] * 3)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "more bytes than declared" in details
    client.stub.LoadAdapter(iter(mine), timeout=10)  # the node is fine afterwards


# ---------------------------------------------------------------------------------------------
# The command line, through real processes


def caravan(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "caravan.coordinator", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def cli_run(model_path, *args: str) -> tuple[list[int], str]:
    """(tokens, stderr) of `caravan run --json -v`."""
    result = caravan("run", "--model", str(model_path), "--temperature", "0", "-n", "12", "-t", "1", "--json", "-v",
                     *args, "Tl an rb")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["tokens"], result.stderr


def with_adapters(tiny_model_path, paths):
    """(model path, model, a one-process pipeline holding the adapters, their names) for the
    tiny Q8_0 model the command-line tests run."""
    model_path = tiny_model_path(weight_type=QT.Q8_0, seed=5)
    model = load_model(model_path)
    pipeline = model.local_pipeline(N_CTX)
    names = []
    for path in paths:
        adapter = LoraAdapter.open(path, model.config)
        pipeline.add_adapter(adapter)
        names.append(adapter.name)
    return model_path, model, pipeline, names


@pytest.mark.slow
def test_run_with_adapters_over_two_node_processes(tiny_model_path, two_adapters, tmp_path):
    """`caravan run --lora A:0.5 --lora B` in one process equals Generation with both adapters,
    and equals the same command over two real node processes (each gets only its layers'
    adapter tensors); a bad --lora is one line and exit 1."""
    from support.nodes import NodeProcess

    model_path, model, pipeline, names = with_adapters(tiny_model_path, two_adapters)
    flags = ("--lora", f"{two_adapters[0]}:0.5", "--lora", str(two_adapters[1]))
    ids = model.tokenizer.encode("Tl an rb")
    expected = greedy(pipeline, 12, ((names[0], 0.5), (names[1], 1.0)), prompt=ids)
    assert expected != greedy(pipeline, 12, prompt=ids)
    assert cli_run(model_path, *flags)[0] == expected
    # Each node holds at most 2 of the 3 layers, so the plan splits them however fast the hops.
    limit = NODE_RUNTIME_BYTES + 2 * model_cost(model, N_CTX).per_layer
    nodes = [NodeProcess(tmp_path / f"node{i}", "--memory-limit", str(limit)) for i in range(2)]
    try:
        tokens, log = cli_run(model_path, "--nodes", ",".join(n.address for n in nodes), *flags)
        placed = next(line for line in log.splitlines() if "layers placed:" in line)
        assert placed.count("[") == 2, placed  # a range on each node
        assert tokens == expected
    finally:
        for node in nodes:
            node.stop()
    result = caravan("run", "--model", str(model_path), "--lora", str(model_path), "-n", "1", "hi")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("caravan: error: ") and "not an adapter" in result.stderr


@pytest.mark.slow
def test_serve_chooses_the_adapter_per_request(tiny_model_path, two_adapters):
    """`caravan serve --lora A --lora B:1.5` offers MODEL, MODEL:A and MODEL:B; requests for the
    three, sent at once (so they share batches), each get the text that one process computes
    alone with that choice; an unknown adapter is a 404 naming what is served."""
    import concurrent.futures

    model_path, model, pipeline, names = with_adapters(tiny_model_path, two_adapters)
    base_id = model_path.stem
    choices = {base_id: (), f"{base_id}:{names[0]}": ((names[0], 1.0),), f"{base_id}:{names[1]}": ((names[1], 1.5),)}
    prompts = [[int(t) for t in np.random.default_rng(i).integers(0, 299, 5 + i)] for i in range(2)]
    expected = {(m, i): model.tokenizer.decode(list(Generation(
        pipeline, p, Sampler(SamplingParams(temperature=0)), 12, model.tokenizer.eog_ids, a)))
        for m, a in choices.items() for i, p in enumerate(prompts)}
    assert len({(expected[m, 0], expected[m, 1]) for m in choices}) == 3  # each choice writes something else

    server = Server("--model", str(model_path), "--lora", str(two_adapters[0]), "--lora", f"{two_adapters[1]}:1.5",
                    ctx=N_CTX)
    try:
        def call(path: str, body: dict | None = None) -> tuple[int, dict]:
            if body is None:
                return server.get("/v1" + path, timeout=120)
            return server.post(path, json.dumps(body).encode(), timeout=120)

        status, listing = call("/models")
        assert status == 200 and [m["id"] for m in listing["data"]] == list(choices)

        def complete(key):
            model_id, i = key
            status, reply = call("/completions", {"model": model_id, "prompt": prompts[i], "max_tokens": 12,
                                                  "temperature": 0})
            assert status == 200, reply
            assert reply["model"] == model_id
            return reply["choices"][0]["text"]

        with concurrent.futures.ThreadPoolExecutor(len(expected)) as pool:
            got = dict(zip(expected, pool.map(complete, list(expected))))
        assert got == expected
        status, reply = call("/completions", {"model": f"{base_id}:nope", "prompt": "hi", "max_tokens": 2})
        assert status == 404 and f"{base_id}:{names[0]}" in reply["error"]["message"]
        # Ollama's API names the adapters alike: MODEL:ADAPTER is a model with a tag.
        listed = [m["name"] for m in server.get("/api/tags", timeout=120)[1]["models"]]
        assert listed == [f"{base_id}:latest", f"{base_id}:{names[0]}", f"{base_id}:{names[1]}"]
    finally:
        server.stop()


@pytest.mark.slow
def test_lost_node_is_refilled_with_the_sessions_adapters(tiny_model_path, two_adapters, tmp_path):
    """A node killed mid-generation: the re-plan sends the adapter to the new stages and
    refills the session's KV caches with its adapter, so every logit afterwards has the same
    bits as in one process."""
    from caravan.coordinator.failover import ClusterPipeline
    from support.nodes import NodeProcess, cluster_token

    _, model, one, names = with_adapters(tiny_model_path, two_adapters)
    chosen = ((names[0], 1.0), (names[1], 0.5))

    def steps(pipeline, adapters=chosen, kill=None) -> list[np.ndarray]:
        hidden = pipeline.forward([Segment("s", 0, len(PROMPT), adapters)], np.asarray(PROMPT))
        logits = []
        for t in range(8):
            logits.append(pipeline.head.logits(hidden[-1:]))
            if t == 3 and kill is not None:
                kill()
            token = np.array([int(np.argmax(logits[-1]))])
            hidden = pipeline.forward([Segment("s", len(PROMPT) + t, 1, adapters)], token)
        pipeline.end_session("s")
        return logits

    expected = steps(one)
    assert not np.array_equal(expected[0], steps(one, ())[0])
    # Each node holds at most 2 of the 3 layers, so the plan splits them however fast the hops.
    limit = NODE_RUNTIME_BYTES + 2 * model_cost(model, N_CTX).per_layer
    nodes = [NodeProcess(tmp_path / f"node{i}", "--memory-limit", str(limit)) for i in range(3)]
    pipeline = ClusterPipeline(model, lambda: [n.address for n in nodes], N_CTX, tmp_path, progress=False,
                               token=cluster_token())
    try:
        for path in two_adapters:
            pipeline.add_adapter(LoraAdapter.open(path, model.config))
        used = [a.node.name for a in pipeline.plan.assignments]
        assert len(used) >= 2
        victim = next(n for n in nodes if n.address == used[0])
        got = steps(pipeline, kill=victim.kill)
        assert len(pipeline.recoveries) == 1
        assert victim.address not in [a.node.name for a in pipeline.plan.assignments]
        for a, b in zip(expected, got):
            np.testing.assert_array_equal(a, b)
    finally:
        pipeline.close()
        for node in nodes:
            node.stop()


@pytest.mark.model
@pytest.mark.oracle
def test_real_model_with_an_adapter_follows_llama_cpp(smollm2, smollm2_path, tmp_path):
    """SmolLM2 with a random rank-16 F16 adapter on every matrix of its 30 layers, at scale 0.2:
    caravan's greedy tokens equal llama.cpp's with the same adapter until a near-tie of
    llama.cpp's own logits (both engines sit about 0.7 from a float64 evaluation, README), and
    the adapter changes what the model writes."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the reference engine) is not installed")
    c = smollm2.config
    path = write_gguf(tmp_path / "smollm2-lora.gguf", *tiny_lora(
        n_layers=c.n_layers, dim=c.dim, hidden_dim=c.hidden_dim, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
        rank=16, alpha=16.0, weight_type=QT.F16, seed=1))
    pipeline = smollm2.local_pipeline(512)
    adapter = LoraAdapter.open(path, c)
    pipeline.add_adapter(adapter)
    llama = llama_cpp.Llama(model_path=str(smollm2_path), n_ctx=512, n_threads=LLAMA_CPP_THREADS,
                            logits_all=True, verbose=False,
                            lora_path=str(path), lora_scale=0.2)
    changed = 0
    for prompt in ("The capital of France is", "Once upon a time", "def fibonacci(n):"):
        ids = smollm2.tokenizer.encode(prompt)
        ours = greedy(pipeline, 24, ((adapter.name, 0.2),), prompt=ids)
        changed += ours != greedy(pipeline, 24, prompt=ids)
        llama.reset()
        ref = []
        for token in llama.generate(ids, temp=0.0, top_k=1):
            ref.append(token)
            if len(ref) == 24:
                break
        top2 = np.sort(np.asarray(llama.scores[len(ids) - 1 : len(ids) - 1 + len(ref)]), axis=1)[:, -2:]
        parted = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
        if parted is not None:
            assert parted >= 3 and top2[parted, 1] - top2[parted, 0] < 0.7, (prompt, parted, top2[parted])
    assert changed
