"""The gRPC servicer: decodes requests, calls the session manager and scheduler, encodes the replies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from sinkstream.core.config import StreamConfig
from sinkstream.service import convert
from sinkstream.service.backpressure import Outbox
from sinkstream.service.chat_input import ChatInput, pinned_config
from sinkstream.service.errors import RequestError, invalid, server_failure
from sinkstream.service.intake import Intake
from sinkstream.service.metrics import ServerMetrics
from sinkstream.service.model_facts import describe_model
from sinkstream.service.options import Limits
from sinkstream.service.replies import StreamEnd
from sinkstream.service.requests import CancelRequest, OpenRequest
from sinkstream.service.scheduler import Scheduler
from sinkstream.service.session import Session
from sinkstream.service.session_manager import SessionManager
from sinkstream.service.tenants import SessionKey, current_tenant
from sinkstream.service.text_input import tokenize
from sinkstream.service.wire import Malformed
from sinkstream.service.work import DetachWork
from sinkstream.v1 import sinkstream_pb2 as pb
from sinkstream.v1 import sinkstream_pb2_grpc as pb_grpc

log = logging.getLogger("sinkstream.servicer")


class SinkStreamServicer(pb_grpc.SinkStreamServicer):
    def __init__(self, manager: SessionManager, scheduler: Scheduler, metrics: ServerMetrics,
                 limits: Limits, defaults: StreamConfig, model_name: str) -> None:
        self.manager, self.scheduler, self.metrics = manager, scheduler, metrics
        self.limits, self.defaults, self.model_name = limits, defaults, model_name
        self.tokenizer = manager.pool.tokenizer
        self.intake = Intake(manager.pool.vocab_size, manager.pool.tokenizer)

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
            session, opened, results_after = await self._start(first)
        except RequestError as exc:
            await self._abort(context, exc)
            return
        outbox = self.manager.attach(session)
        session.resend_replayed(results_after)  # after SessionOpened: what a crash may have lost
        log.info("stream attached", extra={"session": session.key.label, "peer": context.peer()})
        reader = asyncio.create_task(self._read(requests, session, outbox))
        call = asyncio.current_task()
        # for a client that stops reading (SessionManager.sweep): no request of this call reaches the
        # session once this returns, and the handler stops (the HTTP/2 stream itself lasts until the
        # client's deadline or disconnection, holding only what its flow-control windows hold)
        outbox.end_call = lambda: (reader.cancel(), call.cancel())
        try:
            yield opened
            while True:
                reply, made_room = await outbox.get()
                if isinstance(reply, StreamEnd):
                    if reply.error is not None:
                        await self._abort(context, reply.error)
                    return
                if made_room:
                    self.scheduler.wake()  # the session was held back by a full outbox
                yield convert.reply_to_pb(reply)
        finally:
            reader.cancel()
            self.manager.detach(session, outbox)
            log.info("stream detached", extra={"session": session.key.label})

    async def _abort(self, context: grpc.aio.ServicerContext, exc: RequestError) -> None:
        self.metrics.errors.labels(exc.code.name).inc()
        if exc.trailers:
            context.set_trailing_metadata(exc.trailers)
        await context.abort(exc.code, str(exc))

    async def _start(self, first: pb.StreamRequest) -> tuple[Session, pb.StreamResponse, int | None]:
        """The call's session, its SessionOpened, and the position after which a resume asks for the
        results of a recovered log (None: an open, or not asked)."""
        self.metrics.requests.labels(convert.request_kind(first)).inc()
        request = convert.start_request_from_pb(first, self.defaults, self.limits)
        if isinstance(request, OpenRequest):
            chat, first_ids, config = self._system_message(request)
            session = await self.manager.open(current_tenant.get(), request.session_id, config,
                                              request.analysis, request.seed, chat=chat, first_ids=first_ids,
                                              request_id=request.request_id)
        else:
            session = await self.manager.resume(SessionKey(current_tenant.get(), request.session_id),
                                                request.analysis)
        resumed = not isinstance(request, OpenRequest)
        results_after = None if isinstance(request, OpenRequest) else request.results_after
        return session, convert.session_opened_to_pb(request.request_id, session, resumed), results_after

    def _system_message(self, request: OpenRequest) -> tuple[ChatInput | None, list[int], StreamConfig]:
        """The conversation an open starts with its system message, that message's ids and the session's
        config (its sink region enlarged to pin the message unless pin_system is off)."""
        if request.system_message is None:
            return None, [], request.config
        chat = ChatInput(self.manager.pool.tokenizer, field="open.system_message")
        ids = chat.append("system", request.system_message, field="open.system_message")
        config = (pinned_config(request.config, len(ids), self.limits.max_positions) if request.pin_system
                  else request.config)
        return chat, ids, config

    async def _read(self, requests: AsyncIterator[pb.StreamRequest], session: Session,
                    outbox: Outbox) -> None:
        """Turn the call's requests into session work, in order; the bounded inbox gives backpressure."""
        try:
            async for message in requests:
                if isinstance(message, Malformed):
                    outbox.put(StreamEnd(invalid("request", f"malformed message: {message.error}")))
                    return
                kind = convert.request_kind(message)
                self.metrics.requests.labels(kind).inc()
                try:
                    request = convert.stream_request_from_pb(message, self.limits)
                    if isinstance(request, CancelRequest):
                        session.cancel_generations()
                        self.scheduler.wake()
                        continue
                    # made lazily: a big append is tokenized slice by slice as budget room appears
                    async with contextlib.aclosing(self.intake.work(session, request)) as items:
                        async for item in items:
                            await session.queue(item)  # backpressure: waits while the session holds enough
                            self.scheduler.wake()
                except RequestError as exc:
                    self.metrics.errors.labels(exc.code.name).inc()
                    rid = "" if exc.field == "request_id" else message.request_id  # not echoed when too long
                    await session.queue(self.intake.refusal(session, message.seq, rid, exc))
                    self.scheduler.wake()
                    continue  # a refused request (a close included) changes nothing: keep reading
                if kind == "close":
                    return
            await session.queue(DetachWork())
            self.scheduler.wake()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or a failed transport: end the call as failed, keep the session
            log.exception("reading stream failed", extra={"session": session.key.label})
            if session.outbox is outbox:
                outbox.put(StreamEnd(server_failure(exc, "reading the stream failed")))

    # ------------------------------------------------------------------ unary calls
    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:  # noqa: N802
        if self.tokenizer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the model has no tokenizer")
        ids, pieces = await tokenize(self.tokenizer, request.text, request.add_bos, request.return_pieces)
        return convert.tokenize_to_pb(ids, pieces)

    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfoResponse:  # noqa: N802
        facts = describe_model(self.model_name, self.manager.pool.model, self.tokenizer, self.defaults,
                               self.limits)
        return convert.model_info_to_pb(facts)

    async def GetSession(self, request: pb.GetSessionRequest, context) -> pb.SessionInfo:  # noqa: N802
        try:
            session_id = convert.check_session_id(request.session_id, "session_id")
            key = SessionKey(current_tenant.get(), session_id)
            return convert.session_info_to_pb(await self.manager.lookup(key))
        except RequestError as exc:
            await self._abort(context, exc)

    async def ListSessions(self, request, context) -> pb.ListSessionsResponse:  # noqa: N802
        tenant = current_tenant.get()
        unrecovered = [key.id for key in self.manager.unrecovered_of(tenant)]
        return convert.list_sessions_to_pb(self.manager.all(tenant), unrecovered)

    async def DeleteSession(self, request: pb.DeleteSessionRequest, context) -> pb.DeleteSessionResponse:  # noqa: N802
        try:
            session_id = convert.check_session_id(request.session_id, "session_id")
            key = SessionKey(current_tenant.get(), session_id)
            return convert.delete_session_to_pb(await self.manager.delete(key))
        except RequestError as exc:
            await self._abort(context, exc)
