"""The gRPC servicer: translates calls into session-manager and scheduler operations, nothing more."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import secrets
import time
from collections.abc import AsyncIterator

import grpc

from sinkstream.core.config import StreamConfig
from sinkstream.core.generation import eos_token_ids
from sinkstream.service.metrics import ServerMetrics
from sinkstream.service.requests import (
    AnalysisOptions,
    Limits,
    RequestError,
    analysis_from_pb,
    check_request_id,
    check_session_id,
    invalid,
    sampling_from_pb,
    server_failure,
    settings_to_pb,
    stream_config_from_pb,
)
from sinkstream.service.scheduler import Scheduler
from sinkstream.service.sessions import OUTBOX_LIMIT, Session, SessionManager
from sinkstream.service.text_input import TextInput
from sinkstream.service.wire import Malformed
from sinkstream.service.work import (
    AppendWork,
    CheckpointWork,
    CloseWork,
    DetachWork,
    ErrorWork,
    GenerateWork,
    StreamEnd,
)
from sinkstream.v1 import sinkstream_pb2 as pb
from sinkstream.v1 import sinkstream_pb2_grpc as pb_grpc

log = logging.getLogger("sinkstream.servicer")
BIG_TEXT_CHARS = 16384  # tokenize pieces larger than this in a worker thread


def server_version() -> str:
    try:
        return importlib.metadata.version("sinkstream")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class SinkStreamServicer(pb_grpc.SinkStreamServicer):
    def __init__(self, manager: SessionManager, scheduler: Scheduler, metrics: ServerMetrics,
                 limits: Limits, defaults: StreamConfig, model_name: str) -> None:
        self.manager, self.scheduler, self.metrics = manager, scheduler, metrics
        self.limits, self.defaults, self.model_name = limits, defaults, model_name
        self.tokenizer = manager.pool.tokenizer
        self.model_config = manager.pool.model.config

    # ------------------------------------------------------------------ Stream
    async def Stream(self, request_iterator: AsyncIterator[pb.StreamRequest],  # noqa: N802 (gRPC name)
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StreamResponse]:
        requests = aiter(request_iterator)
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            return
        if isinstance(first, Malformed):
            await self._abort(context, invalid("request", str(first.error)))
        try:
            session, opened = await self._start(first)
        except RequestError as exc:
            await self._abort(context, exc)
            return
        outbox = self.manager.attach(session)
        log.info("stream attached", extra={"session": session.id, "peer": context.peer()})
        reader = asyncio.create_task(self._read(requests, session, outbox))
        try:
            yield opened
            while True:
                response = await outbox.get()
                if isinstance(response, StreamEnd):
                    if response.error is not None:
                        await self._abort(context, response.error)
                    return
                if outbox.qsize() == OUTBOX_LIMIT - 1:
                    self.scheduler.wake()  # the session was held back by a full outbox
                yield response
        finally:
            reader.cancel()
            self.manager.detach(session, outbox)
            log.info("stream detached", extra={"session": session.id})

    async def _abort(self, context: grpc.aio.ServicerContext, exc: RequestError) -> None:
        self.metrics.errors.labels(exc.code.name).inc()
        await context.abort(exc.code, str(exc))

    async def _start(self, first: pb.StreamRequest) -> tuple[Session, pb.StreamResponse]:
        kind = first.WhichOneof("kind")
        self.metrics.requests.labels(kind or "empty").inc()
        check_request_id(first.request_id)
        if kind == "open":
            request = first.open
            config = stream_config_from_pb(request.settings, self.defaults, self.limits)
            analysis = analysis_from_pb(request.settings.analysis, self.limits, "open.settings.analysis")
            session_id = (check_session_id(request.session_id, "open.session_id") if request.session_id
                          else secrets.token_hex(8))
            seed = request.seed if request.HasField("seed") else None
            if seed is not None and seed >= 2**63:
                raise invalid("open.seed", "must be below 2^63")
            session = await self.manager.open(session_id, config, analysis, seed)
            resumed = False
        elif kind == "resume":
            request = first.resume
            check_session_id(request.session_id, "resume.session_id")
            analysis = (analysis_from_pb(request.analysis, self.limits, "resume.analysis")
                        if request.HasField("analysis") else None)
            session = await self.manager.resume(request.session_id, analysis)
            resumed = True
        else:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"the first request of a stream must be open or resume, got {kind}", "kind")
        opened = pb.SessionOpened(session_id=session.id,
                                  settings=settings_to_pb(session.config, session.analysis),
                                  resumed=resumed, tokens_seen=session.tokens_seen())
        cache = session.cache_stats()
        if cache is not None:
            opened.cache.CopyFrom(cache)
        return session, pb.StreamResponse(request_id=first.request_id, session_opened=opened)

    async def _read(self, requests: AsyncIterator[pb.StreamRequest], session: Session,
                    outbox: asyncio.Queue) -> None:
        """Turn the call's requests into session work, in order; the bounded inbox gives backpressure."""
        try:
            async for request in requests:
                if isinstance(request, Malformed):
                    outbox.put_nowait(StreamEnd(invalid("request", f"malformed message: {request.error}")))
                    return
                kind = request.WhichOneof("kind")
                self.metrics.requests.labels(kind or "empty").inc()
                if kind == "cancel":
                    session.cancel_upto = session.generate_seq
                    self.scheduler.wake()
                    continue
                try:
                    check_request_id(request.request_id)
                    work = await self._work(session, request, kind)
                except RequestError as exc:
                    self.metrics.errors.labels(exc.code.name).inc()
                    rid = "" if exc.field == "request_id" else request.request_id  # not echoed when too long
                    work = [ErrorWork(rid, exc)]
                for item in work:
                    await session.queue(item)  # backpressure: waits while the session holds enough
                    self.scheduler.wake()
                if kind == "close":
                    return
            await session.queue(DetachWork())
            self.scheduler.wake()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or a failed transport: end the call as failed, keep the session
            log.exception("reading stream failed", extra={"session": session.id})
            if session.outbox is outbox:
                outbox.put_nowait(StreamEnd(server_failure(exc, "reading the stream failed")))

    async def _work(self, session: Session, request: pb.StreamRequest, kind: str | None) -> list:
        rid = request.request_id
        if kind == "append_text":
            text_input = self._text_input(session)
            text = request.append_text.text
            if len(text) > BIG_TEXT_CHARS:
                ids = await asyncio.to_thread(text_input.push, text)
            else:
                ids = text_input.push(text)
            if request.append_text.flush:
                ids = ids + text_input.flush()
            return [AppendWork(rid, ids, request.append_text.flush)]
        if kind == "append_tokens":
            ids = list(request.append_tokens.ids)
            vocab = self.manager.pool.model.get_output_embeddings().out_features
            if ids and max(ids) >= vocab:
                raise invalid("append_tokens.ids", f"token ids must be in 0..{vocab - 1}, got {max(ids)}")
            if session.text is not None:
                ids = session.text.push_ids(ids)
            return [AppendWork(rid, ids, request.append_tokens.flush)]
        if kind == "generate":
            params = sampling_from_pb(request.generate, self.limits)
            limit_ms = request.generate.time_limit_ms
            session.generate_seq += 1
            work = GenerateWork(rid, params, limit_ms / 1000 if limit_ms else None, time.perf_counter(),
                                session.generate_seq)
            head = []
            if session.text is not None and session.text.needs_flush:
                head = [AppendWork(rid, session.text.flush(), False)]
            return [*head, work]
        if kind == "checkpoint":
            return [CheckpointWork(rid)]
        if kind == "close":
            return [CloseWork(rid)]
        if kind in ("open", "resume"):
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"this stream already has session {session.id!r}; open another stream", kind)
        raise invalid("kind", "empty request: set one of the fields of StreamRequest.kind")

    def _text_input(self, session: Session) -> TextInput:
        if session.text is None:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               "the model has no tokenizer: use append_tokens", "append_text")
        return session.text

    # ------------------------------------------------------------------ unary calls
    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:  # noqa: N802
        if self.tokenizer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the model has no tokenizer")
        text_input = TextInput(self.tokenizer)
        ids = await asyncio.to_thread(lambda: text_input.push(request.text) + text_input.flush())
        bos = self.tokenizer.bos_token_id
        if not request.add_bos and ids and bos is not None and ids[0] == bos:
            ids = ids[1:]
        response = pb.TokenizeResponse(ids=ids)
        if request.return_pieces:
            response.pieces.extend(self.tokenizer.convert_ids_to_tokens(ids))
        return response

    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfoResponse:  # noqa: N802
        cfg, model = self.model_config, self.manager.pool.model
        eos = eos_token_ids(cfg, self.tokenizer, getattr(model, "generation_config", None))
        info = pb.ModelInfoResponse(
            name=self.model_name, model_type=cfg.model_type,
            vocab_size=model.get_output_embeddings().out_features,
            max_position_embeddings=cfg.max_position_embeddings, hidden_size=cfg.hidden_size,
            num_layers=cfg.num_hidden_layers, eos_token_ids=sorted(eos),
            default_settings=settings_to_pb(self.defaults, AnalysisOptions()),
            limits=self.limits.to_pb(), server_version=server_version())
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if bos is not None:
            info.bos_token_id = bos
        return info

    async def GetSession(self, request: pb.GetSessionRequest, context) -> pb.SessionInfo:  # noqa: N802
        try:
            return self.manager.get(request.session_id).info()
        except RequestError as exc:
            await self._abort(context, exc)

    async def ListSessions(self, request, context) -> pb.ListSessionsResponse:  # noqa: N802
        return pb.ListSessionsResponse(sessions=[s.info() for s in list(self.manager.sessions.values())])

    async def DeleteSession(self, request: pb.DeleteSessionRequest, context) -> pb.DeleteSessionResponse:  # noqa: N802
        try:
            return pb.DeleteSessionResponse(tokens_seen=await self.manager.delete(request.session_id))
        except RequestError as exc:
            await self._abort(context, exc)
