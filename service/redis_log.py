"""The write-ahead log committer for the Redis store: a LogCommitter (state_backend.py) whose background
thread sends every session's queued records in one pipelined round trip per round (group commit), each
session's records as one Lua script that checks the session's fencing generation before it appends them.

A record is reported durable only after Redis answered for it; how durable that is, is Redis's setting:
with `appendonly yes` and `appendfsync always` Redis fsyncs its append-only file before it answers, with
`appendfsync everysec` up to a second of acknowledged records can be lost if the Redis host crashes (not
if only Redis or a replica dies). A refused append (a stale generation: another replica took the session
over) is reported failed with SessionMoved, after `fenced(key)` told the owner to drop the session.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from sinkstream.service.leases import SessionMoved
from sinkstream.service.redis_keys import SessionKeys, as_text
from sinkstream.service.redis_state import FENCED, LogRef
from sinkstream.service.write_ahead_log import Done

log = logging.getLogger("sinkstream.wal")

APPEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'fenced' end
for i = 2, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
return 'ok'
"""

TRIM = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'fenced' end
redis.call('LTRIM', KEYS[2], ARGV[2], -1)
return 'ok'
"""

DELETE_SESSION = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'fenced' end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
return 'ok'
"""


@dataclass
class _Append:
    ref: LogRef
    data: str
    done: Done | None


@dataclass
class _Rewrite:
    ref: LogRef
    keep: Callable[[dict[str, Any]], bool]


@dataclass
class _Delete:
    ref: LogRef


class RedisLogCommitter:
    """The background thread that makes log records durable in Redis, many sessions per round trip."""

    def __init__(self, client: redis.Redis,
                 notify: Callable[[list[tuple[Done, BaseException | None]]], None],
                 fenced: Callable[[LogRef], None]) -> None:
        self.client, self.notify, self.fenced = client, notify, fenced
        self._append = client.register_script(APPEND)
        self._trim = client.register_script(TRIM)
        self._delete = client.register_script(DELETE_SESSION)
        self._ops: list[_Append | _Rewrite | _Delete] = []
        self._cv = threading.Condition()
        self._stopping = False
        self.rounds = 0  # round trips done (for tests and benchmarks)
        self._thread = threading.Thread(target=self._run, name="sinkstream-redis-wal", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ called from any thread
    def append(self, path: LogRef, record: dict[str, Any], done: Done | None = None) -> None:
        self._put(_Append(path, json.dumps(record, separators=(",", ":")), done))

    def rewrite(self, path: LogRef, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Drop the records `keep` refuses; they must be the log's oldest (a snapshot covers them)."""
        self._put(_Rewrite(path, keep))

    def delete(self, path: LogRef) -> None:
        """Remove the session from Redis: log, snapshots, generation and lease (after earlier records)."""
        self._put(_Delete(path))

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(30)

    def _put(self, op) -> None:
        with self._cv:
            self._ops.append(op)
            self._cv.notify()

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._ops and not self._stopping:
                    self._cv.wait()
                ops, self._ops = self._ops, []
                if not ops and self._stopping:
                    return
            try:
                self._round(ops)
            except Exception as exc:  # the thread must outlive one failed round (e.g. Redis restarting)
                log.exception("write-ahead log round failed")
                self._report([(op.done, exc) for op in ops if isinstance(op, _Append) and op.done], set())

    def _round(self, ops: list) -> None:
        """Send a round's ops in order: appends of one session merge into one script call, all sessions'
        calls in one pipeline; a rewrite or delete first sends what came before it."""
        batch: dict[LogRef, list[_Append]] = {}
        results: list[tuple[Done, BaseException | None]] = []
        fenced: set[LogRef] = set()
        for op in ops:
            if isinstance(op, _Append):
                batch.setdefault(op.ref, []).append(op)
                continue
            self._send(batch, results, fenced)
            batch = {}
            try:
                answer = self._rewrite(op) if isinstance(op, _Rewrite) else self._remove(op)
            except (redis.RedisError, ValueError) as exc:
                log.error("write-ahead log maintenance failed: %r", exc, extra={"session": op.ref.key.label})
                continue
            if as_text(answer) == FENCED:
                fenced.add(op.ref)
        self._send(batch, results, fenced)
        self.rounds += 1
        self._report(results, fenced)

    def _send(self, batch: dict[LogRef, list[_Append]], results: list, fenced: set[LogRef]) -> None:
        if not batch:
            return
        pipe = self.client.pipeline(transaction=False)
        for ref, appends in batch.items():
            names = SessionKeys.of(ref.key)
            self._append(keys=[names.generation, names.log],
                         args=[ref.generation, *(a.data for a in appends)], client=pipe)
        answers = pipe.execute(raise_on_error=False)
        for (ref, appends), answer in zip(batch.items(), answers, strict=True):
            error: BaseException | None = None
            if isinstance(answer, Exception):
                error = answer
            elif as_text(answer) == FENCED:
                fenced.add(ref)
                error = SessionMoved(ref.key, "", "another replica took it over: this replica's log write "
                                                  "was refused")
            results.extend((a.done, error) for a in appends if a.done is not None)

    def _rewrite(self, op: _Rewrite) -> bytes | str:
        names = SessionKeys.of(op.ref.key)
        records = [json.loads(raw) for raw in self.client.lrange(names.log, 0, -1)]
        dropped = next((i for i, record in enumerate(records) if op.keep(record)), len(records))
        if any(not op.keep(record) for record in records[dropped:]):
            raise ValueError("a log rewrite must keep the newest records")
        return self._trim(keys=[names.generation, names.log], args=[op.ref.generation, dropped])

    def _remove(self, op: _Delete) -> bytes | str:
        names = SessionKeys.of(op.ref.key)
        return self._delete(keys=[names.generation, names.lease, names.log, names.snapshot, names.previous],
                            args=[op.ref.generation])

    def _report(self, results: list[tuple[Done, BaseException | None]], fenced: set[LogRef]) -> None:
        for ref in fenced:
            log.warning("write refused: another replica holds the session", extra={"session": ref.key.label})
            self.fenced(ref)  # before the failed acks: the session is dropped first
        for _, error in results:
            if error is not None and not isinstance(error, SessionMoved):
                log.error("write-ahead log write failed: %r", error)
        if results:
            self.notify(results)

