from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_IDLE: _ClassVar[NodeState]
    NODE_STATE_LOADING: _ClassVar[NodeState]
    NODE_STATE_READY: _ClassVar[NodeState]
    NODE_STATE_FAILED: _ClassVar[NodeState]

class WireFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WIRE_FORMAT_UNSPECIFIED: _ClassVar[WireFormat]
    WIRE_FORMAT_F32: _ClassVar[WireFormat]
    WIRE_FORMAT_F16: _ClassVar[WireFormat]
    WIRE_FORMAT_Q8_0: _ClassVar[WireFormat]
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_IDLE: NodeState
NODE_STATE_LOADING: NodeState
NODE_STATE_READY: NodeState
NODE_STATE_FAILED: NodeState
WIRE_FORMAT_UNSPECIFIED: WireFormat
WIRE_FORMAT_F32: WireFormat
WIRE_FORMAT_F16: WireFormat
WIRE_FORMAT_Q8_0: WireFormat

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("protocol_version", "version", "node_id", "name", "memory_total", "memory_available", "cores", "threads", "architecture", "state", "model_sha256", "layer_start", "layer_stop", "local_model_sha256", "error", "max_message_bytes", "rss_bytes", "weight_bytes", "kv_cache_bytes", "sessions", "prompt_cache")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    CORES_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_STOP_FIELD_NUMBER: _ClassVar[int]
    LOCAL_MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CACHE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    version: str
    node_id: str
    name: str
    memory_total: int
    memory_available: int
    cores: int
    threads: int
    architecture: str
    state: NodeState
    model_sha256: str
    layer_start: int
    layer_stop: int
    local_model_sha256: str
    error: str
    max_message_bytes: int
    rss_bytes: int
    weight_bytes: int
    kv_cache_bytes: int
    sessions: int
    prompt_cache: PromptCacheInfo
    def __init__(self, protocol_version: _Optional[int] = ..., version: _Optional[str] = ..., node_id: _Optional[str] = ..., name: _Optional[str] = ..., memory_total: _Optional[int] = ..., memory_available: _Optional[int] = ..., cores: _Optional[int] = ..., threads: _Optional[int] = ..., architecture: _Optional[str] = ..., state: _Optional[_Union[NodeState, str]] = ..., model_sha256: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_stop: _Optional[int] = ..., local_model_sha256: _Optional[str] = ..., error: _Optional[str] = ..., max_message_bytes: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., sessions: _Optional[int] = ..., prompt_cache: _Optional[_Union[PromptCacheInfo, _Mapping]] = ...) -> None: ...

class PromptCacheInfo(_message.Message):
    __slots__ = ("sessions", "tokens", "bytes", "budget", "hits", "evictions")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: int
    tokens: int
    bytes: int
    budget: int
    hits: int
    evictions: int
    def __init__(self, sessions: _Optional[int] = ..., tokens: _Optional[int] = ..., bytes: _Optional[int] = ..., budget: _Optional[int] = ..., hits: _Optional[int] = ..., evictions: _Optional[int] = ...) -> None: ...

