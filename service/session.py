"""One session's state: its stream's pending input, its queued requests, its running generation, its row.

A session is one stream of tokens with its own bounded cache (a row of the StreamingInference engine
built for its StreamConfig). It outlives the gRPC call that created it: detaching keeps it. Every change
of a session's state goes through a method here; the manager, the scheduler and the reader call them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from sinkstream.core.config import StreamConfig
from sinkstream.core.generation import Generation
from sinkstream.core.speculative import SpeculativeDecoder
from sinkstream.core.streaming import RowStats, StreamingInference
from sinkstream.service.backpressure import Inbox, Outbox
from sinkstream.service.chat_input import ChatInput
from sinkstream.service.errors import RequestError, server_failure
from sinkstream.service.options import AnalysisOptions
from sinkstream.service.replayed_results import ReplayedResults
from sinkstream.service.replies import AckReply, ErrorReply, GenerationReply, Reply, StreamEnd, TokenReply
from sinkstream.service.sequencing import SeqState
from sinkstream.service.session_journal import SessionJournal, rng_to_text
from sinkstream.service.tenants import SessionKey
from sinkstream.service.text_input import TextInput
from sinkstream.service.work import AppendWork, DetachWork, ErrorWork, GenerateWork, MessageWork, Work
from sinkstream.service.write_ahead_log import Done

# Session ids are also file names in the state directory: no ".", "..", nor a leading "-" that tools would
# read as an option.
SESSION_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def is_valid_session_id(session_id: str) -> bool:
    """Whether `session_id` is a valid session id (1-128 of [A-Za-z0-9._-], not starting with . or -)."""
    return SESSION_ID.fullmatch(session_id) is not None


@dataclass
class ActiveGeneration:
    """A running Generate request of one session."""

    work: GenerateWork
    gen: Generation
    input_tokens: int
    text_parts: list[str] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None
    decoder: SpeculativeDecoder | None = None  # set by the scheduler on its first decode step
    speculated_round: int = -1  # the scheduler round of its last speculative pass (who speculates next)

    def record_token(self, text: str, now: float) -> tuple[bool, float]:
        """Note a generated token's text at time `now` (perf_counter); returns whether it is the first
        and its latency: since the request arrived for the first, since the previous token otherwise."""
        first = self.first_token_at is None
        latency = now - (self.work.arrived if first else self.last_token_at)
        if first:
            self.first_token_at = now
        self.last_token_at = now
        self.text_parts.append(text)
        return first, latency

    def complete(self, reason: str, tokens_seen: int, error: str) -> GenerationReply:
        """The reply that ends this generation with `reason` (a StopReason name without its prefix)."""
        now = time.perf_counter()
        ttft = (self.first_token_at - self.work.arrived) if self.first_token_at is not None else 0.0
        return GenerationReply(
            request_id=self.work.request_id, stop_reason=reason, generated_tokens=len(self.gen.generated),
            input_tokens=self.input_tokens, tokens_seen=tokens_seen, text="".join(self.text_parts),
            time_to_first_token_s=ttft, total_time_s=now - self.work.arrived, error_message=error)


@dataclass
class KeptGeneration:
    """The last numbered generation's replies, kept to answer a repeated Generate (see the .proto)."""

    seq: int
    tokens: list[TokenReply] = field(default_factory=list)
    complete: GenerationReply | None = None

    def state(self) -> dict[str, Any]:
        return {"seq": self.seq, "tokens": [asdict(t) for t in self.tokens],
                "complete": asdict(self.complete) if self.complete is not None else None}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> KeptGeneration:
        complete = state["complete"]
        return cls(int(state["seq"]), [TokenReply(**t) for t in state["tokens"]],
                   GenerationReply(**complete) if complete is not None else None)


