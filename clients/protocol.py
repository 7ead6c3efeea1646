"""The client's protocol, independent of transport: channel options, request building, response
interpretation, error mapping and a session's bookkeeping across its calls (numbering, replay and
de-duplication after an automatic resume, with resume.py). The sync (client.py) and asyncio (aio.py)
clients are thin transports over it, so they cannot drift apart."""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import Message

from sinkstream.clients.results import (
    Acknowledged,
    CacheStats,
    Checkpointed,
    ChunkResult,
    Closed,
    Flushed,
    GeneratedToken,
    GenerateParams,
    GenerationResult,
    ModelInfo,
    SessionInfo,
    SessionOpened,
    SessionSettings,
    SinkStreamError,
    TierSpec,
)
from sinkstream.clients.resume import RESUMABLE, Delivered, ReplayBuffer, ResumePolicy, new_token
from sinkstream.v1 import sinkstream_pb2 as pb

T = TypeVar("T")
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
FILE_BLOCK_CHARS = 1 << 16  # text per AppendText when streaming a file

Progress = Callable[[int, "int | None"], None]  # (bytes sent, total bytes or None when unknown)


def read_text_blocks(path: str | os.PathLike, block_chars: int = FILE_BLOCK_CHARS) -> Iterator[str]:
    """A UTF-8 file as text blocks; the server's incremental tokenizer makes block cuts invisible."""
    with open(path, encoding="utf-8", newline="") as f:
        while block := f.read(block_chars):
            yield block


# Calls that are safe to repeat: the read-only unary calls, and `Stream` before the server has answered
# anything (gRPC never retries a call once a response has arrived, so a running session is never replayed).
RETRYABLE_METHODS = ("Tokenize", "ModelInfo", "GetSession", "ListSessions", "Stream")