class ModelConfig(_message.Message):
    __slots__ = ("arch", "n_layers", "dim", "hidden_dim", "n_heads", "n_kv_heads", "head_dim", "n_rot", "vocab_size", "context_length", "norm_eps", "rope_theta", "rope_scale", "rope_theta_swa", "rope_freq_factors", "sliding_window", "sliding_layers", "attn_softcap", "final_softcap", "layer_tensors")
    ARCH_FIELD_NUMBER: _ClassVar[int]
    N_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_DIM_FIELD_NUMBER: _ClassVar[int]
    N_HEADS_FIELD_NUMBER: _ClassVar[int]
    N_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    N_ROT_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    NORM_EPS_FIELD_NUMBER: _ClassVar[int]
    ROPE_THETA_FIELD_NUMBER: _ClassVar[int]
    ROPE_SCALE_FIELD_NUMBER: _ClassVar[int]
    ROPE_THETA_SWA_FIELD_NUMBER: _ClassVar[int]
    ROPE_FREQ_FACTORS_FIELD_NUMBER: _ClassVar[int]
    SLIDING_WINDOW_FIELD_NUMBER: _ClassVar[int]
    SLIDING_LAYERS_FIELD_NUMBER: _ClassVar[int]
    ATTN_SOFTCAP_FIELD_NUMBER: _ClassVar[int]
    FINAL_SOFTCAP_FIELD_NUMBER: _ClassVar[int]
    LAYER_TENSORS_FIELD_NUMBER: _ClassVar[int]
    arch: str
    n_layers: int
    dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_rot: int
    vocab_size: int
    context_length: int
    norm_eps: float
    rope_theta: float
    rope_scale: float
    rope_theta_swa: float
    rope_freq_factors: _containers.RepeatedScalarFieldContainer[float]
    sliding_window: int
    sliding_layers: _containers.RepeatedScalarFieldContainer[bool]
    attn_softcap: float
    final_softcap: float
    layer_tensors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, arch: _Optional[str] = ..., n_layers: _Optional[int] = ..., dim: _Optional[int] = ..., hidden_dim: _Optional[int] = ..., n_heads: _Optional[int] = ..., n_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., n_rot: _Optional[int] = ..., vocab_size: _Optional[int] = ..., context_length: _Optional[int] = ..., norm_eps: _Optional[float] = ..., rope_theta: _Optional[float] = ..., rope_scale: _Optional[float] = ..., rope_theta_swa: _Optional[float] = ..., rope_freq_factors: _Optional[_Iterable[float]] = ..., sliding_window: _Optional[int] = ..., sliding_layers: _Optional[_Iterable[bool]] = ..., attn_softcap: _Optional[float] = ..., final_softcap: _Optional[float] = ..., layer_tensors: _Optional[_Iterable[str]] = ...) -> None: ...

class BenchmarkRequest(_message.Message):
    __slots__ = ("config", "weight_type")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_TYPE_FIELD_NUMBER: _ClassVar[int]
    config: ModelConfig
    weight_type: int
    def __init__(self, config: _Optional[_Union[ModelConfig, _Mapping]] = ..., weight_type: _Optional[int] = ...) -> None: ...

class BenchmarkReply(_message.Message):
    __slots__ = ("ms_per_layer",)
    MS_PER_LAYER_FIELD_NUMBER: _ClassVar[int]
    ms_per_layer: float
    def __init__(self, ms_per_layer: _Optional[float] = ...) -> None: ...

class TensorEntry(_message.Message):
    __slots__ = ("name", "type", "shape", "n_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    N_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    n_bytes: int
    def __init__(self, name: _Optional[str] = ..., type: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., n_bytes: _Optional[int] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("model_sha256", "config", "layer_start", "layer_stop", "n_ctx", "tensors", "push_layers", "head", "push_head")
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_STOP_FIELD_NUMBER: _ClassVar[int]
    N_CTX_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    PUSH_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    PUSH_HEAD_FIELD_NUMBER: _ClassVar[int]
    model_sha256: str
    config: ModelConfig
    layer_start: int
    layer_stop: int
    n_ctx: int
    tensors: _containers.RepeatedCompositeFieldContainer[TensorEntry]
    push_layers: _containers.RepeatedScalarFieldContainer[int]
    head: bool
    push_head: bool
    def __init__(self, model_sha256: _Optional[str] = ..., config: _Optional[_Union[ModelConfig, _Mapping]] = ..., layer_start: _Optional[int] = ..., layer_stop: _Optional[int] = ..., n_ctx: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[TensorEntry, _Mapping]]] = ..., push_layers: _Optional[_Iterable[int]] = ..., head: _Optional[bool] = ..., push_head: _Optional[bool] = ...) -> None: ...

class LoadReply(_message.Message):
    __slots__ = ("ready", "needs_weights", "bytes_received", "source", "missing_layers", "needs_head")
    READY_FIELD_NUMBER: _ClassVar[int]
    NEEDS_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    MISSING_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NEEDS_HEAD_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    needs_weights: bool
    bytes_received: int
    source: str
    missing_layers: _containers.RepeatedScalarFieldContainer[int]
    needs_head: bool
    def __init__(self, ready: _Optional[bool] = ..., needs_weights: _Optional[bool] = ..., bytes_received: _Optional[int] = ..., source: _Optional[str] = ..., missing_layers: _Optional[_Iterable[int]] = ..., needs_head: _Optional[bool] = ...) -> None: ...

