"""The Redis session store against a real redis-server on loopback: snapshots and log records round trip,
keys are prefixed by tenant, leases are claimed, renewed, released and expire, and every write of a
replica whose generation is stale (another replica took the session over) is refused, changing nothing."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from redis_support import RedisServer

from sinkstream.core.snapshot import SnapshotError
from sinkstream.service.leases import OWNER_METADATA, Leases, SessionMoved
from sinkstream.service.redis_keys import SessionKeys
from sinkstream.service.redis_log import RedisLogCommitter
from sinkstream.service.redis_state import LogRef, RedisStateStore, connect
from sinkstream.service.tenants import SessionKey

TTL_S = 0.5
KEY = SessionKey("default", "s-1")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    redis_server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield redis_server
    redis_server.stop()


@pytest.fixture
def client(server):
    server.client.flushdb()
    return connect(server.url)


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"keys": torch.randn(2, 3, 4, generator=g), "count": torch.arange(7, dtype=torch.int64)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Committed:
    """A RedisLogCommitter with its reports collected (done results and fenced logs), in order."""

    def __init__(self, client) -> None:
        self.results: list[BaseException | None] = []
        self.fenced: list[LogRef] = []
        self.event = threading.Event()
        self.committer = RedisLogCommitter(client, self._notify, self.fenced.append)

    def _notify(self, results) -> None:
        for done, error in results:
            done(error)
        self.event.set()

    def append_all(self, ref: LogRef, records: list[dict]) -> list[BaseException | None]:
        errors: list[BaseException | None] = []
        done = threading.Event()

        def record_done(error):
            errors.append(error)
            if len(errors) == len(records):
                done.set()
        for record in records:
            self.committer.append(ref, record, record_done)
        assert done.wait(30)
        return errors


def test_snapshots_round_trip_keep_the_previous_one_and_are_deleted(client):
    leases = Leases(client, TTL_S, "10.0.0.1:50051")
    store = RedisStateStore(client, leases)
    assert leases.claim(KEY, new=True).status == "held"
    assert not store.has_snapshot(KEY) and not store.has_snapshot(KEY, previous=True)
    with pytest.raises(SnapshotError):
        store.load(KEY)
    size = store.save(KEY, tensors(1), {"session": {"id": KEY.id}, "n": 1})
    assert size == len(client.get(SessionKeys.of(KEY).snapshot))
    got, meta = store.load(KEY)
    assert same(got, tensors(1)) and meta == {"session": {"id": KEY.id}, "n": 1}
    store.save(KEY, tensors(2), {"n": 2}, keep_previous=True)
    assert same(store.load(KEY)[0], tensors(2)) and store.load(KEY)[1] == {"n": 2}
    assert same(store.load(KEY, previous=True)[0], tensors(1))
    store.promote_previous(KEY)
    assert store.load(KEY)[1]["n"] == 1 and not store.has_snapshot(KEY, previous=True)
    store.delete(KEY)
    assert not store.has_snapshot(KEY) and store.exists(KEY)  # the log and generation go with the log


def test_a_damaged_snapshot_value_is_a_snapshot_error(client):
    leases = Leases(client, TTL_S, "a:1")
    store = RedisStateStore(client, leases)
    leases.claim(KEY, new=True)
    store.save(KEY, tensors(1), {"n": 1})
    name = SessionKeys.of(KEY).snapshot
    data = bytearray(client.get(name))
    data[-3] ^= 0xFF
    client.set(name, bytes(data))
    with pytest.raises(SnapshotError, match="damaged"):
        store.load(KEY)
    client.set(name, b"\x05")
    with pytest.raises(SnapshotError):
        store.load(KEY)


def test_keys_are_prefixed_by_tenant_and_tenants_never_share_a_session(client):
    leases = Leases(client, TTL_S, "a:1")
    store = RedisStateStore(client, leases)
    acme, other = SessionKey("acme", "chat-1"), SessionKey("other", "chat-1")
    for i, key in enumerate((acme, other)):
        assert leases.claim(key, new=True).status == "held"
        store.save(key, tensors(i), {"tenant": key.tenant})
    committed = Committed(client)
    assert committed.append_all(store.log_path(acme), [{"lsn": 1, "k": "open"}]) == [None]
    assert sorted(k.decode() for k in client.keys("*")) == [
        "sinkstream:acme:{chat-1}:gen", "sinkstream:acme:{chat-1}:lease", "sinkstream:acme:{chat-1}:log",
        "sinkstream:acme:{chat-1}:snap", "sinkstream:other:{chat-1}:gen", "sinkstream:other:{chat-1}:lease",
        "sinkstream:other:{chat-1}:snap"]
    assert store.load(acme)[1] == {"tenant": "acme"} and store.load(other)[1] == {"tenant": "other"}
    assert store.read_log(acme) == [{"lsn": 1, "k": "open"}] and store.read_log(other) == []
    committed.committer.stop()


def test_log_records_are_acknowledged_only_once_redis_holds_them_and_in_order(client):
    leases = Leases(client, TTL_S, "a:1")
    store = RedisStateStore(client, leases)
    keys = [SessionKey("default", f"s{i}") for i in range(20)]
    seen_at_ack: list[bool] = []
    done = threading.Event()
    committed = Committed(client)
    for key in keys:
        leases.claim(key, new=True)
    for lsn in range(1, 6):
        for key in keys:
            name = SessionKeys.of(key).log

            def ack(error, name=name, lsn=lsn):
                assert error is None
                # the record is in Redis when its ack is given
                seen_at_ack.append(json.loads(client.lindex(name, -1))["lsn"] >= lsn)
                if len(seen_at_ack) == 5 * len(keys):
                    done.set()
            committed.committer.append(store.log_path(key), {"lsn": lsn, "k": "ran", "n": lsn}, ack)
    assert done.wait(30)
    assert all(seen_at_ack)
    for key in keys:
        assert [r["lsn"] for r in store.read_log(key)] == [1, 2, 3, 4, 5]
    assert committed.committer.rounds <= 5 * len(keys)
    # a snapshot at lsn 3 covers records 1..3: the log keeps the rest
    committed.committer.rewrite(store.log_path(keys[0]), lambda r: r["lsn"] > 3)
    committed.committer.stop()
    assert [r["lsn"] for r in store.read_log(keys[0])] == [4, 5]
    assert [r["lsn"] for r in store.read_log(keys[1])] == [1, 2, 3, 4, 5]


def wait_lease_gone(client, key: SessionKey) -> None:
    deadline = time.monotonic() + 30
    while client.exists(SessionKeys.of(key).lease):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_leases_are_claimed_refused_renewed_released_and_expire(client):
    a, b = Leases(client, TTL_S, "10.0.0.1:1"), Leases(client, TTL_S, "10.0.0.2:1")
    assert b.claim(KEY, new=False).status == "missing"
    first = a.claim(KEY, new=True)
    assert (first.status, first.generation) == ("held", 1) and a.generation(KEY) == 1
    assert b.claim(KEY, new=True).status == "exists"
    refused = b.claim(KEY, new=False)
    assert (refused.status, refused.owner) == ("elsewhere", "10.0.0.1:1") and b.generation(KEY) is None
    lease = json.loads(client.get(SessionKeys.of(KEY).lease))
    assert lease["owner"] == "10.0.0.1:1" and lease["gen"] == 1
    # renewed for longer than its TTL: still held
    for _ in range(4):
        time.sleep(TTL_S / 3)
        assert a.renew([KEY]) == []
    assert b.claim(KEY, new=False).status == "elsewhere"
    # released: another replica takes it over at once, under a new generation
    a.release(KEY)
    taken = b.claim(KEY, new=False)
    assert (taken.status, taken.owner, taken.generation) == ("held", "10.0.0.2:1", 2)
    assert a.renew([KEY]) == [KEY]  # lost
    assert a.claim(KEY, new=False).status == "elsewhere"
    # not renewed: it expires and the first replica takes it back (generation 3)
    wait_lease_gone(client, KEY)
    back = a.claim(KEY, new=False)
    assert (back.status, back.generation) == ("held", 3)
    # released and claimed again by the same process with nobody in between: the generation stays
    a.release(KEY)
    assert a.claim(KEY, new=False).generation == 3
    # a new process at the same address (a restart after kill -9) takes over without waiting the TTL
    restarted = Leases(client, 60, "10.0.0.1:1")
    assert restarted.claim(KEY, new=False).generation == 4
    assert a.renew([KEY]) == [KEY]


def test_a_stale_generation_can_write_nothing(client):
    """Replica A held the session under generation 1; B took it over (generation 2). Every write A still
    makes (snapshot, log append, log trim, promotion, deletion) is refused and changes nothing."""
    a, b = Leases(client, TTL_S, "10.0.0.1:1"), Leases(client, TTL_S, "10.0.0.2:1")
    store_a, store_b = RedisStateStore(client, a), RedisStateStore(client, b)
    committed_a, committed_b = Committed(client), Committed(client)
    a.claim(KEY, new=True)
    store_a.save(KEY, tensors(1), {"by": "a"})
    ref_a = store_a.log_path(KEY)
    assert committed_a.append_all(ref_a, [{"lsn": 1, "k": "open"}]) == [None]
    a.release(KEY)
    assert b.claim(KEY, new=False).generation == 2
    store_b.save(KEY, tensors(2), {"by": "b"}, keep_previous=True)
    assert committed_b.append_all(store_b.log_path(KEY), [{"lsn": 2, "k": "ran", "n": 1}]) == [None]

    def state():
        names = SessionKeys.of(KEY)
        return [client.get(names.snapshot), client.get(names.previous), client.lrange(names.log, 0, -1),
                client.get(names.generation), client.get(names.lease)]
    before = state()
    for write in (lambda: store_a.save(KEY, tensors(3), {"by": "a"}), lambda: store_a.promote_previous(KEY),
                  lambda: store_a.delete(KEY)):
        with pytest.raises(SessionMoved) as refused:
            write()
        assert refused.value.code.name == "UNAVAILABLE"
    errors = committed_a.append_all(ref_a, [{"lsn": 2, "k": "ran", "n": 5}, {"lsn": 3, "k": "flushed"}])
    assert all(isinstance(e, SessionMoved) for e in errors) and len(errors) == 2
    assert committed_a.fenced == [LogRef(KEY, 1)]
    committed_a.committer.rewrite(ref_a, lambda r: r["lsn"] > 1)
    committed_a.committer.delete(ref_a)
    committed_a.committer.stop()
    assert state() == before
    assert store_b.load(KEY)[1] == {"by": "b"} and [r["lsn"] for r in store_b.read_log(KEY)] == [1, 2]
    committed_b.committer.stop()


def test_a_replica_without_the_lease_writes_nothing(client):
    leases = Leases(client, TTL_S, "a:1")
    with pytest.raises(SessionMoved):
        RedisStateStore(client, leases).save(KEY, tensors(1), {})
    assert client.keys("*") == []


def test_session_moved_names_the_owner_in_trailing_metadata():
    error = SessionMoved(KEY, "10.0.0.2:50051", "it holds the session's lease")
    assert error.trailers == ((OWNER_METADATA, "10.0.0.2:50051"),)
    assert "10.0.0.2:50051" in error.message and error.code.name == "UNAVAILABLE"


def test_a_url_that_is_not_redis_is_refused():
    with pytest.raises(ValueError, match="redis://"):
        connect("http://127.0.0.1:1/0")
    with pytest.raises(OSError, match="cannot reach"):
        connect("redis://127.0.0.1:1/0")
