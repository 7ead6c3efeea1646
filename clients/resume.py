"""Client-side durability (issue 14): numbering state-changing requests, the replay buffer of requests the
server has not acknowledged yet, de-duplication of what a resumed stream re-delivers, and the resume
policy (which failures are resumed, backoff, time limit). Pure bookkeeping, no I/O: protocol.SessionProtocol
uses it, and the transports (client.py, aio.py) only move messages.

The contract is the "Acknowledgements" block of sinkstream.proto. What the client guarantees on top of it:

- Numbering: append_text, append_tokens, append_message and generate get `seq` = last + 1 (a new session
  starts at 1, an explicitly resumed one continues after `SessionOpened.acked_seq`). Other requests
  (checkpoint, close, cancel) are unnumbered.
- Replay buffer: every numbered request stays in the buffer until an `ack` covers it (acks are
  cumulative). What bounds it by design: the server reads a stream's requests only while the session's
  input budget has room (max(4 * chunk, 65536) tokens) and acknowledges what it read within one group
  commit, so unacknowledged requests are at most those in flight (the send queue, the HTTP/2 window) plus
  one budget. `ResumePolicy.max_unacked_bytes` / `max_unacked_requests` is the hard cap: past it, sending
  waits for acks (backpressure). A server that has never acknowledged anything by then (no state
  directory, or an older server) is taken not to acknowledge: the buffer is dropped and the session goes on
  without auto-resume, so memory stays bounded.
- De-duplication after a resume: chunk results are delivered by stream position. A chunk whose
  `tokens_seen` is at most the highest position already delivered is dropped; one that overlaps it is cut
  to its new tokens; one that starts beyond it (results lost that the server cannot send again) fails
  the session with DATA_LOSS rather than hand the caller a stream with a hole. A resume asks for the
  results past the delivered position (ResumeSession.results_after): a server that recovers the session
  from its log on that resume sends them again, which fills what a crash lost in flight. Generated
  tokens are delivered by `GeneratedToken.index`: a re-sent token whose index was delivered is dropped
  (and must have the same id, else DATA_LOSS). The final answers (Flushed, GenerationComplete) of a
  request are delivered once, matched by request id.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, replace

import grpc

from sinkstream.clients.results import ChunkResult, GeneratedToken, SinkStreamError
from sinkstream.v1 import sinkstream_pb2 as pb

log = logging.getLogger("sinkstream.clients")

SEQUENCED_KINDS = ("append_text", "append_tokens", "append_message", "generate")
# Failures after which a stream is resumed (CANCELLED / INTERNAL: what a proxy reports when the backend
# behind it dies; a cancel of the caller's own never gets here, the session is marked ended first).
RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL)
# Failures of a ResumeSession attempt that are tried again while the time allows: the server is not up
# yet, or it still sees the dead stream attached (ABORTED) until it notices the connection is gone.
RETRY_RESUME = (*RESUMABLE, grpc.StatusCode.ABORTED)


@dataclass(frozen=True)
class ResumePolicy:
    """How a session survives a server failure. resume_timeout_s: how long to keep trying to resume
    (0 = never resume: failures reach the caller as before); backoff between attempts grows from
    initial_backoff_s by `multiplier` up to max_backoff_s. max_unacked_*: the replay buffer's cap.
    first_ack_timeout_s: how long a sender waits at the cap for a session's very first ack before taking
    the server not to acknowledge at all (see ReplayBuffer.give_up_if_never_acked)."""

    resume_timeout_s: float = 60.0
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    max_unacked_bytes: int = 32 << 20
    max_unacked_requests: int = 4096
    first_ack_timeout_s: float = 10.0

    def delays(self) -> Iterator[float]:
        """Sleep before each further resume attempt, until resume_timeout_s has passed (then stops)."""
        end = time.monotonic() + self.resume_timeout_s
        delay = self.initial_backoff_s
        while (left := end - time.monotonic()) > 0:
            yield min(delay, left)
            delay = min(delay * self.multiplier, self.max_backoff_s)


def is_sequenced(request: pb.StreamRequest) -> bool:
    return request.WhichOneof("kind") in SEQUENCED_KINDS


def answer_kind(request: pb.StreamRequest) -> str | None:
    """The response kind that finally answers `request`, when the caller waits for one."""
    kind = request.WhichOneof("kind")
    if kind in ("append_text", "append_tokens", "append_message"):
        return "flushed" if getattr(request, kind).flush else None
    return {"generate": "generation_complete", "checkpoint": "checkpointed", "close": "closed"}.get(kind)


@dataclass
class _Sent:
    """A request the server may still owe something: an ack (numbered), or its final answer."""

    request: pb.StreamRequest
    size: int
    acked: bool = False
    answered: bool = False  # its final answer was delivered (re-deliveries are dropped)


class ReplayBuffer:
    """Numbered requests not yet acknowledged, plus requests whose final answer is outstanding, in the
    order they were sent. number() before sending, on_ack() / on_answer() as responses arrive,
    resend_after() when the stream was resumed."""

    def __init__(self, policy: ResumePolicy, acked_seq: int = 0) -> None:
        self.policy = policy
        self.last_seq = acked_seq  # highest seq handed out
        self.acked_seq = acked_seq
        self.ever_acked = acked_seq > 0
        self.durable = True  # False once the server is taken not to acknowledge
        self._sent: OrderedDict[str, _Sent] = OrderedDict()  # by request id, in send order
        self._unacked_bytes = 0
        self._unacked = 0
        self._full_since: float | None = None  # when the buffer was first seen full with no ack yet
        self._reasked: dict[int, str] = {}  # seq -> request id of acknowledged generates asked again

    def number(self, request: pb.StreamRequest) -> None:
        """Give a state-changing request its seq (others stay 0) and keep what a resume needs."""
        sequenced = self.durable and is_sequenced(request)
        if sequenced:
            self.last_seq += 1
            request.seq = self.last_seq
        if not sequenced and answer_kind(request) is None:
            return
        entry = _Sent(request, request.ByteSize(), acked=not sequenced)
        self._sent[request.request_id] = entry
        if sequenced:
            self._unacked_bytes += entry.size
            self._unacked += 1

    def full(self) -> bool:
        """Over the cap: the sender must wait for acks (see give_up_if_never_acked)."""
        return self._unacked_bytes > self.policy.max_unacked_bytes or \
            self._unacked > self.policy.max_unacked_requests

    def give_up_if_never_acked(self) -> bool:
        """When the buffer has been full for first_ack_timeout_s and nothing was ever acknowledged, stop
        numbering and drop the buffer (the server does not acknowledge); True if that happened."""
        if not self.full() or self.ever_acked:
            self._full_since = None
            return False
        now = time.monotonic()
        if self._full_since is None:
            self._full_since = now
        if now - self._full_since < self.policy.first_ack_timeout_s:
            return False
        log.warning("no acknowledgement after %d requests (%d bytes): the server keeps no write-ahead log "
                    "(serve --state-dir?); this session will not resume on its own",
                    self._unacked, self._unacked_bytes)
        self.durable = False
        for rid, entry in list(self._sent.items()):
            if not entry.acked:
                entry.acked = True
                self._drop_if_done(rid)
        self._unacked_bytes = self._unacked = 0
        return True

    def on_ack(self, seq: int) -> None:
        """Every numbered request up to `seq` is durable. DATA_LOSS when this is the answer to a generate
        asked again after a resume and its result did not come first (the server no longer holds it)."""
        self.ever_acked = True
        if (rid := self._reasked.pop(seq, None)) in self._sent and not self.answered(rid):
            raise SinkStreamError(grpc.StatusCode.DATA_LOSS, f"the generation of seq {seq} was cut by the "
                                  "failure and the server no longer holds its result (it keeps only the last "
                                  "generation's), so its remaining tokens cannot be delivered")
        if seq <= self.acked_seq:
            return
        if seq > self.last_seq:
            raise SinkStreamError(grpc.StatusCode.INTERNAL,
                                  f"the server acknowledged seq {seq}, but only {self.last_seq} were sent")
        self.acked_seq = seq
        for rid, entry in list(self._sent.items()):
            if entry.acked or entry.request.seq > seq:
                continue
            entry.acked = True
            self._unacked_bytes -= entry.size
            self._unacked -= 1
            self._drop_if_done(rid)

    def on_answer(self, request_id: str, kind: str) -> bool:
        """A final answer of `kind` for `request_id` arrived: True if it is new (deliver it), False if it
        is a re-delivery of one already delivered (drop it)."""
        entry = self._sent.get(request_id)
        if entry is None or answer_kind(entry.request) != kind:
            return True
        if entry.answered:
            return False
        entry.answered = True
        self._drop_if_done(request_id)
        return True

    def on_error(self, request_id: str) -> None:
        """The request was refused: no final answer will come (it is still replayed until acked)."""
        if (entry := self._sent.get(request_id)) is not None:
            entry.answered = True
            self._drop_if_done(request_id)

    def answered(self, request_id: str) -> bool:
        """Whether the final answer of `request_id` was already delivered (its responses are stale)."""
        entry = self._sent.get(request_id)
        return entry is not None and entry.answered

    def _drop_if_done(self, request_id: str) -> None:
        entry = self._sent[request_id]
        if entry.acked and (entry.answered or answer_kind(entry.request) is None):
            del self._sent[request_id]

    def resend_after(self, acked_seq: int, cancel_pending: bool) -> list[pb.StreamRequest]:
        """What to send on a resumed stream whose session has acknowledged up to `acked_seq`, in the
        original order: every numbered request after it (same seq, same request id); for an acknowledged
        request whose final answer was lost, what makes the server answer it again (the same generate,
        which the server answers from the stored generation; an unnumbered empty flush for an append;
        the same checkpoint or close); then a cancel if one was pending."""
        if acked_seq > self.last_seq:
            raise SinkStreamError(grpc.StatusCode.DATA_LOSS, f"the resumed session has acknowledged seq "
                                  f"{acked_seq}, but this client only sent {self.last_seq}: another client "
                                  "wrote to it")
        if not self.durable and acked_seq < self.last_seq:
            raise SinkStreamError(grpc.StatusCode.DATA_LOSS, f"requests after seq {acked_seq} were never "
                                  "acknowledged and are no longer buffered; they cannot be replayed")
        self._reasked.clear()  # asked again below if still unanswered
        if acked_seq:
            self.on_ack(acked_seq)
        out = []
        for rid, entry in self._sent.items():
            if entry.request.seq > acked_seq:
                out.append(entry.request)
            elif not entry.answered and (kind := answer_kind(entry.request)) is not None:
                if kind == "flushed":
                    out.append(pb.StreamRequest(request_id=rid, append_text=pb.AppendText(flush=True)))
                else:
                    out.append(entry.request)
                    if kind == "generation_complete":
                        self._reasked[entry.request.seq] = rid
        if cancel_pending:
            out.append(pb.StreamRequest(cancel=pb.CancelGeneration()))
        return out

    def unacked_count(self) -> int:
        return self._unacked


class Delivered:
    """What the caller has received of the stream, to drop what a resumed stream sends again.
    `position`: the stream length covered by delivered results (chunk results and finished generations)."""

    def __init__(self, position: int) -> None:
        self.position = position
        self.resumed = False  # a hole is only possible (and checked) after a resume

    def chunk(self, chunk: ChunkResult) -> ChunkResult | None:
        """The part of `chunk` the caller has not seen (None: all of it was seen); DATA_LOSS on a hole."""
        start = chunk.tokens_seen - chunk.num_tokens
        if chunk.tokens_seen <= self.position:
            return None
        if start > self.position and self.resumed:
            raise SinkStreamError(grpc.StatusCode.DATA_LOSS, f"the results of tokens {self.position}.."
                                  f"{start} were lost when the server failed, and the resumed session does "
                                  "not send them again")
        new = chunk.tokens_seen - max(start, self.position)
        self.position = chunk.tokens_seen
        if new == chunk.num_tokens:
            return chunk
        cut = chunk.num_tokens - new  # chunked differently after recovery: keep the tokens not yet seen
        tail = {name: getattr(chunk, name)[cut:] for name in
                ("token_ids", "logprobs", "top_k_ids", "top_k_logprobs") if getattr(chunk, name)}
        return replace(chunk, num_tokens=new, **tail)

    def generated_to(self, tokens_seen: int) -> None:
        """A generation finished with the stream at `tokens_seen`."""
        self.position = max(self.position, tokens_seen)


def new_token(token: GeneratedToken, delivered: list[GeneratedToken]) -> bool:
    """Whether `token` of the running generation is new; a re-sent one must match what was delivered."""
    if token.index >= len(delivered):
        if token.index > len(delivered):
            raise SinkStreamError(grpc.StatusCode.DATA_LOSS, f"generated token {len(delivered)} is missing "
                                  f"(got index {token.index})")
        return True
    if delivered[token.index].token_id != token.token_id:
        before = delivered[token.index].token_id
        raise SinkStreamError(grpc.StatusCode.DATA_LOSS, f"the resumed generation differs at token "
                              f"{token.index}: {before} before, {token.token_id} now")
    return False
