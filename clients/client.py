"""Synchronous sinkstream client.

    with SinkStreamClient("127.0.0.1:50051") as client:
        with client.open_session(SessionSettings(logprobs=True)) as session:
            for chunk in session.stream_text(open("doc.txt").read().split("\\n")):
                print(chunk.tokens_seen, chunk.perplexity)
            print(session.generate(GenerateParams(max_new_tokens=32)).text)
        # leaving the `with` detaches: the session stays on the server, resumable by id

Each Session is one bidirectional `Stream` call. Its methods are meant to be called from one thread
(cancel_generation may be called from any thread).
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections.abc import Iterable, Iterator

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

_END = object()
SEND_QUEUE = 8  # requests buffered client-side before send_* blocks (then HTTP/2 flow control)


class SinkStreamClient:
    """A channel to a sinkstream server; unary calls and sessions."""

    def __init__(self, address: str, *, timeout: float | None = None,
                 max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
                 retry_attempts: int = 5,
                 channel: grpc.Channel | None = None) -> None:
        self.channel = channel or grpc.insecure_channel(address, options=protocol.channel_options(
            max_message_bytes, retry_attempts=retry_attempts))
        self.stub = pb_grpc.SinkStreamStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> SinkStreamClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel (the server keeps sessions for resume)."""
        self.channel.close()

    def _unary(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise protocol.rpc_error(exc) from None

    # ------------------------------------------------------------------ unary calls
    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text` as a session would get them (add_bos: as in its first append)."""
        return list(self._unary(self.stub.Tokenize, pb.TokenizeRequest(text=text, add_bos=add_bos)).ids)

    def model_info(self) -> ModelInfo:
        """The served model, the server's session defaults and its limits."""
        return protocol.model_info_from_pb(self._unary(self.stub.ModelInfo, pb.ModelInfoRequest()))

    def get_session(self, session_id: str) -> SessionInfo:
        """One session's state (raises SinkStreamError NOT_FOUND for an unknown id)."""
        return protocol.session_info_from_pb(
            self._unary(self.stub.GetSession, pb.GetSessionRequest(session_id=session_id)))

    def list_sessions(self) -> list[SessionInfo]:
        """Every live session, in creation order."""
        response = self._unary(self.stub.ListSessions, pb.ListSessionsRequest())
        return [protocol.session_info_from_pb(s) for s in response.sessions]

    def delete_session(self, session_id: str) -> int:
        """Delete a detached session; returns the tokens it had processed."""
        request = pb.DeleteSessionRequest(session_id=session_id)
        return self._unary(self.stub.DeleteSession, request).tokens_seen

    def health(self, service: str = "") -> str:
        """The server's health status name, e.g. "SERVING"."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        status = self._unary(stub.Check, health_pb2.HealthCheckRequest(service=service)).status
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)

    # ------------------------------------------------------------------ sessions
    def open_session(self, settings: SessionSettings | None = None, *, seed: int | None = None,
                     session_id: str | None = None, timeout: float | None = None) -> Session:
        """Start a new session on a new stream."""
        return Session(self.stub, protocol.open_request(settings, seed, session_id), timeout)

    def resume_session(self, session_id: str, settings: SessionSettings | None = None, *,
                       timeout: float | None = None) -> Session:
        """Attach to an existing session (settings given replace its analysis options)."""
        return Session(self.stub, protocol.resume_request(session_id, settings), timeout)


class Session:
    """One session on one `Stream` call. `timeout` is the call's deadline in seconds."""

    def __init__(self, stub: pb_grpc.SinkStreamStub, first: pb.StreamRequest, timeout: float | None) -> None:
        self._requests: queue.Queue = queue.Queue(SEND_QUEUE)
        self._requests.put(first)
        self._call = stub.Stream(iter(self._requests.get, _END), timeout=timeout)
        self._ids = (str(i) for i in itertools.count(1))
        self._lock = threading.Lock()
        self._ended = False
        self._chunks: list[ChunkResult] = []  # results read while waiting for something else
        self.last_flush: Flushed | None = None  # set by append_*/flush/stream_*
        self.last_generation: GenerationResult | None = None  # set by generate/generate_stream
        opened = self._next()
        assert isinstance(opened, SessionOpened)
        self.opened: SessionOpened = opened
        self.id = opened.session_id

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.detach()
        else:
            self.abort()

    # ------------------------------------------------------------------ plumbing
    def _send(self, request: pb.StreamRequest) -> str:
        if self._ended:
            raise SinkStreamError(grpc.StatusCode.FAILED_PRECONDITION, "the session's stream has ended")
        with self._lock:
            request.request_id = request.request_id or next(self._ids)
        while True:  # blocks while the server applies backpressure, but not past the call's end
            try:
                self._requests.put(request, timeout=0.1)
                return request.request_id
            except queue.Full:
                if self._ended or not self._call.is_active():
                    self._ended = True
                    raise SinkStreamError(grpc.StatusCode.CANCELLED, "the stream has ended") from None

    def _next(self):
        """The next response as a dataclass; raises SinkStreamError for an Error or a failed call."""
        try:
            response = next(self._call)
        except grpc.RpcError as exc:
            self._ended = True
            raise protocol.rpc_error(exc) from None
        except StopIteration:
            self._ended = True
            raise SinkStreamError(grpc.StatusCode.UNAVAILABLE, "the server ended the stream") from None
        result = protocol.response_from_pb(response)
        if isinstance(result, SinkStreamError):
            raise result
        return result

    def _until(self, kind: type) -> Iterator:
        """Yield results until one of `kind` (which is yielded last)."""
        while True:
            result = self._next()
            yield result
            if isinstance(result, kind):
                return

    def _collect_chunks_until(self, kind: type):
        for result in self._until(kind):
            if isinstance(result, ChunkResult):
                self._chunks.append(result)
            elif isinstance(result, kind):
                return result

    def _take_chunks(self) -> list[ChunkResult]:
        chunks, self._chunks = self._chunks, []
        return chunks

    # ------------------------------------------------------------------ input
    def send_text(self, text: str, flush: bool = False) -> str:
        """Queue text without waiting for results (blocks only under backpressure); returns the request id."""
        return self._send(pb.StreamRequest(append_text=pb.AppendText(text=text, flush=flush)))

    def send_tokens(self, ids: Iterable[int], flush: bool = False) -> str:
        """Queue token ids (used as they are, no BOS) without waiting; returns the request id."""
        return self._send(pb.StreamRequest(append_tokens=pb.AppendTokens(ids=list(ids), flush=flush)))

    def append_text(self, text: str) -> list[ChunkResult]:
        """Append text and process everything pending; the chunk results since the last call."""
        self.send_text(text, flush=True)
        self.last_flush = self._collect_chunks_until(Flushed)
        return self._take_chunks()

    def append_tokens(self, ids: Iterable[int]) -> list[ChunkResult]:
        """Append token ids and process everything pending; the chunk results since the last call."""
        self.send_tokens(ids, flush=True)
        self.last_flush = self._collect_chunks_until(Flushed)
        return self._take_chunks()

    def flush(self) -> list[ChunkResult]:
        """Process everything pending (a final partial chunk, held-back text); the chunk results."""
        return self.append_text("")

    def stream_text(self, pieces: Iterable[str], progress: Progress | None = None,
                    total_bytes: int | None = None) -> Iterator[ChunkResult]:
        """Send pieces from a background thread while yielding chunk results as they arrive; ends with
        a flush, so every piece's tokens are processed when the iterator is exhausted.
        `progress(bytes_sent, total_bytes)` is called (from the sending thread) after each piece."""
        errors: list[BaseException] = []

        def feed() -> None:
            try:
                sent = 0
                for piece in pieces:
                    self.send_text(piece)
                    if progress is not None:
                        sent += len(piece.encode("utf-8"))
                        progress(sent, total_bytes)
                self.send_text("", flush=True)
            except BaseException as exc:  # surfaced to the reading thread
                errors.append(exc)
                self.abort()

        sender = threading.Thread(target=feed, daemon=True, name="sinkstream-send")
        sender.start()
        yield from self._take_chunks()
        try:
            for result in self._until(Flushed):
                if isinstance(result, ChunkResult):
                    yield result
                else:
                    self.last_flush = result
        except SinkStreamError:
            if errors:
                raise errors[0] from None
            raise
        sender.join()

    def stream_file(self, path: str | os.PathLike, progress: Progress | None = None,
                    block_chars: int = protocol.FILE_BLOCK_CHARS) -> Iterator[ChunkResult]:
        """stream_text over a UTF-8 file read in blocks (any size; memory stays bounded);
        `progress(bytes_sent, file_size)` after each block."""
        return self.stream_text(protocol.read_text_blocks(path, block_chars), progress,
                                os.path.getsize(path))

    # ------------------------------------------------------------------ generation
    def generate_stream(self, params: GenerateParams | None = None, **kwargs) -> Iterator[GeneratedToken]:
        """Yield tokens as they are generated; the final GenerationResult is `self.last_generation`."""
        params = params or GenerateParams(**kwargs)
        self._send(protocol.generate_request(params, ""))
        tokens = []
        for result in self._until(GenerationResult):
            if isinstance(result, GeneratedToken):
                tokens.append(result)
                yield result
            elif isinstance(result, ChunkResult):
                self._chunks.append(result)
            elif isinstance(result, GenerationResult):
                result.tokens = tokens
                self.last_generation = result

    def generate(self, params: GenerateParams | None = None, **kwargs) -> GenerationResult:
        """Generate and wait for the end; the result holds the text and every token."""
        for _ in self.generate_stream(params, **kwargs):
            pass
        return self.last_generation

    def cancel_generation(self) -> None:
        """Stop the running (or next queued) generation; it ends with stop reason CANCELLED."""
        self._send(pb.StreamRequest(cancel=pb.CancelGeneration()))

    # ------------------------------------------------------------------ lifecycle
    def checkpoint(self) -> Checkpointed:
        """Persist the session on the server now (needs `serve --state-dir`)."""
        self._send(pb.StreamRequest(checkpoint=pb.Checkpoint()))
        return self._collect_chunks_until(Checkpointed)

    def close(self) -> Closed:
        """End the session for good (its state is deleted)."""
        self._send(pb.StreamRequest(close=pb.Close()))
        closed = self._collect_chunks_until(Closed)
        self._finish()
        return closed

    def detach(self) -> None:
        """End this stream, keeping the session for a later resume."""
        if self._ended:
            return
        self._requests.put(_END)
        try:
            for response in self._call:
                result = protocol.response_from_pb(response)
                if isinstance(result, ChunkResult):
                    self._chunks.append(result)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise protocol.rpc_error(exc) from None
        self._ended = True

    def _finish(self) -> None:
        self._ended = True
        self._requests.put(_END)
        for _ in self._call:
            pass

    def abort(self) -> None:
        """Cancel the call (as a client crash would); the server keeps the session."""
        self._ended = True
        self._call.cancel()
