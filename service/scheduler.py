"""The scheduler: one asyncio task that owns every engine and batches all sessions' work.

Each round, every session with work contributes one piece to the next forward pass of its engine:
up to one chunk of pending input, or one decode token of its running generation. Those pieces run as ONE
`StreamingInference.step` in a dedicated compute thread, so the event loop keeps serving
I/O while the model computes, and N concurrent sessions cost about one pass per chunk instead of N.
Requests that need no forward pass (flush acknowledgements, checkpoints, close, errors) are answered in
order as the scheduler reaches them.

Speculative decoding (`serve --speculate N`, core/speculative.py): per engine and round, one generating
session whose prompt-lookup draft is non-empty runs a verification pass of its own row (`step_prefix`, in the
compute thread, after the batched pass) instead of its one-token step, so the others wait at most one extra
pass per round; sessions take that turn in order of their last one. Each token it accepts is delivered, logged
(after a record of the pass, which recovery runs again) and counted like a plainly decoded token, and EOS,
stop sequences and max_new_tokens end the kept prefix where plain decoding would stop; cancellation and time
limits are checked before each pass, as for plain decoding. Greedy generations speculate always; sampled ones
only without a write-ahead log, since a crash-exact continuation needs one sampler draw per logged token
(recovery sets the RNG state from the last), which a round's acceptance draws break.

Backpressure (see backpressure.py): a session is skipped while its attached call's outbox is full, for
replies without a forward pass too. The scheduler produces plain replies (replies.py); the servicer sends
them as messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from sinkstream.core.generation import GeneratedToken, Generation
from sinkstream.core.speculative import SpeculativeDecoder
from sinkstream.core.streaming import ChunkResult, StreamingInference
from sinkstream.service.batch import run_rows
from sinkstream.service.errors import RequestError, server_failure
from sinkstream.service.fair_share import FairShare
from sinkstream.service.metrics import ServerMetrics
from sinkstream.service.replies import (
    AckReply,
    CheckpointedReply,
    ChunkReply,
    ClosedReply,
    ErrorReply,
    FlushedReply,
    StreamEnd,
    TokenReply,
)
from sinkstream.service.session import ActiveGeneration, Session
from sinkstream.service.session_manager import SessionManager
from sinkstream.service.work import (
    AppendWork,
    CheckpointWork,
    CloseWork,
    DetachWork,
    ErrorWork,
    GenerateWork,
    MessageWork,
    RepeatWork,
    Work,
)

log = logging.getLogger("sinkstream.scheduler")
SWEEP_INTERVAL_S = 1.0


@dataclass
class Piece:
    """One session's part of a forward pass: input ids, or a decode step of its generation (one token, or
    the tokens its own speculative pass emitted)."""

    session: Session
    ids: list[int] | None = None
    token: int = -1
    logprob: float = math.nan
    emitted: list[GeneratedToken] | None = None  # set when this decode step ran as a speculative pass
    verified: list[int] | None = None  # that pass's ids: the round's first token and its draft


class Scheduler:
    """Runs forever on the server's loop; `wake()` whenever a session may have new work."""

    def __init__(self, manager: SessionManager, metrics: ServerMetrics, decode_input_budget: int = 0,
                 max_batch_tokens: int = 0, speculate: int = 0) -> None:
        """`speculate`: draft tokens a speculative pass may verify (0: plain decoding only)."""
        self._progressed = False
        self.speculate = speculate
        self._rounds = 0
        self._stopping = False
        self.decode_input_budget = decode_input_budget
        self.max_batch_tokens = max_batch_tokens
        self.fair_share = FairShare()
        self.manager = manager
        self.metrics = metrics
        self._wake = asyncio.Event()
        # One thread runs every forward pass: passes are sequential anyway, and the layer offloader (not
        # thread-safe) is then only ever used from that thread.
        self._compute_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sinkstream-compute")
        self._task: asyncio.Task | None = None
        self._sweeper: asyncio.Task | None = None
        manager.on_work = self.wake
        manager.compute = self._run_compute

    async def _run_compute(self, work: Callable[[], None]) -> None:
        """Run `work` (e.g. a recovery's replay) on the compute thread, where every forward pass runs."""
        await asyncio.get_running_loop().run_in_executor(self._compute_thread, work)

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sinkstream-scheduler")
        self._sweeper = asyncio.create_task(self._sweep(), name="sinkstream-sweeper")

    async def stop(self) -> None:
        """Stop after the round in progress: cancelling it would release the sessions' lock while its
        forward pass still runs in a worker thread, and persisting then would save half-updated rows."""
        self._stopping = True
        self.wake()
        if self._sweeper is not None:
            self._sweeper.cancel()  # a sweep in progress is shielded and keeps the lock until done
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._task is not None:
            await self._task
        self._compute_thread.shutdown(wait=False)

    async def _sweep(self) -> None:
        while not self._stopping:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                await asyncio.shield(self.manager.sweep())  # a snapshot write is never cut in half
            except Exception:
                log.exception("session sweep failed")
            self.fair_share.prune({s.key for s in self.manager.all()})
            self.wake()  # retry sessions waiting for a free row

    async def _run(self) -> None:
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            try:
                while not self._stopping and await self._round():
                    await asyncio.sleep(0)  # let the loop read requests and send responses
            except Exception:  # a scheduler bug must not take the server down; sessions report errors
                log.exception("scheduler round failed")
                await asyncio.sleep(0.1)
                self.wake()

    # ------------------------------------------------------------------ one round
    async def _round(self) -> bool:
        """Advance every session; run one forward pass per engine with work. True if anything happened."""
        self._progressed = False
        self._rounds += 1
        async with self.manager.lock:
            by_engine: dict[int, tuple[StreamingInference, list[Piece]]] = {}
            now = time.monotonic()
            for session in self.manager.all():
                if not session.has_work() or session.retry_at > now:
                    continue
                try:
                    if not session.resident and not await self.manager.ensure_resident(session):
                        continue
                    piece = await self._advance(session)
                except Exception as exc:  # fail this session only; the others keep being served
                    log.exception("session failed in the scheduler", extra={"session": session.key.label})
                    self.manager.fail(session, server_failure(exc, "the server failed serving this session"))
                    continue
                if piece is not None:
                    by_engine.setdefault(id(session.engine), (session.engine, []))[1].append(piece)
            for engine, pieces in by_engine.values():
                await self._step(engine, self.budget(pieces))
                self._progressed = True
        sessions = self.manager.all()
        self.metrics.queue_depth.set(sum(s.inbox.qsize() for s in sessions))
        self.metrics.pending_tokens.set(sum(len(s.pending) for s in sessions))
        return self._progressed

    def budget(self, pieces: list[Piece]) -> list[Piece]:
        """Keep input tokens per pass within `max_batch_tokens`, and within `decode_input_budget` while
        sessions are generating (so a pass - and so each generated token - stays short); the input pieces
        that fit are chosen by fair share between tenants, then sessions (fair_share.py). Decode pieces
        always go. Pieces left out keep their work for a later pass."""
        inputs = [p for p in pieces if p.ids is not None]
        generating = len(inputs) < len(pieces)
        limits = [b for b in (self.max_batch_tokens, self.decode_input_budget if generating else 0) if b]
        if not limits or not inputs:
            return pieces
        chosen = self.fair_share.choose(inputs, min(limits), tenant=lambda p: p.session.key.tenant,
                                        session=lambda p: p.session.key, tokens=lambda p: len(p.ids))
        return [p for p in pieces if p.ids is None] + chosen

    async def _advance(self, s: Session) -> Piece | None:
        """Answer s's requests that need no forward pass; return its piece of the next pass, if any."""
        chunk = s.config.chunk
        while not s.closed:
            if s.generation is not None:
                return self._decode_piece(s)
            if s.outbox_full():  # also for errors, flushes, checkpoints: the client must read first
                return None
            draining = s.flush_request is not None or isinstance(s.current, GenerateWork)
            if len(s.pending) >= chunk or (s.pending and draining):
                return Piece(s, ids=s.pending[:chunk])
            if not s.pending and s.flush_request is not None:
                stats = s.row_stats()
                s.emit(FlushedReply(s.take_flush_request(), stats.tokens_seen, stats.mean_nll,
                                    stats.perplexity))
                continue
            item = s.take_work()
            if item is None:
                return None
            s.touch()
            self._progressed = True
            await self._prepare_log(s, item)
            if isinstance(item, AppendWork):
                s.add_input(item)
            elif isinstance(item, MessageWork):
                try:
                    s.add_input(AppendWork(item.request_id, s.render_message(item), item.flush, item.seq,
                                           chat_changed=True))
                except RequestError as exc:
                    s.emit(ErrorReply(item.request_id, exc))
                    s.answered(item.seq, item.request_id)
            elif isinstance(item, RepeatWork):
                self._repeat(s, item)
            elif isinstance(item, GenerateWork):
                try:
                    s.open_chat_reply(item)
                except RequestError as exc:
                    s.emit(ErrorReply(item.request_id, exc))
                    s.answered(item.client_seq, item.request_id)
                    continue
                if s.pending:
                    s.defer(item)  # run the remaining input first
                else:
                    self._start_generation(s, item)
            elif isinstance(item, CheckpointWork):
                await self._checkpoint(s, item)
            elif isinstance(item, CloseWork):
                tokens = s.tokens_seen()
                self.manager.close(s)
                s.emit(ClosedReply(item.request_id, s.id, tokens))
                s.emit(StreamEnd())
            elif isinstance(item, DetachWork):
                s.emit(StreamEnd())
            elif isinstance(item, ErrorWork):
                s.emit(ErrorReply(item.request_id, item.error))
                s.answered(item.seq, item.request_id)
        return None

    async def _prepare_log(self, s: Session, item: Work) -> None:
        """Before a numbered request changes a session, start its write-ahead log (when durability is
        on); before anything but its repeated Generate, end a generation a crash interrupted."""
        numbered = item.client_seq if isinstance(item, GenerateWork) else getattr(item, "seq", 0)
        if numbered and s.journal is None:
            await self.manager.start_journal(s)
        if s.suspended is not None and not (isinstance(item, RepeatWork) and item.generate is not None
                                            and item.seq == s.suspended.work.client_seq):
            s.cancel_suspended()

    @staticmethod
    def _repeat(s: Session, item: RepeatWork) -> None:
        """A numbered request came again: a Generate is answered from the kept generation (or continued),
        anything else with `ack` once it is durable (at once if it is)."""
        if item.generate is not None and s.repeat_generation(item.generate):
            return
        if item.seq <= s.seqs.acked:
            s.emit(AckReply(item.request_id, item.seq))

    def _decode_piece(self, s: Session) -> Piece | None:
        g = s.generation
        limit = g.work.time_limit_s
        if g.work.seq <= s.cancel_upto:
            if s.outbox is None and g.work.client_seq:  # its call ended: the client may repeat it
                s.suspend_generation()
            else:
                s.finish_generation("CANCELLED")
            self._progressed = True
        elif limit is not None and time.perf_counter() - g.work.arrived >= limit:
            s.finish_generation("TIME_LIMIT")
            self._progressed = True
        elif not s.outbox_full():
            if g.decoder is None:
                sampled_logged = g.work.params.temperature > 0 and s.journal is not None  # module docstring
                g.decoder = SpeculativeDecoder(g.gen, 0 if sampled_logged else self.speculate)
            return Piece(s)
        return None

    def _start_generation(self, s: Session, work: GenerateWork) -> None:
        if work.seq <= s.cancel_upto:
            s.start_generation(ActiveGeneration(work, Generation(s.engine, s.row, work.params, None), 0))
            s.finish_generation("CANCELLED")
            self._progressed = True
            return
        if s.engine.next_logprobs(s.row) is None:
            s.emit(ErrorReply(work.request_id, RequestError(
                grpc.StatusCode.FAILED_PRECONDITION, "the stream is empty: append input before generating",
                "generate")))
            s.answered(work.client_seq, work.request_id)
            return
        stop_ids = s.chat.end_of_turn if work.chat_reply and s.chat is not None else ()
        gen = Generation(s.engine, s.row, work.params, self.manager.pool.tokenizer, stop_ids)
        s.start_generation(ActiveGeneration(work, gen, input_tokens=work.input_tokens))

    async def _checkpoint(self, s: Session, item: CheckpointWork) -> None:
        try:
            size = await self.manager.checkpoint(s)
        except RequestError as exc:
            s.emit(ErrorReply(item.request_id, exc))
            return
        except Exception as exc:  # e.g. disk full: answer the request, the session stays in memory
            log.warning("checkpoint failed: %r", exc, extra={"session": s.key.label})
            error = server_failure(exc, "checkpoint failed", "checkpoint")
            s.emit(ErrorReply(item.request_id, error))
            return
        s.emit(CheckpointedReply(item.request_id, s.id, s.tokens_seen(), size))

    # ------------------------------------------------------------------ the forward pass
    async def _step(self, engine: StreamingInference, pieces: list[Piece]) -> None:
        top_k = max((p.session.analysis.top_k for p in pieces if p.ids is not None), default=0)
        embeddings = any(p.session.analysis.embeddings for p in pieces if p.ids is not None)
        for p in pieces:
            p.session.begin_step()
        started = time.perf_counter()
        try:
            outcome = await asyncio.get_running_loop().run_in_executor(
                self._compute_thread, self._compute, engine, pieces, top_k, embeddings, self._rounds)
        except Exception as exc:  # _compute handles failures per piece; this is a bug, reported to all
            log.exception("forward pass failed")
            outcome = {p.session.row: exc for p in pieces}
        finally:
            for p in pieces:
                p.session.end_step()
        elapsed = time.perf_counter() - started
        self.metrics.step_seconds.observe(elapsed)
        self.metrics.batch_rows.observe(len(pieces))
        self.metrics.batch_tokens.observe(sum(len(p.ids) if p.ids is not None else 1 for p in pieces
                                              if p.emitted is None))
        for p in pieces:  # each piece on its own: one session's failure never stops another's delivery
            result = outcome[p.session.row]
            try:
                if isinstance(result, Exception):
                    self._fail_piece(p, result)
                elif p.ids is not None:
                    self._deliver_chunk(p, result)
                elif p.emitted is not None:
                    self._count_speculation(p)
                    p.session.record_speculation(p.verified, len(p.emitted))
                    self._deliver_tokens(p.session, p.emitted)
                else:
                    self._deliver_tokens(p.session, [p.session.generation.gen.accept(p.token, p.logprob)])
            except Exception as exc:  # e.g. this generation's stop matcher: fail this session only
                log.exception("delivering a result failed", extra={"session": p.session.key.label})
                self.manager.fail(p.session, server_failure(exc, "the server failed serving this session"))

    @staticmethod
    def _compute(engine: StreamingInference, pieces: list[Piece], top_k: int, embeddings: bool,
                 round_number: int) -> dict[int, ChunkResult | Exception | None]:
        """Worker thread: choose each decode step's first token (and at most one speculative pass, by the
        generation that speculated least recently), then run the other pieces as one batched pass and the
        speculative pass after it. A failure belongs to the piece it came from: a piece whose sampling
        fails is left out of the pass, and a failed pass is run again row by row. Returns each piece's
        result (None for the speculative piece, whose tokens are in its `emitted`) or exception, by row."""
        outcome: dict[int, ChunkResult | Exception | None] = {}
        inputs: dict[int, list[int]] = {}
        speculative: tuple[Piece, tuple[int, float], list[int]] | None = None
        decoding = sorted((p for p in pieces if p.ids is None),
                          key=lambda p: p.session.generation.speculated_round)
        with torch.inference_mode():
            for p in pieces:
                if p.ids is not None:
                    inputs[p.session.row] = p.ids
            for p in decoding:
                row, g = p.session.row, p.session.generation
                try:
                    first = g.decoder.first()
                    drafts = g.decoder.propose(first) if speculative is None else []
                except Exception as exc:  # this session's sampler or parameters
                    outcome[row] = exc
                    continue
                if drafts:
                    speculative = (p, first, drafts)
                    g.speculated_round = round_number
                else:
                    p.token, p.logprob = first
                    inputs[row] = [p.token]
            outcome.update(run_rows(engine, inputs, top_k, embeddings))
            if speculative is not None:
                p, first, drafts = speculative
                try:
                    p.verified = [first[0], *drafts]
                    p.emitted = p.session.generation.decoder.verify(first, drafts)
                    outcome[p.session.row] = None
                except Exception as exc:  # this row's pass; the cache step was aborted
                    outcome[p.session.row] = exc
        return outcome

    def _fail_piece(self, p: Piece, exc: Exception) -> None:
        """This piece's own work failed (its sampler, or its row of the pass); its row is unchanged."""
        s = p.session
        log.warning("a session's part of a forward pass failed: %r", exc, extra={"session": s.key.label})
        if p.ids is None:
            s.finish_generation("ERROR", error=f"generating the next token failed: {exc!r}")
            return
        n = len(p.ids)
        # Dropped and said so: retrying input that fails on its own row would fail again.
        request_id = s.consume_pending(n, ran=False)
        s.emit(ErrorReply(request_id, server_failure(
            exc, f"the forward pass failed on this session's input: {n} input tokens were not processed "
            f"and are not part of the stream (tokens_seen stays {s.tokens_seen()})")))

    def _deliver_chunk(self, p: Piece, result: ChunkResult) -> None:
        s = p.session
        request_id = s.consume_pending(len(p.ids))
        self.metrics.tokens.labels("input").inc(len(p.ids))
        self.metrics.tenant_tokens.labels(p.session.key.tenant, "input").inc(len(p.ids))
        if s.outbox is None:
            return
        s.emit(ChunkReply.of(request_id, len(p.ids), result, s.analysis, s.row_stats()))

    def _count_speculation(self, p: Piece) -> None:
        """A speculative pass ran: it emitted the round's first token and the accepted drafts."""
        self.metrics.speculative_passes.inc()
        self.metrics.speculative_accepted.inc(len(p.emitted) - 1)

    def _deliver_tokens(self, s: Session, tokens: list[GeneratedToken]) -> None:
        """Tokens the generation accepted (in order; the last may end it): record, log, send each."""
        g = s.generation
        for i, token in enumerate(tokens):
            first, latency = g.record_token(token.text, time.perf_counter())
            (self.metrics.ttft_seconds if first else self.metrics.token_seconds).observe(latency)
            self.metrics.tokens.labels("generated").inc()
            self.metrics.tenant_tokens.labels(s.key.tenant, "generated").inc()
            index = len(g.gen.generated) - len(tokens) + i
            s.record_token(TokenReply(g.work.request_id, token.token_id, token.text, token.logprob,
                                      index=index))
            if token.stop_reason is not None:
                s.finish_generation(token.stop_reason)