def retry_service_config(max_attempts: int, initial_backoff_s: float = 0.2,
                         max_backoff_s: float = 5.0) -> str:
    """gRPC service config: retry RETRYABLE_METHODS on UNAVAILABLE (server restarting, connection refused)
    with exponential backoff (randomised by gRPC, up to `max_backoff_s`), `max_attempts` tries in all."""
    policy = {"maxAttempts": max_attempts, "initialBackoff": f"{initial_backoff_s}s",
              "maxBackoff": f"{max_backoff_s}s", "backoffMultiplier": 2,
              "retryableStatusCodes": ["UNAVAILABLE"]}
    names = [{"service": "sinkstream.v1.SinkStream", "method": m} for m in RETRYABLE_METHODS]
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                    keepalive_ms: int = 30_000, retry_attempts: int = 5) -> list[tuple[str, int | str]]:
    """Client channel arguments: large messages both ways; keepalive pings every `keepalive_ms` (the
    server accepts pings every 10 s, so this never triggers a too_many_pings GOAWAY); retries on
    UNAVAILABLE for calls safe to repeat (`retry_attempts` <= 1: none)."""
    retries: list[tuple[str, int | str]] = [("grpc.enable_retries", 0)]
    if retry_attempts > 1:
        retries = [("grpc.enable_retries", 1), ("grpc.service_config", retry_service_config(retry_attempts))]
    return retries + [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


# ---------------------------------------------------------------------- routing
SESSION_ID_HEADER = "x-session-id"  # gRPC metadata a consistent-hash proxy routes on (the server ignores it)

Metadata = tuple[tuple[str, str], ...]
MAX_ROUTED_ID_CHARS = 1024  # far above any id a server accepts, far below gRPC's 8 KiB of metadata


def routing_metadata(session_id: str | None) -> Metadata:
    """The metadata that routes a call about `session_id` to the replica holding the session, through a
    proxy that hashes `x-session-id` (HAProxy `balance hdr(x-session-id)`, Envoy `ring_hash`). Empty when
    the id is unknown (an open whose id the server will assign: the proxy balances it as it likes; the
    client sends the assigned id on every later call) or cannot be a header value, or is too long to be
    one (the server then refuses the id itself, as it would without a proxy)."""
    if session_id and len(session_id) <= MAX_ROUTED_ID_CHARS and session_id.isascii() \
            and session_id.isprintable():
        return ((SESSION_ID_HEADER, session_id),)
    return ()


# grpc-python (C-core, gRFC A76) hashes a request header in its client-side `ring_hash` policy only while
# this is "true" in the environment of the process when gRPC reads it (set it before the first channel)
RING_HASH_ENV = "GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY"


def ring_hash_channel_options(retry_attempts: int = 5, **options) -> list[tuple[str, int | str]]:
    """channel_options for one channel to every replica, without a proxy: gRPC's client-side `ring_hash`
    places each call on a consistent ring of the channel's addresses by its `x-session-id` (calls without
    it go to a random replica). The target lists the replicas, e.g. "ipv4:10.0.0.1:50051,10.0.0.2:50051"
    or "dns:///sinkstream-replicas.ns.svc.cluster.local:50051"; the ring hashes their IP addresses. Needs
    RING_HASH_ENV=true (see above)."""
    merged = dict(channel_options(retry_attempts=retry_attempts, **options))
    config = json.loads(str(merged.get("grpc.service_config", "{}")))
    config["loadBalancingConfig"] = [{"ring_hash_experimental": {"requestHashHeader": SESSION_ID_HEADER}}]
    merged["grpc.service_config"] = json.dumps(config)
    return list(merged.items())


def stream_metadata(first: pb.StreamRequest) -> Metadata:
    """Routing metadata of a `Stream` call opened by `first`: the id of a resume, or of an open whose id
    the client chose."""
    kind = first.WhichOneof("kind")
    if kind == "open":
        return routing_metadata(first.open.session_id)
    if kind == "resume":
        return routing_metadata(first.resume.session_id)
    return ()


# ---------------------------------------------------------------------- requests
def settings_to_pb(s: SessionSettings) -> pb.SessionSettings:
    msg = pb.SessionSettings(
        tiers=[pb.TierSpec(slots=t.slots, ratio=t.ratio) for t in s.tiers], merge_policy=s.merge_policy,
        analysis=pb.AnalysisOptions(logprobs=s.logprobs, top_k=s.top_k, embeddings=s.embeddings,
                                    token_ids=s.token_ids))
    for name in ("sink_tokens", "window", "chunk"):
        if getattr(s, name) is not None:
            setattr(msg, name, getattr(s, name))
    return msg


def open_request(settings: SessionSettings | None, seed: int | None, session_id: str | None,
                 request_id: str = "open", system_message: str | None = None,
                 pin_system: bool | None = None) -> pb.StreamRequest:
    request = pb.OpenSession(settings=settings_to_pb(settings or SessionSettings()),
                             session_id=session_id or "")
    if seed is not None:
        request.seed = seed
    if system_message is not None:
        request.system_message = system_message
    if pin_system is not None:
        request.pin_system = pin_system
    return pb.StreamRequest(request_id=request_id, open=request)


def resume_request(session_id: str, settings: SessionSettings | None = None,
                   request_id: str = "resume", results_after: int | None = None) -> pb.StreamRequest:
    """Resume; `settings` given replaces the session's analysis options (its cache shape is fixed);
    `results_after`: the stream position the caller has results up to (a recovered session sends the
    results of its replayed log past it again)."""
    request = pb.ResumeSession(session_id=session_id, results_after=results_after)
    if settings is not None:
        request.analysis.CopyFrom(settings_to_pb(settings).analysis)
    return pb.StreamRequest(request_id=request_id, resume=request)


def generate_request(p: GenerateParams, request_id: str) -> pb.StreamRequest:
    msg = pb.Generate(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                      repetition_penalty=p.repetition_penalty, max_new_tokens=p.max_new_tokens,
                      stop_sequences=list(p.stop_sequences), include_stop_sequence=p.include_stop_sequence,
                      time_limit_ms=p.time_limit_ms, ignore_eos=p.ignore_eos, chat_reply=p.chat_reply)
    if p.seed is not None:
        msg.seed = p.seed
    return pb.StreamRequest(request_id=request_id, generate=msg)


def append_text_request(text: str, flush: bool) -> pb.StreamRequest:
    return pb.StreamRequest(append_text=pb.AppendText(text=text, flush=flush))


def append_tokens_request(ids: Iterable[int], flush: bool) -> pb.StreamRequest:
    return pb.StreamRequest(append_tokens=pb.AppendTokens(ids=list(ids), flush=flush))


def append_message_request(role: str, content: str, flush: bool) -> pb.StreamRequest:
    return pb.StreamRequest(append_message=pb.AppendMessage(role=role, content=content, flush=flush))


def cancel_request() -> pb.StreamRequest:
    return pb.StreamRequest(cancel=pb.CancelGeneration())


def checkpoint_request() -> pb.StreamRequest:
    return pb.StreamRequest(checkpoint=pb.Checkpoint())


def close_request() -> pb.StreamRequest:
    return pb.StreamRequest(close=pb.Close())


# ---------------------------------------------------------------------- unary calls
SERVICE_PATH = "/sinkstream.v1.SinkStream/"


@dataclass(frozen=True)
class UnaryCall(Generic[T]):
    """One unary call, ready for any transport: the method's full path, the request, the response type,
    how the response becomes the caller's result, and the metadata to send (routing)."""

    path: str
    request: Message
    response_type: type[Message]
    interpret: Callable[[Any], T]
    metadata: Metadata = ()


def tokenize_call(text: str, add_bos: bool) -> UnaryCall[list[int]]:
    return UnaryCall(SERVICE_PATH + "Tokenize", pb.TokenizeRequest(text=text, add_bos=add_bos),
                     pb.TokenizeResponse, lambda r: list(r.ids))


def model_info_call() -> UnaryCall[ModelInfo]:
    return UnaryCall(SERVICE_PATH + "ModelInfo", pb.ModelInfoRequest(), pb.ModelInfoResponse,
                     model_info_from_pb)


def get_session_call(session_id: str) -> UnaryCall[SessionInfo]:
    return UnaryCall(SERVICE_PATH + "GetSession", pb.GetSessionRequest(session_id=session_id),
                     pb.SessionInfo, session_info_from_pb, routing_metadata(session_id))


def list_sessions_call() -> UnaryCall[list[SessionInfo]]:
    return UnaryCall(SERVICE_PATH + "ListSessions", pb.ListSessionsRequest(), pb.ListSessionsResponse,
                     lambda r: [session_info_from_pb(s) for s in r.sessions])


def delete_session_call(session_id: str) -> UnaryCall[int]:
    return UnaryCall(SERVICE_PATH + "DeleteSession", pb.DeleteSessionRequest(session_id=session_id),
                     pb.DeleteSessionResponse, lambda r: r.tokens_seen, routing_metadata(session_id))


def health_call(service: str) -> UnaryCall[str]:
    """grpc.health.v1 Check; the result is the status name, e.g. "SERVING"."""
    from grpc_health.v1 import health_pb2  # grpcio-health-checking: only this call needs it

    return UnaryCall("/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest(service=service),
                     health_pb2.HealthCheckResponse,
                     lambda r: health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))


