"""Sessions outlive streams: resume from a new connection, from disk after idle eviction, and after a
SIGTERM restart of `sinkstream serve`, continuing exactly as an uninterrupted in-process run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from conftest import REPO_ROOT
from service_support import reference_chat, start_server, stories

from sinkstream.clients.client import SinkStreamClient
from sinkstream.clients.results import GenerateParams, SessionSettings, SinkStreamError, TierSpec
from sinkstream.core.config import StreamConfig
from sinkstream.core.sampling import SamplingParams
from sinkstream.core.snapshot import load_snapshot, save_snapshot
from sinkstream.service.tenants import DEFAULT_TENANT, SessionKey

CONFIG = StreamConfig(sink_tokens=4, window=40, chunk=8)  # small window: the chat runs through evictions
SETTINGS = SessionSettings(sink_tokens=4, window=40, chunk=8)
TIERED = SessionSettings(sink_tokens=4, window=40, chunk=8, tiers=(TierSpec(8, 4),))
TURNS = ["Once upon a time", " The dog said hello.", " Then the sun came out and"]
PARAMS = GenerateParams(temperature=0.8, top_k=20, max_new_tokens=24)  # session RNG: no per-request seed
CORE_PARAMS = SamplingParams(temperature=0.8, top_k=20, max_new_tokens=24)
SEED = 99


def wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


@pytest.fixture(scope="module")
def reference(model_dir):
    return reference_chat(stories(model_dir), CONFIG, [(t, CORE_PARAMS) for t in TURNS], seed=SEED)


def test_resume_from_new_connection_continues_chat_exactly(model_dir, reference):
    server = start_server(model_dir)
    try:
        replies, session_id = [], None
        for i, turn in enumerate(TURNS):
            with SinkStreamClient(server.address, timeout=60) as client:  # a new connection each turn
                session = (client.open_session(SETTINGS, seed=SEED) if i == 0
                           else client.resume_session(session_id))
                with session:
                    session_id = session.id
                    session.append_text(turn)
                    result = session.generate(PARAMS)
                    replies.append(([t.token_id for t in result.tokens], result.text, result.stop_reason))
        assert replies == reference
    finally:
        server.stop()


def test_idle_evicted_session_resumes_from_disk_exactly(model_dir, reference, tmp_path):
    server = start_server(model_dir, state_dir=tmp_path, idle_evict_s=0.2)
    try:
        with SinkStreamClient(server.address, timeout=60) as client:
            replies = []
            with client.open_session(SETTINGS, seed=SEED) as session:
                session_id = session.id
                for turn in TURNS:
                    # Idle between turns, with the stream still attached: evicted, then restored on demand.
                    wait_for(lambda: client.get_session(session_id).state == "PERSISTED")
                    session.send_text(turn)  # held-back text and pending ids are part of the snapshot
                    wait_for(lambda: client.get_session(session_id).state == "PERSISTED")
                    result = session.generate(PARAMS)
                    replies.append(([t.token_id for t in result.tokens], result.text, result.stop_reason))
            assert (tmp_path / f"{session_id}.safetensors").is_file()
            assert replies == reference
            assert server.server.metrics.restores._value.get() >= 3
    finally:
        server.stop()


def test_sigterm_persists_sessions_and_restart_resumes(model_dir, reference, tmp_path):
    def serve() -> tuple[subprocess.Popen, str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sinkstream", "serve", "--model", str(model_dir), "--port", "0",
             "--state-dir", str(tmp_path), "--grace", "1", "--plain-logs"],
            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = proc.stdout.readline()
        assert "listening on" in line, line
        return proc, line.split("listening on ")[1].split()[0]

    proc, address = serve()
    try:
        with SinkStreamClient(address, timeout=60) as client, \
                client.open_session(SETTINGS, seed=SEED) as session:
            session_id = session.id
            session.append_text(TURNS[0])
            first = session.generate(PARAMS)
            session.send_text(TURNS[1])  # still held by the tokenizer when the server stops
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    assert (tmp_path / f"{session_id}.safetensors").is_file()

    proc, address = serve()
    try:
        with SinkStreamClient(address, timeout=60) as client:
            assert client.get_session(session_id).state == "PERSISTED"
            with client.resume_session(session_id) as session:
                second = session.generate(PARAMS)
        assert [t.token_id for t in first.tokens] == reference[0][0]
        assert [t.token_id for t in second.tokens] == reference[1][0]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_ttl_expires_detached_sessions_and_corrupt_snapshots_are_data_loss(model_dir, tmp_path):
    server = start_server(model_dir, state_dir=tmp_path, idle_evict_s=0.1, session_ttl_s=1.5)
    try:
        with SinkStreamClient(server.address, timeout=30) as client:
            with client.open_session(SETTINGS) as kept, client.open_session(SETTINGS) as corrupt:
                kept.append_text("Once upon a time")
                corrupt.append_text("Once upon a time")
            wait_for(lambda: client.get_session(corrupt.id).state == "PERSISTED")
            (tmp_path / f"{corrupt.id}.safetensors").write_bytes(b"not a snapshot")
            err = pytest.raises(SinkStreamError, client.resume_session, corrupt.id).value
            assert err.code == grpc.StatusCode.DATA_LOSS
            assert client.health() == "SERVING"
            # a readable snapshot missing a required entry: also DATA_LOSS, and the row it was being
            # restored into is free again
            with client.open_session(TIERED) as untiered:
                untiered.append_text("Once upon a time")
            wait_for(lambda: client.get_session(untiered.id).state == "PERSISTED")
            path = tmp_path / f"{untiered.id}.safetensors"
            tensors, meta = load_snapshot(path)
            del meta["tiers"]
            save_snapshot(path, tensors, meta)
            err = pytest.raises(SinkStreamError, client.resume_session, untiered.id).value
            assert err.code == grpc.StatusCode.DATA_LOSS
            engine = next(e for c, e in server.server.manager.pool.engines.items() if c.tiers)
            assert len(engine._free) == engine.max_rows
            # detached and unused for longer than the TTL: deleted, memory and disk
            wait_for(lambda: not any(s.session_id == kept.id for s in client.list_sessions()))
            assert pytest.raises(SinkStreamError, client.resume_session, kept.id).value.code == \
                grpc.StatusCode.NOT_FOUND
            assert not (tmp_path / f"{kept.id}.safetensors").exists()
    finally:
        server.stop()


def evict(server, session_id: str) -> None:
    """Persist and release a session now, as idle eviction would."""
    manager = server.server.manager

    async def run() -> None:
        async with manager.lock:
            await manager.residency.evict(manager.sessions[SessionKey(DEFAULT_TENANT, session_id)])
    server.call(run())


def test_session_failing_server_side_fails_alone(model_dir, tmp_path, monkeypatch):
    """A persistent failure restoring one session (here out of memory building its engine) ends that
    session's call with RESOURCE_EXHAUSTED; the scheduler keeps serving the others."""
    server = start_server(model_dir, state_dir=tmp_path, idle_evict_s=0)
    try:
        with SinkStreamClient(server.address, timeout=20) as client:
            failing = client.open_session(SessionSettings(window=50, chunk=8), timeout=20)
            failing.append_text("Once upon a time")
            evict(server, failing.id)
            pool = server.server.manager.pool
            shape = server.server.manager.sessions[SessionKey(DEFAULT_TENANT, failing.id)].config
            engine_for = pool.engine_for

            def no_memory_for_shape(config, in_use):
                if config == shape:
                    raise MemoryError("test: cannot allocate this cache")
                return engine_for(config, in_use)

            monkeypatch.setattr(pool, "engine_for", no_memory_for_shape)
            failing.send_tokens([403, 407], flush=True)
            with client.open_session(SETTINGS, timeout=20) as healthy:
                healthy.append_text("Once upon a time")
                result = healthy.generate(GenerateParams(max_new_tokens=5, ignore_eos=True))
                assert result.generated_tokens == 5
            err = pytest.raises(SinkStreamError, failing.flush).value
            assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "MemoryError" in err.message
            monkeypatch.undo()
            with client.resume_session(failing.id) as resumed:  # the session itself survives
                assert resumed.opened.tokens_seen == 5
                assert resumed.append_tokens([403])[-1].tokens_seen == 6
    finally:
        server.stop()


