"""A session's decoded requests turned into the work its scheduler consumes: text tokenized with the
session's text input, token ids checked against the vocabulary, Generate requests numbered."""

from __future__ import annotations

import asyncio
import time

import grpc

from sinkstream.service.errors import RequestError, invalid
from sinkstream.service.requests import (
    AppendText,
    AppendTokens,
    CheckpointRequest,
    CloseRequest,
    GenerateRequest,
    MisplacedStart,
    StreamRequest,
)
from sinkstream.service.session import Session
from sinkstream.service.text_input import TextInput
from sinkstream.service.work import AppendWork, CheckpointWork, CloseWork, GenerateWork, Work

BIG_TEXT_CHARS = 16384  # tokenize pieces larger than this in a worker thread


class Intake:
    """Turns one request of a session's stream into its work items, in order (RequestError if refused)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    async def work(self, session: Session, request: StreamRequest) -> list[Work]:
        if isinstance(request, AppendText):
            text_input = _text_input(session)
            if len(request.text) > BIG_TEXT_CHARS:
                ids = await asyncio.to_thread(text_input.push, request.text)
            else:
                ids = text_input.push(request.text)
            if request.flush:
                ids = ids + text_input.flush()
            return [AppendWork(request.request_id, ids, request.flush)]
        if isinstance(request, AppendTokens):
            ids = request.ids
            if ids and max(ids) >= self.vocab_size:
                raise invalid("append_tokens.ids",
                              f"token ids must be in 0..{self.vocab_size - 1}, got {max(ids)}")
            if session.text is not None:
                ids = session.text.push_ids(ids)
            return [AppendWork(request.request_id, ids, request.flush)]
        if isinstance(request, GenerateRequest):
            work = GenerateWork(request.request_id, request.params, request.time_limit_s, time.perf_counter(),
                                session.next_generate_seq())
            head = []
            if session.text is not None and session.text.needs_flush:
                head = [AppendWork(request.request_id, session.text.flush(), False)]
            return [*head, work]
        if isinstance(request, CheckpointRequest):
            return [CheckpointWork(request.request_id)]
        if isinstance(request, CloseRequest):
            return [CloseWork(request.request_id)]
        if isinstance(request, MisplacedStart):
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"this stream already has session {session.id!r}; open another stream",
                               request.kind)
        raise TypeError(f"not a work request: {request!r}")


def _text_input(session: Session) -> TextInput:
    if session.text is None:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                           "the model has no tokenizer: use append_tokens", "append_text")
    return session.text