def unary_callable(channel: grpc.Channel | grpc.aio.Channel, call: UnaryCall):
    """The channel's multi-callable for `call` (sync or asyncio, as the channel is)."""
    return channel.unary_unary(call.path, request_serializer=type(call.request).SerializeToString,
                               response_deserializer=call.response_type.FromString)


# ---------------------------------------------------------------------- responses
def settings_from_pb(s: pb.SessionSettings) -> SessionSettings:
    a = s.analysis
    return SessionSettings(
        sink_tokens=s.sink_tokens if s.HasField("sink_tokens") else None,
        window=s.window if s.HasField("window") else None, chunk=s.chunk if s.HasField("chunk") else None,
        tiers=tuple(TierSpec(t.slots, t.ratio) for t in s.tiers), merge_policy=s.merge_policy,
        logprobs=a.logprobs, top_k=a.top_k, embeddings=a.embeddings, token_ids=a.token_ids)


def cache_from_pb(parent) -> CacheStats | None:
    if not parent.HasField("cache"):
        return None
    c = parent.cache
    return CacheStats(used=c.used, capacity=c.capacity, sink_used=c.sink_used, window_used=c.window_used,
                      tier_used=list(c.tier_used), cache_bytes=c.cache_bytes)


def _rows(flat, k: int) -> list[list]:
    values = list(flat)
    return [values[i:i + k] for i in range(0, len(values), k)] if k else []


def chunk_from_pb(c: pb.ChunkResult, request_id: str) -> ChunkResult:
    return ChunkResult(
        num_tokens=c.num_tokens, tokens_seen=c.tokens_seen, scored_tokens=c.scored_tokens,
        mean_nll=c.mean_nll, perplexity=c.perplexity, token_ids=list(c.token_ids), logprobs=list(c.logprobs),
        top_k_ids=_rows(c.top_k_ids, c.top_k), top_k_logprobs=_rows(c.top_k_logprobs, c.top_k),
        embedding=list(c.embedding), cache=cache_from_pb(c), request_id=request_id)


