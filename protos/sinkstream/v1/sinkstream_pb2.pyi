from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    STOP_REASON_MAX_TOKENS: _ClassVar[StopReason]
    STOP_REASON_EOS_TOKEN: _ClassVar[StopReason]
    STOP_REASON_STOP_SEQUENCE: _ClassVar[StopReason]
    STOP_REASON_CANCELLED: _ClassVar[StopReason]
    STOP_REASON_TIME_LIMIT: _ClassVar[StopReason]
    STOP_REASON_ERROR: _ClassVar[StopReason]

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_OK: _ClassVar[ErrorCode]
    ERROR_CODE_CANCELLED: _ClassVar[ErrorCode]
    ERROR_CODE_UNKNOWN: _ClassVar[ErrorCode]
    ERROR_CODE_INVALID_ARGUMENT: _ClassVar[ErrorCode]
    ERROR_CODE_DEADLINE_EXCEEDED: _ClassVar[ErrorCode]
    ERROR_CODE_NOT_FOUND: _ClassVar[ErrorCode]
    ERROR_CODE_ALREADY_EXISTS: _ClassVar[ErrorCode]
    ERROR_CODE_PERMISSION_DENIED: _ClassVar[ErrorCode]
    ERROR_CODE_RESOURCE_EXHAUSTED: _ClassVar[ErrorCode]
    ERROR_CODE_FAILED_PRECONDITION: _ClassVar[ErrorCode]
    ERROR_CODE_ABORTED: _ClassVar[ErrorCode]
    ERROR_CODE_OUT_OF_RANGE: _ClassVar[ErrorCode]
    ERROR_CODE_UNIMPLEMENTED: _ClassVar[ErrorCode]
    ERROR_CODE_INTERNAL: _ClassVar[ErrorCode]
    ERROR_CODE_UNAVAILABLE: _ClassVar[ErrorCode]

class SessionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_STATE_UNSPECIFIED: _ClassVar[SessionState]
    SESSION_STATE_RESIDENT: _ClassVar[SessionState]
    SESSION_STATE_PERSISTED: _ClassVar[SessionState]
STOP_REASON_UNSPECIFIED: StopReason
STOP_REASON_MAX_TOKENS: StopReason
STOP_REASON_EOS_TOKEN: StopReason
STOP_REASON_STOP_SEQUENCE: StopReason
STOP_REASON_CANCELLED: StopReason
STOP_REASON_TIME_LIMIT: StopReason
STOP_REASON_ERROR: StopReason
ERROR_CODE_OK: ErrorCode
ERROR_CODE_CANCELLED: ErrorCode
ERROR_CODE_UNKNOWN: ErrorCode
ERROR_CODE_INVALID_ARGUMENT: ErrorCode
ERROR_CODE_DEADLINE_EXCEEDED: ErrorCode
ERROR_CODE_NOT_FOUND: ErrorCode
ERROR_CODE_ALREADY_EXISTS: ErrorCode
ERROR_CODE_PERMISSION_DENIED: ErrorCode
ERROR_CODE_RESOURCE_EXHAUSTED: ErrorCode
ERROR_CODE_FAILED_PRECONDITION: ErrorCode
ERROR_CODE_ABORTED: ErrorCode
ERROR_CODE_OUT_OF_RANGE: ErrorCode
ERROR_CODE_UNIMPLEMENTED: ErrorCode
ERROR_CODE_INTERNAL: ErrorCode
ERROR_CODE_UNAVAILABLE: ErrorCode
SESSION_STATE_UNSPECIFIED: SessionState
SESSION_STATE_RESIDENT: SessionState
SESSION_STATE_PERSISTED: SessionState

class TierSpec(_message.Message):
    __slots__ = ("slots", "ratio")
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    RATIO_FIELD_NUMBER: _ClassVar[int]
    slots: int
    ratio: int
    def __init__(self, slots: _Optional[int] = ..., ratio: _Optional[int] = ...) -> None: ...

class AnalysisOptions(_message.Message):
    __slots__ = ("logprobs", "top_k", "embeddings", "token_ids")
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    logprobs: bool
    top_k: int
    embeddings: bool
    token_ids: bool
    def __init__(self, logprobs: _Optional[bool] = ..., top_k: _Optional[int] = ..., embeddings: _Optional[bool] = ..., token_ids: _Optional[bool] = ...) -> None: ...

