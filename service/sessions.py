"""Sessions: their state, their rows on the shared engines, idle eviction to disk, TTL and persistence.

A session is one stream of tokens with its own bounded cache (a row of the StreamingInference engine
built for its StreamConfig; sessions with equal configs share an engine and are batched together). It
outlives the gRPC call that created it: detaching keeps it; idle sessions are snapshotted to the state
directory (core snapshot: safetensors + JSON) and their row is freed; work for a persisted session
restores it first, so eviction is invisible to clients except for the latency.

Concurrency: everything runs on the server's event loop. `lock` is held by the scheduler around each
forward pass (which runs in a worker thread); any other code that touches an engine takes it too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from safetensors import safe_open

from sinkstream.core.config import StreamConfig, TierSpec
from sinkstream.core.generation import Generation
from sinkstream.core.snapshot import SnapshotError, load_snapshot, save_snapshot
from sinkstream.core.streaming import NoFreeRowError, StreamingInference
from sinkstream.service.metrics import ServerMetrics
from sinkstream.service.requests import AnalysisOptions, RequestError, server_failure, settings_to_pb
from sinkstream.service.text_input import TextInput
from sinkstream.service.work import AppendWork, GenerateWork, StreamEnd, Work
from sinkstream.v1 import sinkstream_pb2 as pb

log = logging.getLogger("sinkstream.sessions")
INBOX_LIMIT = 16  # requests queued per session before the server stops reading its stream
OUTBOX_LIMIT = 256  # responses queued per session before the scheduler stops producing for it
INPUT_BUDGET_MIN = 4 * 16384  # input tokens a session holds (queued + pending) before its stream is not read
RECENTLY_CLOSED = 1024  # closed ids remembered for a clearer NOT_FOUND message
FAILED_RETRY_S = 1.0  # a session that failed server-side is not scheduled again for this long


class Busy(RequestError):
    """No row or cache shape is free now; the scheduler waits for one instead of failing the session."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message, field)


@dataclass
class ActiveGeneration:
    """A running Generate request of one session."""

    work: GenerateWork
    gen: Generation
    input_tokens: int
    text_parts: list[str] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None


