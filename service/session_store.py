"""The state directory: persisted sessions as core snapshots (safetensors + JSON, no pickle), the session
state read back from their metadata, and where each session's write-ahead log and previous snapshot live.

Files of session `<id>` (every name derives from `path`, so all sit in its tenant's folder):
`<id>.safetensors` (the newest snapshot), `<id>.safetensors.prev` (the one before, kept for a logged
session so a damaged newest one can fall back to it) and `<id>.wal` (its write-ahead log, see
write_ahead_log.py). No file of one id ends like another's.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from safetensors import safe_open

from sinkstream.core.config import StreamConfig, TierSpec
from sinkstream.core.snapshot import SnapshotError, load_snapshot, save_snapshot
from sinkstream.service.chat_input import ChatInput
from sinkstream.service.errors import shown_id
from sinkstream.service.options import AnalysisOptions
from sinkstream.service.session import Session, is_valid_session_id
from sinkstream.service.state_backend import rewrite_session_meta
from sinkstream.service.tenants import DEFAULT_TENANT, SessionKey, is_valid_tenant
from sinkstream.service.text_input import TextInput
from sinkstream.service.write_ahead_log import recover_log, sync_dir

log = logging.getLogger("sinkstream.sessions")
SNAPSHOT_SUFFIX = ".safetensors"
LOG_SUFFIX = ".wal"


def prepare_state_dir(root: Path) -> None:
    """Create the state directory if needed and check that files can be written in it (OSError with a
    one-line message if not)."""
    probe = root / f".sinkstream-write-check-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OSError(exc.errno, f"state directory {str(root)!r} is not writable: "
                                 f"{exc.strerror or exc}") from exc


class SessionStore:
    """The state directory, a StateStore (state_backend.py) for one server: one `<session id>.safetensors`
    per persisted session (no pickle), the default tenant's in the directory itself (the layout of servers
    without tenants), every other tenant's in `tenants/<tenant>/`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.shared = False
        prepare_state_dir(root)

    def path(self, key: SessionKey) -> Path:
        """The snapshot file of a session: the one place a session's files are named (files kept beside
        it derive their names from this path). ValueError for a tenant or id that is not valid: paths are
        never built from unchecked names."""
        if not is_valid_session_id(key.id):
            raise ValueError(f"not a valid session id: {shown_id(key.id)}")
        if not is_valid_tenant(key.tenant):
            raise ValueError(f"not a valid tenant: {shown_id(key.tenant)}")
        folder = self.root if key.tenant == DEFAULT_TENANT else self.root / TENANTS_DIR / key.tenant
        return folder / f"{key.id}.safetensors"

    def previous_path(self, key: SessionKey) -> Path:
        """The previous snapshot of a logged session (beside its snapshot)."""
        path = self.path(key)
        return path.with_name(path.name + ".prev")

    def log_path(self, key: SessionKey) -> Path:
        """The write-ahead log of a session (beside its snapshot)."""
        path = self.path(key)
        return path.with_name(path.name.removesuffix(SNAPSHOT_SUFFIX) + LOG_SUFFIX)

    def make_folder(self, key: SessionKey) -> None:
        """Create the folder of a session's files if it is new (a tenant's first session), durably: a
        file made in it must not vanish in a crash with the folder's own directory entry."""
        folder = self.path(key).parent
        missing = [p for p in (folder, *folder.parents) if p != self.root and self.root in p.parents
                   and not p.is_dir()]
        if not missing:
            return
        folder.mkdir(parents=True, exist_ok=True)
        for created in missing:  # the deepest first: then each parent holding a new entry
            sync_dir(created.parent)

    def save(self, key: SessionKey, tensors: dict, meta: dict, keep_previous: bool = False) -> int:
        """Write one session's snapshot durably (fsync'd, renamed in, directory fsync'd); returns its size
        in bytes. `keep_previous`: the snapshot it replaces becomes the previous one."""
        path = self.path(key)
        self.make_folder(key)
        save_snapshot(path, tensors, meta, keep_previous=self.previous_path(key) if keep_previous else None)
        return path.stat().st_size

    def load(self, key: SessionKey, previous: bool = False) -> tuple[dict, dict]:
        """A session's newest snapshot (or its previous one); SnapshotError if it is damaged or missing."""
        path = self.previous_path(key) if previous else self.path(key)
        try:
            return load_snapshot(path)
        except (SnapshotError, MemoryError):  # out of memory says nothing about the file
            raise
        except Exception as exc:  # e.g. safetensors' own error for a damaged header
            raise SnapshotError(f"cannot read snapshot of {key.id}: {exc}") from exc

    def update_session_meta(self, session: Session) -> int:
        """Rewrite a persisted session's snapshot with its current session state (e.g. pending input
        added while it was not resident); returns its size in bytes."""
        return rewrite_session_meta(self, session)

    def has_snapshot(self, key: SessionKey, previous: bool = False) -> bool:
        """Whether the newest (or previous) snapshot file exists, readable or not."""
        return (self.previous_path(key) if previous else self.path(key)).exists()

    def read_log(self, key: SessionKey) -> list[dict[str, Any]]:
        """The session's good log records; a torn or corrupt tail is cut off the file (logged)."""
        return recover_log(self.log_path(key)).records

    def delete(self, key: SessionKey) -> None:
        """Remove a session's snapshots (its log is removed through the log committer, in order)."""
        self.path(key).unlink(missing_ok=True)
        self.previous_path(key).unlink(missing_ok=True)

    def promote_previous(self, key: SessionKey) -> None:
        """The newest snapshot is damaged: the previous one takes its place (the damaged one is gone)."""
        os.replace(self.previous_path(key), self.path(key))

    def _folders(self) -> list[tuple[str, Path]]:
        """(tenant, folder) of every tenant with files: the default tenant's is the directory itself."""
        folders = [(DEFAULT_TENANT, self.root)]
        tenants_root = self.root / TENANTS_DIR
        if tenants_root.is_dir():
            folders += [(p.name, p) for p in sorted(tenants_root.iterdir())
                        if p.is_dir() and is_valid_tenant(p.name) and p.name != DEFAULT_TENANT]
        return folders

    def logged_keys(self) -> list[SessionKey]:
        """Keys of the sessions with a write-ahead log, every tenant's (directory listings: nothing is
        read)."""
        keys = [SessionKey(tenant, p.name.removesuffix(LOG_SUFFIX))
                for tenant, folder in self._folders() for p in folder.glob(f"*{LOG_SUFFIX}")]
        return sorted(k for k in keys if is_valid_session_id(k.id))

    def scan(self, skip: Collection[SessionKey] = ()
             ) -> tuple[list[tuple[SessionKey, dict[str, Any]]], dict[SessionKey, str]]:
        """Key and metadata of every readable snapshot, and why each unreadable one is (by key, from its
        file's place): a damaged file must not stop the server from starting, nor make its session
        vanish. Sessions in `skip` (logged ones, recovered lazily) are not read."""
        metas: list[tuple[SessionKey, dict[str, Any]]] = []
        damaged: dict[SessionKey, str] = {}
        for tenant, folder in self._folders():
            for path in sorted(folder.glob(f"*{SNAPSHOT_SUFFIX}")):
                key = SessionKey(tenant, path.stem)
                if key in skip:
                    continue
                try:
                    with safe_open(str(path), framework="pt") as f:
                        meta = json.loads((f.metadata() or {})["sinkstream"])
                    session_id = meta["session"]["id"]
                except Exception as exc:
                    log.warning("unreadable snapshot", extra={"path": str(path), "error": str(exc)})
                    if is_valid_session_id(path.stem):
                        damaged[key] = f"cannot read snapshot {path.name}: {type(exc).__name__}: {exc}"
                    continue
                if session_id != path.stem or not is_valid_session_id(session_id):
                    log.warning("skipping snapshot of another file name", extra={"path": str(path)})
                    continue
                metas.append((key, meta))
        return metas, damaged