class WeightChunk(_message.Message):
    __slots__ = ("header", "data", "sha256")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    header: LoadRequest
    data: bytes
    sha256: str
    def __init__(self, header: _Optional[_Union[LoadRequest, _Mapping]] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class Segment(_message.Message):
    __slots__ = ("session_id", "start", "length", "adapters")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    start: int
    length: int
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterRef]
    def __init__(self, session_id: _Optional[str] = ..., start: _Optional[int] = ..., length: _Optional[int] = ..., adapters: _Optional[_Iterable[_Union[AdapterRef, _Mapping]]] = ...) -> None: ...

class AdapterRef(_message.Message):
    __slots__ = ("name", "scale")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    name: str
    scale: float
    def __init__(self, name: _Optional[str] = ..., scale: _Optional[float] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("format", "rows", "cols", "data")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    format: WireFormat
    rows: int
    cols: int
    data: bytes
    def __init__(self, format: _Optional[_Union[WireFormat, str]] = ..., rows: _Optional[int] = ..., cols: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("id", "segments", "hidden", "reply_format", "chain", "relay", "compute_us", "error", "reply_tokens")
    ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    REPLY_FORMAT_FIELD_NUMBER: _ClassVar[int]
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    RELAY_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_US_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REPLY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    id: int
    segments: _containers.RepeatedCompositeFieldContainer[Segment]
    hidden: Tensor
    reply_format: WireFormat
    chain: str
    relay: _containers.RepeatedScalarFieldContainer[str]
    compute_us: _containers.RepeatedScalarFieldContainer[int]
    error: Error
    reply_tokens: bool
    def __init__(self, id: _Optional[int] = ..., segments: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., reply_format: _Optional[_Union[WireFormat, str]] = ..., chain: _Optional[str] = ..., relay: _Optional[_Iterable[str]] = ..., compute_us: _Optional[_Iterable[int]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., reply_tokens: _Optional[bool] = ...) -> None: ...

class Tokens(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("id", "hidden", "error", "tokens", "compute_us")
    ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_US_FIELD_NUMBER: _ClassVar[int]
    id: int
    hidden: Tensor
    error: Error
    tokens: Tokens
    compute_us: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, id: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., tokens: _Optional[_Union[Tokens, _Mapping]] = ..., compute_us: _Optional[_Iterable[int]] = ...) -> None: ...

class ResultsRequest(_message.Message):
    __slots__ = ("chain",)
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    chain: str
    def __init__(self, chain: _Optional[str] = ...) -> None: ...

class EndSessionRequest(_message.Message):
    __slots__ = ("session_id", "keep")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    keep: int
    def __init__(self, session_id: _Optional[str] = ..., keep: _Optional[int] = ...) -> None: ...

class EndSessionReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CopySessionRequest(_message.Message):
    __slots__ = ("source", "target", "length")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    source: str
    target: str
    length: int
    def __init__(self, source: _Optional[str] = ..., target: _Optional[str] = ..., length: _Optional[int] = ...) -> None: ...

class CopySessionReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AdapterHeader(_message.Message):
    __slots__ = ("name", "alpha", "arch", "tensors")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    name: str
    alpha: float
    arch: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorEntry]
    def __init__(self, name: _Optional[str] = ..., alpha: _Optional[float] = ..., arch: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorEntry, _Mapping]]] = ...) -> None: ...

class AdapterChunk(_message.Message):
    __slots__ = ("header", "data", "sha256")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    header: AdapterHeader
    data: bytes
    sha256: str
    def __init__(self, header: _Optional[_Union[AdapterHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class AdapterReply(_message.Message):
    __slots__ = ("bytes_received",)
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    def __init__(self, bytes_received: _Optional[int] = ...) -> None: ...