class Session:
    """One client stream of tokens and everything the server keeps for it."""

    def __init__(self, session_id: str, config: StreamConfig, analysis: AnalysisOptions,
                 text: TextInput | None, created: float | None = None) -> None:
        self.id = session_id
        self.config = config
        self.analysis = analysis
        self.text = text
        self.created = created or time.time()
        self.last_used = self.created
        self.engine: StreamingInference | None = None
        self.row: int | None = None
        self.pending: list[int] = []  # input ids waiting for a forward pass
        self.pending_owners: deque[list] = deque()  # [ids left, request id] of the appends in `pending`
        self.flush_request: str | None = None  # request id to acknowledge once `pending` is empty
        self.inbox: asyncio.Queue[Work] = asyncio.Queue(INBOX_LIMIT)
        self.queued_tokens = 0  # input ids of the AppendWork in `inbox`
        self.input_room = asyncio.Event()  # set when input tokens ran or were dropped
        self.current: Work | None = None  # a request waiting for `pending` to drain
        self.generation: ActiveGeneration | None = None
        self.outbox: asyncio.Queue | None = None  # the attached call's responses; None when detached
        self.generate_seq = 0  # Generate requests received on the current call
        self.cancel_upto = 0  # Generate requests with seq <= this are cancelled
        self.in_step = False
        self.closed = False
        self.retry_at = 0.0  # time.monotonic() before which the scheduler skips a session that failed
        # Counters of a persisted session (a resident one reads them from its engine row).
        self.saved_stats: dict[str, Any] = {"tokens_seen": 0, "mean_nll": 0.0, "scored": 0}

    # ------------------------------------------------------------------ state
    @property
    def resident(self) -> bool:
        return self.row is not None

    @property
    def attached(self) -> bool:
        return self.outbox is not None

    def has_work(self) -> bool:
        return bool(len(self.pending) >= self.config.chunk or self.flush_request is not None
                    or self.current is not None or self.generation is not None or not self.inbox.empty())

    def idle(self) -> bool:
        return not self.in_step and not self.has_work()

    def outbox_full(self) -> bool:
        return self.outbox is not None and self.outbox.qsize() >= OUTBOX_LIMIT

    def input_budget(self) -> int:
        """Input tokens the session may hold: a message limit alone would let 16 big texts in."""
        return max(4 * self.config.chunk, INPUT_BUDGET_MIN)

    async def queue(self, item: Work) -> None:
        """Queue a request for the scheduler; waits while the inbox is full or, for input, while the
        session holds more input tokens than its budget (so the server stops reading the stream)."""
        if isinstance(item, AppendWork):
            while self.queued_tokens + len(self.pending) > self.input_budget():
                self.input_room.clear()
                await self.input_room.wait()
            self.queued_tokens += len(item.ids)
        await self.inbox.put(item)

    def next_work(self) -> Work:
        """The next queued request (the inbox must not be empty)."""
        item = self.inbox.get_nowait()
        if isinstance(item, AppendWork):
            self.queued_tokens -= len(item.ids)
        return item

    def drop_queued(self) -> None:
        """Drop the requests not started yet."""
        while not self.inbox.empty():
            self.inbox.get_nowait()
        self.queued_tokens = 0
        self.input_room.set()

    def consume_pending(self, n: int) -> str:
        """Drop the first n pending ids (they ran); return the request id of the last one's append."""
        del self.pending[:n]
        self.input_room.set()
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

    def emit(self, response: pb.StreamResponse | StreamEnd) -> None:
        """Queue a response for the attached call (dropped when no call is attached)."""
        if self.outbox is not None:
            self.outbox.put_nowait(response)

    def touch(self) -> None:
        self.last_used = time.time()

    def tokens_seen(self) -> int:
        return self.engine.stats(self.row).tokens_seen if self.resident else self.saved_stats["tokens_seen"]

    def cache_stats(self) -> pb.CacheStats | None:
        if not self.resident:
            return None
        s = self.engine.stats(self.row)
        return pb.CacheStats(used=s.cache_used, capacity=s.cache_capacity, sink_used=s.sink_used,
                             window_used=s.window_used, tier_used=s.tier_used, cache_bytes=s.cache_bytes)

    def info(self) -> pb.SessionInfo:
        if self.resident:
            st = self.engine.stats(self.row)
            tokens, nll = st.tokens_seen, st.mean_nll
        else:
            tokens, nll = self.saved_stats["tokens_seen"], self.saved_stats["mean_nll"]
        info = pb.SessionInfo(
            session_id=self.id, settings=settings_to_pb(self.config, self.analysis),
            state=pb.SESSION_STATE_RESIDENT if self.resident else pb.SESSION_STATE_PERSISTED,
            attached=self.attached, tokens_seen=tokens, pending_tokens=len(self.pending), mean_nll=nll,
            perplexity=_exp(nll), created_unix_s=self.created, last_used_unix_s=self.last_used)
        cache = self.cache_stats()
        if cache is not None:
            info.cache.CopyFrom(cache)
        return info

    # ------------------------------------------------------------------ generation
    def finish_generation(self, reason: str, error: str = "") -> None:
        """End the running generation: report it, and tell the text input the stream moved on."""
        g = self.generation
        assert g is not None
        self.generation = None
        if self.text is not None:
            self.text.push_ids([])  # later text starts at a token boundary after the generated tokens
        now = time.perf_counter()
        ttft = (g.first_token_at - g.work.arrived) if g.first_token_at is not None else 0.0
        self.emit(pb.StreamResponse(request_id=g.work.request_id, generation_complete=pb.GenerationComplete(
            stop_reason=pb.StopReason.Value(f"STOP_REASON_{reason}"), generated_tokens=len(g.gen.generated),
            input_tokens=g.input_tokens, tokens_seen=self.tokens_seen(), text="".join(g.text_parts),
            time_to_first_token_s=ttft, total_time_s=now - g.work.arrived, error_message=error)))

    # ------------------------------------------------------------------ persistence
    def meta(self) -> dict[str, Any]:
        """JSON-able session state that the engine snapshot does not hold."""
        return {"id": self.id, "analysis": asdict(self.analysis), "created": self.created,
                "last_used": self.last_used, "pending": self.pending,
                "text": self.text.state() if self.text is not None else None}


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf


def config_from_meta(meta: dict[str, Any]) -> StreamConfig:
    config = dict(meta["config"])
    config["tiers"] = tuple(TierSpec(**t) for t in config["tiers"])
    return StreamConfig(**config)


