"""Sessions' state in Redis, shared by replicas: a StateStore (state_backend.py) for `--state-store
redis://host:port/db`.

Per session (keys: redis_keys.py): the newest and previous snapshot as safetensors bytes (the same bytes a
snapshot file holds: metadata JSON and a sha256 in the header; no pickle), the write-ahead log as a list
of JSON records (written by redis_log.RedisLogCommitter), the fencing generation and the lease
(leases.py). Every write here is a Lua script that checks the generation this process holds the session
under first; a refused one raises SessionMoved, and nothing was written.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis

from sinkstream.core.snapshot import SnapshotError, snapshot_from_bytes, snapshot_to_bytes
from sinkstream.service.leases import Leases, SessionMoved
from sinkstream.service.redis_keys import SessionKeys, as_text
from sinkstream.service.session import Session
from sinkstream.service.state_backend import rewrite_session_meta
from sinkstream.service.tenants import SessionKey

log = logging.getLogger("sinkstream.sessions")
FENCED = "fenced"  # what a write script answers when the generation is not the writer's

SAVE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'fenced' end
if ARGV[3] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then redis.call('RENAME', KEYS[2], KEYS[3]) end
redis.call('SET', KEYS[2], ARGV[2])
return 'ok'
"""

PROMOTE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'fenced' end
redis.call('RENAME', KEYS[3], KEYS[2])
return 'ok'
"""

DELETE_SNAPSHOTS = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'fenced' end
redis.call('DEL', KEYS[2], KEYS[3])
return 'ok'
"""

SCHEMES = ("redis", "rediss", "unix")


def connect(url: str) -> redis.Redis:
    """A client of the Redis server `url` names (redis://host:port/db, rediss:// for TLS, unix://path),
    checked with a PING. ValueError for another kind of URL, OSError if the server cannot be reached."""
    if urlsplit(url).scheme not in SCHEMES:
        raise ValueError(f"--state-store {url!r}: expected a redis://host:port/db URL "
                         "(or rediss://, unix://)")
    client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise OSError(f"cannot reach the Redis state store {url}: {exc}") from exc
    return client


@dataclass(frozen=True)
class LogRef:
    """A session's log as the committer writes it: its key and the generation its writes are fenced by
    (taken when the log was opened: a record queued by a stale owner can never pass under a newer one)."""

    key: SessionKey
    generation: int


class RedisStateStore:
    """Snapshots and logs of every replica's sessions in one Redis database."""

    shared = True

    def __init__(self, client: redis.Redis, leases: Leases) -> None:
        self.client, self.leases = client, leases
        self._save = client.register_script(SAVE)
        self._promote = client.register_script(PROMOTE)
        self._delete = client.register_script(DELETE_SNAPSHOTS)

    def _generation(self, key: SessionKey) -> int:
        generation = self.leases.generation(key)
        if generation is None:
            raise SessionMoved(key, "", "this replica does not hold its lease")
        return generation

    def _fenced(self, key: SessionKey, answer: bytes | str) -> None:
        if as_text(answer) == FENCED:
            raise SessionMoved(key, "", "another replica took it over: this replica's write was refused")

    def save(self, key: SessionKey, tensors: dict, meta: dict, keep_previous: bool = False) -> int:
        """Store a snapshot (SessionMoved if this process's generation is stale); returns its bytes."""
        data = snapshot_to_bytes(tensors, meta)
        names = SessionKeys.of(key)
        self._fenced(key, self._save(keys=[names.generation, names.snapshot, names.previous],
                                     args=[self._generation(key), data, "1" if keep_previous else "0"]))
        return len(data)

    def load(self, key: SessionKey, previous: bool = False) -> tuple[dict, dict]:
        names = SessionKeys.of(key)
        name = names.previous if previous else names.snapshot
        data = self.client.get(name)
        if data is None:
            raise SnapshotError(f"no snapshot {name}")
        return snapshot_from_bytes(data, name)

    def has_snapshot(self, key: SessionKey, previous: bool = False) -> bool:
        names = SessionKeys.of(key)
        return bool(self.client.exists(names.previous if previous else names.snapshot))

    def promote_previous(self, key: SessionKey) -> None:
        names = SessionKeys.of(key)
        self._fenced(key, self._promote(keys=[names.generation, names.snapshot, names.previous],
                                        args=[self._generation(key)]))

    def delete(self, key: SessionKey) -> None:
        names = SessionKeys.of(key)
        self._fenced(key, self._delete(keys=[names.generation, names.snapshot, names.previous],
                                       args=[self._generation(key)]))

    def update_session_meta(self, session: Session) -> int:
        return rewrite_session_meta(self, session)

    def log_path(self, key: SessionKey) -> LogRef:
        return LogRef(key, self._generation(key))

    def read_log(self, key: SessionKey) -> list[dict[str, Any]]:
        """The log's records up to the first one that is not a JSON object (logged; Redis does not tear
        a record, so that one was written by something else)."""
        records = []
        for i, raw in enumerate(self.client.lrange(SessionKeys.of(key).log, 0, -1)):
            try:
                record = json.loads(raw)
            except ValueError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("lsn"), int):
                log.warning("write-ahead log record unreadable; the log is read up to it",
                            extra={"session": key.label, "index": i})
                break
            records.append(record)
        return records

    def exists(self, key: SessionKey) -> bool:
        """Whether the session is stored (its generation key exists from its open to its deletion)."""
        return bool(self.client.exists(SessionKeys.of(key).generation))

    def make_folder(self, key: SessionKey) -> None:
        pass  # keys need no folder

    def logged_keys(self) -> list[SessionKey]:
        return []  # recovered when a call asks for one (and this replica can take its lease)

    def scan(self, skip: Collection[SessionKey] = ()
             ) -> tuple[list[tuple[SessionKey, dict[str, Any]]], dict[SessionKey, str]]:
        return [], {}  # likewise
