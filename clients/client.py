"""Synchronous sinkstream client: the protocol (protocol.py) over a blocking gRPC channel.

    with SinkStreamClient("127.0.0.1:50051") as client:
        with client.open_session(SessionSettings(logprobs=True)) as session:
            for chunk in session.stream_text(open("doc.txt").read().split("\\n")):
                print(chunk.tokens_seen, chunk.perplexity)
            print(session.generate(GenerateParams(max_new_tokens=32)).text)
        # leaving the `with` detaches: the session stays on the server, resumable by id

Each Session is one bidirectional `Stream` call at a time. Its methods are meant to be called from one
thread (cancel_generation may be called from any thread). When the call fails with UNAVAILABLE (or
CANCELLED / INTERNAL the caller did not cause) the session resumes on a new call within
`ResumePolicy.resume_timeout_s` and re-sends what the server had not acknowledged; results it delivers
again are dropped, so the caller sees one uninterrupted run (guarantees and bounds: resume.py).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
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
_END = object()
SEND_QUEUE = 8  # requests buffered client-side before send_* blocks (then HTTP/2 flow control)


class SinkStreamClient:
    """A channel to a sinkstream server; unary calls and sessions."""

    def __init__(self, address: str, *, timeout: float | None = None,
                 max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
                 retry_attempts: int = 5, resume: ResumePolicy | None = None,
                 channel: grpc.Channel | None = None, token: str | None = None,
                 tls: bool = False, tls_ca: Pem | None = None, tls_cert: Pem | None = None,
                 tls_key: Pem | None = None) -> None:
        """`channel` given: use it (its options as they are) instead of opening one to `address`.
        `resume`: how sessions survive a server failure (default ResumePolicy(); resume_timeout_s=0: off).
        `token`: sent as `authorization: Bearer TOKEN` on every call. TLS when `tls` or any TLS file is
        given: `tls_ca` the CA the server's certificate must chain to (PEM path or bytes; None: the
        system's roots), `tls_cert` and `tls_key` this client's certificate for mutual TLS."""
        self.metadata = auth_metadata(token)
        self.channel = channel or open_channel(
            address, protocol.channel_options(max_message_bytes, retry_attempts=retry_attempts), tls=tls,
            tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, aio=False)
        self.stub = pb_grpc.SinkStreamStub(self.channel)
        self.timeout = timeout
        self.resume = resume or ResumePolicy()

    def __enter__(self) -> SinkStreamClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel (the server keeps sessions for resume)."""
        self.channel.close()

    def _unary(self, call: UnaryCall[T]) -> T:
        rpc = protocol.unary_callable(self.channel, call)
        try:
            metadata = tuple(self.metadata) + tuple(call.metadata)  # auth, then routing
            return call.interpret(rpc(call.request, timeout=self.timeout, metadata=metadata))
        except grpc.RpcError as exc:
            raise protocol.rpc_error(exc) from None

    # ------------------------------------------------------------------ unary calls
    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text` as a session would get them (add_bos: as in its first append)."""
        return self._unary(protocol.tokenize_call(text, add_bos))

    def model_info(self) -> ModelInfo:
        """The served model, the server's session defaults and its limits."""
        return self._unary(protocol.model_info_call())

    def get_session(self, session_id: str) -> SessionInfo:
        """One session's state (raises SinkStreamError NOT_FOUND for an unknown id)."""
        return self._unary(protocol.get_session_call(session_id))

    def list_sessions(self) -> list[SessionInfo]:
        """Every live session, in creation order."""
        return self._unary(protocol.list_sessions_call())

    def delete_session(self, session_id: str) -> int:
        """Delete a detached session; returns the tokens it had processed."""
        return self._unary(protocol.delete_session_call(session_id))

    def health(self, service: str = "") -> str:
        """The server's health status name, e.g. "SERVING"."""
        return self._unary(protocol.health_call(service))

    # ------------------------------------------------------------------ sessions
    def open_session(self, settings: SessionSettings | None = None, *, seed: int | None = None,
                     session_id: str | None = None, timeout: float | None = None,
                     system_message: str | None = None, pin_system: bool | None = None) -> Session:
        """Start a new session on a new stream (`timeout`: the stream's deadline in seconds);
        `system_message` starts its conversation, kept in the cache unless `pin_system` is False."""
        request = protocol.open_request(settings, seed, session_id, system_message=system_message,
                                        pin_system=pin_system)
        return Session.start(self.stub, request, timeout, self.resume, self.metadata)

    def resume_session(self, session_id: str, settings: SessionSettings | None = None, *,
                       timeout: float | None = None) -> Session:
        """Attach to an existing session (settings given replace its analysis options)."""
        return Session.start(self.stub, protocol.resume_request(session_id, settings), timeout, self.resume,
                             self.metadata)


class _Outbox:
    """The requests of one `Stream` call: `first` (open or resume), then `resend` once it is set (what a
    resume re-sends; held in a list so re-sending never blocks on the queue), then the bounded queue."""

    def __init__(self, first: pb.StreamRequest) -> None:
        self.first = first
        self.queue: queue.Queue = queue.Queue(SEND_QUEUE)
        self.resend: list[pb.StreamRequest] = []
        self.ready = threading.Event()

    def __iter__(self) -> Iterator[pb.StreamRequest]:
        yield self.first
        self.ready.wait()
        yield from self.resend
        yield from iter(self.queue.get, _END)

    def start(self, resend: list[pb.StreamRequest]) -> None:
        self.resend = resend
        self.ready.set()


class Session(SessionProtocol):
    """One session, on one `Stream` call at a time: requests go through a bounded queue the call reads.
    When the call fails with UNAVAILABLE (or CANCELLED / INTERNAL not of the caller's doing) the session
    resumes on a new call and re-sends what the server has not acknowledged (see resume.py)."""

    def __init__(self, stub: pb_grpc.SinkStreamStub, first: pb.StreamRequest, timeout: float | None,
                 policy: ResumePolicy | None = None, metadata: Metadata = ()) -> None:
        """Open the stream and send `first` (open or resume); start() also waits for SessionOpened."""
        super().__init__(policy)
        self._stub = stub
        self._metadata = tuple(metadata)
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._resume_lock = threading.Lock()  # one resume at a time (the reader or a blocked sender)
        self._room = threading.Condition()  # notified on acks: a sender waiting for replay-buffer room
        self._feeder: threading.Thread | None = None  # stream_text's sending thread (not the reader)
        self._early: collections.deque = collections.deque()  # read by a sender waiting for room
        self._call, self._outbox = self._open_call(first)
        self._outbox.start([])

    @classmethod
    def start(cls, stub: pb_grpc.SinkStreamStub, first: pb.StreamRequest, timeout: float | None,
              policy: ResumePolicy | None = None, metadata: Metadata = ()) -> Session:
        """Open the stream, send `first` (open or resume) and wait for SessionOpened. Every call of the
        session (the first and each resume's) carries `metadata` (auth), then the routing metadata
        (`x-session-id` when the id is known)."""
        self = cls(stub, first, timeout, policy, metadata)
        try:
            self._on_opened(self._interpret_opened(next(self._call)))
        except grpc.RpcError as exc:
            raise self._failed(protocol.rpc_error(exc)) from None
        except StopIteration:
            raise self._failed(protocol.stream_ended_error(None, None)) from None
        return self

    def _open_call(self, first: pb.StreamRequest):
        outbox = _Outbox(first)
        timeout = None if self._deadline is None else max(self._deadline - time.monotonic(), 0.001)
        metadata = self._metadata + tuple(protocol.stream_metadata(first))  # auth, then routing
        return self._stub.Stream(iter(outbox), timeout=timeout, metadata=metadata), outbox

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.detach()
        else:
            self.abort()

    # ------------------------------------------------------------------ transport
    def _send(self, request: pb.StreamRequest) -> str:
        if is_sequenced(request):  # only numbered requests fill the replay buffer (cancel never waits)
            self._wait_for_room()
        stream_no = self._stamp(request)
        while True:  # blocks while the server applies backpressure, but not past the call's end
            with self._ids_lock:
                if self._ended:
                    raise SinkStreamError(grpc.StatusCode.FAILED_PRECONDITION,
                                          "the session's stream has ended")
                if request.seq and stream_no < self._stream_no:
                    return request.request_id  # numbered before a resume, which re-sent it
                call, outbox, stream_no = self._call, self._outbox, self._stream_no
            try:
                outbox.queue.put(request, timeout=0.1)
                return request.request_id
            except queue.Full:
                if not call.is_active():
                    self._recover(call, protocol.stream_ended_error(call.code(), call.details()))

    def _wait_for_room(self) -> None:
        """Backpressure of the replay buffer: wait until acks make room. stream_text's sending thread
        waits for the reader; a caller that reads nothing meanwhile reads the responses itself."""
        while self._replay_full():
            if self._feeder is threading.current_thread():
                with self._room:
                    self._room.wait(0.1)
                if self._ended:
                    return
            else:
                self._early.append(self._read())

    def _acknowledged(self) -> None:
        with self._room:
            self._room.notify_all()

    def _next(self):
        """The next response as a dataclass; raises SinkStreamError for an Error or a failed call that
        could not be resumed."""
        return self._early.popleft() if self._early else self._read()

    def _read(self):
        while True:
            call = self._call
            try:
                response = next(call)
            except grpc.RpcError as exc:
                self._recover(call, protocol.rpc_error(exc))
                continue
            except StopIteration:
                self._recover(call, protocol.stream_ended_error(None, None))
                continue
            result = self._interpret(response)
            if result is not None:
                return result

    def _collect_chunks_until(self, kind: type):
        """Read until the answer of `kind` (returned), keeping chunk results for the next append_*."""
        while (answer := self._awaited(self._next(), kind)) is None:
            pass
        return answer

    def _recover(self, failed, error: SinkStreamError) -> None:
        """The call `failed` with `error`: resume the session on a new call (re-sending what the server
        has not acknowledged), or raise `error` (or why resuming failed) when it cannot be resumed."""
        with self._resume_lock:
            if failed is not self._call:
                return  # another thread resumed already
            if not self._may_resume(error):
                raise self._failed(error)
            failed.cancel()
            with contextlib.suppress(queue.Full):  # let the dead call's request thread end
                self._outbox.queue.put_nowait(_END)
            last = None
            for delay in itertools.chain([0.0], self.policy.delays()):
                time.sleep(delay)
                call, outbox = self._open_call(self._auto_resume_request())
                try:
                    opened = self._interpret_opened(next(call))
                except (grpc.RpcError, StopIteration, SinkStreamError) as exc:
                    call.cancel()
                    outbox.start([])
                    outbox.queue.put_nowait(_END)  # the attempt's request thread ends too
                    last = exc if isinstance(exc, SinkStreamError) else (
                        protocol.rpc_error(exc) if isinstance(exc, grpc.RpcError)
                        else protocol.stream_ended_error(None, None))
                    if last.code in RETRY_RESUME:
                        continue
                    raise self._resume_failed(error, last, gave_up=False) from None
                with self._ids_lock:
                    try:
                        resend = self._resumed(opened)
                    except SinkStreamError as exc:
                        call.cancel()
                        raise self._resume_failed(error, exc, gave_up=False) from None
                    self._call, self._outbox = call, outbox
                outbox.start(resend)
                return
            raise self._resume_failed(error, last, gave_up=True)

    # ------------------------------------------------------------------ input
    def send_text(self, text: str, flush: bool = False) -> str:
        """Queue text without waiting for results (blocks only under backpressure); returns the request id."""
        return self._send(protocol.append_text_request(text, flush))

    def send_tokens(self, ids: Iterable[int], flush: bool = False) -> str:
        """Queue token ids (used as they are, no BOS) without waiting; returns the request id."""
        return self._send(protocol.append_tokens_request(ids, flush))

    def send_message(self, role: str, content: str, flush: bool = False) -> str:
        """Queue one chat message without waiting; returns the request id."""
        return self._send(protocol.append_message_request(role, content, flush))

    def append_message(self, role: str, content: str) -> list[ChunkResult]:
        """Append one chat message (rendered with the model's chat template) and process everything
        pending; the chunk results since the last call."""
        self.send_message(role, content, flush=True)
        self._collect_chunks_until(Flushed)
        return self._take_chunks()

    def append_text(self, text: str) -> list[ChunkResult]:
        """Append text and process everything pending; the chunk results since the last call."""
        self.send_text(text, flush=True)
        self._collect_chunks_until(Flushed)
        return self._take_chunks()

    def append_tokens(self, ids: Iterable[int]) -> list[ChunkResult]:
        """Append token ids and process everything pending; the chunk results since the last call."""
        self.send_tokens(ids, flush=True)
        self._collect_chunks_until(Flushed)
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
            self._feeder = threading.current_thread()
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
            while not self._flush_reached(result := self._next()):
                if isinstance(result, ChunkResult):
                    yield result
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
        self._send(self._generate_request(params, kwargs))
        while not self._generated(result := self._next()):
            if isinstance(result, GeneratedToken):
                yield result

    def generate(self, params: GenerateParams | None = None, **kwargs) -> GenerationResult:
        """Generate and wait for the end; the result holds the text and every token."""
        for _ in self.generate_stream(params, **kwargs):
            pass
        return self.last_generation

    def cancel_generation(self) -> None:
        """Stop the running (or next queued) generation; it ends with stop reason CANCELLED."""
        self._send(protocol.cancel_request())

    # ------------------------------------------------------------------ lifecycle
    def checkpoint(self) -> Checkpointed:
        """Persist the session on the server now (needs `serve --state-dir`)."""
        self._send(protocol.checkpoint_request())
        return self._collect_chunks_until(Checkpointed)

    def close(self) -> Closed:
        """End the session for good (its state is deleted)."""
        self._send(protocol.close_request())
        try:
            closed = self._collect_chunks_until(Closed)
        except SinkStreamError as exc:
            return self._closed_anyway(exc)
        self._ended = True
        self._outbox.queue.put(_END)
        self._drain()
        return closed

    def detach(self) -> None:
        """End this stream, keeping the session for a later resume."""
        if self._ended:
            return
        self._outbox.queue.put(_END)
        self._drain()

    def _drain(self) -> None:
        self._ended = True
        try:
            for response in self._call:
                self._drained(response)
        except grpc.RpcError as exc:
            if (error := protocol.drain_error(exc)) is not None:
                raise error from None

    def abort(self) -> None:
        """Cancel the call (as a client crash would); the server keeps the session."""
        self._ended = True
        self._call.cancel()