class SessionStore:
    """The state directory: one `<session id>.safetensors` per persisted session (no pickle)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, session_id: str) -> Path:
        return self.root / f"{session_id}.safetensors"

    def save(self, session_id: str, tensors: dict, meta: dict) -> int:
        path = self.path(session_id)
        save_snapshot(path, tensors, meta)
        return path.stat().st_size

    def load(self, session_id: str) -> tuple[dict, dict]:
        try:
            return load_snapshot(self.path(session_id))
        except (SnapshotError, MemoryError):  # out of memory says nothing about the file
            raise
        except Exception as exc:  # e.g. safetensors' own error for a damaged header
            raise SnapshotError(f"cannot read snapshot of {session_id}: {exc}") from exc

    def delete(self, session_id: str) -> None:
        self.path(session_id).unlink(missing_ok=True)

    def scan(self) -> list[dict[str, Any]]:
        """Metadata of every readable snapshot (unreadable files are logged and skipped)."""
        metas = []
        for path in sorted(self.root.glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as f:
                    metas.append(json.loads((f.metadata() or {})["sinkstream"]))
            except Exception as exc:  # a damaged file must not stop the server from starting
                log.warning("skipping unreadable snapshot", extra={"path": str(path), "error": str(exc)})
        return metas


class EnginePool:
    """One StreamingInference per distinct StreamConfig, all sharing the model's weights."""

    def __init__(self, model, tokenizer, rows: int, max_shapes: int, metrics: ServerMetrics) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.rows, self.max_shapes = rows, max_shapes
        self.engines: dict[StreamConfig, StreamingInference] = {}
        self.metrics = metrics

    def engine_for(self, config: StreamConfig,
                   in_use: Callable[[StreamingInference], bool]) -> StreamingInference:
        engine = self.engines.get(config)
        if engine is not None:
            return engine
        if len(self.engines) >= self.max_shapes:
            for other_config, other in list(self.engines.items()):
                if not in_use(other):  # free an unused shape's memory
                    del self.engines[other_config]
                    break
            else:
                raise Busy(f"the server already serves {self.max_shapes} distinct cache shapes; use the "
                           "settings of an existing session (see ModelInfo defaults)", "open.settings")
        engine = StreamingInference(self.model, config, max_rows=self.rows, tokenizer=self.tokenizer)
        self.engines[config] = engine
        self.metrics.cache_bytes.set(sum(e.cache_bytes for e in self.engines.values()))
        return engine


