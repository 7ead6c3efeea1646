"""asyncio sinkstream client: the protocol (protocol.py) over grpc.aio; the same surface as client.py, with
coroutines.

    async with AsyncSinkStreamClient("127.0.0.1:50051") as client:
        session = await client.open_session(SessionSettings(logprobs=True))
        async for chunk in session.stream_text(pieces):
            ...
        result = await session.generate(GenerateParams(max_new_tokens=32))
        await session.detach()

Sessions resume on their own after a server failure, as the sync client's (client.py, resume.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import TypeVar

import grpc

from sinkstream.clients import protocol
from sinkstream.clients.connection import Metadata, Pem, auth_metadata, open_channel
from sinkstream.clients.protocol import Progress, SessionProtocol, UnaryCall
from sinkstream.clients.results import (
    Checkpointed,
    ChunkResult,
    Closed,
    Flushed,
    GeneratedToken,
    GenerateParams,
    GenerationResult,
    ModelInfo,
    SessionInfo,
    SessionSettings,
    SinkStreamError,
)
from sinkstream.clients.resume import RETRY_RESUME, ResumePolicy, is_sequenced
from sinkstream.v1 import sinkstream_pb2 as pb
from sinkstream.v1 import sinkstream_pb2_grpc as pb_grpc

T = TypeVar("T")


class AsyncSinkStreamClient:
    """An asyncio channel to a sinkstream server; unary calls and sessions."""

    def __init__(self, address: str, *, timeout: float | None = None,
                 max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
                 retry_attempts: int = 5, resume: ResumePolicy | None = None,
                 channel: grpc.aio.Channel | None = None, token: str | None = None,
                 tls: bool = False, tls_ca: Pem | None = None, tls_cert: Pem | None = None,
                 tls_key: Pem | None = None) -> None:
        """As SinkStreamClient's (channel, resume, token and TLS arguments alike), on an asyncio channel."""
        self.metadata = auth_metadata(token)
        self.channel = channel or open_channel(
            address, protocol.channel_options(max_message_bytes, retry_attempts=retry_attempts), tls=tls,
            tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, aio=True)
        self.stub = pb_grpc.SinkStreamStub(self.channel)
        self.timeout = timeout
        self.resume = resume or ResumePolicy()

    async def __aenter__(self) -> AsyncSinkStreamClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (the server keeps sessions for resume)."""
        await self.channel.close()

    async def _unary(self, call: UnaryCall[T]) -> T:
        rpc = protocol.unary_callable(self.channel, call)
        try:
            metadata = tuple(self.metadata) + tuple(call.metadata)  # auth, then routing
            return call.interpret(await rpc(call.request, timeout=self.timeout, metadata=metadata))
        except grpc.RpcError as exc:
            raise protocol.rpc_error(exc) from None

    # ------------------------------------------------------------------ unary calls
    async def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text` as a session would get them (add_bos: as in its first append)."""
        return await self._unary(protocol.tokenize_call(text, add_bos))

    async def model_info(self) -> ModelInfo:
        """The served model, the server's session defaults and its limits."""
        return await self._unary(protocol.model_info_call())

    async def get_session(self, session_id: str) -> SessionInfo:
        """One session's state (raises SinkStreamError NOT_FOUND for an unknown id)."""
        return await self._unary(protocol.get_session_call(session_id))

    async def list_sessions(self) -> list[SessionInfo]:
        """Every live session, in creation order."""
        return await self._unary(protocol.list_sessions_call())

    async def delete_session(self, session_id: str) -> int:
        """Delete a detached session; returns the tokens it had processed."""
        return await self._unary(protocol.delete_session_call(session_id))

    async def health(self, service: str = "") -> str:
        """The server's health status name, e.g. "SERVING"."""
        return await self._unary(protocol.health_call(service))

    # ------------------------------------------------------------------ sessions
    async def open_session(self, settings: SessionSettings | None = None, *, seed: int | None = None,
                           session_id: str | None = None, timeout: float | None = None,
                           system_message: str | None = None, pin_system: bool | None = None) -> AsyncSession:
        """Start a new session on a new stream (`timeout`: the stream's deadline in seconds);
        `system_message` starts its conversation, kept in the cache unless `pin_system` is False."""
        request = protocol.open_request(settings, seed, session_id, system_message=system_message,
                                        pin_system=pin_system)
        return await AsyncSession.start(self.stub, request, timeout, self.resume, self.metadata)

    async def resume_session(self, session_id: str, settings: SessionSettings | None = None, *,
                             timeout: float | None = None) -> AsyncSession:
        """Attach to an existing session (settings given replace its analysis options)."""
        request = protocol.resume_request(session_id, settings)
        return await AsyncSession.start(self.stub, request, timeout, self.resume, self.metadata)


