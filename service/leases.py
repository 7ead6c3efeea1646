"""Ownership of sessions between replicas sharing a Redis store: leases with a fencing generation.

A replica serves a session only while it holds the session's lease: a Redis key with a TTL holding the
owner's address, the owning process (a random instance id) and the session's fencing generation. Taking
a session over increments the generation (INCR on a key without TTL, which exists as long as the session
does); every write to the session's state (redis_state.py) is a Lua script that first checks the
generation, so a replica that lost the session (paused past its TTL, cut off) can never write over the new
owner's state: its writes are refused and it drops the session.

Claiming a lease (one script, atomic):
- held by another live process: refused, with that owner's address (the caller redirects the client);
- free (expired or released), or left by a dead process that had this very address (a restart): taken; the
  generation stays if it is the one this process last held (nobody else wrote since), else it grows.

Calls block on Redis: the event loop runs them with asyncio.to_thread.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import grpc
import redis

from sinkstream.service.errors import RequestError, shown_id
from sinkstream.service.redis_keys import SessionKeys, as_text
from sinkstream.service.tenants import SessionKey

OWNER_METADATA = "x-session-owner"  # trailing metadata naming the replica that holds a session

CLAIM = """
local gen = redis.call('GET', KEYS[1])
if ARGV[4] == 'open' and gen then return {'exists', '', 0} end
if ARGV[4] == 'take' and not gen then return {'missing', '', 0} end
local current = redis.call('GET', KEYS[2])
if current then
  local lease = cjson.decode(current)
  if lease.instance ~= ARGV[2] and lease.owner ~= ARGV[1] then
    return {'elsewhere', lease.owner, tonumber(lease.gen)}
  end
end
local g
if gen and gen == ARGV[5] then g = tonumber(gen) else g = redis.call('INCR', KEYS[1]) end
redis.call('SET', KEYS[2], cjson.encode({owner=ARGV[1], instance=ARGV[2], gen=g}), 'PX', ARGV[3])
return {'held', ARGV[1], g}
"""

RENEW = """
local current = redis.call('GET', KEYS[2])
if current then
  local lease = cjson.decode(current)
  if lease.instance == ARGV[2] and tonumber(lease.gen) == tonumber(ARGV[4]) then
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
    return 1
  end
  return 0
end
if redis.call('GET', KEYS[1]) == ARGV[4] then
  redis.call('SET', KEYS[2], cjson.encode({owner=ARGV[1], instance=ARGV[2], gen=tonumber(ARGV[4])}),
             'PX', ARGV[3])
  return 1
end
return 0
"""

RELEASE = """
local current = redis.call('GET', KEYS[1])
if current and cjson.decode(current).instance == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
"""

ABANDON = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1], KEYS[2]) return 1 end
return 0
"""


class SessionMoved(RequestError):
    """Another replica holds the session (or took it over from this one): UNAVAILABLE naming the owner in
    the message and in the trailing metadata `x-session-owner` (empty when not known)."""

    def __init__(self, key: SessionKey, owner: str, why: str) -> None:
        where = f"replica {owner}" if owner else "another replica"
        super().__init__(grpc.StatusCode.UNAVAILABLE,
                         f"session {shown_id(key.id)} is served by {where} ({why}); resume it there",
                         "session_id", trailers=((OWNER_METADATA, owner),) if owner else ())
        self.owner = owner


@dataclass(frozen=True)
class Claim:
    """What claiming a session's lease found: "held" (this process holds it now, under `generation`),
    "elsewhere" (`owner` holds it), "exists" (an open found the session) or "missing" (no such session)."""

    status: str
    owner: str
    generation: int


class Leases:
    """This process's leases: claims, renewals and releases, and the generation each session is held
    under (kept after a release, so a session kept in memory can tell whether another replica wrote it
    since)."""

    def __init__(self, client: redis.Redis, ttl_s: float, owner: str = "") -> None:
        self.client, self.ttl_ms = client, max(1, int(ttl_s * 1000))
        self.owner = owner  # the advertised address, set once the server listens (see advertise)
        self.instance = secrets.token_hex(8)  # this process: a restart at the same address is another one
        self.generations: dict[SessionKey, int] = {}
        self._claim = client.register_script(CLAIM)
        self._renew = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)
        self._abandon = client.register_script(ABANDON)

    def advertise(self, address: str) -> None:
        """The address other replicas send clients to for the sessions this one holds."""
        self.owner = address

    def generation(self, key: SessionKey) -> int | None:
        """The generation this process holds (or last held) the session under; None if it never did."""
        return self.generations.get(key)

    def claim(self, key: SessionKey, new: bool) -> Claim:
        """Take the session's lease: `new` for an open (refused as "exists" if the session is stored),
        else a takeover of a stored session (refused as "missing" if there is none)."""
        keys = SessionKeys.of(key)
        expected = self.generations.get(key, 0)
        status, owner, generation = self._claim(
            keys=[keys.generation, keys.lease],
            args=[self.owner, self.instance, self.ttl_ms, "open" if new else "take", str(expected)])
        claim = Claim(as_text(status), as_text(owner), int(generation))
        if claim.status == "held":
            self.generations[key] = claim.generation
        return claim

    def renew(self, keys: list[SessionKey]) -> list[SessionKey]:
        """Extend the leases of `keys` (one round trip); returns those this process no longer holds."""
        held = [k for k in keys if k in self.generations]
        if not held:
            return []
        pipe = self.client.pipeline(transaction=False)
        for key in held:
            names = SessionKeys.of(key)
            self._renew(keys=[names.generation, names.lease],
                        args=[self.owner, self.instance, self.ttl_ms, self.generations[key]], client=pipe)
        return [key for key, kept in zip(held, pipe.execute(), strict=True) if not kept]

    def release(self, key: SessionKey) -> None:
        """Give the lease up (the session's call ended): another replica may take it over at once. The
        generation is remembered: if nobody does, this process continues with its state in memory."""
        self._release(keys=[SessionKeys.of(key).lease], args=[self.instance])

    def abandon(self, key: SessionKey) -> None:
        """An open that failed after claiming: the session was never stored, remove its keys."""
        generation = self.generations.pop(key, None)
        if generation is not None:
            names = SessionKeys.of(key)
            self._abandon(keys=[names.generation, names.lease], args=[generation])

    def forget(self, key: SessionKey) -> None:
        """The session is no longer this process's (dropped, moved or deleted)."""
        self.generations.pop(key, None)

