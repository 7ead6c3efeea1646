"""The state directory: persisted sessions as core snapshots (safetensors + JSON, no pickle), the session
state read back from their metadata, and where each session's write-ahead log and previous snapshot live.

Files of session `<id>` (every name derives from `path`): `<id>.safetensors` (the newest snapshot),
`<id>.safetensors.prev` (the one before, kept for a logged session so a damaged newest one can fall back
to it) and `<id>.wal` (its write-ahead log, see write_ahead_log.py). No file of one id ends like another's.
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
from sinkstream.service.text_input import TextInput

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
    """The state directory: one `<session id>.safetensors` per persisted session (no pickle)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        prepare_state_dir(root)

    def path(self, session_id: str) -> Path:
        """The snapshot file of a session (ValueError for an id that is not a valid session id: paths are
        never built from unchecked ids)."""
        if not is_valid_session_id(session_id):
            raise ValueError(f"not a valid session id: {shown_id(session_id)}")
        return self.root / f"{session_id}.safetensors"

    def previous_path(self, session_id: str) -> Path:
        """The previous snapshot of a logged session."""
        path = self.path(session_id)
        return path.with_name(path.name + ".prev")

    def log_path(self, session_id: str) -> Path:
        """The write-ahead log of a session."""
        path = self.path(session_id)
        return path.with_name(path.name.removesuffix(SNAPSHOT_SUFFIX) + LOG_SUFFIX)

    def save(self, session_id: str, tensors: dict, meta: dict, keep_previous: bool = False) -> int:
        """Write one session's snapshot durably (fsync'd, renamed in, directory fsync'd); returns its size
        in bytes. `keep_previous`: the snapshot it replaces becomes the previous one."""
        path = self.path(session_id)
        save_snapshot(path, tensors, meta, keep_previous=self.previous_path(session_id) if keep_previous
                      else None)
        return path.stat().st_size

    def load(self, session_id: str, previous: bool = False) -> tuple[dict, dict]:
        """A session's newest snapshot (or its previous one); SnapshotError if it is damaged or missing."""
        path = self.previous_path(session_id) if previous else self.path(session_id)
        try:
            return load_snapshot(path)
        except (SnapshotError, MemoryError):  # out of memory says nothing about the file
            raise
        except Exception as exc:  # e.g. safetensors' own error for a damaged header
            raise SnapshotError(f"cannot read snapshot of {session_id}: {exc}") from exc

    def update_session_meta(self, session: Session) -> int:
        """Rewrite a persisted session's snapshot with its current session state (e.g. pending input
        added while it was not resident); returns its size in bytes."""
        tensors, meta = self.load(session.id)
        size = self.save(session.id, tensors, snapshot_meta(session, meta))
        session.input_unsaved = False
        return size

    def delete(self, session_id: str) -> None:
        """Remove a session's snapshots (its log is removed through the log committer, in order)."""
        self.path(session_id).unlink(missing_ok=True)
        self.previous_path(session_id).unlink(missing_ok=True)

    def promote_previous(self, session_id: str) -> None:
        """The newest snapshot is damaged: the previous one takes its place (the damaged one is gone)."""
        os.replace(self.previous_path(session_id), self.path(session_id))

    def logged_ids(self) -> list[str]:
        """Ids of the sessions with a write-ahead log (a directory listing: nothing is read)."""
        ids = (p.name.removesuffix(LOG_SUFFIX) for p in self.root.glob(f"*{LOG_SUFFIX}"))
        return sorted(i for i in ids if is_valid_session_id(i))

    def scan(self, skip: Collection[str] = ()) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """Metadata of every readable snapshot, and why each unreadable one is (by session id, from its
        file name): a damaged file must not stop the server from starting, nor make its session vanish.
        Sessions in `skip` (logged ones, recovered lazily) are not read."""
        metas, damaged = [], {}
        for path in sorted(self.root.glob("*.safetensors")):
            if path.stem in skip:
                continue
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = json.loads((f.metadata() or {})["sinkstream"])
                session_id = meta["session"]["id"]
            except Exception as exc:
                log.warning("unreadable snapshot", extra={"path": str(path), "error": str(exc)})
                if is_valid_session_id(path.stem):
                    damaged[path.stem] = f"cannot read snapshot {path.name}: {type(exc).__name__}: {exc}"
                continue
            if session_id != path.stem or not is_valid_session_id(session_id):
                log.warning("skipping snapshot of another file name", extra={"path": str(path)})
                continue
            metas.append(meta)
        return metas, damaged


def snapshot_meta(session: Session, meta: dict[str, Any]) -> dict[str, Any]:
    """The engine snapshot's metadata with the session's own state added."""
    meta["session"] = session.meta()
    return meta


def config_from_meta(meta: dict[str, Any]) -> StreamConfig:
    config = dict(meta["config"])
    config["tiers"] = tuple(TierSpec(**t) for t in config["tiers"])
    return StreamConfig(**config)


def session_from_meta(meta: dict[str, Any], tokenizer) -> Session:
    """The persisted session a snapshot's metadata describes (KeyError, TypeError, ValueError if it
    holds no valid session state)."""
    info = meta["session"]
    text = TextInput(tokenizer, info["text"]) if tokenizer is not None else None
    scored = int(meta["scored"])
    session = Session.persisted(
        info["id"], config_from_meta(meta), AnalysisOptions(**info["analysis"]), text,
        created=info["created"], last_used=info["last_used"], pending=list(info["pending"]),
        saved_stats={"tokens_seen": int(meta["tokens_seen"]), "scored": scored,
                     "mean_nll": float(meta["nll_sum"]) / max(scored, 1)})
    if info.get("chat") is not None:  # snapshots from before chat sessions have no "chat"
        session.chat = ChatInput(tokenizer, info["chat"])
    return session
