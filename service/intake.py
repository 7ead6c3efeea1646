"""A session's decoded requests turned into the work its scheduler consumes: text tokenized with the
session's text input, token ids checked against the vocabulary, Generate requests numbered.

An append is worked through in slices of at most INPUT_SLICE characters or ids, each handed on (and so
counted against the session's input budget) before the next is tokenized, with the event loop free
between slices: a message of any size costs other sessions and health checks one slice of latency, and
the server holds at most the budget of its ids.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import grpc

from sinkstream.core.chat import ROLES
from sinkstream.service.backpressure import INPUT_SLICE
from sinkstream.service.chat_input import ChatInput
from sinkstream.service.errors import RequestError, invalid, shown_id
from sinkstream.service.requests import (
    AppendMessage,
    AppendText,
    AppendTokens,
    CheckpointRequest,
    CloseRequest,
    GenerateRequest,
    MisplacedStart,
    StreamRequest,
)
from sinkstream.service.sequencing import Verdict
from sinkstream.service.session import Session
from sinkstream.service.text_input import TextInput
from sinkstream.service.work import (
    AppendWork,
    CheckpointWork,
    CloseWork,
    ErrorWork,
    GenerateWork,
    MessageWork,
    RepeatWork,
    Work,
)


class Intake:
    """Turns one request of a session's stream into its work items, in order (RequestError if refused)."""

    def __init__(self, vocab_size: int, tokenizer=None) -> None:
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer

    async def work(self, session: Session, request: StreamRequest) -> AsyncIterator[Work]:
        """The request's work items, made lazily: the caller queues each (waiting for budget room) before
        the next is made. A RequestError comes before any item (a refused request changes nothing). A
        numbered request (StreamRequest.seq) received before becomes one RepeatWork; a gap is refused."""
        seq = getattr(request, "seq", 0)
        suspended = session.suspended
        if seq and suspended is not None and suspended.work.client_seq == seq and not (
                isinstance(request, GenerateRequest)
                and self._generate_work(session, request, seq).params == suspended.work.params):
            session.abandon_suspended(seq)  # not its repeat: the caller never saw that generation
        if session.seqs.check(seq) is Verdict.DUPLICATE:
            yield RepeatWork(request.request_id, seq, self._generate_work(session, request, seq)
                             if isinstance(request, GenerateRequest) else None)
            return
        if isinstance(request, AppendText):
            text_input = _text_input(session)
            session.seqs.receive(seq)
            text = request.text
            for start in range(session.applied_from(seq), len(text), INPUT_SLICE):
                end = min(start + INPUT_SLICE, len(text))
                ids = text_input.push(text[start:end])
                if ids or seq:  # a numbered request logs every slice: where it got to is known
                    yield AppendWork(request.request_id, ids, False, seq, False, text_input.state(), upto=end)
                await asyncio.sleep(0)  # other sessions, health checks and the scheduler run between slices
            yield AppendWork(request.request_id, text_input.flush() if request.flush else [], request.flush,
                             seq, True, text_input.state())
        elif isinstance(request, AppendTokens):
            await self._check_ids(request.ids)
            session.seqs.receive(seq)
            ids = request.ids
            for start in range(session.applied_from(seq), len(ids), INPUT_SLICE) or [len(ids)]:
                piece = list(ids[start:start + INPUT_SLICE])
                state = None
                if session.text is not None:
                    piece = session.text.push_ids(piece)  # held text first; later text at a token boundary
                    state = session.text.state()
                last = start + INPUT_SLICE >= len(ids)
                yield AppendWork(request.request_id, piece, request.flush and last, seq, last, state,
                                 upto=min(start + INPUT_SLICE, len(ids)))
        elif isinstance(request, AppendMessage):
            self.chat(session)
            if request.role not in ROLES:
                raise invalid("append_message.role",
                              f"must be one of {', '.join(ROLES)}, got {shown_id(request.role)}")
            session.seqs.receive(seq)
            # held text first; the message starts at a token boundary (and no BOS is added after it)
            head = session.text.push_ids([]) if session.text is not None else []
            if head:
                yield AppendWork(request.request_id, head, False, seq, False, session.text.state())
            yield MessageWork(request.request_id, request.role, request.content, request.flush, seq)
        elif isinstance(request, GenerateRequest):
            if request.chat_reply:
                self.chat(session, "generate.chat_reply")
            session.seqs.receive(seq)
            work = self._generate_work(session, request, seq)
            if request.chat_reply and session.text is not None:  # the template frames the stream: no BOS
                head = session.text.push_ids([])
                if head:
                    yield AppendWork(request.request_id, head, False, seq, False, session.text.state())
            elif session.text is not None and session.text.needs_flush:
                yield AppendWork(request.request_id, session.text.flush(), False, seq, False,
                                 session.text.state())
            if session.text is not None:
                # Text sent after it starts at a token boundary after the generated tokens. Set here, in
                # request order: done when the generation ends, it raced with the reading of later text.
                session.text.push_ids([])
                work.text_state = session.text.state()
            yield work
        elif isinstance(request, CheckpointRequest):
            yield CheckpointWork(request.request_id)
        elif isinstance(request, CloseRequest):
            yield CloseWork(request.request_id)
        elif isinstance(request, MisplacedStart):
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"this stream already has session {session.id!r}; open another stream",
                               request.kind)
        else:
            raise TypeError(f"not a work request: {request!r}")

    @staticmethod
    def refusal(session: Session, seq: int, request_id: str, error: RequestError) -> Work:
        """The work answering a request refused with `error` before it became work. A numbered one takes
        its number like any other request (so requests pipelined after it are not a gap): a new number
        is answered with the error and acknowledged once durable; a duplicate (a refused request sent
        again, e.g. after a resume) is only acknowledged again. A gap takes nothing and is reported."""
        if seq:
            suspended = session.suspended
            if suspended is not None and suspended.work.client_seq == seq:
                session.abandon_suspended(seq)  # not its repeat: the caller never saw that generation
            try:
                verdict = session.seqs.check(seq)
            except RequestError as gap:
                return ErrorWork(request_id, gap)
            if verdict is Verdict.DUPLICATE:
                return RepeatWork(request_id, seq, None)
            session.seqs.receive(seq)
        return ErrorWork(request_id, error, seq)

    @staticmethod
    def _generate_work(session: Session, request: GenerateRequest, seq: int) -> GenerateWork:
        return GenerateWork(request.request_id, request.params, request.time_limit_s, time.perf_counter(),
                            session.next_generate_seq(), chat_reply=request.chat_reply, client_seq=seq)

    def chat(self, session: Session, field: str = "append_message") -> ChatInput:
        """The session's conversation, started on first use (FAILED_PRECONDITION without a template)."""
        if session.chat is None:
            session.chat = ChatInput(self.tokenizer, field=field)
        return session.chat

    async def _check_ids(self, ids: Sequence[int]) -> None:
        """INVALID_ARGUMENT unless every id is in the vocabulary (checked in slices, the loop free
        between them)."""
        for start in range(0, len(ids), INPUT_SLICE):
            top = max(ids[start:start + INPUT_SLICE])
            if top >= self.vocab_size:
                raise invalid("append_tokens.ids",
                              f"token ids must be in 0..{self.vocab_size - 1}, got {top}")
            await asyncio.sleep(0)


def _text_input(session: Session) -> TextInput:
    if session.text is None:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                           "the model has no tokenizer: use append_tokens", "append_text")
    return session.text
