"""Typed results and parameters of the sinkstream client (plain dataclasses; no protobuf, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc


class SinkStreamError(Exception):
    """A refused request or a failed call: gRPC status `code`, the request `field` at fault, `message`."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str = "") -> None:
        super().__init__(f"{code.name}: {field + ': ' if field else ''}{message}")
        self.code, self.field, self.message = code, field, message


@dataclass(frozen=True)
class TierSpec:
    """One memory tier: `slots` slots, each merging `ratio` slots of the level below."""

    slots: int
    ratio: int


@dataclass(frozen=True)
class SessionSettings:
    """A session's cache shape (None = server default) and what each chunk reports."""

    sink_tokens: int | None = None
    window: int | None = None
    chunk: int | None = None
    tiers: tuple[TierSpec, ...] = ()
    merge_policy: str = ""
    logprobs: bool = False
    top_k: int = 0
    embeddings: bool = False
    token_ids: bool = False


@dataclass(frozen=True)
class GenerateParams:
    """How to generate (0 / None fields take the server defaults; temperature 0 = greedy)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 0
    stop_sequences: tuple[str, ...] = ()
    include_stop_sequence: bool = False
    time_limit_ms: int = 0
    ignore_eos: bool = False
    # the assistant's turn of the session's conversation: generation prompt, stop at end of turn, reply
    # appended as the assistant message (the model needs a chat template)
    chat_reply: bool = False


@dataclass
class CacheStats:
    """Occupancy of a session's bounded cache (slots), and the bytes of the storage it is part of."""
    used: int
    capacity: int
    sink_used: int
    window_used: int
    tier_used: list[int]
    cache_bytes: int


@dataclass
class SessionOpened:
    """Answer to open / resume: the session's id, effective settings and progress so far."""
    session_id: str
    settings: SessionSettings
    resumed: bool
    tokens_seen: int
    cache: CacheStats | None
    acked_seq: int = 0  # highest acknowledged StreamRequest.seq of the session


@dataclass
class Acknowledged:
    """Every numbered request up to `seq` is durable on the server (handled by the session itself)."""
    seq: int


@dataclass
class ChunkResult:
    """One processed chunk. Per-token lists have num_tokens entries when the session asked for them;
    logprobs[0] of a session's very first chunk is NaN (nothing predicts the first token)."""

    num_tokens: int
    tokens_seen: int
    scored_tokens: int
    mean_nll: float
    perplexity: float
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_k_ids: list[list[int]] = field(default_factory=list)  # [num_tokens][k]
    top_k_logprobs: list[list[float]] = field(default_factory=list)  # [num_tokens][k]
    embedding: list[float] = field(default_factory=list)  # [hidden]
    cache: CacheStats | None = None
    request_id: str = ""


@dataclass
class Flushed:
    """Everything appended up to a flush is processed; running totals of the stream."""
    tokens_seen: int
    mean_nll: float
    perplexity: float


@dataclass
class GeneratedToken:
    """One generated token: id, the text it completes (may be empty), log-prob, index."""
    token_id: int
    text: str
    logprob: float
    index: int


@dataclass
class GenerationResult:
    """The end of a generation. stop_reason: MAX_TOKENS, EOS_TOKEN, STOP_SEQUENCE, CANCELLED, TIME_LIMIT
    or ERROR."""

    stop_reason: str
    generated_tokens: int
    input_tokens: int
    tokens_seen: int
    text: str
    time_to_first_token_s: float
    total_time_s: float
    error_message: str = ""
    tokens: list[GeneratedToken] = field(default_factory=list)


@dataclass
class Checkpointed:
    """The session was persisted: tokens it holds and bytes written."""
    session_id: str
    tokens_seen: int
    bytes: int


@dataclass
class Closed:
    """The session was closed and its state deleted."""
    session_id: str
    tokens_seen: int


@dataclass
class SessionInfo:
    """A session's settings and progress (GetSession / ListSessions); state RESIDENT or PERSISTED."""
    session_id: str
    settings: SessionSettings
    state: str  # RESIDENT | PERSISTED
    attached: bool
    tokens_seen: int
    pending_tokens: int
    mean_nll: float
    perplexity: float
    created_unix_s: float
    last_used_unix_s: float
    cache: CacheStats | None
    acked_seq: int = 0


@dataclass
class ModelInfo:
    """The served model, the defaults a session gets and the server's limits."""
    name: str
    model_type: str
    vocab_size: int
    max_position_embeddings: int
    hidden_size: int
    num_layers: int
    bos_token_id: int | None
    eos_token_ids: list[int]
    default_settings: SessionSettings
    limits: dict[str, float]
    server_version: str
    has_chat_template: bool = False
