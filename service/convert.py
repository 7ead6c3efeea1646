"""The one place protobuf messages are built and read: wire requests -> validated plain requests and
core objects (StreamConfig, SamplingParams, AnalysisOptions), and plain replies -> wire messages.

Every rejection is a RequestError naming the offending request field, so a client sees e.g.
INVALID_ARGUMENT "open.settings.window: must be > 0".
"""

from __future__ import annotations

import math

import grpc

from sinkstream.core.config import ConfigError, StreamConfig, TierSpec
from sinkstream.core.sampling import SamplingError, SamplingParams
from sinkstream.core.streaming import RowStats
from sinkstream.core.tiers import validate_tiers
from sinkstream.service.errors import RequestError, invalid, shown_id
from sinkstream.service.model_facts import ModelFacts
from sinkstream.service.options import AnalysisOptions, Limits
from sinkstream.service.replies import (
    AckReply,
    CheckpointedReply,
    ChunkReply,
    ClosedReply,
    ErrorReply,
    FlushedReply,
    GenerationReply,
    Reply,
    TokenReply,
)
from sinkstream.service.requests import (
    AppendMessage,
    AppendText,
    AppendTokens,
    CancelRequest,
    CheckpointRequest,
    CloseRequest,
    GenerateRequest,
    MisplacedStart,
    OpenRequest,
    ResumeRequest,
    StartRequest,
    StreamRequest,
)
from sinkstream.service.session import Session, is_valid_session_id
from sinkstream.v1 import sinkstream_pb2 as pb

MAX_REQUEST_ID_BYTES = 256  # request ids are echoed on every response: keep them from multiplying traffic


# ---------------------------------------------------------------------- wire -> plain
def check_session_id(session_id: str, field: str) -> str:
    """`session_id` if it is a valid session id; INVALID_ARGUMENT naming `field` otherwise."""
    if not is_valid_session_id(session_id):
        raise invalid(field, f"session ids are 1-128 characters of A-Z a-z 0-9 . _ -, not starting with . or "
                             f"-; got {shown_id(session_id)} ({len(session_id)} characters)")
    return session_id


def check_request_id(request_id: str) -> None:
    size = len(request_id.encode())
    if size > MAX_REQUEST_ID_BYTES:
        raise invalid("request_id", f"must be at most {MAX_REQUEST_ID_BYTES} bytes (UTF-8), got {size}")


def request_kind(request: pb.StreamRequest) -> str:
    """The request's kind for metrics: the field set in StreamRequest.kind, or "empty"."""
    return request.WhichOneof("kind") or "empty"


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
        kv_dtype=defaults.kv_dtype,  # the server's (serve --kv-dtype); not a per-session setting
        keep_rotated_keys=defaults.keep_rotated_keys,  # the server's too (serve --keep-rotated-keys)
    )
    try:
        config.validate(limits.max_positions, chunk_within_window=True)
        if config.tiers:
            validate_tiers(config)  # what the engine would refuse when built, refused now by name
    except ConfigError as exc:
        raise invalid(f"{field}.{exc.field}", exc.message) from exc
    return config


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


def start_request_from_pb(first: pb.StreamRequest, defaults: StreamConfig, limits: Limits) -> StartRequest:
    """The first request of a stream: open or resume, validated."""
    check_request_id(first.request_id)
    kind = first.WhichOneof("kind")
    if kind == "open":
        request = first.open
        config = stream_config_from_pb(request.settings, defaults, limits)
        analysis = analysis_from_pb(request.settings.analysis, limits, "open.settings.analysis")
        session_id = check_session_id(request.session_id, "open.session_id") if request.session_id else ""
        seed = request.seed if request.HasField("seed") else None
        if seed is not None and seed >= 2**63:
            raise invalid("open.seed", "must be below 2^63")
        system = request.system_message if request.HasField("system_message") else None
        pin = request.pin_system if request.HasField("pin_system") else True
        return OpenRequest(first.request_id, session_id, config, analysis, seed, system, pin)
    if kind == "resume":
        request = first.resume
        check_session_id(request.session_id, "resume.session_id")
        analysis = (analysis_from_pb(request.analysis, limits, "resume.analysis")
                    if request.HasField("analysis") else None)
        results_after = request.results_after if request.HasField("results_after") else None
        return ResumeRequest(first.request_id, request.session_id, analysis, results_after)
    raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                       f"the first request of a stream must be open or resume, got {kind}", "kind")


