"""Durable sessions (issue 14): numbered requests are acknowledged once in the write-ahead log, duplicates
are answered without being processed twice, gaps are refused, and after kill -9 a restarted server
recovers every acknowledged request: the resumed session equals an uninterrupted run bit for bit."""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import asdict
from pathlib import Path

import grpc
import pytest
import torch
from durable_support import (
    Outcome,
    RawStream,
    ServeProcess,
    acked,
    drive,
    killed_run,
    mismatches,
    open_request,
    resume_request,
    scripted_requests,
    session_state,
    uninterrupted,
)
from service_support import start_server

from sinkstream.clients.client import SinkStreamClient
from sinkstream.core.config import StreamConfig
from sinkstream.service.backpressure import INPUT_SLICE, input_budget
from sinkstream.service.options import AnalysisOptions
from sinkstream.service.session import Session
from sinkstream.service.session_journal import SessionJournal, rng_to_text
from sinkstream.service.tenants import DEFAULT_TENANT, SessionKey
from sinkstream.service.write_ahead_log import GroupCommitter, read_log
from sinkstream.v1 import sinkstream_pb2 as pb
from sinkstream.v1 import sinkstream_pb2_grpc as pb_grpc

SEED, CHUNK = 7, 16


def kinds(responses: list[pb.StreamResponse]) -> list[str]:
    return [r.WhichOneof("kind") for r in responses]


def append(seq: int, text: str, flush: bool = False, rid: str = "") -> pb.StreamRequest:
    return pb.StreamRequest(seq=seq, request_id=rid or f"r{seq}",
                            append_text=pb.AppendText(text=text, flush=flush))


def until_flushed_and_acked(stream: RawStream, seq: int) -> list[pb.StreamResponse]:
    """Responses until both a `flushed` and the ack of `seq` came (an ack may come before or after the
    input it acknowledges was processed)."""
    got: list[pb.StreamResponse] = []
    while not ("flushed" in kinds(got) and any(r.HasField("ack") and r.ack.seq == seq for r in got)):
        got.append(stream.next())
    return got


def info(channel: grpc.Channel, session_id: str) -> pb.SessionInfo:
    return pb_grpc.SinkStreamStub(channel).GetSession(pb.GetSessionRequest(session_id=session_id))


@pytest.fixture(scope="module")
def story(sotu_path) -> str:
    return sotu_path.read_text(encoding="utf-8")[:3000]


@pytest.fixture(scope="module")
def script(story):
    return scripted_requests(story, 200)


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory, script):
    """The scripted session run without interruption on a real server process."""
    return uninterrupted(model_dir, tmp_path_factory.mktemp("reference"), script, SEED, CHUNK)


