"""Which sessions hold engine rows: one engine per cache shape, rows given to sessions, idle sessions
evicted to the state directory to free a row or a shape, and restored when they have work again.

Everything here runs on the server's event loop with the manager's lock held (see session_manager.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from sinkstream.core.config import StreamConfig
from sinkstream.core.snapshot import SnapshotError
from sinkstream.core.streaming import NoFreeRowError, StreamingInference
from sinkstream.service.errors import Busy, RequestError, server_failure
from sinkstream.service.metrics import ServerMetrics
from sinkstream.service.quotas import NO_QUOTAS, TenantQuotas
from sinkstream.service.session import Session
from sinkstream.service.session_store import SessionStore, snapshot_meta
from sinkstream.service.tenants import SessionKey

log = logging.getLogger("sinkstream.sessions")


def lost(session: Session, exc: SnapshotError) -> RequestError:
    """DATA_LOSS naming the session whose snapshot cannot be restored."""
    return RequestError(grpc.StatusCode.DATA_LOSS, f"session {session.id!r} cannot be restored: {exc}",
                        "session_id")


class EnginePool:
    """One StreamingInference per distinct StreamConfig, all sharing the model's weights."""

    def __init__(self, model, tokenizer, rows: int, max_shapes: int, metrics: ServerMetrics) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.rows, self.max_shapes = rows, max_shapes
        self.engines: dict[StreamConfig, StreamingInference] = {}
        self.metrics = metrics

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().out_features

    def engine_for(self, config: StreamConfig,
                   in_use: Callable[[StreamingInference], bool]) -> StreamingInference:
        """The engine of `config`, built if needed (dropping an engine no session uses when all
        `max_shapes` are taken; Busy if every one is in use)."""
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


class Residency:
    """Gives sessions rows on the pool's engines, evicting and restoring them through the store.

    `sessions` is the manager's live sessions (read only here); `changed` is called whenever a session
    became resident or stopped being so.
    """

    def __init__(self, pool: EnginePool, store: SessionStore | None, sessions: dict[SessionKey, Session],
                 metrics: ServerMetrics, changed: Callable[[], None],
                 quotas: TenantQuotas = NO_QUOTAS) -> None:
        self.pool, self.store, self.sessions = pool, store, sessions
        self.metrics, self.changed, self.quotas = metrics, changed, quotas

    async def take_row(self, session: Session, seed: int | None = None) -> int:
        """Give the session a row on its config's engine, evicting the least recently used idle session
        of that engine when all rows are taken. Failures are RequestErrors: Busy when no row can be freed
        now, RESOURCE_EXHAUSTED when memory or disk ran out, INTERNAL otherwise."""
        try:
            return await self._claim_row(session, seed)
        except RequestError:
            raise
        except Exception as exc:  # e.g. MemoryError building an engine, OSError persisting a victim
            raise server_failure(exc, f"cannot give session {session.id!r} a cache row") from exc

    async def _claim_row(self, session: Session, seed: int | None) -> int:
        await self._within_tenant_rows(session)
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
            await self.evict(victims[0])
            row = engine.open_row(seed)
        session.place(engine, row)
        return row

    async def _within_tenant_rows(self, session: Session) -> None:
        """Make room for one more row of the session's tenant: at its quota, evict the tenant's least
        recently used idle session (its own, never another tenant's); Busy if none can be."""
        own = [s for s in self.sessions.values()
               if s.key.tenant == session.key.tenant and s.resident and s is not session]
        if not self.quotas.rows_full(len(own)):
            return
        victims = sorted((s for s in own if s.idle()), key=lambda s: s.last_used)
        if not victims or self.store is None:
            raise self.quotas.rows_exhausted()
        await self.evict(victims[0])

    async def _free_a_shape(self) -> None:
        """Persist the sessions of the least recently used engine whose sessions are all idle, so that
        engine can be dropped for a new cache shape."""
        if self.store is None:
            return
        candidates = []
        for engine in self.pool.engines.values():
            users = [s for s in self.sessions.values() if s.engine is engine]
            if all(s.idle() for s in users):
                candidates.append((max((s.last_used for s in users), default=0.0), users))
        if candidates:
            for user in min(candidates, key=lambda c: c[0])[1]:
                await self.evict(user)

    def _engine_in_use(self, engine: StreamingInference) -> bool:
        return any(s.engine is engine for s in self.sessions.values())

    async def save(self, session: Session) -> int:
        """Snapshot a resident session to the store; returns bytes written. A logged session's snapshot
        records the log position it covers and keeps the one before it; its log is then cut behind the
        OLDER of the two, so a damaged newest snapshot can fall back to the previous one plus the log."""
        tensors, meta = session.engine.snapshot(session.row)
        meta = snapshot_meta(session, meta)
        journal = session.journal
        if journal is None:
            return await asyncio.to_thread(self.store.save, session.key, tensors, meta)
        lsn = journal.lsn
        size = await asyncio.to_thread(self.store.save, session.key, tensors, meta, True)
        older, session.snapshot_lsn = session.snapshot_lsn, lsn
        if older is not None:
            journal.drop_through(older)
        return size

    async def evict(self, session: Session) -> None:
        """Snapshot a resident, idle session to the state directory and free its row."""
        assert self.store is not None and session.resident
        session.cancel_suspended()  # a snapshot holds no generation
        await self.save(session)
        session.release_row_persisted()
        self.metrics.evictions.inc()
        self.changed()
        log.info("session persisted and released", extra={"session": session.key.label})

    async def restore(self, session: Session) -> None:
        """Bring a persisted session back onto a row. RequestErrors: DATA_LOSS when its snapshot is
        unreadable, Busy when no row is free now, else as take_row."""
        assert self.store is not None
        try:
            tensors, meta = await asyncio.to_thread(self.store.load, session.key)
        except SnapshotError as exc:
            raise lost(session, exc) from exc
        except Exception as exc:  # e.g. out of memory reading it: the snapshot itself may be fine
            raise server_failure(exc, f"cannot restore session {session.id!r}", "session_id") from exc
        await self.restore_from(session, tensors, meta)

    async def restore_from(self, session: Session, tensors: dict, meta: dict) -> None:
        """Put a snapshot's state on a new row for the session (errors as `restore`)."""
        await self.take_row(session)
        try:
            session.engine.restore(session.row, tensors, meta)
        except BaseException as exc:  # whatever the failure, the row must not stay taken
            session.release_row()
            if isinstance(exc, SnapshotError):
                raise lost(session, exc) from exc
            if isinstance(exc, Exception):
                raise server_failure(exc, f"cannot restore session {session.id!r}", "session_id") from exc
            raise
        self.metrics.restores.inc()
        self.changed()
        log.info("session restored", extra={"session": session.key.label})