def stream_request_from_pb(request: pb.StreamRequest, limits: Limits) -> StreamRequest:
    """A later request of a stream, validated (a cancel carries no request id to check)."""
    kind = request.WhichOneof("kind")
    if kind == "cancel":
        return CancelRequest()
    check_request_id(request.request_id)
    rid = request.request_id
    if kind == "append_text":
        return AppendText(rid, request.append_text.text, request.append_text.flush, request.seq)
    if kind == "append_tokens":
        return AppendTokens(rid, list(request.append_tokens.ids), request.append_tokens.flush, request.seq)
    if kind == "append_message":
        message = request.append_message
        return AppendMessage(rid, message.role, message.content, message.flush, request.seq)
    if kind == "generate":
        params = sampling_from_pb(request.generate, limits)
        limit_ms = request.generate.time_limit_ms
        return GenerateRequest(rid, params, limit_ms / 1000 if limit_ms else None,
                               chat_reply=request.generate.chat_reply, seq=request.seq)
    if kind == "checkpoint":
        return CheckpointRequest(rid)
    if kind == "close":
        return CloseRequest(rid)
    if kind in ("open", "resume"):
        return MisplacedStart(kind)
    raise invalid("kind", "empty request: set one of the fields of StreamRequest.kind")


# ---------------------------------------------------------------------- plain -> wire
def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def error_to_pb(error: RequestError, unprocessed_tokens: int = 0) -> pb.Error:
    return pb.Error(code=error.code.value[0], field=error.field, message=error.message,
                    unprocessed_tokens=unprocessed_tokens)


def analysis_to_pb(analysis: AnalysisOptions) -> pb.AnalysisOptions:
    return pb.AnalysisOptions(logprobs=analysis.logprobs, top_k=analysis.top_k,
                              embeddings=analysis.embeddings, token_ids=analysis.token_ids)


def settings_to_pb(config: StreamConfig, analysis: AnalysisOptions) -> pb.SessionSettings:
    return pb.SessionSettings(
        sink_tokens=config.sink_tokens, window=config.window, chunk=config.chunk,
        tiers=[pb.TierSpec(slots=t.slots, ratio=t.ratio) for t in config.tiers],
        merge_policy=config.merge_policy, analysis=analysis_to_pb(analysis))


def limits_to_pb(limits: Limits) -> pb.ServerLimits:
    return pb.ServerLimits(
        max_sessions=limits.max_sessions, max_positions=limits.max_positions, max_top_k=limits.max_top_k,
        max_new_tokens=limits.max_new_tokens, max_stop_sequences=limits.max_stop_sequences,
        max_message_bytes=limits.max_message_bytes, max_cache_shapes=limits.max_cache_shapes,
        session_ttl_s=limits.session_ttl_s)


def cache_to_pb(s: RowStats) -> pb.CacheStats:
    return pb.CacheStats(used=s.cache_used, capacity=s.cache_capacity, sink_used=s.sink_used,
                         window_used=s.window_used, tier_used=s.tier_used, cache_bytes=s.cache_bytes)


def _chunk_to_pb(r: ChunkReply) -> pb.ChunkResult:
    msg = pb.ChunkResult(num_tokens=r.num_tokens, tokens_seen=r.tokens_seen, mean_nll=r.mean_nll,
                         perplexity=r.perplexity, scored_tokens=r.scored_tokens)
    if r.token_ids is not None:
        msg.token_ids.extend(r.token_ids)
    if r.logprobs is not None:
        msg.logprobs.extend(r.logprobs)
    if r.top_k:
        msg.top_k = r.top_k
        msg.top_k_ids.extend(r.top_k_ids)
        msg.top_k_logprobs.extend(r.top_k_logprobs)
    if r.embedding is not None:
        msg.embedding.extend(r.embedding)
    msg.cache.CopyFrom(cache_to_pb(r.cache))
    return msg


