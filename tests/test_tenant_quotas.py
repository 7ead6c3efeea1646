"""Per-tenant quotas and fairness: a tenant over its session or row quota is refused with
RESOURCE_EXHAUSTED while another tenant keeps opening sessions; the scheduler's choice of pieces for a
pass with a token budget serves tenants in turns (an exact invariant over counted passes); a stream whose
client never reads is ended and its session kept."""

from __future__ import annotations

import time

import grpc
import pytest
from service_support import start_server, stories

from sinkstream.clients.client import SinkStreamClient
from sinkstream.clients.results import SessionSettings, SinkStreamError
from sinkstream.core.config import StreamConfig
from sinkstream.service.engine_pool import EnginePool
from sinkstream.service.metrics import ServerMetrics
from sinkstream.service.options import AnalysisOptions
from sinkstream.service.quotas import TenantQuotas
from sinkstream.service.scheduler import Piece, Scheduler
from sinkstream.service.session import Session
from sinkstream.service.session_manager import SessionManager
from sinkstream.service.tenants import SessionKey
from sinkstream.v1 import sinkstream_pb2 as pb

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"
SETTINGS = SessionSettings(sink_tokens=4, window=40, chunk=8)
CHUNK = 8


@pytest.fixture()
def tokens_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"{ALICE} alice\n{BOB} bob\n")
    return path


def refused(call) -> str:
    with pytest.raises(SinkStreamError) as err:
        call()
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    return str(err.value)


def test_session_quota_refuses_one_tenant_only(model_dir, tokens_file):
    srv = start_server(model_dir, auth_tokens=tokens_file, quotas=TenantQuotas(max_sessions=2))
    try:
        with SinkStreamClient(srv.address, timeout=30, token=ALICE) as alice, \
                SinkStreamClient(srv.address, timeout=30, token=BOB) as bob:
            for i in range(2):
                with alice.open_session(SETTINGS, session_id=f"a{i}") as s:
                    s.append_text("Once upon a time")
            assert "maximum of 2 sessions" in refused(lambda: alice.open_session(SETTINGS))
            for i in range(2):  # the other tenant is not affected
                with bob.open_session(SETTINGS, session_id=f"b{i}") as s:
                    s.append_text("Once upon a time")
            refused(lambda: bob.open_session(SETTINGS))
            alice.delete_session("a0")
            with alice.open_session(SETTINGS, session_id="a2") as s:  # room again
                s.append_text("Once upon a time")
            assert sorted(s.session_id for s in alice.list_sessions()) == ["a1", "a2"]
            assert sorted(s.session_id for s in bob.list_sessions()) == ["b0", "b1"]
    finally:
        srv.stop()


def test_row_quota_without_state_dir_refuses_one_tenant_only(model_dir, tokens_file):
    srv = start_server(model_dir, auth_tokens=tokens_file, quotas=TenantQuotas(max_rows=2))
    try:
        with SinkStreamClient(srv.address, timeout=30, token=ALICE) as alice, \
                SinkStreamClient(srv.address, timeout=30, token=BOB) as bob:
            held = [alice.open_session(SETTINGS) for _ in range(2)]  # two streams that hold their rows
            assert "resident sessions are all busy" in refused(lambda: alice.open_session(SETTINGS))
            others = [bob.open_session(SETTINGS) for _ in range(2)]
            for s in held + others:
                s.close()
    finally:
        srv.stop()


def test_row_quota_with_state_dir_evicts_the_tenants_own_idle_session(model_dir, tokens_file, tmp_path):
    srv = start_server(model_dir, auth_tokens=tokens_file, quotas=TenantQuotas(max_rows=2),
                       state_dir=tmp_path / "state", idle_evict_s=0)
    try:
        with SinkStreamClient(srv.address, timeout=30, token=ALICE) as alice, \
                SinkStreamClient(srv.address, timeout=30, token=BOB) as bob:
            for sid in ("b0", "b1"):
                with bob.open_session(SETTINGS, session_id=sid) as s:
                    s.append_text("Bob's text")
            for sid in ("a0", "a1", "a2"):
                with alice.open_session(SETTINGS, session_id=sid) as s:
                    s.append_text("Alice's text")
            states = {s.session_id: s.state for s in alice.list_sessions() + bob.list_sessions()}
            assert states == {"a0": "PERSISTED", "a1": "RESIDENT", "a2": "RESIDENT",
                              "b0": "RESIDENT", "b1": "RESIDENT"}
            with alice.resume_session("a0") as s:  # back in a row: a1, the least recently used, leaves
                s.append_text(" more")
            states = {s.session_id: s.state for s in alice.list_sessions()}
            assert states == {"a0": "RESIDENT", "a1": "PERSISTED", "a2": "RESIDENT"}
    finally:
        srv.stop()