# ---------------------------------------------------------------------------------------------- acks
def test_acks_duplicates_and_gaps(model_dir, tmp_path):
    server = start_server(model_dir, state_dir=tmp_path)
    channel = grpc.insecure_channel(server.address)
    try:
        stream = RawStream(channel, open_request("acks", chunk=CHUNK))
        assert stream.next().session_opened.acked_seq == 0
        stream.send(append(1, "Once upon a time there was a little girl named Lily."))
        stream.send(append(2, " She loved to play outside in the park", flush=True))
        got = until_flushed_and_acked(stream, 2)
        assert [r.ack.seq for r in got if r.HasField("ack")] == [1, 2]
        before = info(channel, "acks")
        assert before.acked_seq == 2 and before.tokens_seen > 0

        # a duplicate is acknowledged again and not processed
        stream.send(append(2, " She loved to play outside in the park", flush=True, rid="again"))
        (again,) = stream.until(acked(2))
        assert again.request_id == "again"
        after = info(channel, "acks")
        assert (after.tokens_seen, after.pending_tokens, after.mean_nll) == (
            before.tokens_seen, before.pending_tokens, before.mean_nll)

        # a gap is refused and changes nothing; the expected number is named
        stream.send(append(5, " and more", flush=True, rid="gap"))
        (gap,) = stream.until(lambda r: True)
        assert gap.request_id == "gap" and gap.error.code == pb.ERROR_CODE_OUT_OF_RANGE
        assert gap.error.field == "seq" and "expected seq 3" in gap.error.message
        still = info(channel, "acks")
        assert (still.tokens_seen, still.pending_tokens, still.acked_seq) == (
            before.tokens_seen, before.pending_tokens, 2)

        # the expected number goes through; an unsequenced request is never acknowledged
        stream.send(append(3, " One day", flush=True))
        got = until_flushed_and_acked(stream, 3)
        assert [r.ack.seq for r in got if r.HasField("ack")] == [3]
        stream.send(pb.StreamRequest(request_id="u", append_text=pb.AppendText(text=" she saw", flush=True)))
        got = stream.until(lambda r: r.WhichOneof("kind") == "flushed")
        assert "ack" not in kinds(got)

        # a generate is acknowledged after its completion; repeated, it is answered from index 0
        stream.send(pb.StreamRequest(seq=4, request_id="g", generate=pb.Generate(max_new_tokens=6)))
        first = stream.until(acked(4))
        assert kinds(first) == ["token"] * 6 + ["generation_complete", "ack"]
        seen = info(channel, "acks").tokens_seen
        stream.send(pb.StreamRequest(seq=4, request_id="g2", generate=pb.Generate(max_new_tokens=6)))
        second = stream.until(acked(4))
        assert [(r.token.token_id, r.token.index) for r in second[:6]] == [
            (r.token.token_id, r.token.index) for r in first[:6]]
        assert {r.request_id for r in second} == {"g2"}
        assert second[6].generation_complete.text == first[6].generation_complete.text
        assert info(channel, "acks").tokens_seen == seen  # not generated twice
        stream.close()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["acks.wal"]
    finally:
        channel.close()
        server.stop()


def test_without_durability_acks_mean_applied_and_nothing_is_logged(model_dir, tmp_path):
    server = start_server(model_dir, state_dir=tmp_path, durability=False)
    channel = grpc.insecure_channel(server.address)
    try:
        stream = RawStream(channel, open_request("plain", chunk=CHUNK))
        stream.next()
        stream.send(append(1, "Once upon a time", flush=True))
        until_flushed_and_acked(stream, 1)
        stream.close()
        assert list(tmp_path.iterdir()) == []
    finally:
        channel.close()
        server.stop()


# ---------------------------------------------------------------------------------------------- kill -9
@pytest.mark.parametrize("trial", range(2))  # more: scripts/kill9_trials.py
def test_kill9_then_resume_equals_an_uninterrupted_run(model_dir, tmp_path, script, reference, trial):
    want, want_state = reference
    kill_at = random.Random(1000 + trial).randrange(5, want.responses - 5)
    got, state, run = killed_run(model_dir, tmp_path, script, SEED, CHUNK, kill_at)
    assert run["killed"] == 1
    assert state == want_state  # tokens_seen, mean NLL (exact) and acked_seq
    assert mismatches(got, want) == []


# ---------------------------------------------------------------------------------------------- damage
def acked_session(model_dir, state_dir, requests, checkpoints=()) -> None:
    """Send `requests` on session "d" (checkpointing after the seqs in `checkpoints`), wait for every
    ack, then kill the server with SIGKILL."""
    server = ServeProcess(model_dir, state_dir)
    try:
        stream = RawStream(server.channel, open_request("d", chunk=CHUNK, seed=SEED))
        stream.next()
        for request in requests:
            stream.send(request)
            stream.until(acked(request.seq))
            if request.seq in checkpoints:
                stream.send(pb.StreamRequest(checkpoint=pb.Checkpoint()))
                stream.until(lambda r: r.WhichOneof("kind") == "checkpointed")
    finally:
        server.kill9()