TENANTS_DIR = "tenants"


def snapshot_meta(session: Session, meta: dict[str, Any]) -> dict[str, Any]:
    """The engine snapshot's metadata with the session's own state added."""
    meta["session"] = session.meta()
    return meta


def config_from_meta(meta: dict[str, Any]) -> StreamConfig:
    config = dict(meta["config"])
    config["tiers"] = tuple(TierSpec(**t) for t in config["tiers"])
    return StreamConfig(**config)


def session_from_meta(key: SessionKey, meta: dict[str, Any], tokenizer) -> Session:
    """The persisted session `key` whose snapshot's metadata is `meta` (KeyError, TypeError, ValueError if
    it holds no valid session state)."""
    info = meta["session"]
    text = TextInput(tokenizer, info["text"]) if tokenizer is not None else None
    scored = int(meta["scored"])
    session = Session.persisted(
        key, config_from_meta(meta), AnalysisOptions(**info["analysis"]), text,
        created=info["created"], last_used=info["last_used"], pending=list(info["pending"]),
        saved_stats={"tokens_seen": int(meta["tokens_seen"]), "scored": scored,
                     "mean_nll": float(meta["nll_sum"]) / max(scored, 1)})
    if info.get("chat") is not None:  # snapshots from before chat sessions have no "chat"
        session.chat = ChatInput(tokenizer, info["chat"])
    return session
