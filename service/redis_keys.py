"""The Redis keys of a session, prefixed by its tenant: `sinkstream:<tenant>:{<session id>}:<part>`.

Tenant names and session ids hold only [A-Za-z0-9._-] (tenants.py, session.py), so no key of one session
can be read as another's. The braces are a Redis Cluster hash tag: every key of a session lies in one slot,
so one Lua script may touch them all.
"""

from __future__ import annotations

from dataclasses import dataclass

from sinkstream.service.tenants import SessionKey

PREFIX = "sinkstream"


@dataclass(frozen=True)
class SessionKeys:
    """Every key of one session in Redis."""

    generation: str  # the fencing generation (INCR on each takeover; exists while the session does)
    lease: str  # owner address, owner instance and generation as JSON, with a TTL
    log: str  # the write-ahead log: a list of JSON records
    snapshot: str  # the newest snapshot: safetensors bytes (metadata JSON and checksum in its header)
    previous: str  # the snapshot before it

    @classmethod
    def of(cls, key: SessionKey, prefix: str = PREFIX) -> SessionKeys:
        base = f"{prefix}:{key.tenant}:{{{key.id}}}"
        return cls(f"{base}:gen", f"{base}:lease", f"{base}:log", f"{base}:snap", f"{base}:prev")


def as_text(value: bytes | str) -> str:
    """A Redis reply (bytes) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