def test_out_of_memory_on_open_and_failed_restore_have_clear_codes(model_dir, tmp_path, monkeypatch):
    server = start_server(model_dir, state_dir=tmp_path, idle_evict_s=0)
    manager = server.server.manager
    try:
        with SinkStreamClient(server.address, timeout=20) as client:
            for oom in (MemoryError("test"), torch.OutOfMemoryError("test: CUDA out of memory")):
                def no_memory(config, in_use, oom=oom):
                    raise oom
                monkeypatch.setattr(manager.pool, "engine_for", no_memory)
                err = pytest.raises(SinkStreamError, client.open_session, SETTINGS).value
                assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                assert type(oom).__name__ in err.message
            monkeypatch.undo()
            with client.open_session(SETTINGS) as session:
                session.append_text("Once upon a time")
            evict(server, session.id)
            engine = next(iter(manager.pool.engines.values()))

            def broken_restore(*args):
                raise RuntimeError("test: restore failed")
            monkeypatch.setattr(engine, "restore", broken_restore)
            err = pytest.raises(SinkStreamError, client.resume_session, session.id).value
            assert err.code == grpc.StatusCode.INTERNAL  # not UNKNOWN; the snapshot is not to blame
            assert f"cannot restore session {session.id!r}" in err.message and "test: restore" in err.message
            assert len(engine._free) == engine.max_rows  # the row it was restored into is free again
            monkeypatch.undo()
            with client.resume_session(session.id) as resumed:
                assert resumed.opened.tokens_seen == 5
    finally:
        server.stop()


def test_shutdown_persists_after_the_forward_pass_in_flight(model_dir, tmp_path):
    """SIGTERM while a pass runs in its worker thread: sessions are persisted once it has finished, never
    half-updated."""
    server = start_server(model_dir, state_dir=tmp_path, idle_evict_s=0)
    scheduler = server.server.scheduler
    compute, started, release = scheduler._compute, threading.Event(), threading.Event()

    def slow_compute(*args):
        started.set()
        release.wait(10)
        return compute(*args)

    scheduler._compute = slow_compute
    try:
        with SinkStreamClient(server.address, timeout=20) as client:
            session = client.open_session(SETTINGS)
            session.send_tokens([1, 403, 407, 261, 378, 1, 403, 407])  # one whole chunk of 8
            assert started.wait(10)
            stopper = threading.Thread(target=server.stop)  # grace 0.5 s, then persist
            stopper.start()
            time.sleep(1.5)
            release.set()
            stopper.join(30)
    finally:
        release.set()
        server.stop()
    _, meta = load_snapshot(tmp_path / f"{session.id}.safetensors")
    assert (meta["tokens_seen"], meta["session"]["pending"]) == (8, [])