class SessionManager:
    """All live sessions; opening, resuming, evicting, restoring, expiring and deleting them."""

    def __init__(self, pool: EnginePool, store: SessionStore | None, metrics: ServerMetrics, *,
                 max_sessions: int, session_ttl_s: float, idle_evict_s: float) -> None:
        self.pool, self.store, self.metrics = pool, store, metrics
        self.max_sessions = max_sessions
        self.session_ttl_s, self.idle_evict_s = session_ttl_s, idle_evict_s
        self.sessions: dict[str, Session] = {}
        self.recently_closed: dict[str, None] = {}
        self.lock = asyncio.Lock()
        self.on_work: Callable[[], None] = lambda: None  # the scheduler's wake-up
        if store is not None:
            for meta in store.scan():
                try:
                    self._adopt_persisted(meta)
                except (KeyError, TypeError, ValueError) as exc:
                    log.warning("skipping snapshot without session state: %r", exc)
        self._update_gauges()

    # ------------------------------------------------------------------ lookup
    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            why = "was closed" if session_id in self.recently_closed else "is unknown or expired"
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"session {session_id!r} {why}", "session_id")
        return session

    def _update_gauges(self) -> None:
        resident = sum(s.resident for s in self.sessions.values())
        self.metrics.sessions.labels("resident").set(resident)
        self.metrics.sessions.labels("persisted").set(len(self.sessions) - resident)
        self.metrics.attached.set(sum(s.attached for s in self.sessions.values()))

    # ------------------------------------------------------------------ open / resume / detach
    async def open(self, session_id: str, config: StreamConfig, analysis: AnalysisOptions,
                   seed: int | None) -> Session:
        async with self.lock:
            if session_id in self.sessions:
                raise RequestError(grpc.StatusCode.ALREADY_EXISTS, f"session {session_id!r} exists",
                                   "open.session_id")
            if len(self.sessions) >= self.max_sessions:
                self._expire(time.time())
                if len(self.sessions) >= self.max_sessions:
                    raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                       f"the server holds its maximum of {self.max_sessions} sessions")
            text = TextInput(self.pool.tokenizer) if self.pool.tokenizer is not None else None
            session = Session(session_id, config, analysis, text)
            await self._take_row(session, seed=seed)
            self.sessions[session_id] = session
            self.recently_closed.pop(session_id, None)
            self._update_gauges()
            return session

    async def resume(self, session_id: str, analysis: AnalysisOptions | None) -> Session:
        async with self.lock:
            session = self.get(session_id)
            if session.attached:
                raise RequestError(grpc.StatusCode.ABORTED,
                                   f"session {session_id!r} is attached to another stream",
                                   "resume.session_id")
            if session.generation is not None:  # cancelled by the previous call's end
                session.finish_generation("CANCELLED")
            if not session.resident:
                await self._restore(session)
            if analysis is not None:
                session.analysis = analysis
            return session

    def attach(self, session: Session) -> asyncio.Queue:
        session.outbox = asyncio.Queue()
        session.generate_seq = session.cancel_upto = 0
        session.touch()
        self._update_gauges()
        return session.outbox

    def detach(self, session: Session, outbox: asyncio.Queue) -> None:
        """The call ended (half-close, cancellation, deadline, error): drop its unstarted requests and
        cancel its generation; tokens already accepted stay in the session."""
        if session.outbox is not outbox:
            return
        session.outbox = None
        session.drop_queued()
        if isinstance(session.current, GenerateWork):
            session.current = None
        session.cancel_upto = session.generate_seq
        session.touch()
        self._update_gauges()
        self.on_work()

    # ------------------------------------------------------------------ rows, eviction, restore
    async def _take_row(self, session: Session, seed: int | None = None) -> int:
        """Give the session a row on its config's engine, evicting the least recently used idle session
        of that engine when all rows are taken. Lock held. Failures are RequestErrors: Busy when no row
        can be freed now, RESOURCE_EXHAUSTED when memory or disk ran out, INTERNAL otherwise."""
        try:
            return await self._claim_row(session, seed)
        except RequestError:
            raise
        except Exception as exc:  # e.g. MemoryError building an engine, OSError persisting a victim
            raise server_failure(exc, f"cannot give session {session.id!r} a cache row") from exc

    async def _claim_row(self, session: Session, seed: int | None) -> int:
        if session.config not in self.pool.engines and len(self.pool.engines) >= self.pool.max_shapes:
            await self._free_a_shape()
        engine = self.pool.engine_for(session.config, self._engine_in_use)
        try:
            row = engine.open_row(seed)
        except NoFreeRowError:
            victims = sorted((s for s in self.sessions.values()
                              if s.engine is engine and s.idle() and s is not session),
                             key=lambda s: s.last_used)
            if not victims or self.store is None:
                raise Busy(f"all {engine.max_rows} rows for this cache shape are busy") from None
            await self._evict(victims[0])
            row = engine.open_row(seed)
        session.engine, session.row = engine, row
        return row

    async def _free_a_shape(self) -> None:
        """Persist the sessions of the least recently used engine whose sessions are all idle, so that
        engine can be dropped for a new cache shape. Lock held."""
        if self.store is None:
            return
        candidates = []
        for engine in self.pool.engines.values():
            users = [s for s in self.sessions.values() if s.engine is engine]
            if all(s.idle() for s in users):
                candidates.append((max((s.last_used for s in users), default=0.0), users))
        if candidates:
            for user in min(candidates, key=lambda c: c[0])[1]:
                await self._evict(user)

    def _engine_in_use(self, engine: StreamingInference) -> bool:
        return any(s.engine is engine for s in self.sessions.values())

    async def _evict(self, session: Session) -> None:
        """Snapshot a resident, idle session to the state directory and free its row. Lock held."""
        assert self.store is not None and session.resident
        await self._save(session)
        session.saved_stats = self._stats_of(session)
        session.engine.close_row(session.row)
        session.engine = session.row = None
        self.metrics.evictions.inc()
        self._update_gauges()
        log.info("session persisted and released", extra={"session": session.id})

    def _stats_of(self, session: Session) -> dict[str, Any]:
        st = session.engine.stats(session.row)
        return {"tokens_seen": st.tokens_seen, "mean_nll": st.mean_nll, "scored": st.scored_tokens}

    async def _save(self, session: Session) -> int:
        tensors, meta = session.engine.snapshot(session.row)
        meta["session"] = session.meta()
        return await asyncio.to_thread(self.store.save, session.id, tensors, meta)

    async def _restore(self, session: Session) -> None:
        """Bring a persisted session back onto a row. Lock held."""
        assert self.store is not None
        try:
            tensors, meta = await asyncio.to_thread(self.store.load, session.id)
        except SnapshotError as exc:
            raise RequestError(grpc.StatusCode.DATA_LOSS, str(exc), "session_id") from exc
        except Exception as exc:  # e.g. out of memory reading it: the snapshot itself may be fine
            raise server_failure(exc, f"cannot restore session {session.id!r}", "session_id") from exc
        await self._take_row(session)
        try:
            session.engine.restore(session.row, tensors, meta)
        except BaseException as exc:  # whatever the failure, the row must not stay taken
            session.engine.close_row(session.row)
            session.engine = session.row = None
            if isinstance(exc, SnapshotError):
                raise RequestError(grpc.StatusCode.DATA_LOSS, str(exc), "session_id") from exc
            if isinstance(exc, Exception):
                raise server_failure(exc, f"cannot restore session {session.id!r}", "session_id") from exc
            raise
        self.metrics.restores.inc()
        self._update_gauges()
        log.info("session restored", extra={"session": session.id})

    async def ensure_resident(self, session: Session) -> bool:
        """Restore a persisted session that has work; False if no row can be freed now, or if restoring
        failed (the session is failed, or forgotten when its snapshot is unreadable). Lock held."""
        if session.resident:
            return True
        try:
            await self._restore(session)
        except Busy:
            return False  # wait for a row
        except RequestError as exc:
            if exc.code == grpc.StatusCode.DATA_LOSS:
                session.emit(StreamEnd(exc))
                self._forget(session)
            else:
                self.fail(session, exc)
            return False
        return True

    def fail(self, session: Session, error: RequestError) -> None:
        """A server-side failure specific to this session: end its call with `error`, drop its queued
        requests (they would fail the same way) and leave it alone for a moment; it stays resumable."""
        log.warning("session failed: %s", error, extra={"session": session.id})
        if session.generation is not None:
            try:
                session.finish_generation("ERROR", error=str(error))
            except Exception:  # the failure may be in the very state that reports it
                session.generation = None
        session.emit(StreamEnd(error))
        session.drop_queued()
        session.current = session.flush_request = None
        session.retry_at = time.monotonic() + FAILED_RETRY_S

    def _adopt_persisted(self, meta: dict[str, Any]) -> None:
        """Register a session found in the state directory at startup."""
        info = meta["session"]
        text = None
        if self.pool.tokenizer is not None:
            text = TextInput(self.pool.tokenizer, info["text"])
        session = Session(info["id"], config_from_meta(meta), AnalysisOptions(**info["analysis"]), text,
                          created=info["created"])
        session.last_used = info["last_used"]
        session.pending = list(info["pending"])
        session.pending_owners.append([len(session.pending), ""])
        scored = int(meta["scored"])
        session.saved_stats = {"tokens_seen": int(meta["tokens_seen"]), "scored": scored,
                               "mean_nll": float(meta["nll_sum"]) / max(scored, 1)}
        self.sessions[session.id] = session

    # ------------------------------------------------------------------ checkpoint / close / delete
    async def checkpoint(self, session: Session) -> int:
        """Persist a resident session now; returns bytes written. Lock held."""
        if self.store is None:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               "the server runs without --state-dir: nothing can be persisted", "checkpoint")
        return await self._save(session)

    def close(self, session: Session) -> None:
        """End a session for good (its row, its snapshot). Lock held."""
        self._forget(session)

    def _forget(self, session: Session) -> None:
        if session.resident:
            session.engine.close_row(session.row)
            session.engine = session.row = None
        session.closed = True
        self.sessions.pop(session.id, None)
        self.recently_closed[session.id] = None
        if len(self.recently_closed) > RECENTLY_CLOSED:
            self.recently_closed.pop(next(iter(self.recently_closed)))
        if self.store is not None:
            self.store.delete(session.id)
        self._update_gauges()

    async def delete(self, session_id: str) -> int:
        async with self.lock:
            session = self.get(session_id)
            if session.attached:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"session {session_id!r} is attached to a stream; close it there",
                                   "session_id")
            tokens = session.tokens_seen()
            self._forget(session)
            return tokens

    # ------------------------------------------------------------------ housekeeping
    def _expire(self, now: float) -> None:
        if not self.session_ttl_s:
            return
        for session in list(self.sessions.values()):
            if not session.attached and session.idle() and now - session.last_used > self.session_ttl_s:
                log.info("session expired", extra={"session": session.id})
                self._forget(session)

    async def sweep(self) -> None:
        """Expire sessions past their TTL; persist and release sessions idle for idle_evict_s."""
        async with self.lock:
            now = time.time()
            self._expire(now)
            if self.store is None or not self.idle_evict_s:
                return
            for session in list(self.sessions.values()):
                if session.resident and session.idle() and now - session.last_used > self.idle_evict_s:
                    await self._evict(session)

    async def persist_all(self) -> int:
        """At shutdown: persist every resident session (when a state directory is set)."""
        if self.store is None:
            return 0
        async with self.lock:
            resident = [s for s in self.sessions.values() if s.resident]
            for session in resident:
                if session.generation is not None:
                    session.finish_generation("CANCELLED")
                await self._evict(session)
            return len(resident)