class SessionSettings(_message.Message):
    __slots__ = ("sink_tokens", "window", "chunk", "tiers", "merge_policy", "analysis")
    SINK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    MERGE_POLICY_FIELD_NUMBER: _ClassVar[int]
    ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    sink_tokens: int
    window: int
    chunk: int
    tiers: _containers.RepeatedCompositeFieldContainer[TierSpec]
    merge_policy: str
    analysis: AnalysisOptions
    def __init__(self, sink_tokens: _Optional[int] = ..., window: _Optional[int] = ..., chunk: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[TierSpec, _Mapping]]] = ..., merge_policy: _Optional[str] = ..., analysis: _Optional[_Union[AnalysisOptions, _Mapping]] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("request_id", "open", "resume", "append_text", "append_tokens", "generate", "checkpoint", "close", "cancel", "append_message", "seq")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    APPEND_TEXT_FIELD_NUMBER: _ClassVar[int]
    APPEND_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    APPEND_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    open: OpenSession
    resume: ResumeSession
    append_text: AppendText
    append_tokens: AppendTokens
    generate: Generate
    checkpoint: Checkpoint
    close: Close
    cancel: CancelGeneration
    append_message: AppendMessage
    seq: int
    def __init__(self, request_id: _Optional[str] = ..., open: _Optional[_Union[OpenSession, _Mapping]] = ..., resume: _Optional[_Union[ResumeSession, _Mapping]] = ..., append_text: _Optional[_Union[AppendText, _Mapping]] = ..., append_tokens: _Optional[_Union[AppendTokens, _Mapping]] = ..., generate: _Optional[_Union[Generate, _Mapping]] = ..., checkpoint: _Optional[_Union[Checkpoint, _Mapping]] = ..., close: _Optional[_Union[Close, _Mapping]] = ..., cancel: _Optional[_Union[CancelGeneration, _Mapping]] = ..., append_message: _Optional[_Union[AppendMessage, _Mapping]] = ..., seq: _Optional[int] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("settings", "seed", "session_id", "system_message", "pin_system")
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PIN_SYSTEM_FIELD_NUMBER: _ClassVar[int]
    settings: SessionSettings
    seed: int
    session_id: str
    system_message: str
    pin_system: bool
    def __init__(self, settings: _Optional[_Union[SessionSettings, _Mapping]] = ..., seed: _Optional[int] = ..., session_id: _Optional[str] = ..., system_message: _Optional[str] = ..., pin_system: _Optional[bool] = ...) -> None: ...

class ResumeSession(_message.Message):
    __slots__ = ("session_id", "analysis", "results_after")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ANALYSIS_FIELD_NUMBER: _ClassVar[int]
    RESULTS_AFTER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    analysis: AnalysisOptions
    results_after: int
    def __init__(self, session_id: _Optional[str] = ..., analysis: _Optional[_Union[AnalysisOptions, _Mapping]] = ..., results_after: _Optional[int] = ...) -> None: ...

class AppendText(_message.Message):
    __slots__ = ("text", "flush")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FLUSH_FIELD_NUMBER: _ClassVar[int]
    text: str
    flush: bool
    def __init__(self, text: _Optional[str] = ..., flush: _Optional[bool] = ...) -> None: ...

class AppendTokens(_message.Message):
    __slots__ = ("ids", "flush")
    IDS_FIELD_NUMBER: _ClassVar[int]
    FLUSH_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    flush: bool
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., flush: _Optional[bool] = ...) -> None: ...

class Generate(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "repetition_penalty", "seed", "max_new_tokens", "stop_sequences", "include_stop_sequence", "time_limit_ms", "ignore_eos", "chat_reply")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STOP_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_LIMIT_MS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    CHAT_REPLY_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    seed: int
    max_new_tokens: int
    stop_sequences: _containers.RepeatedScalarFieldContainer[str]
    include_stop_sequence: bool
    time_limit_ms: int
    ignore_eos: bool
    chat_reply: bool
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., stop_sequences: _Optional[_Iterable[str]] = ..., include_stop_sequence: _Optional[bool] = ..., time_limit_ms: _Optional[int] = ..., ignore_eos: _Optional[bool] = ..., chat_reply: _Optional[bool] = ...) -> None: ...