def resumed_state(model_dir, state_dir, requests) -> tuple[int, tuple[int, float, int], Outcome]:
    """Restart, resume "d", send every request after its acked_seq; (acked_seq at resume, final state,
    what came back)."""
    server = ServeProcess(model_dir, state_dir)
    try:
        stream = RawStream(server.channel, resume_request("d"))
        opened = stream.next().session_opened
        outcome = Outcome()
        assert drive(stream, requests, opened.acked_seq, outcome)
        stream.close()
        return opened.acked_seq, session_state(server.channel, "d"), outcome
    finally:
        server.stop()


@pytest.fixture(scope="module")
def damage_script(story):
    requests = [append(seq, story[i:i + 150], flush=seq % 2 == 0)
                for seq, i in enumerate(range(0, 1200, 150), 1)]
    requests.append(pb.StreamRequest(seq=len(requests) + 1, request_id=f"r{len(requests) + 1}",
                                     generate=pb.Generate(max_new_tokens=20)))
    return requests


@pytest.fixture(scope="module")
def damage_reference(model_dir, tmp_path_factory, damage_script):
    state_dir = tmp_path_factory.mktemp("damage-ref")
    acked_session(model_dir, state_dir, damage_script)
    # not killed before the end: the whole run, recovered, is the reference (no request is re-sent)
    acked_seq, state, _ = resumed_state(model_dir, state_dir, damage_script)
    assert acked_seq == len(damage_script)
    return state


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_corrupted_log_tail_is_cut_and_the_rest_recovers(model_dir, tmp_path, damage_script,
                                                          damage_reference, damage):
    last_append = damage_script[-2].seq
    acked_session(model_dir, tmp_path, damage_script[:last_append])
    path = tmp_path / "d.wal"
    contents = read_log(path)
    (where,) = [i for i, r in enumerate(contents.records) if r["k"] == "in" and r["seq"] == last_append]
    start = contents.offsets[where]
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:start + 12]  # in the middle of the record
    else:
        data[start + 20] ^= 0x40  # a byte of its payload
    path.write_bytes(bytes(data))
    acked_seq, state, _ = resumed_state(model_dir, tmp_path, damage_script)
    assert acked_seq == last_append - 1  # every request before the damaged record survived
    assert state == damage_reference
    after = read_log(path)  # cut at the damaged record, then continued with good records
    assert after.damage is None and path.read_bytes()[:start] == bytes(data[:start])
    assert after.records[:where] == contents.records[:where]


def test_a_damaged_newest_snapshot_falls_back_to_the_previous_one(model_dir, tmp_path, damage_script,
                                                                  damage_reference):
    acked_session(model_dir, tmp_path, damage_script[:-1], checkpoints=(3, 6))
    newest, previous = tmp_path / "d.safetensors", tmp_path / "d.safetensors.prev"
    assert newest.is_file() and previous.is_file()
    first_lsn = read_log(tmp_path / "d.wal").records[0]["lsn"]
    assert first_lsn > 1  # the log was cut behind the previous snapshot
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    acked_seq, state, _ = resumed_state(model_dir, tmp_path, damage_script)
    assert acked_seq == len(damage_script) - 1
    assert state == damage_reference


# ---------------------------------------------------------------------------------------------- startup
def opening_log(path: Path, config: StreamConfig) -> None:
    """A valid write-ahead log of a fresh session that holds only its opening record, written through the
    log's own API (SessionJournal.opened on a GroupCommitter), as the server starts one."""
    committer = GroupCommitter(lambda results: None, sync=False)
    try:
        session = Session(SessionKey(DEFAULT_TENANT, path.stem), config, AnalysisOptions(), None)
        SessionJournal(committer, path).opened(asdict(config), asdict(session.analysis), session.created,
                                               session.meta(), rng_to_text(torch.Generator()))
    finally:
        committer.stop()


