"""Shutdown saves each session on its own: a failed save is reported and the others are still saved; the
exit code of `sinkstream serve` says whether all were; open streams are told which requests were not
processed."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading

import grpc
import pytest
from service_support import start_server

from sinkstream.clients.client import SinkStreamClient
from sinkstream.service.tenants import DEFAULT_TENANT, SessionKey
from sinkstream.service.work import AppendWork
from sinkstream.v1 import sinkstream_pb2 as pb

IDS = ["keep-1", "fails", "keep-2"]


def detached_sessions(address: str, ids: list[str]) -> None:
    with SinkStreamClient(address, timeout=30) as client:
        for session_id in ids:
            with client.open_session(session_id=session_id) as session:
                session.append_text("Once upon a time")


def test_a_failed_save_does_not_stop_the_others(model_dir, tmp_path, monkeypatch):
    server = start_server(model_dir, state_dir=tmp_path, idle_evict_s=0)
    detached_sessions(server.address, IDS)
    store = server.server.manager.store
    real_save = store.save

    def save(key: SessionKey, tensors: dict, meta: dict, keep_previous: bool = False) -> int:
        if key.id == "fails":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(key, tensors, meta, keep_previous)

    monkeypatch.setattr(store, "save", save)
    report = server.stop()
    assert sorted(report.saved) == ["keep-1", "keep-2"]
    assert list(report.failed) == ["fails"] and "No space left on device" in report.failed["fails"]
    assert not report.all_saved
    snapshots = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors")
    assert snapshots == ["keep-1.safetensors", "keep-2.safetensors"]
    assert (tmp_path / "fails.wal").is_file()  # its acknowledged input is in its write-ahead log
    # the saved ones come back, and the one whose save failed is rebuilt from its log
    again = start_server(model_dir, state_dir=tmp_path)
    try:
        with SinkStreamClient(again.address, timeout=30) as client:
            assert sorted(s.session_id for s in client.list_sessions()) == sorted(IDS)
            assert client.get_session("keep-2").tokens_seen == 5
            assert client.get_session("fails").tokens_seen == 5
    finally:
        assert again.stop().all_saved


def serve(model_dir, state_dir) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "sinkstream", "serve", "--model", str(model_dir),
                             "--port", "0", "--state-dir", str(state_dir), "--grace", "0.5", "--plain-logs"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("sinkstream: listening on "), line + proc.stderr.read()
    return proc, line.split()[3]


def test_serve_exit_code_says_whether_every_session_was_saved(model_dir, tmp_path):
    proc, address = serve(model_dir, tmp_path)
    detached_sessions(address, ["fine"])
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, out + err
    # now one save cannot be written: its temporary file's name is taken by a directory
    proc, address = serve(model_dir, tmp_path)
    (tmp_path / "blocked.safetensors.tmp").mkdir()
    detached_sessions(address, ["blocked", "other"])  # "fine" is back from the state directory
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, out + err
    assert [line for line in out.splitlines() if "blocked" in line] == [
        line for line in out.splitlines() if line.startswith("sinkstream serve: error: session blocked was "
                                                             "not persisted: ")]
    assert "Traceback" not in err
    assert {"fine.safetensors", "other.safetensors"} <= set(os.listdir(tmp_path))


def test_shutdown_answers_each_unprocessed_append_and_keeps_its_input(model_dir, tmp_path):
    server = start_server(model_dir, state_dir=tmp_path, idle_evict_s=0)
    release = threading.Event()
    ids = [403, 407, 261, 378] * 50_000  # more than the input budget: still being worked on at shutdown

    def outgoing():
        yield pb.StreamRequest(open=pb.OpenSession(session_id="busy", settings=pb.SessionSettings(chunk=16)))
        yield pb.StreamRequest(request_id="a1", append_tokens=pb.AppendTokens(ids=ids[:100]))
        yield pb.StreamRequest(request_id="a2", append_tokens=pb.AppendTokens(ids=ids, flush=True))
        yield pb.StreamRequest(request_id="g", generate=pb.Generate(max_new_tokens=3))
        release.wait()

    with SinkStreamClient(server.address, timeout=60) as client:
        call = client.stub.Stream(outgoing(), timeout=60)
        responses = [next(call)]
        while not any(r.request_id == "a2" for r in responses):
            responses.append(next(call))
        report = server.stop(grace=0.2)
        with pytest.raises(grpc.RpcError) as ended:
            responses.extend(call)
        release.set()
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    errors = {r.request_id: r.error for r in responses if r.WhichOneof("kind") == "error"}
    assert [r.request_id for r in responses if r.WhichOneof("kind") == "error"] == ["a2"]  # a1 was processed
    assert errors["a2"].code == pb.ERROR_CODE_UNAVAILABLE and errors["a2"].unprocessed_tokens > 0
    assert not any(r.request_id == "g" for r in responses)  # never read (a2 waited for budget): no answer
    processed = sum(r.chunk.num_tokens for r in responses if r.WhichOneof("kind") == "chunk")
    assert report.saved == ["busy"]
    again = start_server(model_dir, state_dir=tmp_path)
    try:
        with SinkStreamClient(again.address, timeout=60) as client:
            info = client.get_session("busy")
            # every admitted token is either processed (and reported) or kept, reported as unprocessed
            assert info.tokens_seen == processed
            assert info.pending_tokens == errors["a2"].unprocessed_tokens
    finally:
        again.stop()


def test_input_kept_for_a_persisted_session_is_saved_at_shutdown(model_dir, tmp_path):
    # A call ends while its session waits for a row (persisted): its queued appends join the pending
    # input, and shutdown writes them into the session's snapshot.
    server = start_server(model_dir, state_dir=tmp_path, idle_evict_s=0)
    detached_sessions(server.address, ["waiting"])
    manager = server.server.manager
    session = manager.get(SessionKey(DEFAULT_TENANT, "waiting"))

    async def evict_then_queue_then_detach() -> None:
        async with manager.lock:
            await manager.residency.evict(session)
        outbox = manager.attach(session)
        await session.queue(AppendWork("late", [403] * 10, False))
        manager.detach(session, outbox)

    server.call(evict_then_queue_then_detach())
    assert not session.resident and len(session.pending) == 10
    assert server.stop().saved == ["waiting"]
    again = start_server(model_dir, state_dir=tmp_path)
    try:
        with SinkStreamClient(again.address, timeout=30) as client:
            info = client.get_session("waiting")
            assert (info.tokens_seen, info.pending_tokens) == (5, 10)
    finally:
        again.stop()
