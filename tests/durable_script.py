"""A scripted stand-in for a durable sinkstream server, to test the clients' automatic resume on loopback
before (and besides) the real write-ahead log: a real gRPC server whose servicer follows the
"Acknowledgements" contract of sinkstream.proto with a toy model, and "crashes" at a chosen response.

Toy model: each character of appended text is one token (its code point); a chunk result per append
reports its ids and log-prob -id/100 (the stream's first token NaN); greedy generation emits
(sum of the stream + i) % 97. A crash loses everything not in the session's log (numbered requests are
logged when received, before anything is sent back) and ends the call with UNAVAILABLE (or `crash_code`);
the next resume recovers by replaying the log through the toy model and sends the chunk results of the
replayed input on the resuming stream, as a write-ahead-log server does after kill -9."""

from __future__ import annotations

import math
import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from sinkstream.v1 import sinkstream_pb2 as pb
from sinkstream.v1 import sinkstream_pb2_grpc as pb_grpc


class Crash(Exception):
    pass


@dataclass
class ToySession:
    log: list[pb.StreamRequest] = field(default_factory=list)  # numbered requests received, in seq order
    stream: list[int] = field(default_factory=list)  # processed tokens (lost at a crash)
    generations: dict[int, list[int]] = field(default_factory=dict)  # seq -> generated ids
    recovered: bool = True


class DurableScript(pb_grpc.SinkStreamServicer):
    """crash_at: crash when about to send this many responses in total (None: never);
    log_before_crash: whether the request being handled when the crash hits is in the log."""

    def __init__(self, crash_at: list[int], crash_code=grpc.StatusCode.UNAVAILABLE,
                 acks: bool = True) -> None:
        """acks False: a server that never acknowledges (an older one)."""
        self.acks = acks
        self.crash_at = sorted(crash_at)
        self.crash_code = crash_code
        self.sent = 0
        self.sessions: dict[str, ToySession] = {}
        self.calls: list[dict[str, str]] = []  # each Stream call's metadata, in order
        self.lock = threading.Lock()

    # -------------------------------------------------------------- the toy model
    @staticmethod
    def chunk(stream: list[int], ids: list[int]) -> pb.ChunkResult:
        end = len(stream)
        start = end - len(ids)
        lps = [math.nan if start + i == 0 else -t / 100 for i, t in enumerate(ids)]
        return pb.ChunkResult(num_tokens=len(ids), token_ids=ids, logprobs=lps, tokens_seen=end,
                              scored_tokens=max(end - 1, 0))

    @staticmethod
    def appended(request: pb.StreamRequest) -> list[int]:
        kind = request.WhichOneof("kind")
        if kind == "append_text":
            return [ord(c) for c in request.append_text.text]
        return list(request.append_tokens.ids) if kind == "append_tokens" else []

    def run(self, s: ToySession, request: pb.StreamRequest, rid: str, emit) -> None:
        """Process one request on `s`, emitting its responses (the generation's tokens are kept)."""
        if request.WhichOneof("kind") == "generate":
            n = request.generate.max_new_tokens or 8
            out = s.generations.setdefault(request.seq, []) if request.seq else []
            for i in range(n):
                if i >= len(out):
                    out.append((sum(s.stream) + i) % 97)
                    s.stream.append(out[-1])
                emit(pb.StreamResponse(request_id=rid, token=pb.GeneratedToken(token_id=out[i], index=i,
                                                                                text=f"<{out[i]}>")))
            emit(pb.StreamResponse(request_id=rid, generation_complete=pb.GenerationComplete(
                stop_reason=pb.STOP_REASON_MAX_TOKENS, generated_tokens=n, tokens_seen=len(s.stream),
                text="".join(f"<{t}>" for t in out))))
            return
        ids = self.appended(request)
        if ids:
            s.stream += ids
            emit(pb.StreamResponse(request_id=rid, chunk=self.chunk(s.stream, ids)))
        kind = request.WhichOneof("kind")
        if getattr(request, kind).flush:
            emit(pb.StreamResponse(request_id=rid, flushed=pb.Flushed(tokens_seen=len(s.stream))))

    # -------------------------------------------------------------- the service
    def Stream(self, request_iterator, context):  # noqa: N802
        out: list[pb.StreamResponse] = []
        self.calls.append(dict(context.invocation_metadata()))

        def emit(response: pb.StreamResponse) -> None:
            with self.lock:
                if self.crash_at and self.sent >= self.crash_at[0]:
                    self.crash_at.pop(0)
                    raise Crash
                self.sent += 1
            out.append(response)

        requests = iter(request_iterator)
        first = next(requests)
        try:
            if first.HasField("open"):
                sid = first.open.session_id or f"s{len(self.sessions) + 1}"
                s = self.sessions[sid] = ToySession()
            else:
                sid = first.resume.session_id
                if sid not in self.sessions:
                    context.abort(grpc.StatusCode.NOT_FOUND, f"session {sid} unknown or expired")
                s = self.sessions[sid]
            replay: list[pb.StreamResponse] = []
            if not s.recovered:  # recovery: the log replayed through the model, its results re-sent
                s.stream, s.generations = [], {}
                for logged in s.log:
                    self.run(s, logged, logged.request_id, lambda r: replay.append(r)
                             if r.HasField("chunk") else None)
                s.recovered = True
            acked = s.log[-1].seq if s.log else 0
            emit(pb.StreamResponse(request_id=first.request_id, session_opened=pb.SessionOpened(
                session_id=sid, resumed=first.HasField("resume"), tokens_seen=len(s.stream) - sum(
                    r.chunk.num_tokens for r in replay), acked_seq=acked)))
            for r in replay:
                emit(r)
            yield from self.flush(out)
            for request in requests:
                rid = request.request_id
                if request.seq:
                    acked = s.log[-1].seq if s.log else 0
                    if request.seq > acked + 1:
                        emit(pb.StreamResponse(request_id=rid, error=pb.Error(
                            code=pb.ERROR_CODE_OUT_OF_RANGE, field="seq", message=f"expected {acked + 1}")))
                    elif request.seq <= acked:  # a duplicate: a generate is answered again
                        if request.WhichOneof("kind") == "generate":
                            self.run(s, request, rid, emit)
                        self.ack(request.seq, emit)
                    else:
                        s.log.append(request)  # durable before anything is sent back
                        self.run(s, request, rid, emit)
                        self.ack(request.seq, emit)
                elif request.WhichOneof("kind") in ("append_text", "append_tokens", "generate"):
                    self.run(s, request, rid, emit)
                elif request.HasField("close"):
                    del self.sessions[sid]
                    emit(pb.StreamResponse(request_id=rid, closed=pb.Closed(session_id=sid,
                                                                             tokens_seen=len(s.stream))))
                    yield from self.flush(out)
                    return
                yield from self.flush(out)
        except Crash:
            yield from self.flush(out)
            s.recovered = False
            context.abort(self.crash_code, "backend died")

    def ack(self, seq: int, emit) -> None:
        if self.acks:
            emit(pb.StreamResponse(ack=pb.Acknowledged(seq=seq)))

    @staticmethod
    def flush(out: list):
        while out:
            yield out.pop(0)


def serve(servicer: DurableScript) -> tuple[grpc.Server, str]:
    # the clients ping every 30 s (protocol.channel_options): allow it, as the real server does
    server = grpc.server(futures.ThreadPoolExecutor(8), options=[
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000), ("grpc.keepalive_permit_without_calls", 1)])
    pb_grpc.add_SinkStreamServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"