class Session:
    """One client stream of tokens and everything the server keeps for it."""

    def __init__(self, key: SessionKey, config: StreamConfig, analysis: AnalysisOptions,
                 text: TextInput | None, created: float | None = None) -> None:
        self.key = key  # (tenant, id): the tenant that opened it and the id that tenant knows it by
        self.id = key.id
        self.config = config
        self.analysis = analysis
        self.text = text
        self.chat: ChatInput | None = None  # the session's conversation, from its first chat request
        self.created = created or time.time()
        self.last_used = self.created
        self.engine: StreamingInference | None = None
        self.row: int | None = None
        self.pending: list[int] = []  # input ids waiting for a forward pass
        self.pending_owners: deque[list] = deque()  # [ids left, request id] of the appends in `pending`
        self.flush_request: str | None = None  # request id to acknowledge once `pending` is empty
        self.inbox = Inbox(config.chunk, lambda: len(self.pending))
        self.current: Work | None = None  # a request waiting for `pending` to drain
        self.generation: ActiveGeneration | None = None
        self.outbox: Outbox | None = None  # the attached call's replies; None when detached
        self.generate_seq = 0  # Generate requests received on the current call
        self.cancel_upto = 0  # Generate requests with seq <= this are cancelled
        self.in_step = False
        self.closed = False
        self.retry_at = 0.0  # time.monotonic() before which the scheduler skips a session that failed
        self.input_unsaved = False  # a persisted session's pending input grew since its snapshot
        # Counters of a persisted session (a resident one reads them from its engine row).
        self.saved_stats: dict[str, Any] = {"tokens_seen": 0, "mean_nll": 0.0, "scored": 0}
        # Durability (see session_journal.py): the write-ahead log once a numbered request came, the
        # sequence numbers, the text input's state as of the last input applied (the reader may be ahead),
        # the last numbered generation's replies, a generation a crash interrupted (continued when its
        # Generate is repeated) and the lsn the newest snapshot covers.
        self.journal: SessionJournal | None = None
        self.seqs = SeqState()
        self.unacked_records = 0  # numbered requests applied whose log record is not durable yet
        self._all_durable = asyncio.Event()
        self._all_durable.set()
        self.applied_text_state: dict[str, Any] | None = text.state() if text is not None else None
        self.kept_generation: KeptGeneration | None = None
        self.suspended: ActiveGeneration | None = None
        self.snapshot_lsn: int | None = None
        # A numbered append applied in part (its call or the server ended mid-request): (seq, where the
        # applied slices end); when it is sent again only the rest is applied.
        self.partial: tuple[int, int] | None = None
        # The results a recovery's replay produced, for the call that resumes the session (once).
        self.replayed: ReplayedResults | None = None

    @classmethod
    def persisted(cls, key: SessionKey, config: StreamConfig, analysis: AnalysisOptions,
                  text: TextInput | None, *, created: float, last_used: float, pending: list[int],
                  saved_stats: dict[str, Any]) -> Session:
        """A session found in the state directory, not resident until its work restores it."""
        session = cls(key, config, analysis, text, created=created)
        session.last_used = last_used
        session.pending = list(pending)
        session.pending_owners.append([len(session.pending), ""])
        session.saved_stats = saved_stats
        return session

    # ------------------------------------------------------------------ state
    @property
    def resident(self) -> bool:
        return self.row is not None

    @property
    def attached(self) -> bool:
        return self.outbox is not None

    def has_work(self) -> bool:
        """Whether the scheduler has something to do for this session. Without an attached call, only a
        generation to end: input kept for a resume waits for it (a client that left costs no compute)."""
        if self.outbox is None:
            return self.generation is not None
        return bool(len(self.pending) >= self.config.chunk or self.flush_request is not None
                    or self.current is not None or self.generation is not None or not self.inbox.empty())

    def idle(self) -> bool:
        return not self.in_step and not self.has_work()

    def outbox_full(self) -> bool:
        return self.outbox is not None and self.outbox.full()

    def touch(self) -> None:
        self.last_used = time.time()

    def applied_from(self, seq: int) -> int:
        """Where to start a numbered append sent again after it was applied in part (0: from its start)."""
        return self.partial[1] if self.partial is not None and self.partial[0] == seq else 0

    def rewind_text_input(self, tokenizer) -> None:
        """A new call: the text input continues from the input applied (a slice the ended call had
        tokenized but not queued is forgotten with its request, which the client sends again)."""
        numbered = self.journal is not None or self.seqs.received
        if numbered and self.text is not None and self.applied_text_state is not None:
            self.text = TextInput(tokenizer, self.applied_text_state)

    def set_analysis(self, analysis: AnalysisOptions) -> None:
        self.analysis = analysis

    def row_stats(self) -> RowStats:
        """Counters and cache occupancy of the session's row (it must be resident)."""
        return self.engine.stats(self.row)

    def tokens_seen(self) -> int:
        return self.engine.stats(self.row).tokens_seen if self.resident else self.saved_stats["tokens_seen"]

    def counters(self) -> tuple[int, float]:
        """(tokens seen, mean negative log-likelihood), resident or persisted."""
        if self.resident:
            st = self.engine.stats(self.row)
            return st.tokens_seen, st.mean_nll
        return self.saved_stats["tokens_seen"], self.saved_stats["mean_nll"]

    def cache_stats(self) -> RowStats | None:
        return self.engine.stats(self.row) if self.resident else None

    # ------------------------------------------------------------------ the attached call
    def attach(self) -> Outbox:
        """A new call takes the session: its replies go to the returned outbox."""
        self.outbox = Outbox()
        self.generate_seq = self.cancel_upto = 0
        self.touch()
        return self.outbox

    def detach(self, outbox: Outbox) -> bool:
        """The call owning `outbox` ended: its queued input joins the pending input, kept unprocessed for a
        resume (at most the input budget); its other unstarted requests are dropped and its generation
        cancelled. False if another call owns the session by now."""
        if self.outbox is not outbox:
            return False
        self.outbox = None
        self.keep_queued_input()
        self.seqs.forget_unapplied()
        self.cancel_upto = self.generate_seq
        self.touch()
        return True

    def resend_replayed(self, position: int | None) -> None:
        """A call just attached: send it the results of the recovered log past stream `position` (None:
        none); they are kept for this first call only."""
        replayed, self.replayed = self.replayed, None
        if replayed is not None and position is not None:
            for reply in replayed.after(position):
                self.emit(reply)

    def emit(self, reply: Reply | StreamEnd) -> None:
        """Queue a reply for the attached call (dropped when no call is attached)."""
        if self.outbox is not None:
            self.outbox.put(reply)

    def next_generate_seq(self) -> int:
        """Number a Generate request received on the current call."""
        self.generate_seq += 1
        return self.generate_seq

    def cancel_generations(self) -> None:
        """Cancel the Generate requests received on the current call so far."""
        self.cancel_upto = self.generate_seq

    # ------------------------------------------------------------------ queued requests and input
    async def queue(self, item: Work) -> None:
        """Queue a request for the scheduler; waits while backpressure holds the reader back."""
        await self.inbox.put_work(item)

    def take_work(self) -> Work | None:
        """The request to handle next: one waiting for pending input to drain, else the next queued."""
        item = self.current
        if item is None:
            if self.inbox.empty():
                return None
            item = self.inbox.take()
        self.current = None
        return item

    def drop_current(self) -> None:
        """Drop the request waiting for pending input; a chat reply whose prompt is in the stream is closed
        (as an empty assistant message) so the conversation can go on."""
        work, self.current = self.current, None
        if isinstance(work, GenerateWork) and work.chat_reply and work.prompted:
            self.add_input(AppendWork(work.request_id, self.chat.close_reply([], "CANCELLED"), False,
                                      chat_changed=True))

    def render_message(self, work: MessageWork) -> list[int]:
        """Ids of a chat message, now part of the conversation (RequestError: refused, nothing changed)."""
        return self.chat.append(work.role, work.content)

    def open_chat_reply(self, work: GenerateWork) -> None:
        """Put the generation prompt of a chat reply into the pending input (once)."""
        if work.chat_reply and not work.prompted:
            work.prompted = True
            self.add_input(AppendWork(work.request_id, self.chat.open_reply(), False, chat_changed=True))

    def defer(self, work: GenerateWork) -> None:
        """Run the pending input before `work`; it is handled again once that is done."""
        self.current = work
        work.input_tokens = len(self.pending)

    def drop_queued(self) -> None:
        """Drop the requests not started yet."""
        self.inbox.drop_all()

    def keep_queued_input(self) -> list[tuple[str, RequestError | None]]:
        """The call is ending: its queued appends join the pending input (kept for a resume, within the
        input budget, which counted them); its other unstarted requests and a flush to acknowledge are
        dropped. Returns (request id, its own refusal if it was one) of each dropped request, oldest first."""
        dropped: list[tuple[str, RequestError | None]] = []
        if self.flush_request is not None:
            dropped.append((self.flush_request, None))
            self._flush_gone()
        # Numbered requests after a dropped numbered Generate are dropped too: acknowledging them would
        # say the Generate before them is durable (acks are cumulative). The client sends them again.
        gap = self.generation is not None and bool(self.generation.work.client_seq)  # suspended, not done
        if isinstance(self.current, GenerateWork):
            dropped.append((self.current.request_id, None))
            gap = bool(self.current.client_seq)
            self.drop_current()
        for item in self.inbox.drop_all():
            if gap and getattr(item, "seq", 0) and isinstance(item, AppendWork | MessageWork | ErrorWork):
                dropped.append((item.request_id, None))
                continue
            if isinstance(item, GenerateWork):
                gap = gap or bool(item.client_seq)
            if isinstance(item, AppendWork):
                self.add_input(item)
                self.input_unsaved |= not self.resident and bool(item.ids)
                if item.flush:
                    dropped.append((item.request_id, None))
            elif isinstance(item, MessageWork):  # admitted input too: rendered now, kept for a resume
                try:
                    self.add_input(AppendWork(item.request_id, self.render_message(item), False, seq=item.seq,
                                              chat_changed=True))
                except RequestError as exc:
                    dropped.append((item.request_id, exc))
                    self.answered(item.seq, item.request_id)
                    continue
                self.input_unsaved |= not self.resident
                if item.flush:
                    dropped.append((item.request_id, None))
            elif isinstance(item, ErrorWork):
                dropped.append((item.request_id, item.error))
                self.answered(item.seq, item.request_id)  # it took its number
            elif not isinstance(item, DetachWork):
                dropped.append((item.request_id, None))
        self.flush_request = None
        return dropped

    def unprocessed_input(self) -> list[tuple[str, int]]:
        """(request id, input tokens not processed yet) of each append with pending input, oldest first
        (the slices of one append counted together)."""
        left: list[tuple[str, int]] = []
        for n, request_id in self.pending_owners:
            if left and left[-1][0] == request_id:
                left[-1] = (request_id, left[-1][1] + n)
            elif n:
                left.append((request_id, n))
        return left

    def add_input(self, work: AppendWork) -> None:
        """Ids of an append join the pending input; a flush is acknowledged once they ran. Logged (and a
        numbered request's last slice acknowledged once durable)."""
        self.pending.extend(work.ids)
        self.pending_owners.append([len(work.ids), work.request_id])
        if work.flush:
            self.flush_request = work.request_id
        if work.text_state is not None:
            self.applied_text_state = work.text_state
        if work.seq:
            self.partial = (work.seq, work.upto) if not work.final else None
        if self.journal is not None:
            chat = self.chat.state() if work.chat_changed and self.chat is not None else None
            seq = work.seq if work.final else 0
            self.journal.input(work.request_id, list(work.ids), work.flush, seq, work.text_state, chat,
                               self._acknowledge_when_durable(seq, work.request_id), part=work.seq,
                               upto=work.upto)
        elif work.final:
            self._acknowledge_when_durable(work.seq, work.request_id)

    def answered(self, seq: int, request_id: str) -> None:
        """A numbered request was answered without changing the state (e.g. refused): log its number."""
        if not seq:
            return
        if self.journal is not None:
            self.journal.answered(seq, self._acknowledge_when_durable(seq, request_id))
        else:
            self._acknowledge_when_durable(seq, request_id)

    def _acknowledge_when_durable(self, seq: int, request_id: str) -> Done | None:
        """Mark `seq` applied; without a log acknowledge it now, else return what acknowledges it once its
        record is durable."""
        if not seq:
            return None
        self.seqs.apply(seq)
        if self.journal is None:
            self.acknowledged(seq, request_id, None)
            return None
        self.unacked_records += 1
        self._all_durable.clear()

        def durable(error: BaseException | None) -> None:
            self.unacked_records -= 1
            if not self.unacked_records:
                self._all_durable.set()
            self.acknowledged(seq, request_id, error)
        return durable

    async def wait_applied_durable(self) -> None:
        """Wait until every numbered request applied so far is durable (or its log write failed), so
        `seqs.acked` covers them: a resume reports it as SessionOpened.acked_seq, after which a new client
        numbers its requests (one still in flight would make the new client's next request a duplicate,
        taken for the old one and never processed)."""
        await self._all_durable.wait()

    def acknowledged(self, seq: int, request_id: str, error: BaseException | None) -> None:
        """`seq` is durable (error None): answer `ack` on the attached call; a failed log write is
        reported instead (the request was applied in memory but is not durable)."""
        if error is not None:
            self.emit(ErrorReply(request_id, server_failure(
                error, f"request seq {seq} was processed but could not be made durable", "seq")))
        elif self.seqs.acknowledge(seq):
            self.emit(AckReply(request_id, seq))

    def take_flush_request(self) -> str:
        """The request id of the flush to acknowledge now (there must be one)."""
        request_id, self.flush_request = self.flush_request, None
        self._flush_gone()
        return request_id

    def _flush_gone(self) -> None:
        if self.journal is not None:
            self.journal.flushed()

    def consume_pending(self, n: int, ran: bool = True) -> str:
        """Drop the first n pending ids (they ran, or failed: `ran` False); return the request id of the
        last one's append."""
        if self.journal is not None:
            self.journal.ran(n) if ran else self.journal.dropped(n)
        del self.pending[:n]
        self.inbox.input_ran()
        request_id = ""
        while n > 0 and self.pending_owners:
            owner = self.pending_owners[0]
            used = min(n, owner[0])
            owner[0] -= used
            n -= used
            request_id = owner[1]
            if owner[0] == 0:
                self.pending_owners.popleft()
        return request_id

    def begin_step(self) -> None:
        self.in_step = True

    def end_step(self) -> None:
        self.in_step = False

    # ------------------------------------------------------------------ generation
    def start_generation(self, generation: ActiveGeneration) -> None:
        self.generation = generation
        work, sampler = generation.work, generation.gen.sampler
        if work.text_state is not None:
            self.applied_text_state = work.text_state
        if work.client_seq:
            self.seqs.apply(work.client_seq)
            self.kept_generation = KeptGeneration(work.client_seq)
        if self.journal is not None:
            rng = rng_to_text(sampler.generator) if work.params.temperature > 0 else None
            self.journal.generation_started(work.request_id, work.client_seq, work.params, work.chat_reply,
                                            generation.input_tokens, rng, work.text_state)

    def record_speculation(self, ids: list[int], kept: int) -> None:
        """A speculative pass over `ids` kept the first `kept` (the tokens record_token gets next): log it,
        so a replay runs the same pass."""
        if self.journal is not None:
            self.journal.speculated(ids, kept)

    def record_token(self, reply: TokenReply) -> None:
        """A generated token was accepted: log it (with the sampler's RNG state when it samples), keep it
        for a repeated Generate, send it."""
        g = self.generation
        if self.journal is not None:
            rng = rng_to_text(g.gen.sampler.generator) if g.work.params.temperature > 0 else None
            self.journal.token(reply.token_id, reply.logprob, rng)
        if self.kept_generation is not None and g.work.client_seq == self.kept_generation.seq:
            self.kept_generation.tokens.append(reply)
        self.emit(reply)

    def finish_generation(self, reason: str, error: str = "", close_chat: bool = True,
                          report: bool = True) -> GenerationReply:
        """End the running generation and report it (the text input moved past it when it was read).
        `close_chat` False: leave a chat reply's closing to the caller (a log replay, whose next record
        holds the closing ids and the conversation's state)."""
        g = self.generation
        assert g is not None
        self.generation = None
        seq = g.work.client_seq
        if self.journal is not None:  # before the chat reply's tail: replay meets them in this order
            acknowledge = self._acknowledge_when_durable(seq, g.work.request_id)
            self.journal.generation_done(reason, error, acknowledge)
        if close_chat and g.work.chat_reply and self.chat is not None and self.chat.reply_open:
            # the template's text after the reply (e.g. "\n" after <|im_end|>) runs with the next input
            tail = self.chat.close_reply(g.gen.generated, reason)
            self.add_input(AppendWork(g.work.request_id, tail, False, chat_changed=True))
        complete = g.complete(reason, self.tokens_seen(), error)
        if self.kept_generation is not None and seq == self.kept_generation.seq:
            self.kept_generation.complete = complete
        if report:  # False: nobody asked for it on this call (see abandon_suspended)
            self.emit(complete)
        if self.journal is None:
            self._acknowledge_when_durable(seq, g.work.request_id)
        return complete

    def repeat_generation(self, work: GenerateWork) -> bool:
        """A numbered Generate came again: send the kept generation's tokens from index 0 under the new
        request id, then its completion and ack, or continue it if a crash interrupted it. False if
        `work` is not the kept generation."""
        kept = self.kept_generation
        if kept is None or kept.seq != work.client_seq:
            return False
        for token in kept.tokens:
            self.emit(dataclasses.replace(token, request_id=work.request_id))
        if kept.complete is not None:
            self.emit(dataclasses.replace(kept.complete, request_id=work.request_id))
            if self.seqs.acked >= kept.seq:
                self.emit(AckReply(work.request_id, kept.seq))
        elif self.suspended is not None and self.suspended.work.client_seq == kept.seq:
            g, self.suspended = self.suspended, None
            g.work = dataclasses.replace(work, input_tokens=g.input_tokens)
            g.first_token_at = g.last_token_at = None
            self.generation = g
        return True

    def suspend_generation(self) -> None:
        """The call of a numbered generation ended: keep it, not running, to be continued when its Generate
        comes again (as after a crash) instead of cancelling it."""
        self.suspended, self.generation = self.generation, None

    def abandon_suspended(self, seq: int) -> None:
        """A request other than a repeat of its Generate came numbered `seq`, the number of a generation
        whose call ended (a caller that never saw it, e.g. after a deadline): end that generation
        unacknowledged and unreported (its tokens stay in the stream), and let `seq` be used again."""
        g, self.suspended = self.suspended, None
        assert g is not None and g.work.client_seq == seq > self.seqs.acked
        g.work = dataclasses.replace(g.work, client_seq=0)
        self.generation = g
        self.finish_generation("CANCELLED", report=False)
        self.kept_generation = None
        self.seqs.release(seq)

    def cancel_suspended(self) -> None:
        """End a generation a crash interrupted (its Generate did not come again) as CANCELLED."""
        if self.suspended is not None:
            self.generation, self.suspended = self.suspended, None
            self.finish_generation("CANCELLED")

    def fail(self, error: RequestError, retry_at: float) -> None:
        """A server-side failure of this session: end its call with `error`, drop its queued requests
        (they would fail the same way) and leave it alone until `retry_at` (time.monotonic())."""
        if self.generation is not None:
            try:
                self.finish_generation("ERROR", error=str(error))
            except Exception:  # the failure may be in the very state that reports it
                self.generation = None
        self.emit(StreamEnd(error))
        self.drop_queued()
        self.drop_current()
        if self.flush_request is not None:
            self._flush_gone()
        self.flush_request = None
        self.seqs.forget_unapplied()
        self.retry_at = retry_at

    # ------------------------------------------------------------------ its row
    def place(self, engine: StreamingInference, row: int) -> None:
        """The session now lives in `row` of `engine`."""
        self.engine, self.row = engine, row

    def release_row(self) -> None:
        """Free the session's row (it must be resident)."""
        self.engine.close_row(self.row)
        self.engine = self.row = None

    def release_row_persisted(self) -> None:
        """Free the row of a session just persisted, keeping its counters for when it is not resident."""
        st = self.engine.stats(self.row)
        self.saved_stats = {"tokens_seen": st.tokens_seen, "mean_nll": st.mean_nll,
                            "scored": st.scored_tokens}
        self.input_unsaved = False
        self.release_row()

    def end(self) -> None:
        """The session is gone for good: free its row; the scheduler stops at once."""
        if self.resident:
            self.release_row()
        self.closed = True

    def meta(self) -> dict[str, Any]:
        """JSON-able session state that the engine snapshot does not hold. A logged session's snapshot
        holds the text input state of the input it covers, and its log position and sequence numbers."""
        text = self.text.state() if self.text is not None else None
        meta = {"id": self.id, "analysis": asdict(self.analysis), "created": self.created,
                "last_used": self.last_used, "pending": self.pending,
                "text": text, "chat": self.chat.state() if self.chat is not None else None}
        if self.journal is not None:
            meta["text"] = self.applied_text_state if text is not None else None
            meta["flush"] = self.flush_request
            meta["wal"] = {"lsn": self.journal.lsn, "seqs": self.seqs.state(),
                           "kept": self.kept_generation.state() if self.kept_generation is not None else None}
        return meta