def error_from_pb(e: pb.Error) -> SinkStreamError:
    return SinkStreamError(_STATUS_BY_VALUE.get(e.code, grpc.StatusCode.UNKNOWN), e.message, e.field)


_STATUS_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def response_from_pb(r: pb.StreamResponse):
    """The dataclass for one StreamResponse (an Error becomes a SinkStreamError instance, not raised)."""
    kind = r.WhichOneof("kind")
    if kind == "chunk":
        return chunk_from_pb(r.chunk, r.request_id)
    if kind == "token":
        t = r.token
        return GeneratedToken(token_id=t.token_id, text=t.text, logprob=t.logprob, index=t.index)
    if kind == "flushed":
        f = r.flushed
        return Flushed(tokens_seen=f.tokens_seen, mean_nll=f.mean_nll, perplexity=f.perplexity)
    if kind == "generation_complete":
        g = r.generation_complete
        return GenerationResult(
            stop_reason=pb.StopReason.Name(g.stop_reason).removeprefix("STOP_REASON_"),
            generated_tokens=g.generated_tokens, input_tokens=g.input_tokens, tokens_seen=g.tokens_seen,
            text=g.text, time_to_first_token_s=g.time_to_first_token_s, total_time_s=g.total_time_s,
            error_message=g.error_message)
    if kind == "session_opened":
        o = r.session_opened
        return SessionOpened(session_id=o.session_id, settings=settings_from_pb(o.settings),
                             resumed=o.resumed, tokens_seen=o.tokens_seen, cache=cache_from_pb(o),
                             acked_seq=o.acked_seq)
    if kind == "checkpointed":
        c = r.checkpointed
        return Checkpointed(session_id=c.session_id, tokens_seen=c.tokens_seen, bytes=c.bytes)
    if kind == "closed":
        return Closed(session_id=r.closed.session_id, tokens_seen=r.closed.tokens_seen)
    if kind == "error":
        return error_from_pb(r.error)
    if kind == "ack":
        return Acknowledged(seq=r.ack.seq)
    raise SinkStreamError(grpc.StatusCode.UNIMPLEMENTED, f"unknown response kind {kind!r} (newer server?)")


def session_info_from_pb(s: pb.SessionInfo) -> SessionInfo:
    return SessionInfo(
        session_id=s.session_id, settings=settings_from_pb(s.settings),
        state=pb.SessionState.Name(s.state).removeprefix("SESSION_STATE_"), attached=s.attached,
        tokens_seen=s.tokens_seen, pending_tokens=s.pending_tokens, mean_nll=s.mean_nll,
        perplexity=s.perplexity, created_unix_s=s.created_unix_s, last_used_unix_s=s.last_used_unix_s,
        cache=cache_from_pb(s), acked_seq=s.acked_seq)


def model_info_from_pb(m: pb.ModelInfoResponse) -> ModelInfo:
    return ModelInfo(
        name=m.name, model_type=m.model_type, vocab_size=m.vocab_size,
        max_position_embeddings=m.max_position_embeddings, hidden_size=m.hidden_size, num_layers=m.num_layers,
        bos_token_id=m.bos_token_id if m.HasField("bos_token_id") else None,
        eos_token_ids=list(m.eos_token_ids), default_settings=settings_from_pb(m.default_settings),
        limits={f.name: getattr(m.limits, f.name) for f in m.limits.DESCRIPTOR.fields},
        server_version=m.server_version, has_chat_template=m.has_chat_template)


def rpc_error(exc: grpc.RpcError) -> SinkStreamError:
    """A failed call as a SinkStreamError (the server puts "field: message" in the details)."""
    details = exc.details() or ""
    field, sep, message = details.partition(": ")
    if not sep or " " in field:
        field, message = "", details
    return SinkStreamError(exc.code(), message, field)


def stream_ended_error(code: grpc.StatusCode | None, details: str | None) -> SinkStreamError:
    """The stream ended before the awaited answer: the call's status (UNAVAILABLE when it had none)."""
    if code is None or code == grpc.StatusCode.OK:
        return SinkStreamError(grpc.StatusCode.UNAVAILABLE, details or "the server ended the stream")
    return SinkStreamError(code, details or "the stream has ended")