def reply_to_pb(reply: Reply) -> pb.StreamResponse:
    """The StreamResponse carrying a reply of the scheduler or a session."""
    rid = reply.request_id
    if isinstance(reply, ChunkReply):
        return pb.StreamResponse(request_id=rid, chunk=_chunk_to_pb(reply))
    if isinstance(reply, TokenReply):
        return pb.StreamResponse(request_id=rid, token=pb.GeneratedToken(
            token_id=reply.token_id, text=reply.text, logprob=reply.logprob, index=reply.index))
    if isinstance(reply, GenerationReply):
        return pb.StreamResponse(request_id=rid, generation_complete=pb.GenerationComplete(
            stop_reason=pb.StopReason.Value(f"STOP_REASON_{reply.stop_reason}"),
            generated_tokens=reply.generated_tokens, input_tokens=reply.input_tokens,
            tokens_seen=reply.tokens_seen, text=reply.text, time_to_first_token_s=reply.time_to_first_token_s,
            total_time_s=reply.total_time_s, error_message=reply.error_message))
    if isinstance(reply, FlushedReply):
        return pb.StreamResponse(request_id=rid, flushed=pb.Flushed(
            tokens_seen=reply.tokens_seen, mean_nll=reply.mean_nll, perplexity=reply.perplexity))
    if isinstance(reply, CheckpointedReply):
        return pb.StreamResponse(request_id=rid, checkpointed=pb.Checkpointed(
            session_id=reply.session_id, tokens_seen=reply.tokens_seen, bytes=reply.bytes))
    if isinstance(reply, ClosedReply):
        return pb.StreamResponse(request_id=rid, closed=pb.Closed(session_id=reply.session_id,
                                                                  tokens_seen=reply.tokens_seen))
    if isinstance(reply, AckReply):
        return pb.StreamResponse(request_id=rid, ack=pb.Acknowledged(seq=reply.seq))
    if isinstance(reply, ErrorReply):
        return pb.StreamResponse(request_id=rid, error=error_to_pb(reply.error, reply.unprocessed_tokens))
    raise TypeError(f"not a reply: {reply!r}")


def session_opened_to_pb(request_id: str, session: Session, resumed: bool) -> pb.StreamResponse:
    opened = pb.SessionOpened(session_id=session.id,
                              settings=settings_to_pb(session.config, session.analysis),
                              resumed=resumed, tokens_seen=session.tokens_seen(),
                              acked_seq=session.seqs.acked)
    cache = session.cache_stats()
    if cache is not None:
        opened.cache.CopyFrom(cache_to_pb(cache))
    return pb.StreamResponse(request_id=request_id, session_opened=opened)


def session_info_to_pb(session: Session) -> pb.SessionInfo:
    tokens, nll = session.counters()
    info = pb.SessionInfo(
        session_id=session.id, settings=settings_to_pb(session.config, session.analysis),
        state=pb.SESSION_STATE_RESIDENT if session.resident else pb.SESSION_STATE_PERSISTED,
        attached=session.attached, tokens_seen=tokens, pending_tokens=len(session.pending), mean_nll=nll,
        perplexity=_exp(nll), created_unix_s=session.created, last_used_unix_s=session.last_used,
        acked_seq=session.seqs.acked)
    cache = session.cache_stats()
    if cache is not None:
        info.cache.CopyFrom(cache_to_pb(cache))
    return info


def model_info_to_pb(facts: ModelFacts) -> pb.ModelInfoResponse:
    info = pb.ModelInfoResponse(
        name=facts.name, model_type=facts.model_type, vocab_size=facts.vocab_size,
        max_position_embeddings=facts.max_position_embeddings, hidden_size=facts.hidden_size,
        num_layers=facts.num_layers, eos_token_ids=facts.eos_token_ids,
        default_settings=settings_to_pb(facts.default_settings, AnalysisOptions()),
        limits=limits_to_pb(facts.limits), server_version=facts.server_version,
        has_chat_template=facts.has_chat_template)
    if facts.bos_token_id is not None:
        info.bos_token_id = facts.bos_token_id
    return info


def tokenize_to_pb(ids: list[int], pieces: list[str] | None) -> pb.TokenizeResponse:
    response = pb.TokenizeResponse(ids=ids)
    if pieces is not None:
        response.pieces.extend(pieces)
    return response


def list_sessions_to_pb(sessions: list[Session], unrecovered: list[str] = ()) -> pb.ListSessionsResponse:
    """Every live session; one not recovered yet since a restart (its state is in its write-ahead log)
    is listed with its id and state PERSISTED only (GetSession or a resume recovers it)."""
    infos = [session_info_to_pb(s) for s in sessions]
    infos += [pb.SessionInfo(session_id=i, state=pb.SESSION_STATE_PERSISTED) for i in unrecovered]
    return pb.ListSessionsResponse(sessions=infos)


def delete_session_to_pb(tokens_seen: int) -> pb.DeleteSessionResponse:
    return pb.DeleteSessionResponse(tokens_seen=tokens_seen)
