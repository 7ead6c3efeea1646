"""What the session manager needs of a place that keeps sessions' state, whichever it is: the state
directory (session_store.SessionStore + write_ahead_log.GroupCommitter) or Redis (redis_state).

A store keeps each session's snapshots and reads back its write-ahead log; a log committer writes the log
records in the background, many sessions per round, and reports each one durable through a callback. A
log is named by the store (`log_path`): a file path for the directory, a (key, lease generation) for Redis,
so the committer never needs to know which store made the name.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable
from typing import Any, Protocol

from sinkstream.service.session import Session
from sinkstream.service.tenants import SessionKey
from sinkstream.service.write_ahead_log import Done


class StateStore(Protocol):
    """Snapshots and logs of sessions, keyed by (tenant, session id)."""

    #: whether other replicas share it (then a session is served only under its lease, see leases.py)
    shared: bool

    def save(self, key: SessionKey, tensors: dict, meta: dict, keep_previous: bool = False) -> int:
        """Write a snapshot durably; returns its size in bytes. `keep_previous`: the one it replaces
        becomes the previous one."""

    def load(self, key: SessionKey, previous: bool = False) -> tuple[dict, dict]:
        """The newest (or previous) snapshot; SnapshotError if missing or damaged."""

    def has_snapshot(self, key: SessionKey, previous: bool = False) -> bool:
        """Whether a newest (or previous) snapshot is stored, readable or not."""

    def promote_previous(self, key: SessionKey) -> None:
        """The newest snapshot is damaged: the previous one takes its place."""

    def delete(self, key: SessionKey) -> None:
        """Remove the session's snapshots (its log goes through the committer, in order)."""

    def update_session_meta(self, session: Session) -> int:
        """Rewrite a persisted session's snapshot with its current session state; returns its size."""

    def log_path(self, key: SessionKey) -> Hashable:
        """The name the committer writes the session's log under."""

    def read_log(self, key: SessionKey) -> list[dict[str, Any]]:
        """The session's good log records, in order (a torn tail is cut off where the store can tear)."""

    def make_folder(self, key: SessionKey) -> None:
        """Prepare the place of a session's first files (a no-op where there are no folders)."""

    def logged_keys(self) -> list[SessionKey]:
        """Sessions with a log this server recovers lazily after a restart (none for a shared store:
        there a session is recovered when a call asks for it)."""

    def scan(self, skip: Collection[SessionKey] = ()
             ) -> tuple[list[tuple[SessionKey, dict[str, Any]]], dict[SessionKey, str]]:
        """Metadata of every snapshot this server loads at start, and why each unreadable one is."""


class LogCommitter(Protocol):
    """The background writer of every session's log records (see write_ahead_log.GroupCommitter)."""

    def append(self, path: Hashable, record: dict[str, Any], done: Done | None = None) -> None:
        """Queue one record; `done` is told once it is durable (None) or failed (its error)."""

    def rewrite(self, path: Hashable, keep: Callable[[dict[str, Any]], bool]) -> None:
        """Keep only the records `keep` selects (a log's newer records, after a snapshot)."""

    def delete(self, path: Hashable) -> None:
        """Remove the log, after the records queued before."""

    def stop(self) -> None:
        """Write everything queued, then end the background writer."""


def rewrite_session_meta(store: StateStore, session: Session) -> int:
    """Rewrite a persisted session's snapshot with its current session state (e.g. pending input added
    while it was not resident); returns its size in bytes."""
    tensors, meta = store.load(session.key)
    meta["session"] = session.meta()  # as session_store.snapshot_meta
    size = store.save(session.key, tensors, meta)
    session.input_unsaved = False
    return size
