"""The sessions' lifecycle: opening, resuming, attaching and detaching calls, failing, closing, expiring,
idle eviction and persisting them all at shutdown.

Sessions outlive the gRPC call that created them; idle sessions are snapshotted to the state directory
and their row is freed (engine_pool.Residency); work for a persisted session restores it first, so
eviction is invisible to clients except for the latency.

With a shared store (Redis, several replicas) a session is served only under its lease (leases.py): a
call about a session first claims it, which redirects the client to the replica holding it, or takes it
over (recovered from the shared snapshot and log); the lease is renewed while a call is attached and
given up when it ends. A session whose writes are refused (another replica took it over) is dropped here.

Concurrency: everything runs on the server's event loop. `lock` is held by the scheduler around each
forward pass (which runs in a worker thread); any other code that touches an engine takes it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field

import grpc

from sinkstream.core.config import StreamConfig
from sinkstream.core.snapshot import SnapshotError
from sinkstream.service.backpressure import Outbox
from sinkstream.service.chat_input import ChatInput
from sinkstream.service.engine_pool import EnginePool, Residency
from sinkstream.service.errors import Busy, RequestError, server_failure, shown_id
from sinkstream.service.leases import Claim, Leases, SessionMoved
from sinkstream.service.metrics import ServerMetrics
from sinkstream.service.options import AnalysisOptions
from sinkstream.service.quotas import NO_QUOTAS, TenantQuotas
from sinkstream.service.recovery import (
    Replay,
    covers,
    restore_bookkeeping,
    session_from_open,
    snapshot_lsn,
)
from sinkstream.service.replies import ErrorReply, StreamEnd
from sinkstream.service.session import Session
from sinkstream.service.session_journal import SessionJournal, rng_from_text, rng_to_text
from sinkstream.service.session_store import SessionStore, session_from_meta
from sinkstream.service.state_backend import LogCommitter, StateStore
from sinkstream.service.tenants import SessionKey
from sinkstream.service.text_input import TextInput
from sinkstream.service.work import AppendWork

log = logging.getLogger("sinkstream.sessions")
RECENTLY_CLOSED = 1024  # closed ids remembered for a clearer NOT_FOUND message
FAILED_RETRY_S = 1.0  # a session that failed server-side is not scheduled again for this long


def last_changed(store: SessionStore, key: SessionKey) -> float:
    """When a logged session of a state directory (only its sessions are listed at start) was last changed,
    from its files' modification times (log, snapshot; the files are not read): the last use of a session
    not recovered since the restart (its files do not change until it is)."""
    times = []
    for path in (store.log_path(key), store.path(key)):
        with contextlib.suppress(FileNotFoundError):
            times.append(path.stat().st_mtime)
    return max(times, default=time.time())


class SessionManager:
    """All live sessions; opening, resuming, evicting, restoring, expiring and deleting them."""

    def __init__(self, pool: EnginePool, store: StateStore | None, metrics: ServerMetrics, *,
                 max_sessions: int, session_ttl_s: float, idle_evict_s: float,
                 quotas: TenantQuotas = NO_QUOTAS, stalled_reader_s: float = 0.0,
                 committer: LogCommitter | None = None, durable: bool = False,
                 leases: Leases | None = None) -> None:
        """`committer`: writes the sessions' write-ahead logs (given with a store); `durable`: numbered
        requests start a session's log (else they are acknowledged when applied, not durable); `leases`:
        with a shared store, this replica's leases."""
        self.pool, self.store, self.metrics = pool, store, metrics
        self.leases = leases
        self._background: set[asyncio.Task] = set()  # lease releases under way
        self.max_sessions, self.quotas = max_sessions, quotas
        self.stalled_reader_s = stalled_reader_s  # 0: a stream that reads nothing stays attached
        self.committer, self.durable = committer, durable and committer is not None
        # Logged sessions found at start, recovered on first use (key -> last use, in key order).
        self.unrecovered: dict[SessionKey, float] = {}
        # Runs a replay's forward passes; the scheduler gives its compute thread.
        self.compute: Callable[[Callable[[], None]], Awaitable[None]] = asyncio.to_thread
        self.session_ttl_s, self.idle_evict_s = session_ttl_s, idle_evict_s
        self.sessions: dict[SessionKey, Session] = {}
        self.recently_closed: dict[SessionKey, None] = {}
        # Sessions whose snapshot is damaged (key -> why): DATA_LOSS until deleted, never NOT_FOUND.
        self.damaged: dict[SessionKey, str] = {}
        self.lock = asyncio.Lock()
        self._gauged_tenants: set[str] = set()
        self.residency = Residency(pool, store, self.sessions, metrics, self._update_gauges, quotas)
        self.on_work: Callable[[], None] = lambda: None  # the scheduler's wake-up
        if store is not None:
            if committer is not None:
                self.unrecovered = {key: last_changed(store, key) for key in store.logged_keys()}
            metas, self.damaged = store.scan(skip=self.unrecovered)
            for key, meta in metas:
                try:
                    session = session_from_meta(key, meta, pool.tokenizer)
                except (KeyError, TypeError, ValueError) as exc:
                    log.warning("skipping snapshot without session state: %r", exc)
                    continue
                self.sessions[key] = session
        self._update_gauges()

    # ------------------------------------------------------------------ lookup
    def get(self, key: SessionKey) -> Session:
        """A tenant's live session; NOT_FOUND for an id the tenant has no session under, whether or not
        another tenant has one (the message is the same)."""
        session = self.sessions.get(key)
        if session is None and key in self.damaged:
            raise RequestError(grpc.StatusCode.DATA_LOSS,
                               f"session {shown_id(key.id)} is lost: its persisted state is damaged "
                               f"({self.damaged[key]}); delete it", "session_id")
        if session is None:
            raise self._not_found(key)
        return session

    async def lookup(self, key: SessionKey) -> Session:
        """A session, recovered from its log first if it has not been since the restart (with a shared
        store: once this replica holds its lease)."""
        if self.leases is not None:
            async with self.lock:
                await self._take_lease(key)
        if key in self.unrecovered:
            async with self.lock:
                if key in self.unrecovered:
                    await self._recover(key)
        return self.get(key)

    def all(self, tenant: str | None = None) -> list[Session]:
        """The live sessions, resident or persisted: every tenant's, or only `tenant`'s."""
        return [s for s in self.sessions.values() if tenant is None or s.key.tenant == tenant]

    def unrecovered_of(self, tenant: str | None = None) -> list[SessionKey]:
        """The logged sessions not recovered since the restart: every tenant's, or only `tenant`'s."""
        return [key for key in self.unrecovered if tenant is None or key.tenant == tenant]

    def _update_gauges(self) -> None:
        resident = sum(s.resident for s in self.sessions.values())
        self.metrics.sessions.labels("resident").set(resident)
        self.metrics.sessions.labels("persisted").set(len(self.sessions) - resident)
        by_tenant = Counter((s.key.tenant, s.resident) for s in self.sessions.values())
        for tenant in {key.tenant for key in self.sessions} | self._gauged_tenants:
            for state, is_resident in (("resident", True), ("persisted", False)):
                self.metrics.tenant_sessions.labels(tenant, state).set(by_tenant[tenant, is_resident])
        self._gauged_tenants |= {key.tenant for key in self.sessions}
        self.metrics.attached.set(sum(s.attached for s in self.sessions.values()))

    # ------------------------------------------------------------------ open / resume / attach / detach
    async def open(self, tenant: str, session_id: str, config: StreamConfig, analysis: AnalysisOptions,
                   seed: int | None, *, chat: ChatInput | None = None, first_ids: list[int] | None = None,
                   request_id: str = "") -> Session:
        """A new resident session of `tenant`; an empty `session_id` gets a random one (128 bits).
        `chat`: its conversation, started (e.g. with a system message) and `first_ids`: that start's ids,
        the stream's first input."""
        key = SessionKey(tenant, session_id or secrets.token_hex(16))
        async with self.lock:
            if key in self.sessions or key in self.damaged or key in self.unrecovered:
                raise RequestError(grpc.StatusCode.ALREADY_EXISTS, f"session {shown_id(key.id)} exists",
                                   "open.session_id")
            if self._held_by(tenant) >= self.quotas.max_sessions > 0:
                self._expire(time.time())
            self.quotas.check_sessions(self._held_by(tenant))
            if len(self.sessions) + len(self.unrecovered) >= self.max_sessions:
                self._expire(time.time())
                if len(self.sessions) + len(self.unrecovered) >= self.max_sessions:
                    raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                       f"the server holds its maximum of {self.max_sessions} sessions")
            await self._claim_new(key)
            text = TextInput(self.pool.tokenizer) if self.pool.tokenizer is not None else None
            session = Session(key, config, analysis, text)
            session.chat = chat
            if first_ids:
                ids = text.push_ids(first_ids) if text is not None else first_ids
                session.add_input(AppendWork(request_id, ids, False,
                                             text_state=text.state() if text is not None else None))
            try:
                await self.residency.take_row(session, seed=seed)
            except BaseException:
                if self.leases is not None:
                    await asyncio.to_thread(self.leases.abandon, key)
                raise
            self.sessions[key] = session
            self.recently_closed.pop(key, None)
            self._update_gauges()
            if self.store is not None and self.store.shared:
                # logged from its creation, numbered requests or not: whichever replica a later call
                # reaches takes it over from the shared log (else only this replica's memory holds it)
                await self.start_journal(session)
            return session

    def _held_by(self, tenant: str) -> int:
        """Sessions `tenant` holds, counting its logged ones not recovered yet."""
        return sum(key.tenant == tenant for key in (*self.sessions, *self.unrecovered))

    async def resume(self, key: SessionKey, analysis: AnalysisOptions | None) -> Session:
        """An existing session, resident again, for a new call."""
        if (known := self.sessions.get(key)) is not None:
            await known.wait_applied_durable()  # mostly here, not under the lock (see below)
        async with self.lock:
            await self._take_lease(key)
            if key in self.unrecovered:
                await self._recover(key)
            session = self.get(key)
            if session.attached:
                raise RequestError(grpc.StatusCode.ABORTED,
                                   f"session {shown_id(key.id)} is attached to another stream",
                                   "resume.session_id")
            if session.generation is not None:  # cancelled by the previous call's end
                if session.generation.work.client_seq:  # numbered: continued if the client repeats it
                    session.suspend_generation()
                else:
                    session.finish_generation("CANCELLED")
            if not session.resident:
                try:
                    await self.residency.restore(session)
                except RequestError as exc:
                    if exc.code == grpc.StatusCode.DATA_LOSS:
                        self._lose(session, exc)
                    raise
            if analysis is not None:
                session.set_analysis(analysis)
            session.rewind_text_input(self.pool.tokenizer)
            # the ended call's last numbered requests may still be in the log committer's round: the
            # SessionOpened built from this must acknowledge them (the new caller numbers after it); at
            # once unless the session was recovered or changed since the wait above
            await session.wait_applied_durable()
            return session

    def attach(self, session: Session) -> Outbox:
        """A call takes the session; its replies come out of the returned outbox."""
        outbox = session.attach()
        self._update_gauges()
        return outbox

    def detach(self, session: Session, outbox: Outbox) -> None:
        """The call ended (half-close, cancellation, deadline, error): drop its unstarted requests and
        cancel its generation; tokens already accepted stay in the session."""
        if not session.detach(outbox):
            return
        self._update_gauges()
        self.on_work()
        if self.leases is not None:  # another replica may take the session over from now on
            self._in_background(asyncio.to_thread(self.leases.release, session.key), "releasing a lease")

    def _in_background(self, work: Awaitable[None], what: str) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)

        def finished(task: asyncio.Task) -> None:
            self._background.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.warning("%s failed: %r", what, task.exception())
        task.add_done_callback(finished)

    # ------------------------------------------------------------------ leases (shared store)
    async def _claim_new(self, key: SessionKey) -> None:
        """Shared store: hold a new session's lease (ALREADY_EXISTS if another replica stored it)."""
        if self.leases is None:
            return
        claim = await self._claim(key, new=True)
        if claim.status == "exists":
            raise RequestError(grpc.StatusCode.ALREADY_EXISTS, f"session {shown_id(key.id)} exists",
                               "open.session_id")
        if claim.status != "held":
            raise SessionMoved(key, claim.owner, "it holds the session's lease")

    async def _take_lease(self, key: SessionKey) -> None:
        """Shared store: hold the session's lease before serving it. SessionMoved (UNAVAILABLE, naming the
        owner) while another live replica holds it; NOT_FOUND if no replica stored it. A copy kept here
        that another replica wrote since (the generation grew) is stale: it is dropped and the session is
        recovered from the store instead. Lock held."""
        if self.leases is None or key in self.damaged:
            return
        local = self.sessions.get(key)
        before = self.leases.generation(key)
        claim = await self._claim(key, new=False)
        if claim.status == "held" and (local is None or claim.generation == before):
            if local is None:
                self.unrecovered[key] = None  # recovered from the store by the caller
            return
        if local is not None:
            self._drop(local, SessionMoved(key, claim.owner, "another replica took it over"))
        if claim.status == "held":
            self.unrecovered[key] = None
            return
        self.leases.forget(key)
        self.unrecovered.pop(key, None)
        if claim.status == "elsewhere":
            raise SessionMoved(key, claim.owner, "it holds the session's lease")
        raise self._not_found(key)

    async def _claim(self, key: SessionKey, new: bool) -> Claim:
        try:
            return await asyncio.to_thread(self.leases.claim, key, new)
        except Exception as exc:  # Redis unreachable: the client tries again (here or elsewhere)
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"the session store cannot be reached: {exc}",
                               "session_id") from exc

    def _drop(self, session: Session, error: RequestError) -> None:
        """Forget a session this replica no longer owns (its state is another replica's now): its call, if
        any, ends with `error`; nothing is written to the store. Lock held."""
        log.warning("session dropped: %s", error.message, extra={"session": session.key.label})
        session.emit(StreamEnd(error))
        session.end()
        if self.sessions.get(session.key) is session:
            self.sessions.pop(session.key)
        self._update_gauges()

    def moved(self, key: SessionKey, generation: int) -> None:
        """The store refused a write of `key` under `generation`: another replica took the session over.
        Drops it (unless it was taken back under a newer generation meanwhile)."""
        self._in_background(self._drop_moved(key, generation), "dropping a moved session")

    async def _drop_moved(self, key: SessionKey, generation: int) -> None:
        async with self.lock:
            if self.leases is None or self.leases.generation(key) != generation:
                return
            self.leases.forget(key)
            if (session := self.sessions.get(key)) is not None:
                self._drop(session, SessionMoved(key, "", "another replica took it over: this replica's "
                                                          "write was refused"))

    async def keep_leases(self, interval_s: float) -> None:
        """Renew the leases of the sessions with an attached call every `interval_s`, until cancelled; a
        session whose lease was lost (another replica took it over) is dropped."""
        while True:
            await asyncio.sleep(interval_s)
            attached = [key for key, session in self.sessions.items() if session.attached]
            try:
                lost = await asyncio.to_thread(self.leases.renew, attached)
            except Exception as exc:  # Redis unreachable: writes stay fenced, try again next time
                log.warning("renewing leases failed: %r", exc)
                continue
            for key in lost:
                self.moved(key, self.leases.generation(key))

    # ------------------------------------------------------------------ write-ahead log
    async def start_journal(self, session: Session) -> None:
        """A numbered request is about to change a session without a log: start its log (durability on).
        A fresh session's log opens with its creation; one with state first gets a snapshot the log
        continues. Lock held, the session resident."""
        if not self.durable or self.store is None:
            return
        self.store.make_folder(session.key)  # a tenant's first log may be its first file
        journal = SessionJournal(self.committer, self.store.log_path(session.key))
        engine, row = session.engine, session.row
        if engine.stats(row).tokens_seen == 0 and session.generation is None:
            meta = session.meta()
            meta["text"] = session.applied_text_state if session.text is not None else None
            session.journal = journal
            journal.opened(asdict(session.config), asdict(session.analysis), session.created, meta,
                           rng_to_text(engine.generators[row]))
        else:
            session.journal = journal
            await self.residency.save(session)
            journal.based()

    async def _recover(self, key: SessionKey) -> None:
        """Rebuild a logged session after a restart: its newest valid snapshot (or its log's opening),
        then the log after it replayed through the model. DATA_LOSS if neither snapshot nor log can
        rebuild it; NOT_FOUND if its log holds nothing. Lock held."""
        store = self.store
        path = store.log_path(key)
        started = time.perf_counter()
        try:
            records = await asyncio.to_thread(store.read_log, key)
            base = await asyncio.to_thread(self._base_snapshot, key, records)
        except OSError as exc:
            raise server_failure(exc, f"cannot read the write-ahead log of session {shown_id(key.id)}",
                                 "session_id") from exc
        if base is None and not (records and records[0].get("k") == "open"):
            self.unrecovered.pop(key, None)
            if not records and not store.has_snapshot(key):  # an empty log: nothing was ever kept
                self.committer.delete(path)
                raise self._not_found(key)
            why = "no valid snapshot and its write-ahead log does not reach back to the session's start"
            self.damaged[key] = why
            raise RequestError(grpc.StatusCode.DATA_LOSS, f"session {shown_id(key.id)} cannot be "
                               f"recovered: {why}; delete it", "session_id")
        if base is None:
            session = session_from_open(key, records[0], self.pool.tokenizer)
            await self.residency.take_row(session)
            session.engine.generators[session.row].set_state(rng_from_text(records[0]["rng"]))
            lsn, replay = 0, records
        else:
            tensors, meta, lsn = base
            session = session_from_meta(key, meta, self.pool.tokenizer)
            restore_bookkeeping(session, meta)
            session.snapshot_lsn = lsn
            replay = [r for r in records if int(r["lsn"]) > lsn]
            if not replay:  # the snapshot is the whole history (a clean shutdown): no row until it is used
                self._adopt(key, session, SessionJournal(self.committer, path, lsn), 0, started)
                return
            await self.residency.restore_from(session, tensors, meta)
        try:
            await self.compute(lambda: Replay(session, self.pool.tokenizer).run(replay))
        except BaseException:
            session.release_row()
            raise
        journal = SessionJournal(self.committer, path, int(records[-1]["lsn"]) if records else lsn)
        self._adopt(key, session, journal, len(replay), started)

    def _adopt(self, key: SessionKey, session: Session, journal: SessionJournal, replayed: int,
               started: float) -> None:
        """A recovered session joins the live ones, its log continued by `journal`."""
        session.journal = journal
        self.sessions[key] = session
        self.unrecovered.pop(key, None)
        self.metrics.recoveries.inc()
        self._update_gauges()
        log.info("session recovered", extra={"session": key.label, "replayed_records": replayed,
                                             "resident": session.resident,
                                             "seconds": round(time.perf_counter() - started, 4)})

    def _base_snapshot(self, key: SessionKey, records: list[dict]) -> tuple[dict, dict, int] | None:
        """Worker thread: the newest snapshot that is valid and that the log continues (tensors, meta,
        lsn); a damaged newest one is replaced by the previous one when that one is used."""
        for previous in (False, True):
            try:
                tensors, meta = self.store.load(key, previous=previous)
            except SnapshotError as exc:
                if self.store.has_snapshot(key, previous):  # damaged (a missing one is normal: none yet)
                    log.warning("snapshot unusable for recovery: %s", exc, extra={"session": key.label})
                continue
            lsn = snapshot_lsn(meta)
            if covers(lsn, records):
                if previous:
                    self.store.promote_previous(key)
                return tensors, meta, lsn
        return None

    def _not_found(self, key: SessionKey) -> RequestError:
        why = "was closed" if key in self.recently_closed else "is unknown or expired"
        return RequestError(grpc.StatusCode.NOT_FOUND, f"session {shown_id(key.id)} {why}", "session_id")

    # ------------------------------------------------------------------ restore / failure
    async def ensure_resident(self, session: Session) -> bool:
        """Restore a persisted session that has work; False if no row can be freed now, or if restoring
        failed (the session is failed, or forgotten when its snapshot is unreadable). Lock held."""
        if session.resident:
            return True
        try:
            await self.residency.restore(session)
        except Busy:
            return False  # wait for a row
        except RequestError as exc:
            if exc.code == grpc.StatusCode.DATA_LOSS:
                session.emit(StreamEnd(exc))
                self._lose(session, exc)
            else:
                self.fail(session, exc)
            return False
        return True

    def _lose(self, session: Session, error: RequestError) -> None:
        """The session's snapshot is damaged: it is gone from memory, its file stays (for inspection) and
        every later use of its id is DATA_LOSS until DeleteSession removes it."""
        log.error("session lost: %s", error, extra={"session": session.key.label})
        session.end()
        self.sessions.pop(session.key, None)
        self.damaged[session.key] = error.message
        self._update_gauges()

    def fail(self, session: Session, error: RequestError) -> None:
        """A server-side failure specific to this session: end its call with `error`, drop its queued
        requests (they would fail the same way) and leave it alone for a moment; it stays resumable."""
        log.warning("session failed: %s", error, extra={"session": session.key.label})
        session.fail(error, retry_at=time.monotonic() + FAILED_RETRY_S)

    # ------------------------------------------------------------------ checkpoint / close / delete
    async def checkpoint(self, session: Session) -> int:
        """Persist a resident session now; returns bytes written. Lock held."""
        if self.store is None:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               "the server runs without --state-dir: nothing can be persisted", "checkpoint")
        return await self.residency.save(session)

    def close(self, session: Session) -> None:
        """End a session for good (its row, its snapshot). Lock held."""
        self._forget(session)

    def _forget(self, session: Session) -> None:
        session.end()
        self.sessions.pop(session.key, None)
        self.recently_closed[session.key] = None
        if len(self.recently_closed) > RECENTLY_CLOSED:
            self.recently_closed.pop(next(iter(self.recently_closed)))
        if self.store is not None:
            try:
                self.store.delete(session.key)
            except SessionMoved:  # a stale copy (e.g. expired here): the session is another replica's
                log.info("not deleting a session another replica took over",
                         extra={"session": session.key.label})
            else:
                if session.journal is not None:
                    session.journal.delete()
                elif self.store.shared:  # its generation and lease keys too
                    self.committer.delete(self.store.log_path(session.key))
        if self.leases is not None:
            self.leases.forget(session.key)
        self._update_gauges()

    async def delete(self, key: SessionKey) -> int:
        """Delete a detached session; returns the tokens it had seen."""
        async with self.lock:
            await self._take_lease(key)
            if key in self.damaged or key in self.unrecovered:
                self._drop_files(key)
                return 0
            session = self.get(key)
            if session.attached:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"session {shown_id(key.id)} is attached to a stream; close it there",
                                   "session_id")
            tokens = session.tokens_seen()
            self._forget(session)
            return tokens

    def _drop_files(self, key: SessionKey) -> None:
        """Remove a session known only by its files (damaged, or logged and not recovered yet)."""
        self.damaged.pop(key, None)
        self.unrecovered.pop(key, None)
        if self.store is not None:
            self.store.delete(key)
        if self.committer is not None:
            self.committer.delete(self.store.log_path(key))
        if self.leases is not None:
            self.leases.forget(key)

    # ------------------------------------------------------------------ housekeeping
    def _expire(self, now: float) -> None:
        if not self.session_ttl_s:
            return
        for key, last_used in list(self.unrecovered.items()):  # expire like the others, never read
            if now - last_used > self.session_ttl_s:
                log.info("session expired before it was recovered", extra={"session": key.label})
                self._drop_files(key)
        for session in list(self.sessions.values()):
            if not session.attached and session.idle() and now - session.last_used > self.session_ttl_s:
                log.info("session expired", extra={"session": session.key.label})
                self._forget(session)

    def _end_stalled_streams(self) -> None:
        """End the calls whose client has read no reply for stalled_reader_s: their sessions are detached
        (state and unprocessed input kept, resumable), so they no longer hold a row - nor can they be
        driven - for a client that reads nothing (see Outbox.end_call for the call itself)."""
        if not self.stalled_reader_s:
            return
        now = time.monotonic()
        for session in list(self.sessions.values()):
            outbox = session.outbox
            if outbox is None or outbox.stalled_for(now) <= self.stalled_reader_s:
                continue
            log.warning("ending a stream that reads no replies; its session stays",
                        extra={"session": session.key.label, "stalled_s": round(outbox.stalled_for(now), 1)})
            self.metrics.stalled_streams.inc()
            outbox.put(StreamEnd(RequestError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"the client read no reply for {self.stalled_reader_s:g} "
                "s: the stream is ended, the session kept (resume it)")))
            outbox.end_call()  # first: the call's reader queues nothing more
            self.detach(session, outbox)

    async def sweep(self) -> None:
        """End streams that stopped reading; expire sessions past their TTL; persist and release sessions
        idle for idle_evict_s."""
        async with self.lock:
            self._end_stalled_streams()
            now = time.time()
            self._expire(now)
            if self.store is None or not self.idle_evict_s:
                return
            for session in list(self.sessions.values()):
                if session.resident and session.idle() and now - session.last_used > self.idle_evict_s:
                    try:
                        await self.residency.evict(session)
                    except SessionMoved as exc:  # a stale copy: another replica took the session over
                        self._drop(session, exc)

    def end_streams(self, error: RequestError) -> None:
        """At shutdown, once the scheduler stopped: end every attached call with `error`, first answering
        each request it will not get an answer to with an error reply carrying its request id (and, for an
        append, its input tokens not processed; that input is kept with the session for a resume)."""
        for session in self.sessions.values():
            if not session.attached:
                continue
            dropped = session.keep_queued_input()
            if session.generation is not None:
                session.finish_generation("CANCELLED")
            unprocessed = session.unprocessed_input()
            for request_id, tokens in unprocessed:
                session.emit(ErrorReply(request_id, error, unprocessed_tokens=tokens))
            answered = {request_id for request_id, _ in unprocessed}
            for request_id, own_error in dropped:
                if request_id not in answered:  # e.g. the flush of an append reported just above
                    session.emit(ErrorReply(request_id, own_error or error))
            session.emit(StreamEnd(error))

    async def persist_all(self) -> ShutdownReport:
        """At shutdown: persist every resident session, and the session state of persisted ones whose
        pending input grew (when a state directory is set), each on its own: a failed save is logged and
        reported, and the others are still saved."""
        report = ShutdownReport()
        if self.store is None:
            return report
        async with self.lock:
            for session in [s for s in self.sessions.values() if s.resident or s.input_unsaved]:
                if session.generation is not None:
                    session.finish_generation("CANCELLED")
                session.cancel_suspended()
                try:
                    if session.resident:
                        await self.residency.evict(session)
                    else:  # input kept at detach while it waited for a row: its snapshot must hold it
                        await asyncio.to_thread(self.store.update_session_meta, session)
                except SessionMoved as exc:  # not this replica's any more: nothing of it to save
                    log.info("not persisting a session another replica took over: %s", exc.message,
                             extra={"session": session.key.label})
                except Exception as exc:  # disk full, unwritable, too large: the next session is still saved
                    why = f"{type(exc).__name__}: {exc}"
                    log.error("could not persist session at shutdown: %s", why,
                              extra={"session": session.key.label})
                    report.failed[session.key.label] = why
                else:
                    report.saved.append(session.key.label)
            return report


@dataclass
class ShutdownReport:
    """What persisting the sessions at shutdown did: ids saved, and why each failed save failed."""

    saved: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def all_saved(self) -> bool:
        return not self.failed
