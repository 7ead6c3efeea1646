"""Wire messages -> validated core objects (StreamConfig, SamplingParams, analysis options), and back.

Every rejection is a RequestError naming the offending request field, so a client sees e.g.
INVALID_ARGUMENT "open.settings.window: must be > 0".
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass

import grpc
import torch

from sinkstream.core.config import ConfigError, StreamConfig, TierSpec
from sinkstream.core.sampling import SamplingError, SamplingParams
from sinkstream.v1 import sinkstream_pb2 as pb

SESSION_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
MAX_REQUEST_ID_BYTES = 256  # request ids are echoed on every response: keep them from multiplying traffic


class RequestError(Exception):
    """A request the server refuses: a gRPC status code, the request field at fault and why."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str = "") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.code, self.field, self.message = code, field, message

    def to_pb(self) -> pb.Error:
        return pb.Error(code=self.code.value[0], field=self.field, message=self.message)


def invalid(field: str, message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message, field)


def is_exhaustion(exc: BaseException) -> bool:
    """Out of memory (host or device; torch.cuda.OutOfMemoryError is torch.OutOfMemoryError) or disk full."""
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return True
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def server_failure(exc: BaseException, what: str, field: str = "") -> RequestError:
    """An unexpected failure as a RequestError: RESOURCE_EXHAUSTED when memory or disk ran out, INTERNAL
    otherwise (never UNKNOWN); a RequestError passes through unchanged."""
    if isinstance(exc, RequestError):
        return exc
    code = grpc.StatusCode.RESOURCE_EXHAUSTED if is_exhaustion(exc) else grpc.StatusCode.INTERNAL
    return RequestError(code, f"{what}: {type(exc).__name__}: {exc}", field)


@dataclass(frozen=True)
class AnalysisOptions:
    """What each processed chunk reports (see AnalysisOptions in the .proto)."""

    logprobs: bool = False
    top_k: int = 0
    embeddings: bool = False
    token_ids: bool = False

    def to_pb(self) -> pb.AnalysisOptions:
        return pb.AnalysisOptions(logprobs=self.logprobs, top_k=self.top_k, embeddings=self.embeddings,
                                  token_ids=self.token_ids)


@dataclass(frozen=True)
class Limits:
    """What the server accepts; reported by ModelInfo."""

    max_sessions: int
    max_positions: int
    max_top_k: int
    max_new_tokens: int
    max_stop_sequences: int
    max_message_bytes: int
    max_cache_shapes: int
    session_ttl_s: float
    default_max_new_tokens: int = 64

    def to_pb(self) -> pb.ServerLimits:
        return pb.ServerLimits(
            max_sessions=self.max_sessions, max_positions=self.max_positions, max_top_k=self.max_top_k,
            max_new_tokens=self.max_new_tokens, max_stop_sequences=self.max_stop_sequences,
            max_message_bytes=self.max_message_bytes, max_cache_shapes=self.max_cache_shapes,
            session_ttl_s=self.session_ttl_s)


def analysis_from_pb(options: pb.AnalysisOptions, limits: Limits, field: str) -> AnalysisOptions:
    if options.top_k > limits.max_top_k:
        raise invalid(f"{field}.top_k", f"must be at most {limits.max_top_k}, got {options.top_k}")
    return AnalysisOptions(logprobs=options.logprobs, top_k=options.top_k, embeddings=options.embeddings,
                           token_ids=options.token_ids)


def stream_config_from_pb(settings: pb.SessionSettings, defaults: StreamConfig, limits: Limits,
                          field: str = "open.settings") -> StreamConfig:
    """The session's StreamConfig: given fields over server defaults, validated against the model."""
    config = StreamConfig(
        sink_tokens=settings.sink_tokens if settings.HasField("sink_tokens") else defaults.sink_tokens,
        window=settings.window if settings.HasField("window") else defaults.window,
        chunk=settings.chunk if settings.HasField("chunk") else defaults.chunk,
        tiers=tuple(TierSpec(t.slots, t.ratio) for t in settings.tiers),
        merge_policy=settings.merge_policy or defaults.merge_policy,
    )
    try:
        config.validate(limits.max_positions)
    except ConfigError as exc:
        raise invalid(f"{field}.{exc.field}", exc.message) from exc
    return config


def settings_to_pb(config: StreamConfig, analysis: AnalysisOptions) -> pb.SessionSettings:
    return pb.SessionSettings(
        sink_tokens=config.sink_tokens, window=config.window, chunk=config.chunk,
        tiers=[pb.TierSpec(slots=t.slots, ratio=t.ratio) for t in config.tiers],
        merge_policy=config.merge_policy, analysis=analysis.to_pb())


def check_session_id(session_id: str, field: str) -> str:
    if not SESSION_ID.match(session_id):
        raise invalid(field, "session ids are 1-128 characters of A-Z a-z 0-9 . _ -")
    return session_id


def check_request_id(request_id: str) -> None:
    size = len(request_id.encode())
    if size > MAX_REQUEST_ID_BYTES:
        raise invalid("request_id", f"must be at most {MAX_REQUEST_ID_BYTES} bytes (UTF-8), got {size}")


def sampling_from_pb(request: pb.Generate, limits: Limits) -> SamplingParams:
    """SamplingParams of a Generate request (0 / unset fields take their defaults), validated."""
    if request.max_new_tokens > limits.max_new_tokens:
        raise invalid("generate.max_new_tokens",
                      f"must be at most {limits.max_new_tokens}, got {request.max_new_tokens}")
    if len(request.stop_sequences) > limits.max_stop_sequences:
        raise invalid("generate.stop_sequences", f"at most {limits.max_stop_sequences} stop sequences")
    params = SamplingParams(
        temperature=request.temperature, top_k=request.top_k, top_p=request.top_p or 1.0,
        repetition_penalty=request.repetition_penalty or 1.0,
        seed=request.seed if request.HasField("seed") else None,
        # unset: the default, but never above the server's limit (a server may allow fewer than 64)
        max_new_tokens=request.max_new_tokens or min(limits.default_max_new_tokens, limits.max_new_tokens),
        stop_sequences=tuple(request.stop_sequences), include_stop=request.include_stop_sequence,
        stop_on_eos=not request.ignore_eos)
    try:
        params.validate()
    except SamplingError as exc:
        raise invalid(f"generate.{exc.field}", str(exc).split(": ", 1)[-1]) from exc
    return params