def test_fair_share_serves_the_small_tenant_in_every_pass(model_dir):
    """Tenant a has 8 busy sessions, tenant b one; a pass holds 3 chunks. Counted over 40 passes: b's
    session is in every pass, and a's sessions take turns, each exactly once in every 4 passes. With all
    nine sessions in one tenant, b's session would be in only one pass of three."""
    loaded = stories(model_dir)
    metrics = ServerMetrics()
    manager = SessionManager(EnginePool(loaded.model, loaded.tokenizer, 4, 1, metrics), None, metrics,
                             max_sessions=64, session_ttl_s=0, idle_evict_s=0)

    def piece(tenant: str, sid: str) -> Piece:
        return Piece(Session(SessionKey(tenant, sid), StreamConfig(chunk=CHUNK), AnalysisOptions(), None),
                     ids=[1] * CHUNK)

    def passes(pieces: list[Piece], n: int) -> list[list[str]]:
        scheduler = Scheduler(manager, metrics, max_batch_tokens=3 * CHUNK)
        return [[p.session.key.id for p in scheduler.budget(pieces)] for _ in range(n)]

    a_sessions = [f"a{i}" for i in range(8)]
    chosen = passes([piece("a", sid) for sid in a_sessions] + [piece("b", "b0")], 40)
    assert all(len(ids) == 3 and "b0" in ids for ids in chosen)
    for start in range(0, 40, 4):
        served = [sid for ids in chosen[start:start + 4] for sid in ids if sid != "b0"]
        assert sorted(served) == a_sessions  # each once in these 4 passes
    one_tenant = passes([piece("a", sid) for sid in a_sessions] + [piece("a", "b0")], 9)
    assert sum("b0" in ids for ids in one_tenant) == 3  # fairness between sessions only

    generating = Piece(Session(SessionKey("c", "c0"), StreamConfig(chunk=CHUNK), AnalysisOptions(), None))
    with_decode = passes([piece("a", sid) for sid in a_sessions] + [piece("b", "b0"), generating], 8)
    assert all("c0" in ids and "b0" in ids and len(ids) == 4 for ids in with_decode)  # decodes always go


def test_a_stream_that_never_reads_is_ended_and_its_session_kept(model_dir):
    srv = start_server(model_dir, stalled_reader_s=0.5)
    try:
        with SinkStreamClient(srv.address, timeout=60) as client:
            text = "Once upon a time there was a dog."

            def requests():
                yield pb.StreamRequest(request_id="open", open=pb.OpenSession(
                    session_id="never-reads", settings=pb.SessionSettings(chunk=CHUNK)))
                yield pb.StreamRequest(request_id="t", append_text=pb.AppendText(text=text, flush=True))
                for i in range(20_000):  # each answered with an error reply nobody reads
                    yield pb.StreamRequest(request_id=f"{i:0250d}",
                                           generate=pb.Generate(max_new_tokens=10**6))

            call = client.stub.Stream(requests(), timeout=60)
            try:
                assert next(call).session_opened.session_id == "never-reads"
                deadline = time.monotonic() + 60
                while client.get_session("never-reads").attached and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert not client.get_session("never-reads").attached
            finally:
                call.cancel()
            expected = len(client.tokenize(text, add_bos=True))
            assert client.get_session("never-reads").tokens_seen == expected
            with client.resume_session("never-reads") as session:  # the session is kept and usable
                assert session.close().tokens_seen == expected
        assert srv.server.metrics.registry.get_sample_value("sinkstream_stalled_streams_total") == 1
    finally:
        srv.stop()