def test_many_logged_sessions_start_without_recovering_any(model_dir, tmp_path):
    config = StreamConfig(sink_tokens=4, window=64, chunk=CHUNK)
    opening_log(tmp_path / "copy.wal", config)
    template = (tmp_path / "copy.wal").read_bytes()
    for i in range(10_000):
        (tmp_path / f"s{i:05d}.wal").write_bytes(template)
    server = ServeProcess(model_dir, tmp_path, "--max-sessions", "20000")
    try:
        stub = pb_grpc.SinkStreamStub(server.channel)
        assert stub.ModelInfo(pb.ModelInfoRequest()).vocab_size > 0
        listed = stub.ListSessions(pb.ListSessionsRequest()).sessions
        assert len(listed) == 10_001
        assert not any(s.HasField("settings") for s in listed)  # none recovered yet
        recovered = stub.GetSession(pb.GetSessionRequest(session_id="copy"))
        assert recovered.state == pb.SESSION_STATE_RESIDENT and recovered.tokens_seen == 0
        assert (recovered.settings.window, recovered.settings.chunk) == (config.window, config.chunk)
        listed = stub.ListSessions(pb.ListSessionsRequest()).sessions
        assert [s.session_id for s in listed if s.HasField("settings")] == ["copy"]
    finally:
        server.stop()


def test_a_numbered_generation_whose_call_ended_continues_when_repeated(model_dir, tmp_path):
    server = start_server(model_dir, state_dir=tmp_path)
    channel = grpc.insecure_channel(server.address)
    generate = pb.Generate(max_new_tokens=300, ignore_eos=True)
    try:
        results = {}
        for session_id in ("whole", "cut"):
            stream = RawStream(channel, open_request(session_id, chunk=CHUNK))
            stream.next()
            stream.send(append(1, "Once upon a time there was a little girl named Lily.", flush=True))
            stream.send(pb.StreamRequest(seq=2, request_id="g", generate=generate))
            if session_id == "cut":  # the call ends (e.g. a proxy's backend died) a few tokens in
                stream.until(lambda r: r.WhichOneof("kind") == "token" and r.token.index == 3)
                stream.cancel()
                stream = RawStream(channel, resume_request(session_id))
                assert stream.next().session_opened.acked_seq == 1
                stream.send(pb.StreamRequest(seq=2, request_id="g-again", generate=generate))
            got = stream.until(acked(2))
            results[session_id] = ([(r.token.index, r.token.token_id, r.token.logprob) for r in got
                                    if r.HasField("token")],
                                   [r.generation_complete for r in got if r.HasField("generation_complete")])
            stream.close()
        tokens, (complete,) = results["cut"]
        assert complete.stop_reason == pb.STOP_REASON_MAX_TOKENS and complete.generated_tokens == 300
        assert tokens == results["whole"][0]  # from index 0, continued exactly where it stopped
        assert complete.text == results["whole"][1][0].text
        assert info(channel, "cut").tokens_seen == info(channel, "whole").tokens_seen
    finally:
        channel.close()
        server.stop()