def drain_error(exc: grpc.RpcError) -> SinkStreamError | None:
    """What a failure while draining a stream being ended means: nothing if the call was cancelled."""
    return None if exc.code() == grpc.StatusCode.CANCELLED else rpc_error(exc)


# ---------------------------------------------------------------------- a session stream's bookkeeping
_ANSWER_KINDS = ((Flushed, "flushed"), (GenerationResult, "generation_complete"),
                 (Checkpointed, "checkpointed"), (Closed, "closed"))


class SessionProtocol:
    """The state of one session across its `Stream` calls, whatever the transport: request ids and
    sequence numbers, the replay buffer and what was delivered (resume.py), the chunk results read while
    waiting for another answer, the last flush and generation. The transports (client.Session,
    aio.AsyncSession) move the messages, call these steps on each response, and when a call fails with a
    resumable status open a new one (ResumeSession) and send what `_resumed` returns."""

    def __init__(self, policy: ResumePolicy | None = None) -> None:
        self.policy = policy or ResumePolicy()
        self._ids = (str(i) for i in itertools.count(1))
        self._ids_lock = threading.Lock()  # cancel_generation may stamp from another thread
        self._ended = False
        self._chunks: list[ChunkResult] = []  # results read while waiting for something else
        self._tokens: list[GeneratedToken] = []  # of the running generation
        self._replay = ReplayBuffer(self.policy)
        self._delivered = Delivered(0)
        self._cancel_pending = False  # a CancelGeneration was sent and its generation has not ended
        self._stream_no = 0  # how many times the session was resumed on a new call by this object
        self._gone = False  # a resume found the session gone
        self.opened: SessionOpened | None = None
        self.id = ""
        self.last_flush: Flushed | None = None  # set by append_*/flush/stream_*
        self.last_generation: GenerationResult | None = None  # set by generate/generate_stream

    @property
    def resumes(self) -> int:
        """How many times this session resumed on its own after a failed call."""
        return self._stream_no

    def _stamp(self, request: pb.StreamRequest) -> int:
        """Give `request` its request id and (state-changing ones, once the session is open) its seq;
        returns the number of the stream it was numbered on. Raises when the stream has ended."""
        if self._ended:
            raise SinkStreamError(grpc.StatusCode.FAILED_PRECONDITION, "the session's stream has ended")
        with self._ids_lock:
            request.request_id = request.request_id or next(self._ids)
            if self.opened is not None:
                self._replay.number(request)
                self._cancel_pending = self._cancel_pending or request.HasField("cancel")
            return self._stream_no

    def _replay_full(self) -> bool:
        """Whether sending must wait for acks (the replay buffer is at its cap)."""
        with self._ids_lock:
            return self._replay.full() and not self._replay.give_up_if_never_acked()

    def _interpret(self, response: pb.StreamResponse):
        """The dataclass of one response, or None for what the caller must not see (acks, what a resumed
        stream delivers again, a request's UNAVAILABLE error while the stream ends and will be resumed);
        an Error is raised as SinkStreamError."""
        result = response_from_pb(response)
        rid = response.request_id
        with self._ids_lock:
            if isinstance(result, Acknowledged):
                self._replay.on_ack(result.seq)
                self._acknowledged()
                return None
            if isinstance(result, SinkStreamError):
                if result.code == grpc.StatusCode.UNAVAILABLE and self._auto_resume():
                    return None  # the server is stopping: the call ends next, and the request is replayed
                self._replay.on_error(rid)
                raise result
            if isinstance(result, ChunkResult):
                return self._delivered.chunk(result)
            if isinstance(result, GeneratedToken):
                stale = self._replay.answered(rid) or not new_token(result, self._tokens)
                return None if stale else result
            for kind, name in _ANSWER_KINDS:
                if isinstance(result, kind) and not self._replay.on_answer(rid, name):
                    return None
            if isinstance(result, GenerationResult):
                self._delivered.generated_to(result.tokens_seen)
                self._cancel_pending = False
            return result

    def _acknowledged(self) -> None:
        """Called (under the state lock) when an ack arrives; transports wake a sender waiting for room."""

    def _auto_resume(self) -> bool:
        return self.policy.resume_timeout_s > 0 and self._replay.durable and bool(self.id)

    def _may_resume(self, error: SinkStreamError) -> bool:
        """Whether a call that failed with `error` is resumed (not after the caller's own abort)."""
        return not self._ended and self._auto_resume() and error.code in RESUMABLE

    def _resume_failed(self, cause: SinkStreamError, last: SinkStreamError | None,
                       gave_up: bool) -> SinkStreamError:
        """The error a session that could not resume raises (and marks the stream ended): `last` is the
        last attempt's failure; gave_up: the policy's time ran out."""
        if last is not None and last.code == grpc.StatusCode.NOT_FOUND:
            why = "the session is gone from the server (unknown, closed or expired)"
            self._gone = True
        elif gave_up:
            why = f"gave up after {self.policy.resume_timeout_s:g} s"
            why += f"; last attempt: {last}" if last else ""
        else:
            why = str(last)
        code = cause.code if gave_up or last is None else last.code
        return self._failed(SinkStreamError(code, f"session {self.id[:64]} could not be resumed after "
                                            f"the call failed ({cause}): {why}"))

    def _auto_resume_request(self) -> pb.StreamRequest:
        """The ResumeSession of an automatic resume: it asks for the results past what was delivered
        (results in flight when the server died are sent again if it recovers the session)."""
        with self._ids_lock:
            return resume_request(self.id, results_after=self._delivered.position)

    def _resumed(self, result) -> list[pb.StreamRequest]:
        """Book the SessionOpened of an automatic resume; returns the requests to send on the new call,
        in order. Called by the transport under the state lock, before it makes the new call current."""
        if not isinstance(result, SessionOpened):
            raise SinkStreamError(grpc.StatusCode.INTERNAL, f"expected SessionOpened, got {result!r}")
        resend = self._replay.resend_after(result.acked_seq, self._cancel_pending)
        self.opened = result
        self._delivered.resumed = True
        self._stream_no += 1
        return resend

    def _interpret_opened(self, response: pb.StreamResponse):
        """The first answer of a call (SessionOpened), errors raised."""
        result = response_from_pb(response)
        if isinstance(result, SinkStreamError):
            raise result
        return result

    def _closed_anyway(self, error: SinkStreamError) -> Closed:
        """A close interrupted by a server failure: the session being gone on resume means the close was
        done (or the session expired, which is what close asked for); anything else is raised."""
        if not self._gone:
            raise error
        return Closed(session_id=self.id, tokens_seen=self._delivered.position)

    def _failed(self, error: SinkStreamError) -> SinkStreamError:
        """Mark the stream ended by `error` and return it, for the transport to raise."""
        self._ended = True
        return error

    def _on_opened(self, result) -> None:
        """Book the first answer, SessionOpened: numbering continues after its acked_seq."""
        if not isinstance(result, SessionOpened):
            raise SinkStreamError(grpc.StatusCode.INTERNAL, f"expected SessionOpened, got {result!r}")
        self.opened, self.id = result, result.session_id
        self._replay = ReplayBuffer(self.policy, result.acked_seq)
        self._delivered = Delivered(result.tokens_seen)

    def _awaited(self, result, kind: type):
        """Book one result while waiting for an answer of `kind`: the answer when it is one, else None
        (chunk results are kept for the next append_*; anything else is not waited for)."""
        if isinstance(result, ChunkResult):
            self._chunks.append(result)
        elif isinstance(result, kind):
            if isinstance(result, Flushed):
                self.last_flush = result
            return result
        return None

    def _flush_reached(self, result) -> bool:
        """Book one result of stream_text; True at the final flush (chunk results are the caller's)."""
        if isinstance(result, Flushed):
            self.last_flush = result
            return True
        return False

    def _generate_request(self, params: GenerateParams | None, kwargs: dict) -> pb.StreamRequest:
        self._tokens = []
        return generate_request(params or GenerateParams(**kwargs), "")

    def _generated(self, result) -> bool:
        """Book one result of a generation; True at its end (then last_generation holds every token)."""
        if isinstance(result, GeneratedToken):
            self._tokens.append(result)
        elif isinstance(result, ChunkResult):
            self._chunks.append(result)
        elif isinstance(result, GenerationResult):
            result.tokens, self._tokens = self._tokens, []
            self.last_generation = result
            return True
        return False

    def _drained(self, response: pb.StreamResponse) -> None:
        """Book a response read while ending the stream (chunk results are kept; errors are moot)."""
        try:
            result = self._interpret(response)
        except SinkStreamError:
            return
        if isinstance(result, ChunkResult):
            self._chunks.append(result)

    def _take_chunks(self) -> list[ChunkResult]:
        chunks, self._chunks = self._chunks, []
        return chunks
