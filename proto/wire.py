"""The one codec between numpy arrays, pipeline types and caravan.proto messages.

Everything that comes off the wire is checked here before it becomes an array or a config:
formats, row and column counts, byte lengths. Callers pass the limits they know (the model's
dim, the most rows they accept).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Callable, Iterable, Iterator

import grpc
import numpy as np
from gguf import GGMLQuantizationType as QT

from caravan.pipeline.architectures import BLOCK_TENSORS
from caravan.pipeline.gguf_file import GGUFError, TensorInfo, tensor_nbytes
from caravan.pipeline.lora import MAX_ADAPTERS_PER_ROW, LoraError, check_name
from caravan.pipeline.model import ModelConfig, ModelError
from caravan.pipeline.stage import Segment

from . import caravan_pb2 as pb

PROTOCOL_VERSION = 5  # bump with any incompatible change to caravan.proto

Q8_BLOCK = 32  # ggml's block_q8_0: an f16 scale d, then 32 int8 q; value = q * d
Q8_BLOCK_BYTES = 2 + Q8_BLOCK

WIRE_FORMATS = {"f32": pb.WIRE_FORMAT_F32, "f16": pb.WIRE_FORMAT_F16, "q8_0": pb.WIRE_FORMAT_Q8_0}
WIRE_NAMES = {code: name for name, code in WIRE_FORMATS.items()}
STATE_NAMES = {pb.NODE_STATE_IDLE: "idle", pb.NODE_STATE_LOADING: "loading",
               pb.NODE_STATE_READY: "ready", pb.NODE_STATE_FAILED: "failed"}


# A node accepts batches of at most MAX_BATCH_ROWS rows (the coordinator sends prefill in
# chunks of PREFILL_CHUNK = 256) and messages of at most MAX_MESSAGE_BYTES: 512 rows of an
# 8192-wide model (70B) in f32 are 16 MiB, and weight chunks are 1 MiB.
MAX_BATCH_ROWS = 512
MAX_MESSAGE_BYTES = 32 << 20
WEIGHT_CHUNK_BYTES = 1 << 20

# Every channel to a node keeps its connection checked: a node that stops answering pings
# (unplugged, frozen) is noticed within KEEPALIVE_MS * 2 even while no batch is in flight.
KEEPALIVE_MS = 2000

# What a node's own process takes beside its layers and KV caches (Python, Numba, gRPC,
# scratch; measured in tests/bench/RESULTS.md): the planner leaves it free on every node, and
# a node counts it against its --memory-limit.
NODE_RUNTIME_BYTES = 300 << 20


def client_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Options of a channel to a node: the coordinator's, and a node's to the next of a chain."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class WireError(ValueError):
    """A message that does not fit what was declared or what the receiver accepts."""


class NotReadyError(RuntimeError):
    """The node has no layers loaded (or is loading new ones)."""


class ChainClosedError(RuntimeError):
    """A chain's batch reached a node where the chain's results stream has ended: the
    coordinator lost part of the chain or went away, so it must plan the chain again."""


# The one table from errors to gRPC status codes, first match wins. Nodes send these codes;
# the coordinator reports them with the node's name.
STATUS_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (NotReadyError, grpc.StatusCode.FAILED_PRECONDITION),
    (ChainClosedError, grpc.StatusCode.UNAVAILABLE),  # the coordinator treats the chain as lost
    (MemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (OSError, grpc.StatusCode.FAILED_PRECONDITION),  # the node's disk or cache directory
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),  # WireError, WeightError, StageError, ModelError
)


def status_code(exc: BaseException) -> grpc.StatusCode:
    for error_type, code in STATUS_CODES:
        if isinstance(exc, error_type):
            return code
    return grpc.StatusCode.INTERNAL


def status_from_value(value: int) -> grpc.StatusCode:
    return next((code for code in grpc.StatusCode if code.value[0] == value), grpc.StatusCode.UNKNOWN)


def wire_format(name: str) -> int:
    try:
        return WIRE_FORMATS[name.lower()]
    except KeyError:
        raise WireError(f"unknown wire format {name!r} (known: {', '.join(WIRE_FORMATS)})") from None


def check_format(fmt: int, cols: int) -> int:
    """fmt, when rows of `cols` floats can travel in it; WireError otherwise."""
    if fmt not in WIRE_NAMES:
        raise WireError(f"unknown wire format {fmt} (known: {', '.join(f'{code} ({name})' for code, name in WIRE_NAMES.items())})")
    if fmt == pb.WIRE_FORMAT_Q8_0 and cols % Q8_BLOCK:
        raise WireError(f"Q8_0 needs a width that is a multiple of {Q8_BLOCK}, got {cols}")
    return fmt


def row_bytes(fmt: int, cols: int) -> int:
    if fmt == pb.WIRE_FORMAT_F32:
        return 4 * cols
    if fmt == pb.WIRE_FORMAT_F16:
        return 2 * cols
    if fmt == pb.WIRE_FORMAT_Q8_0:
        return cols // Q8_BLOCK * Q8_BLOCK_BYTES
    raise WireError(f"unknown wire format {fmt}")


# --- hidden states ----------------------------------------------------------------------------


def encode_hidden(x: np.ndarray, fmt: int = pb.WIRE_FORMAT_F32) -> pb.Tensor:
    """(rows, cols) f32 -> Tensor."""
    rows, cols = x.shape
    if fmt == pb.WIRE_FORMAT_F32:
        data = np.ascontiguousarray(x, dtype="<f4").tobytes()
    elif fmt == pb.WIRE_FORMAT_F16:
        data = np.ascontiguousarray(x, dtype="<f2").tobytes()
    elif fmt == pb.WIRE_FORMAT_Q8_0:
        data = _quantize_q8_0(x)
    else:
        raise WireError(f"unknown wire format {fmt}")
    return pb.Tensor(format=fmt, rows=rows, cols=cols, data=data)


def decode_hidden(t: pb.Tensor, cols: int, max_rows: int) -> np.ndarray:
    """Tensor -> (rows, cols) f32, refusing anything but the expected width and at most max_rows."""
    if t.cols != cols:
        raise WireError(f"hidden state has {t.cols} columns, expected {cols}")
    if not 0 < t.rows <= max_rows:
        raise WireError(f"hidden state has {t.rows} rows, expected 1 to {max_rows}")
    expected = t.rows * row_bytes(check_format(t.format, cols), cols)
    if len(t.data) != expected:
        raise WireError(f"hidden state of {t.rows}x{cols} {WIRE_NAMES[t.format]} has {len(t.data)} bytes, expected {expected}")
    if t.format == pb.WIRE_FORMAT_F32:
        x = np.frombuffer(t.data, dtype="<f4").reshape(t.rows, cols).astype(np.float32)
    elif t.format == pb.WIRE_FORMAT_F16:
        x = np.frombuffer(t.data, dtype="<f2").reshape(t.rows, cols).astype(np.float32)
    else:
        x = _dequantize_q8_0(t.data, t.rows, cols)
    if not np.isfinite(x).all():  # kernels would compute garbage from it: refused before any compute
        raise WireError(_non_finite(x, t.format))
    return x


def _non_finite(x: np.ndarray, fmt: int) -> str:
    row = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
    why = ("values past f16's range arrive as Inf: send f32" if fmt == pb.WIRE_FORMAT_F16
           else "the sender's activations overflowed, or its data is damaged")
    return f"hidden state row {row} of {x.shape[0]} holds NaN or Inf ({why})"


def _quantize_q8_0(x: np.ndarray) -> bytes:
    """As ggml's quantize_row_q8_0_ref: d = max|x| / 127 per block, q = round(x / d)."""
    rows, cols = x.shape
    if cols % Q8_BLOCK:
        raise WireError(f"Q8_0 needs a width that is a multiple of {Q8_BLOCK}, got {cols}")
    blocks = x.astype(np.float32).reshape(rows, cols // Q8_BLOCK, Q8_BLOCK)
    d = np.abs(blocks).max(axis=2) / 127.0  # (rows, n_blocks)
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = np.rint(blocks * inv[..., None]).astype(np.int8)
    out = np.empty((rows, cols // Q8_BLOCK, Q8_BLOCK_BYTES), np.uint8)
    out[..., :2] = d.astype("<f2")[..., None].view(np.uint8)
    out[..., 2:] = q.view(np.uint8)
    return out.tobytes()


def _dequantize_q8_0(data: bytes, rows: int, cols: int) -> np.ndarray:
    blocks = np.frombuffer(data, dtype=np.uint8).reshape(rows, cols // Q8_BLOCK, Q8_BLOCK_BYTES)
    d = np.ascontiguousarray(blocks[..., :2]).view("<f2").astype(np.float32)  # (rows, n_blocks, 1)
    q = blocks[..., 2:].view(np.int8).astype(np.float32)
    with np.errstate(invalid="ignore"):  # an Inf scale times a zero quant: NaN, refused by the caller
        return (q * d).reshape(rows, cols)


def decode_tokens(reply: pb.ForwardReply, rows: int, vocab_size: int) -> np.ndarray:
    """A last node's token ids (ForwardRequest.reply_tokens) -> (rows,) int64, refusing another
    count than the batch's rows or an id outside the vocabulary."""
    if reply.WhichOneof("result") != "tokens":
        raise WireError("the answer holds no token ids (a node without the head, or of another caravan version)")
    ids = np.asarray(reply.tokens.ids, dtype=np.int64)  # (rows,)
    if ids.shape != (rows,):
        raise WireError(f"{ids.shape[0]} token ids for a batch of {rows} rows")
    if ids.size and ids.max() >= vocab_size:
        raise WireError(f"token id {int(ids.max())} is outside the vocabulary of {vocab_size}")
    return ids


# --- segments ---------------------------------------------------------------------------------

MAX_SESSION_ID = 128  # characters


def check_session_id(session_id: str) -> str:
    """A session id from the wire (a batch's segment, CopySession's source and target)."""
    if not session_id or len(session_id) > MAX_SESSION_ID:
        raise WireError(f"session id must have 1 to {MAX_SESSION_ID} characters, got {len(session_id)}")
    return session_id


def encode_segments(segments) -> list[pb.Segment]:
    return [pb.Segment(session_id=s.session_id, start=s.start, length=s.length,
                       adapters=[pb.AdapterRef(name=name, scale=scale) for name, scale in s.adapters])
            for s in segments]


def decode_segments(messages) -> tuple[Segment, ...]:
    segments = []
    for m in messages:
        check_session_id(m.session_id)
        if m.length == 0:
            raise WireError(f"session {m.session_id}: segment of 0 rows")
        segments.append(Segment(m.session_id, m.start, m.length, _decode_adapters(m)))
    if not segments:
        raise WireError("a batch needs at least one segment")
    return tuple(segments)


def _decode_adapters(m: pb.Segment) -> tuple[tuple[str, float], ...]:
    if len(m.adapters) > MAX_ADAPTERS_PER_ROW:
        raise WireError(f"session {m.session_id}: {len(m.adapters)} adapters, at most {MAX_ADAPTERS_PER_ROW}")
    try:
        adapters = tuple((check_name(a.name), a.scale) for a in m.adapters)
    except LoraError as exc:
        raise WireError(f"session {m.session_id}: {exc}") from None
    if not all(math.isfinite(scale) for _, scale in adapters):
        raise WireError(f"session {m.session_id}: an adapter scale is not finite")
    return adapters


# --- adapter tensors --------------------------------------------------------------------------

MAX_ADAPTER_TENSORS = 4096


def decode_tensor_entries(entries) -> dict[str, TensorInfo]:
    """TensorEntry messages -> TensorInfo by name, laid out back to back from offset 0 in
    message order, each size checked against its type and shape."""
    if len(entries) > MAX_ADAPTER_TENSORS:
        raise WireError(f"{len(entries)} tensors, at most {MAX_ADAPTER_TENSORS}")
    tensors: dict[str, TensorInfo] = {}
    offset = 0
    for e in entries:
        ttype = tensor_type(e.type)
        shape = tuple(e.shape)
        if e.name in tensors or not e.name or len(e.name) > 256:
            raise WireError(f"tensor name {e.name[:256]!r} is empty, too long or given twice")
        if not 1 <= len(shape) <= 4 or any(not 0 < d < 1 << 32 for d in shape):
            raise WireError(f"{e.name}: invalid shape {list(shape)}")
        try:
            n_bytes = tensor_nbytes(ttype, shape, e.name)
        except GGUFError as exc:
            raise WireError(str(exc)) from None
        if e.n_bytes != n_bytes:
            raise WireError(f"{e.name}: declared {e.n_bytes} bytes, a {ttype.name} tensor of shape {list(shape)} has {n_bytes}")
        tensors[e.name] = TensorInfo(e.name, ttype, shape, offset, n_bytes)
        offset += n_bytes
    return tensors


# --- chunked streams (PushWeights, LoadAdapter) ---------------------------------------------
# A header, then the data in pieces of WEIGHT_CHUNK_BYTES, then the sha256 of every byte sent.


def chunked_stream(message: type, header, blobs: Iterable, on_bytes: Callable[[int], None] | None = None) -> Iterator:
    """The messages (pb.WeightChunk or pb.AdapterChunk) that send `header` and the bytes of each
    blob, read lazily, one piece at a time; on_bytes hears the size of each piece sent."""
    yield message(header=header)
    digest = hashlib.sha256()
    for data in blobs:
        for start in range(0, len(data), WEIGHT_CHUNK_BYTES):
            piece = bytes(data[start : start + WEIGHT_CHUNK_BYTES])
            digest.update(piece)
            if on_bytes is not None:
                on_bytes(len(piece))
            yield message(data=piece)
    yield message(sha256=digest.hexdigest())


def stream_header(request_iterator: Iterator, rpc: str, what: str):
    """The header that must open a chunked stream; what: the header's name in the error."""
    first = next(request_iterator, None)
    if first is None or first.WhichOneof("part") != "header":
        raise WireError(f"{rpc} must start with {what}")
    return first.header


def receive_stream(request_iterator: Iterator, what: str, on_data: Callable[[bytes], None]) -> str:
    """Hand each data piece after the header to on_data, and return the sender's sha256, which
    must end the stream; what: the stream's name in the errors."""
    sha256 = None
    for chunk in request_iterator:
        part = chunk.WhichOneof("part")
        if part == "data" and sha256 is None:
            on_data(chunk.data)
        elif part == "sha256" and sha256 is None:
            sha256 = chunk.sha256
        else:
            raise WireError(f"unexpected {part} in {what}")
    if sha256 is None:
        raise WireError(f"{what} ended before its sha256")
    return sha256


# --- model config -----------------------------------------------------------------------------


def encode_config(c: ModelConfig) -> pb.ModelConfig:
    """The message's fields are ModelConfig's, by the same names (test_wire checks it)."""
    return pb.ModelConfig(**dataclasses.asdict(c))


MAX_DIM = 1 << 16  # wider than any LLaMA-family model; bounds what a node allocates


def decode_config(m: pb.ModelConfig) -> ModelConfig:
    """A ModelConfig from the wire, through the same checks as one read from a GGUF file."""
    for field in ("dim", "hidden_dim", "n_heads", "n_kv_heads", "head_dim"):
        if not 0 < getattr(m, field) <= MAX_DIM:
            raise WireError(f"model config: {field} {getattr(m, field)} is out of range (1 to {MAX_DIM})")
    if m.n_heads * m.head_dim > MAX_DIM:
        raise WireError(f"model config: {m.n_heads} heads of {m.head_dim} are too wide")
    a = m.arch
    metadata = {
        "general.architecture": a,
        f"{a}.block_count": m.n_layers,
        f"{a}.embedding_length": m.dim,
        f"{a}.feed_forward_length": m.hidden_dim,
        f"{a}.attention.head_count": m.n_heads,
        f"{a}.attention.head_count_kv": m.n_kv_heads,
        f"{a}.attention.key_length": m.head_dim,
        f"{a}.rope.dimension_count": m.n_rot,
        f"{a}.context_length": m.context_length,
        f"{a}.attention.layer_norm_rms_epsilon": m.norm_eps,
        f"{a}.rope.freq_base": m.rope_theta,
        f"{a}.rope.scaling.type": "linear",
        f"{a}.rope.scaling.factor": m.rope_scale,
        f"{a}.rope.freq_base_swa": m.rope_theta_swa,
        f"{a}.attention.sliding_window": m.sliding_window,
        f"{a}.attention.sliding_window_pattern": list(m.sliding_layers) if m.sliding_layers else 0,
        f"{a}.attn_logit_softcapping": m.attn_softcap,
        f"{a}.final_logit_softcapping": m.final_softcap,
    }
    if len(m.layer_tensors) > len(BLOCK_TENSORS) or len(m.sliding_layers) > m.n_layers:
        raise WireError("model config: more block tensors or sliding layers than a model can have")
    rope_freqs = np.array(m.rope_freq_factors, dtype=np.float32) if m.rope_freq_factors else None
    try:
        config = ModelConfig.from_metadata(metadata, m.vocab_size, list(m.layer_tensors) or None, rope_freqs)
    except ModelError as exc:
        raise WireError(f"model config: {exc}") from None
    if not (config.norm_eps > 0 and config.rope_theta > 0):
        raise WireError("model config: norm_eps and rope_theta must be positive")
    return config


def tensor_type(code: int) -> QT:
    try:
        return QT(code)
    except ValueError:
        raise WireError(f"unknown tensor type {code}") from None