def test_a_numbered_append_applied_in_part_is_completed_not_repeated(model_dir, tmp_path):
    """An append bigger than the input budget is admitted slice by slice; if its call ends mid-request
    and the client sends it again, only the slices not applied yet are applied."""
    server = start_server(model_dir, state_dir=tmp_path)
    channel = grpc.insecure_channel(server.address)
    # over the session's input budget by half a slice: the last slice waits for room, so a call cut
    # after 640 tokens has applied only part of the request
    ids = [random.Random(3).randrange(3, 512) for _ in range(input_budget(64) + INPUT_SLICE // 2)]
    request = pb.StreamRequest(seq=1, append_tokens=pb.AppendTokens(ids=ids, flush=True))
    try:
        for session_id in ("whole", "cut"):
            stream = RawStream(channel, open_request(session_id, chunk=64, window=252))
            stream.next()
            stream.send(request)
            if session_id == "cut":
                stream.until(lambda r: r.HasField("chunk") and r.chunk.tokens_seen >= 640)
                stream.cancel()
                stream = RawStream(channel, resume_request(session_id))
                assert stream.next().session_opened.acked_seq == 0  # not all of it was applied
                assert 0 < info(channel, session_id).pending_tokens + info(channel, session_id).tokens_seen \
                    < len(ids)
                stream.send(request)
            stream.until(lambda r: r.HasField("flushed"))
            stream.close()
        whole, cut = info(channel, "whole"), info(channel, "cut")
        assert (cut.tokens_seen, cut.mean_nll, cut.acked_seq) == (whole.tokens_seen, whole.mean_nll, 1)
        assert cut.tokens_seen == len(ids)
    finally:
        channel.close()
        server.stop()


# ---------------------------------------------------------------------------------------------- tenants
def test_a_tenants_logged_session_recovers_under_its_tenant_only(model_dir, tmp_path, damage_script):
    """Tenant bob's numbered session, acknowledged, survives kill -9 in tenants/bob/ and is recovered for
    bob exactly as it was; tenant alice cannot see, resume or delete it, and may use the same id."""
    alice, bob = "alice-token-0123456789", "bob-token-0123456789ab"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{alice} alice\n{bob} bob\n")
    as_alice, as_bob = (("authorization", f"Bearer {alice}"),), (("authorization", f"Bearer {bob}"),)
    state_dir = tmp_path / "state"
    requests = damage_script[:2]  # the second one flushed: nothing pending once it is processed
    server = ServeProcess(model_dir, state_dir, "--auth-tokens", str(tokens))
    try:
        stream = RawStream(server.channel, open_request("n", chunk=CHUNK, seed=SEED), metadata=as_bob)
        stream.next()
        for request in requests:
            stream.send(request)
        until_flushed_and_acked(stream, len(requests))
        stub = pb_grpc.SinkStreamStub(server.channel)
        before = stub.GetSession(pb.GetSessionRequest(session_id="n"), metadata=as_bob)
    finally:
        server.kill9()
    logs = sorted(p.relative_to(state_dir).as_posix() for p in state_dir.rglob("*.wal"))
    assert logs == ["tenants/bob/n.wal"]

    server = ServeProcess(model_dir, state_dir, "--auth-tokens", str(tokens))
    try:
        stub = pb_grpc.SinkStreamStub(server.channel)
        assert list(stub.ListSessions(pb.ListSessionsRequest(), metadata=as_alice).sessions) == []
        for call in (lambda: stub.GetSession(pb.GetSessionRequest(session_id="n"), metadata=as_alice),
                     lambda: stub.DeleteSession(pb.DeleteSessionRequest(session_id="n"), metadata=as_alice),
                     lambda: RawStream(server.channel, resume_request("n"), metadata=as_alice).next()):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        (listed,) = stub.ListSessions(pb.ListSessionsRequest(), metadata=as_bob).sessions
        assert listed.session_id == "n" and not listed.HasField("settings")  # not recovered yet
        after = stub.GetSession(pb.GetSessionRequest(session_id="n"), metadata=as_bob)
        assert (after.tokens_seen, after.mean_nll, after.acked_seq) == (
            before.tokens_seen, before.mean_nll, len(requests))
        # ids are per tenant: alice opens her own "n"
        own = RawStream(server.channel, open_request("n", chunk=CHUNK), metadata=as_alice)
        assert own.next().session_opened.session_id == "n"
        own.close()
        stub.DeleteSession(pb.DeleteSessionRequest(session_id="n"), metadata=as_bob)
        assert stub.GetSession(pb.GetSessionRequest(session_id="n"), metadata=as_alice).session_id == "n"
    finally:
        server.stop()
    assert not list((state_dir / "tenants" / "bob").iterdir())  # the log goes with the committer's stop


# ---------------------------------------------------------------------------------- resume vs. acks in flight
def test_a_resume_acknowledges_what_the_ended_call_applied_before_a_new_caller_numbers_after_it(
        model_dir, tmp_path):
    """A call ends (Flushed read, `with` left) while its append's log record is still in the committer's
    round; a new caller resumes at once and numbers after SessionOpened.acked_seq. Reported before the
    record was durable, acked_seq was 0: the new append got seq 1, was taken for a duplicate of the
    applied one and never processed, and its caller waited for Flushed for ever. The log is held back with
    a FIFO in another session's log path: the committer thread blocks opening it until the test reads it."""
    server = start_server(model_dir, state_dir=tmp_path)
    blocker_log = tmp_path / "blocker.wal"
    os.mkfifo(blocker_log)
    channel = grpc.insecure_channel(server.address)
    released: list[bytes] = []
    try:
        blocker = RawStream(channel, open_request("blocker", chunk=CHUNK))
        blocker.next()
        blocker.send(append(1, "Once", flush=True))
        blocker.until(lambda r: r.HasField("flushed"))  # applied; its log record holds the committer
        with SinkStreamClient(server.address) as client:
            with client.open_session(session_id="late-ack") as session:
                first = session.append_text("Once upon a time")[-1].tokens_seen
            assert info(channel, "late-ack").acked_seq == 0  # still in the held-back round

            def release() -> None:  # the resume below is sent before the log is let go
                time.sleep(0.5)
                released.append(read_fifo_once(blocker_log))

            releaser = threading.Thread(target=release, daemon=True)
            releaser.start()
            with client.resume_session("late-ack", timeout=60) as session:  # bounded: must be answered
                assert session.opened.acked_seq == 1
                assert session.opened.tokens_seen == first
                after = session.append_text(" there was a cat.")[-1].tokens_seen
            assert after > first
            releaser.join(60)
        assert released and released[0]  # the blocker's records went through the FIFO
        deadline = time.monotonic() + 60  # the last ack comes with the committer's round after the release
        while info(channel, "late-ack").acked_seq != 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert info(channel, "late-ack").acked_seq == 2
        blocker.cancel()
    finally:
        if not released:
            threading.Thread(target=read_fifo_once, args=(blocker_log,), daemon=True).start()
        channel.close()
        server.stop()


def read_fifo_once(path: Path) -> bytes:
    """Open a FIFO for reading (a writer blocked opening it goes on) and take what one read gives."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 1 << 20)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------ results in flight at a crash
IN_FLIGHT = [append(1, "Once upon a time there was a little girl named Lily. She liked to play"),
             append(2, " in the park with her big red ball every day.", flush=True),
             pb.StreamRequest(seq=3, request_id="r3",
                              generate=pb.Generate(max_new_tokens=12, ignore_eos=True)),
             append(4, " The next day the sun was hot and Lily went to the sea.", flush=True)]


def results(responses: list[pb.StreamResponse]) -> list[tuple]:
    """The chunk results, generated tokens and completions among `responses`, in order, as comparable
    values (a completion without its timings)."""
    out: list[tuple] = []
    for r in responses:
        kind = r.WhichOneof("kind")
        if kind == "chunk":
            c = r.chunk
            out.append((kind, r.request_id, c.tokens_seen, c.num_tokens, list(c.token_ids),
                        [x.hex() for x in c.logprobs]))  # bit for bit (the first token's is nan)
        elif kind == "token":
            out.append((kind, r.request_id, r.token.index, r.token.token_id, r.token.logprob.hex(),
                        r.token.text))
        elif kind == "generation_complete":
            g = r.generation_complete
            out.append((kind, r.request_id, g.stop_reason, g.generated_tokens, g.input_tokens, g.tokens_seen,
                        g.text))
    return out


def in_flight_open(session_id: str) -> pb.StreamRequest:
    request = open_request(session_id, chunk=CHUNK, seed=SEED)
    request.open.settings.analysis.token_ids = True
    return request


def test_results_in_flight_at_a_crash_are_sent_again_on_the_resume_that_recovers(model_dir, tmp_path):
    """A client sends numbered appends and a generate and reads nothing: every result is in flight (in the
    server's outbox or the transport) when the server is killed with SIGKILL after all of it was processed
    and acknowledged. The resume that recovers the session, asking for results after position 0, gets
    every chunk result, generated token and completion again, once each, in order, equal to what an
    uninterrupted run delivered; a second resume (nothing recovered any more) gets none of them."""
    reference = ServeProcess(model_dir, tmp_path / "reference")
    try:
        stream = RawStream(reference.channel, in_flight_open("s"))
        stream.next()
        for request in IN_FLIGHT:
            stream.send(request)
        seen: list[pb.StreamResponse] = []  # the last ack may come before or after the last results
        while not {("flushed", "r4"), ("ack", "r4")} <= {(r.WhichOneof("kind"), r.request_id) for r in seen}:
            seen.append(stream.next())
        want = results(seen)
        stream.close()
    finally:
        reference.stop()
    assert [r[0] for r in want].count("token") == 12 and want[-1][0] == "chunk"
    final = want[-1][2]

    state = tmp_path / "state"
    server = ServeProcess(model_dir, state)
    try:
        unread = RawStream(server.channel, in_flight_open("s"))
        for request in IN_FLIGHT:
            unread.send(request)
        deadline = time.monotonic() + 120
        while session_state(server.channel, "s")[::2] != (final, 4):  # all processed and durable
            assert time.monotonic() < deadline, session_state(server.channel, "s")
            time.sleep(0.05)
        server.kill9()
    finally:
        server.stop()
    server = ServeProcess(model_dir, state)
    try:
        resume = resume_request("s")
        resume.resume.results_after = 0
        stream = RawStream(server.channel, resume)
        opened = stream.next().session_opened
        assert (opened.tokens_seen, opened.acked_seq) == (final, 4)
        stream.send(pb.StreamRequest(request_id="end", append_text=pb.AppendText(flush=True)))
        got = stream.until(lambda r: r.HasField("flushed"))
        stream.close()
        assert results(got) == want
        again = RawStream(server.channel, resume)  # recovered already: nothing is sent again
        again.next()
        again.send(pb.StreamRequest(request_id="end", append_text=pb.AppendText(flush=True)))
        assert results(again.until(lambda r: r.HasField("flushed"))) == []
        again.close()
    finally:
        server.stop()


# ------------------------------------------------------------------------------ refusals take their number
def test_pipelined_refusals_take_their_numbers_and_are_acknowledged(model_dir, tmp_path):
    """Numbered requests sent without waiting: good, refused at intake (append_message: the model has no
    chat template; append_tokens: an id outside the vocabulary), refused at decoding (generate with a
    negative temperature), good. Every refusal takes its number: each is answered with its own error and
    acknowledged, the requests after it are not a gap, and the state is the good appends' alone (equal to
    a session that only got those). A refused request sent again is a duplicate: acknowledged only. After
    kill -9 the recovered session has the same state and acknowledged numbers."""
    good = [append(1, "Once upon a time there was a little girl named Lily."),
            append(5, " She loved to play outside in the park.", flush=True)]
    refused = [pb.StreamRequest(seq=2, request_id="r2", append_message=pb.AppendMessage(role="user",
                                                                                         content="hi")),
               pb.StreamRequest(seq=3, request_id="r3", append_tokens=pb.AppendTokens(ids=[1, 10**6])),
               pb.StreamRequest(seq=4, request_id="r4", generate=pb.Generate(temperature=-1.0))]
    server = ServeProcess(model_dir, tmp_path / "state")
    try:
        plain = RawStream(server.channel, in_flight_open("plain"))
        plain.next()
        plain.send(append(1, good[0].append_text.text))
        plain.send(append(2, good[1].append_text.text, flush=True))
        plain.until(acked(2))
        plain.close()
        want = session_state(server.channel, "plain")[:2]

        stream = RawStream(server.channel, in_flight_open("s"))
        stream.next()
        for request in [good[0], *refused, good[1]]:
            stream.send(request)
        got: list[pb.StreamResponse] = []
        while not {"flushed", "ack"} <= {r.WhichOneof("kind") for r in got if r.request_id == "r5"}:
            got.append(stream.next())
        errors = {r.request_id: r.error for r in got if r.HasField("error")}
        assert sorted(errors) == ["r2", "r3", "r4"]
        assert errors["r2"].code == pb.ERROR_CODE_FAILED_PRECONDITION
        assert errors["r3"].code == errors["r4"].code == pb.ERROR_CODE_INVALID_ARGUMENT
        assert errors["r3"].field == "append_tokens.ids" and errors["r4"].field == "generate.temperature"
        acks = [r.ack.seq for r in got if r.HasField("ack")]
        assert acks == sorted(acks) and acks[-1] == 5
        assert set(acks) == {1, 2, 3, 4, 5}  # acks are cumulative; here each request got its own
        assert session_state(server.channel, "s") == (*want, 5)

        stream.send(refused[0])  # a duplicate: acknowledged, not refused (nor processed) again
        (again,) = stream.until(acked(2))
        assert again.request_id == "r2"
        stream.close()
        server.kill9()
    finally:
        server.stop()
    server = ServeProcess(model_dir, tmp_path / "state")
    try:
        assert session_state(server.channel, "s") == (*want, 5)
    finally:
        server.stop()


# ------------------------------------------------------------------------------ group commit: what is fsync'd
def test_only_records_someone_waits_for_are_fsynced_and_an_fsync_covers_what_came_before(
        tmp_path, monkeypatch):
    """A round fsyncs only the files holding a record with a waiter (an ack); records without one are
    written at once (readable, so they survive kill -9) and become durable with the next fsync of their
    file, or when the file is closed. Counted with the module's fsync function replaced by a counter."""
    import sinkstream.service.write_ahead_log as wal

    synced: list[int] = []
    real_sync = wal._sync
    monkeypatch.setattr(wal, "_sync", lambda fd: (synced.append(fd), real_sync(fd)))
    reported = threading.Event()
    committer = GroupCommitter(lambda results: reported.set(), sync=True)
    waited, unwaited = tmp_path / "a.wal", tmp_path / "b.wal"
    for i in range(20):
        committer.append(waited, {"k": "ran", "n": i})
        committer.append(unwaited, {"k": "ran", "n": i})
    committer.append(waited, {"k": "seq", "seq": 1}, done=lambda error: None)
    assert reported.wait(60)
    assert len(synced) == 1  # one fsync, for the file whose last record is waited for
    assert len(read_log(waited).records) == 21 and len(read_log(unwaited).records) == 20  # written
    committer.stop()
    assert len(synced) == 2  # the unwaited file is made durable when it is closed


# ------------------------------------------------------------------------------ TTL of sessions not recovered
def test_sessions_not_recovered_since_a_restart_expire_by_ttl(model_dir, tmp_path):
    """Logged sessions found at start expire like the others, their last use taken from their files'
    modification times (nothing is read): one last changed two hours ago is removed by the first sweep
    (files gone, NOT_FOUND), one changed now stays, still not recovered, and recovers when asked for."""
    config = StreamConfig(sink_tokens=4, window=64, chunk=CHUNK)
    opening_log(tmp_path / "recent.wal", config)
    opening_log(tmp_path / "old.wal", config)
    two_hours_ago = time.time() - 7200
    os.utime(tmp_path / "old.wal", (two_hours_ago, two_hours_ago))
    server = start_server(model_dir, state_dir=tmp_path, session_ttl_s=3600)
    channel = grpc.insecure_channel(server.address)
    try:
        stub = pb_grpc.SinkStreamStub(channel)
        deadline = time.monotonic() + 60  # the sweep runs every second
        while "old" in {s.session_id for s in stub.ListSessions(pb.ListSessionsRequest()).sessions}:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not (tmp_path / "old.wal").exists()
        with pytest.raises(grpc.RpcError) as gone:
            stub.GetSession(pb.GetSessionRequest(session_id="old"))
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        (recent,) = stub.ListSessions(pb.ListSessionsRequest()).sessions
        assert recent.session_id == "recent" and not recent.HasField("settings")  # not recovered yet
        assert stub.GetSession(pb.GetSessionRequest(session_id="recent")).tokens_seen == 0
    finally:
        channel.close()
        server.stop()
