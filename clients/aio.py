"""asyncio sinkstream client (grpc.aio); the same surface as clients.client, with coroutines.

    async with AsyncSinkStreamClient("127.0.0.1:50051") as client:
        session = await client.open_session(SessionSettings(logprobs=True))
        async for chunk in session.stream_text(pieces):
            ...
        result = await session.generate(GenerateParams(max_new_tokens=32))
        await session.detach()
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterable, AsyncIterator, Iterable

import grpc

from sinkstream.clients import protocol
from sinkstream.clients.protocol import Progress
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
    SessionOpened,
    SessionSettings,
    SinkStreamError,
)
from sinkstream.v1 import sinkstream_pb2 as pb
from sinkstream.v1 import sinkstream_pb2_grpc as pb_grpc


class AsyncSinkStreamClient:
    """An asyncio channel to a sinkstream server; unary calls and sessions."""

    def __init__(self, address: str, *, timeout: float | None = None,
                 max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
                 retry_attempts: int = 5) -> None:
        self.channel = grpc.aio.insecure_channel(address, options=protocol.channel_options(
            max_message_bytes, retry_attempts=retry_attempts))
        self.stub = pb_grpc.SinkStreamStub(self.channel)
        self.timeout = timeout

    async def __aenter__(self) -> AsyncSinkStreamClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (the server keeps sessions for resume)."""
        await self.channel.close()

    async def _unary(self, method, request):
        try:
            return await method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise protocol.rpc_error(exc) from None

    async def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text` as a session would get them (add_bos: as in its first append)."""
        request = pb.TokenizeRequest(text=text, add_bos=add_bos)
        return list((await self._unary(self.stub.Tokenize, request)).ids)

    async def model_info(self) -> ModelInfo:
        """The served model, the server's session defaults and its limits."""
        return protocol.model_info_from_pb(await self._unary(self.stub.ModelInfo, pb.ModelInfoRequest()))

    async def get_session(self, session_id: str) -> SessionInfo:
        """One session's state (raises SinkStreamError NOT_FOUND for an unknown id)."""
        return protocol.session_info_from_pb(
            await self._unary(self.stub.GetSession, pb.GetSessionRequest(session_id=session_id)))

    async def list_sessions(self) -> list[SessionInfo]:
        """Every live session, in creation order."""
        response = await self._unary(self.stub.ListSessions, pb.ListSessionsRequest())
        return [protocol.session_info_from_pb(s) for s in response.sessions]

    async def delete_session(self, session_id: str) -> int:
        """Delete a detached session; returns the tokens it had processed."""
        request = pb.DeleteSessionRequest(session_id=session_id)
        return (await self._unary(self.stub.DeleteSession, request)).tokens_seen

    async def health(self, service: str = "") -> str:
        """The server's health status name, e.g. "SERVING"."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        response = await self._unary(stub.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def open_session(self, settings: SessionSettings | None = None, *, seed: int | None = None,
                           session_id: str | None = None, timeout: float | None = None) -> AsyncSession:
        """Start a new session on a new stream (`timeout`: the stream's deadline in seconds)."""
        return await AsyncSession.start(self.stub, protocol.open_request(settings, seed, session_id), timeout)

    async def resume_session(self, session_id: str, settings: SessionSettings | None = None, *,
                             timeout: float | None = None) -> AsyncSession:
        """Attach to an existing session (settings given replace its analysis options)."""
        return await AsyncSession.start(self.stub, protocol.resume_request(session_id, settings), timeout)


class AsyncSession:
    """One session on one `Stream` call; use from one task (cancel_generation from any)."""

    def __init__(self, call) -> None:
        self._call = call
        self._ids = (str(i) for i in itertools.count(1))
        self._chunks: list[ChunkResult] = []
        self._ended = False
        self.opened: SessionOpened | None = None
        self.id = ""
        self.last_flush: Flushed | None = None
        self.last_generation: GenerationResult | None = None

    @classmethod
    async def start(cls, stub: pb_grpc.SinkStreamStub, first: pb.StreamRequest,
                    timeout: float | None) -> AsyncSession:
        """Open the stream, send `first` (open or resume) and wait for SessionOpened."""
        self = cls(stub.Stream(timeout=timeout))
        await self._write(first)
        self.opened = await self._next()
        self.id = self.opened.session_id
        return self

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            await self.detach()
        else:
            self.abort()

    async def _write(self, request: pb.StreamRequest) -> str:
        if self._ended:
            raise SinkStreamError(grpc.StatusCode.FAILED_PRECONDITION, "the session's stream has ended")
        request.request_id = request.request_id or next(self._ids)
        try:
            await self._call.write(request)
        except grpc.RpcError as exc:
            self._ended = True
            raise protocol.rpc_error(exc) from None
        except asyncio.InvalidStateError:
            self._ended = True
            await self._raise_status()
        return request.request_id

    async def _raise_status(self):
        code = await self._call.code()
        raise SinkStreamError(code, await self._call.details() or "the stream has ended")

    async def _next(self):
        try:
            response = await self._call.read()
        except grpc.RpcError as exc:
            self._ended = True
            raise protocol.rpc_error(exc) from None
        if response is grpc.aio.EOF:
            self._ended = True
            await self._raise_status()
        result = protocol.response_from_pb(response)
        if isinstance(result, SinkStreamError):
            raise result
        return result

    async def _collect_chunks_until(self, kind: type):
        while True:
            result = await self._next()
            if isinstance(result, ChunkResult):
                self._chunks.append(result)
            elif isinstance(result, kind):
                return result

    def _take_chunks(self) -> list[ChunkResult]:
        chunks, self._chunks = self._chunks, []
        return chunks

    # ------------------------------------------------------------------ input
    async def send_text(self, text: str, flush: bool = False) -> str:
        """Queue text without waiting for results; returns the request id."""
        return await self._write(pb.StreamRequest(append_text=pb.AppendText(text=text, flush=flush)))

    async def send_tokens(self, ids: Iterable[int], flush: bool = False) -> str:
        """Queue token ids (used as they are, no BOS) without waiting; returns the request id."""
        return await self._write(pb.StreamRequest(append_tokens=pb.AppendTokens(ids=list(ids), flush=flush)))

    async def append_text(self, text: str) -> list[ChunkResult]:
        """Append text and process everything pending; the chunk results since the last call."""
        await self.send_text(text, flush=True)
        self.last_flush = await self._collect_chunks_until(Flushed)
        return self._take_chunks()

    async def append_tokens(self, ids: Iterable[int]) -> list[ChunkResult]:
        """Append token ids and process everything pending; the chunk results since the last call."""
        await self.send_tokens(ids, flush=True)
        self.last_flush = await self._collect_chunks_until(Flushed)
        return self._take_chunks()

    async def stream_text(self, pieces: Iterable[str] | AsyncIterable[str], progress: Progress | None = None,
                          total_bytes: int | None = None) -> AsyncIterator[ChunkResult]:
        """Send pieces from a task while yielding chunk results; ends after the final flush.
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
        try:
            for chunk in self._take_chunks():
                yield chunk
            while True:
                result = await self._next()
                if isinstance(result, ChunkResult):
                    yield result
                elif isinstance(result, Flushed):
                    self.last_flush = result
                    break
            await sender
        finally:
            if not sender.done():
                sender.cancel()

    def stream_file(self, path: str | os.PathLike, progress: Progress | None = None,
                    block_chars: int = protocol.FILE_BLOCK_CHARS) -> AsyncIterator[ChunkResult]:
        """stream_text over a UTF-8 file read in blocks; `progress(bytes_sent, file_size)` per block."""
        return self.stream_text(protocol.read_text_blocks(path, block_chars), progress,
                                os.path.getsize(path))

    # ------------------------------------------------------------------ generation
    async def generate_stream(self, params: GenerateParams | None = None,
                              **kwargs) -> AsyncIterator[GeneratedToken]:
        """Yield tokens as generated; the final GenerationResult is `self.last_generation`."""
        await self._write(protocol.generate_request(params or GenerateParams(**kwargs), ""))
        tokens = []
        while True:
            result = await self._next()
            if isinstance(result, GeneratedToken):
                tokens.append(result)
                yield result
            elif isinstance(result, ChunkResult):
                self._chunks.append(result)
            elif isinstance(result, GenerationResult):
                result.tokens = tokens
                self.last_generation = result
                return

    async def generate(self, params: GenerateParams | None = None, **kwargs) -> GenerationResult:
        """Generate and wait for the end; the result holds the text and every token."""
        async for _ in self.generate_stream(params, **kwargs):
            pass
        return self.last_generation

    async def cancel_generation(self) -> None:
        """Stop the running (or next queued) generation; it ends with stop reason CANCELLED."""
        await self._write(pb.StreamRequest(cancel=pb.CancelGeneration()))

    # ------------------------------------------------------------------ lifecycle
    async def checkpoint(self) -> Checkpointed:
        """Persist the session on the server now (needs `serve --state-dir`)."""
        await self._write(pb.StreamRequest(checkpoint=pb.Checkpoint()))
        return await self._collect_chunks_until(Checkpointed)

    async def close(self) -> Closed:
        """End the session for good (its state is deleted)."""
        await self._write(pb.StreamRequest(close=pb.Close()))
        closed = await self._collect_chunks_until(Closed)
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
                result = protocol.response_from_pb(response)
                if isinstance(result, ChunkResult):
                    self._chunks.append(result)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise protocol.rpc_error(exc) from None

    def abort(self) -> None:
        """Cancel the call; the server keeps the session."""
        self._ended = True
        self._call.cancel()