class AppendMessage(_message.Message):
    __slots__ = ("role", "content", "flush")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    FLUSH_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    flush: bool
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ..., flush: _Optional[bool] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Close(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CancelGeneration(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("request_id", "session_opened", "chunk", "flushed", "token", "generation_complete", "checkpointed", "closed", "error", "ack")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_OPENED_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    FLUSHED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    GENERATION_COMPLETE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTED_FIELD_NUMBER: _ClassVar[int]
    CLOSED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    session_opened: SessionOpened
    chunk: ChunkResult
    flushed: Flushed
    token: GeneratedToken
    generation_complete: GenerationComplete
    checkpointed: Checkpointed
    closed: Closed
    error: Error
    ack: Acknowledged
    def __init__(self, request_id: _Optional[str] = ..., session_opened: _Optional[_Union[SessionOpened, _Mapping]] = ..., chunk: _Optional[_Union[ChunkResult, _Mapping]] = ..., flushed: _Optional[_Union[Flushed, _Mapping]] = ..., token: _Optional[_Union[GeneratedToken, _Mapping]] = ..., generation_complete: _Optional[_Union[GenerationComplete, _Mapping]] = ..., checkpointed: _Optional[_Union[Checkpointed, _Mapping]] = ..., closed: _Optional[_Union[Closed, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., ack: _Optional[_Union[Acknowledged, _Mapping]] = ...) -> None: ...

class Acknowledged(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class SessionOpened(_message.Message):
    __slots__ = ("session_id", "settings", "resumed", "tokens_seen", "cache", "acked_seq")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SEEN_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    ACKED_SEQ_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    settings: SessionSettings
    resumed: bool
    tokens_seen: int
    cache: CacheStats
    acked_seq: int
    def __init__(self, session_id: _Optional[str] = ..., settings: _Optional[_Union[SessionSettings, _Mapping]] = ..., resumed: _Optional[bool] = ..., tokens_seen: _Optional[int] = ..., cache: _Optional[_Union[CacheStats, _Mapping]] = ..., acked_seq: _Optional[int] = ...) -> None: ...

class CacheStats(_message.Message):
    __slots__ = ("used", "capacity", "sink_used", "window_used", "tier_used", "cache_bytes")
    USED_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    SINK_USED_FIELD_NUMBER: _ClassVar[int]
    WINDOW_USED_FIELD_NUMBER: _ClassVar[int]
    TIER_USED_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    used: int
    capacity: int
    sink_used: int
    window_used: int
    tier_used: _containers.RepeatedScalarFieldContainer[int]
    cache_bytes: int
    def __init__(self, used: _Optional[int] = ..., capacity: _Optional[int] = ..., sink_used: _Optional[int] = ..., window_used: _Optional[int] = ..., tier_used: _Optional[_Iterable[int]] = ..., cache_bytes: _Optional[int] = ...) -> None: ...

class ChunkResult(_message.Message):
    __slots__ = ("num_tokens", "token_ids", "logprobs", "top_k_ids", "top_k_logprobs", "top_k", "embedding", "tokens_seen", "scored_tokens", "mean_nll", "perplexity", "cache")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SEEN_FIELD_NUMBER: _ClassVar[int]
    SCORED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEAN_NLL_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    top_k_ids: _containers.RepeatedScalarFieldContainer[int]
    top_k_logprobs: _containers.RepeatedScalarFieldContainer[float]
    top_k: int
    embedding: _containers.RepeatedScalarFieldContainer[float]
    tokens_seen: int
    scored_tokens: int
    mean_nll: float
    perplexity: float
    cache: CacheStats
    def __init__(self, num_tokens: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., top_k_ids: _Optional[_Iterable[int]] = ..., top_k_logprobs: _Optional[_Iterable[float]] = ..., top_k: _Optional[int] = ..., embedding: _Optional[_Iterable[float]] = ..., tokens_seen: _Optional[int] = ..., scored_tokens: _Optional[int] = ..., mean_nll: _Optional[float] = ..., perplexity: _Optional[float] = ..., cache: _Optional[_Union[CacheStats, _Mapping]] = ...) -> None: ...

class Flushed(_message.Message):
    __slots__ = ("tokens_seen", "mean_nll", "perplexity")
    TOKENS_SEEN_FIELD_NUMBER: _ClassVar[int]
    MEAN_NLL_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    tokens_seen: int
    mean_nll: float
    perplexity: float
    def __init__(self, tokens_seen: _Optional[int] = ..., mean_nll: _Optional[float] = ..., perplexity: _Optional[float] = ...) -> None: ...

class GeneratedToken(_message.Message):
    __slots__ = ("token_id", "text", "logprob", "index")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    text: str
    logprob: float
    index: int
    def __init__(self, token_id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ..., index: _Optional[int] = ...) -> None: ...

class GenerationComplete(_message.Message):
    __slots__ = ("stop_reason", "generated_tokens", "input_tokens", "tokens_seen", "text", "time_to_first_token_s", "total_time_s", "error_message")
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SEEN_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TIME_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    stop_reason: StopReason
    generated_tokens: int
    input_tokens: int
    tokens_seen: int
    text: str
    time_to_first_token_s: float
    total_time_s: float
    error_message: str
    def __init__(self, stop_reason: _Optional[_Union[StopReason, str]] = ..., generated_tokens: _Optional[int] = ..., input_tokens: _Optional[int] = ..., tokens_seen: _Optional[int] = ..., text: _Optional[str] = ..., time_to_first_token_s: _Optional[float] = ..., total_time_s: _Optional[float] = ..., error_message: _Optional[str] = ...) -> None: ...

class Checkpointed(_message.Message):
    __slots__ = ("session_id", "tokens_seen", "bytes")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SEEN_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tokens_seen: int
    bytes: int
    def __init__(self, session_id: _Optional[str] = ..., tokens_seen: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class Closed(_message.Message):
    __slots__ = ("session_id", "tokens_seen")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SEEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tokens_seen: int
    def __init__(self, session_id: _Optional[str] = ..., tokens_seen: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "field", "message", "unprocessed_tokens")
    CODE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    UNPROCESSED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    field: str
    message: str
    unprocessed_tokens: int
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., field: _Optional[str] = ..., message: _Optional[str] = ..., unprocessed_tokens: _Optional[int] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("text", "add_bos", "return_pieces")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ADD_BOS_FIELD_NUMBER: _ClassVar[int]
    RETURN_PIECES_FIELD_NUMBER: _ClassVar[int]
    text: str
    add_bos: bool
    return_pieces: bool
    def __init__(self, text: _Optional[str] = ..., add_bos: _Optional[bool] = ..., return_pieces: _Optional[bool] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("ids", "pieces")
    IDS_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    pieces: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., pieces: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_sessions", "max_positions", "max_top_k", "max_new_tokens", "max_stop_sequences", "max_message_bytes", "max_cache_shapes", "session_ttl_s")
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CACHE_SHAPES_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_S_FIELD_NUMBER: _ClassVar[int]
    max_sessions: int
    max_positions: int
    max_top_k: int
    max_new_tokens: int
    max_stop_sequences: int
    max_message_bytes: int
    max_cache_shapes: int
    session_ttl_s: float
    def __init__(self, max_sessions: _Optional[int] = ..., max_positions: _Optional[int] = ..., max_top_k: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., max_stop_sequences: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_cache_shapes: _Optional[int] = ..., session_ttl_s: _Optional[float] = ...) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("name", "model_type", "vocab_size", "max_position_embeddings", "hidden_size", "num_layers", "bos_token_id", "eos_token_ids", "default_settings", "limits", "server_version", "has_chat_template")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITION_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    BOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_SETTINGS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    HAS_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    model_type: str
    vocab_size: int
    max_position_embeddings: int
    hidden_size: int
    num_layers: int
    bos_token_id: int
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    default_settings: SessionSettings
    limits: ServerLimits
    server_version: str
    has_chat_template: bool
    def __init__(self, name: _Optional[str] = ..., model_type: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_position_embeddings: _Optional[int] = ..., hidden_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., bos_token_id: _Optional[int] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., default_settings: _Optional[_Union[SessionSettings, _Mapping]] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., server_version: _Optional[str] = ..., has_chat_template: _Optional[bool] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "settings", "state", "attached", "tokens_seen", "pending_tokens", "mean_nll", "perplexity", "created_unix_s", "last_used_unix_s", "cache", "acked_seq")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SEEN_FIELD_NUMBER: _ClassVar[int]
    PENDING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEAN_NLL_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    ACKED_SEQ_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    settings: SessionSettings
    state: SessionState
    attached: bool
    tokens_seen: int
    pending_tokens: int
    mean_nll: float
    perplexity: float
    created_unix_s: float
    last_used_unix_s: float
    cache: CacheStats
    acked_seq: int
    def __init__(self, session_id: _Optional[str] = ..., settings: _Optional[_Union[SessionSettings, _Mapping]] = ..., state: _Optional[_Union[SessionState, str]] = ..., attached: _Optional[bool] = ..., tokens_seen: _Optional[int] = ..., pending_tokens: _Optional[int] = ..., mean_nll: _Optional[float] = ..., perplexity: _Optional[float] = ..., created_unix_s: _Optional[float] = ..., last_used_unix_s: _Optional[float] = ..., cache: _Optional[_Union[CacheStats, _Mapping]] = ..., acked_seq: _Optional[int] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[SessionInfo]
    def __init__(self, sessions: _Optional[_Iterable[_Union[SessionInfo, _Mapping]]] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ("tokens_seen",)
    TOKENS_SEEN_FIELD_NUMBER: _ClassVar[int]
    tokens_seen: int
    def __init__(self, tokens_seen: _Optional[int] = ...) -> None: ...
