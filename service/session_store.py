"""The state directory: persisted sessions as core snapshots (safetensors + JSON, no pickle), and the
session state read back from their metadata."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from safetensors import safe_open

from sinkstream.core.config import StreamConfig, TierSpec
from sinkstream.core.snapshot import SnapshotError, load_snapshot, save_snapshot
from sinkstream.service.chat_input import ChatInput
from sinkstream.service.errors import shown_id
from sinkstream.service.options import AnalysisOptions
from sinkstream.service.session import Session, is_valid_session_id
from sinkstream.service.tenants import DEFAULT_TENANT, SessionKey, is_valid_tenant
from sinkstream.service.text_input import TextInput

log = logging.getLogger("sinkstream.sessions")


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
    """The state directory: one `<session id>.safetensors` per persisted session (no pickle), the default
    tenant's in the directory itself (the layout of servers without tenants), every other tenant's in
    `tenants/<tenant>/`."""

    def __init__(self, root: Path) -> None:
        self.root = root
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

    def save(self, key: SessionKey, tensors: dict, meta: dict) -> int:
        """Write one session's snapshot; returns its size in bytes."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_snapshot(path, tensors, meta)
        return path.stat().st_size

    def load(self, key: SessionKey) -> tuple[dict, dict]:
        try:
            return load_snapshot(self.path(key))
        except (SnapshotError, MemoryError):  # out of memory says nothing about the file
            raise
        except Exception as exc:  # e.g. safetensors' own error for a damaged header
            raise SnapshotError(f"cannot read snapshot of {key.id}: {exc}") from exc

    def update_session_meta(self, session: Session) -> int:
        """Rewrite a persisted session's snapshot with its current session state (e.g. pending input
        added while it was not resident); returns its size in bytes."""
        tensors, meta = self.load(session.key)
        size = self.save(session.key, tensors, snapshot_meta(session, meta))
        session.input_unsaved = False
        return size

    def delete(self, key: SessionKey) -> None:
        self.path(key).unlink(missing_ok=True)

    def scan(self) -> tuple[list[tuple[SessionKey, dict[str, Any]]], dict[SessionKey, str]]:
        """Key and metadata of every readable snapshot, and why each unreadable one is (by key, from its
        file's place): a damaged file must not stop the server from starting, nor make its session
        vanish."""
        metas: list[tuple[SessionKey, dict[str, Any]]] = []
        damaged: dict[SessionKey, str] = {}
        folders = [(DEFAULT_TENANT, self.root)]
        tenants_root = self.root / TENANTS_DIR
        if tenants_root.is_dir():
            folders += [(p.name, p) for p in sorted(tenants_root.iterdir())
                        if p.is_dir() and is_valid_tenant(p.name) and p.name != DEFAULT_TENANT]
        for tenant, folder in folders:
            for path in sorted(folder.glob("*.safetensors")):
                key = SessionKey(tenant, path.stem)
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