class AsyncSession(SessionProtocol):
    """One session, on one `Stream` call at a time; use from one task (cancel_generation from any).
    When the call fails with UNAVAILABLE (or CANCELLED / INTERNAL not of the caller's doing) the session
    resumes on a new call and re-sends what the server has not acknowledged (see resume.py)."""

    def __init__(self, stub: pb_grpc.SinkStreamStub, first: pb.StreamRequest, timeout: float | None,
                 policy: ResumePolicy | None = None, metadata: Metadata = ()) -> None:
        """Open the stream `first` (open or resume, sent by start()) will go on."""
        super().__init__(policy)
        self._stub = stub
        self._metadata = tuple(metadata)
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._resume_lock = asyncio.Lock()  # one resume at a time (the reader or a sender)
        self._room = asyncio.Event()  # set on acks: a sender waiting for replay-buffer room
        self._feeder: asyncio.Task | None = None  # stream_text's sending task (not the reader)
        self._early: collections.deque = collections.deque()  # read by a sender waiting for room
        self._resending: asyncio.Future | None = None  # writes what a resume re-sends
        self._call = self._open_call(first)

    @classmethod
    async def start(cls, stub: pb_grpc.SinkStreamStub, first: pb.StreamRequest,
                    timeout: float | None, policy: ResumePolicy | None = None,
                    metadata: Metadata = ()) -> AsyncSession:
        """Open the stream, send `first` (open or resume) and wait for SessionOpened. Every call of the
        session (the first and each resume's) carries `metadata` (auth), then the routing metadata
        (`x-session-id` when the id is known)."""
        self = cls(stub, first, timeout, policy, metadata)
        await self._send(first)
        self._on_opened(await self._next())
        return self

    def _open_call(self, first: pb.StreamRequest):
        """A new Stream call whose first request will be `first`."""
        timeout = None if self._deadline is None else max(self._deadline - time.monotonic(), 0.001)
        metadata = self._metadata + tuple(protocol.stream_metadata(first))  # auth, then routing
        return self._stub.Stream(timeout=timeout, metadata=metadata)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            await self.detach()
        else:
            self.abort()

    # ------------------------------------------------------------------ transport
    async def _send(self, request: pb.StreamRequest) -> str:
        if is_sequenced(request):  # only numbered requests fill the replay buffer (cancel never waits)
            await self._wait_for_room()
        stream_no = self._stamp(request)
        while True:
            if self._resending is not None and asyncio.current_task() is not self._resending:
                await asyncio.shield(self._resending)  # what the resume re-sends goes first
            if self._ended:
                raise SinkStreamError(grpc.StatusCode.FAILED_PRECONDITION, "the session's stream has ended")
            if request.seq and stream_no < self._stream_no:
                return request.request_id  # numbered before a resume, which re-sent it
            call, stream_no = self._call, self._stream_no
            try:
                await call.write(request)
                return request.request_id
            except grpc.RpcError as exc:
                error = protocol.rpc_error(exc)
            except asyncio.InvalidStateError:
                error = await self._status_error(call)
            await self._recover(call, error)

    async def _wait_for_room(self) -> None:
        """Backpressure of the replay buffer: wait until acks make room. stream_text's sending task
        waits for the reader; a caller that reads nothing meanwhile reads the responses itself."""
        while self._replay_full():
            if self._feeder is not None and asyncio.current_task() is self._feeder:
                self._room.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._room.wait(), 0.1)
                if self._ended:
                    return
            else:
                self._early.append(await self._read())

    def _acknowledged(self) -> None:
        self._room.set()

    @staticmethod
    async def _status_error(call) -> SinkStreamError:
        return protocol.stream_ended_error(await call.code(), await call.details())

    async def _next(self):
        """The next response as a dataclass; raises SinkStreamError for an Error or a failed call that
        could not be resumed."""
        return self._early.popleft() if self._early else await self._read()

    async def _read(self):
        while True:
            call = self._call
            try:
                response = await call.read()
            except grpc.RpcError as exc:
                await self._recover(call, protocol.rpc_error(exc))
                continue
            if response is grpc.aio.EOF:
                await self._recover(call, await self._status_error(call))
                continue
            result = self._interpret(response)
            if result is not None:
                return result

    async def _recover(self, failed, error: SinkStreamError) -> None:
        """The call `failed` with `error`: resume the session on a new call (re-sending what the server
        has not acknowledged), or raise `error` (or why resuming failed) when it cannot be resumed."""
        async with self._resume_lock:
            if failed is not self._call:
                return  # resumed already
            if not self._may_resume(error):
                raise self._failed(error)
            failed.cancel()
            last = None
            for delay in itertools.chain([0.0], self.policy.delays()):
                await asyncio.sleep(delay)
                resume = self._auto_resume_request()
                call = self._open_call(resume)
                try:
                    await call.write(resume)
                    response = await call.read()
                    if response is grpc.aio.EOF:
                        raise await self._status_error(call)
                    opened = self._interpret_opened(response)
                except (grpc.RpcError, asyncio.InvalidStateError, SinkStreamError) as exc:
                    call.cancel()
                    last = exc if isinstance(exc, SinkStreamError) else (
                        protocol.rpc_error(exc) if isinstance(exc, grpc.RpcError)
                        else await self._status_error(call))
                    if last.code in RETRY_RESUME:
                        continue
                    raise self._resume_failed(error, last, gave_up=False) from None
                with self._ids_lock:
                    try:
                        resend = self._resumed(opened)
                    except SinkStreamError as exc:
                        call.cancel()
                        raise self._resume_failed(error, exc, gave_up=False) from None
                self._call = call
                self._resending = asyncio.ensure_future(self._write_all(call, resend))
                return
            raise self._resume_failed(error, last, gave_up=True)

    @staticmethod
    async def _write_all(call, requests: list[pb.StreamRequest]) -> None:
        """Re-send after a resume; a failure here shows on the reading side, which resumes again."""
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            for request in requests:
                await call.write(request)

    async def _collect_chunks_until(self, kind: type):
        """Read until the answer of `kind` (returned), keeping chunk results for the next append_*."""
        while (answer := self._awaited(await self._next(), kind)) is None:
            pass
        return answer

    # ------------------------------------------------------------------ input
    async def send_text(self, text: str, flush: bool = False) -> str:
        """Queue text without waiting for results (waits only under backpressure); returns the request id."""
        return await self._send(protocol.append_text_request(text, flush))

    async def send_tokens(self, ids: Iterable[int], flush: bool = False) -> str:
        """Queue token ids (used as they are, no BOS) without waiting; returns the request id."""
        return await self._send(protocol.append_tokens_request(ids, flush))

    async def send_message(self, role: str, content: str, flush: bool = False) -> str:
        """Queue one chat message without waiting; returns the request id."""
        return await self._send(protocol.append_message_request(role, content, flush))

    async def append_message(self, role: str, content: str) -> list[ChunkResult]:
        """Append one chat message (rendered with the model's chat template) and process everything
        pending; the chunk results since the last call."""
        await self.send_message(role, content, flush=True)
        await self._collect_chunks_until(Flushed)
        return self._take_chunks()

    async def append_text(self, text: str) -> list[ChunkResult]:
        """Append text and process everything pending; the chunk results since the last call."""
        await self.send_text(text, flush=True)
        await self._collect_chunks_until(Flushed)
        return self._take_chunks()

    async def append_tokens(self, ids: Iterable[int]) -> list[ChunkResult]:
        """Append token ids and process everything pending; the chunk results since the last call."""
        await self.send_tokens(ids, flush=True)
        await self._collect_chunks_until(Flushed)
        return self._take_chunks()

    async def flush(self) -> list[ChunkResult]:
        """Process everything pending (a final partial chunk, held-back text); the chunk results."""
        return await self.append_text("")

    async def stream_text(self, pieces: Iterable[str] | AsyncIterable[str], progress: Progress | None = None,
                          total_bytes: int | None = None) -> AsyncIterator[ChunkResult]:
        """Send pieces from a task while yielding chunk results as they arrive; ends with a flush, so
        every piece's tokens are processed when the iterator is exhausted.
        `progress(bytes_sent, total_bytes)` is called after each piece."""
        sent = 0

        async def send(piece: str) -> None:
            nonlocal sent
            await self.send_text(piece)
            if progress is not None:
                sent += len(piece.encode("utf-8"))
                progress(sent, total_bytes)

        async def feed() -> None:
            if isinstance(pieces, AsyncIterable):
                async for piece in pieces:
                    await send(piece)
            else:
                for piece in pieces:
                    await send(piece)
            await self.send_text("", flush=True)

        sender = asyncio.create_task(feed())
        self._feeder = sender
        try:
            for chunk in self._take_chunks():
                yield chunk
            while not self._flush_reached(result := await self._next()):
                if isinstance(result, ChunkResult):
                    yield result
            await sender
        finally:
            if not sender.done():
                sender.cancel()

    def stream_file(self, path: str | os.PathLike, progress: Progress | None = None,
                    block_chars: int = protocol.FILE_BLOCK_CHARS) -> AsyncIterator[ChunkResult]:
        """stream_text over a UTF-8 file read in blocks (any size; memory stays bounded);
        `progress(bytes_sent, file_size)` after each block."""
        return self.stream_text(protocol.read_text_blocks(path, block_chars), progress,
                                os.path.getsize(path))

    # ------------------------------------------------------------------ generation
    async def generate_stream(self, params: GenerateParams | None = None,
                              **kwargs) -> AsyncIterator[GeneratedToken]:
        """Yield tokens as they are generated; the final GenerationResult is `self.last_generation`."""
        await self._send(self._generate_request(params, kwargs))
        while not self._generated(result := await self._next()):
            if isinstance(result, GeneratedToken):
                yield result

    async def generate(self, params: GenerateParams | None = None, **kwargs) -> GenerationResult:
        """Generate and wait for the end; the result holds the text and every token."""
        async for _ in self.generate_stream(params, **kwargs):
            pass
        return self.last_generation

    async def cancel_generation(self) -> None:
        """Stop the running (or next queued) generation; it ends with stop reason CANCELLED."""
        await self._send(protocol.cancel_request())

    # ------------------------------------------------------------------ lifecycle
    async def checkpoint(self) -> Checkpointed:
        """Persist the session on the server now (needs `serve --state-dir`)."""
        await self._send(protocol.checkpoint_request())
        return await self._collect_chunks_until(Checkpointed)

    async def close(self) -> Closed:
        """End the session for good (its state is deleted)."""
        await self._send(protocol.close_request())
        try:
            closed = await self._collect_chunks_until(Closed)
        except SinkStreamError as exc:
            return self._closed_anyway(exc)
        await self._drain()
        return closed

    async def detach(self) -> None:
        """End this stream, keeping the session for a later resume."""
        if self._ended:
            return
        await self._call.done_writing()
        await self._drain()

    async def _drain(self) -> None:
        self._ended = True
        try:
            while (response := await self._call.read()) is not grpc.aio.EOF:
                self._drained(response)
        except grpc.RpcError as exc:
            if (error := protocol.drain_error(exc)) is not None:
                raise error from None

    def abort(self) -> None:
        """Cancel the call (as a client crash would); the server keeps the session."""
        self._ended = True
        self._call.cancel()
