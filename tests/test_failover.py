"""Failover, all real: a redis-server, three `sinkstream serve --state-store redis://...` replicas on fixed
loopback ports and an HAProxy running deploy/haproxy.cfg. Many sessions stream through the proxy, spread
over the replicas; one replica is killed with -9 mid-stream. Its sessions resume through the proxy on the
others (the clients' own auto-resume re-sends what was not acknowledged) and every session's results equal
an uninterrupted server's; the sessions of the other replicas never move (their fencing generation never
changes, their calls never break). The killed replica restarts at its address and writes nothing over the
sessions that moved; a replica paused past its lease has its writes refused and drops the session."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from conftest import REPO_ROOT
from redis_support import RedisServer, free_port
from test_haproxy_routing import HAPROXY, start_proxy, wait_for

from sinkstream.clients.client import SinkStreamClient
from sinkstream.clients.results import GenerateParams, SessionSettings, SinkStreamError
from sinkstream.clients.resume import ResumePolicy
from sinkstream.service.redis_keys import SessionKeys
from sinkstream.service.tenants import SessionKey
from sinkstream.v1 import sinkstream_pb2 as pb
from sinkstream.v1 import sinkstream_pb2_grpc as pb_grpc

# No skip: CI installs haproxy and redis-server (.ci/run); without them these tests fail, saying so.
assert HAPROXY is not None, "haproxy is not installed (.ci/run installs it with apt-get)"

LEASE_TTL_S = 1.5
POLICY = ResumePolicy(resume_timeout_s=90, initial_backoff_s=0.05, max_backoff_s=0.3)
SETTINGS = SessionSettings(sink_tokens=4, window=60, chunk=16, logprobs=True, token_ids=True)
GENERATE = GenerateParams(max_new_tokens=40, temperature=0.8, top_k=40, seed=7, ignore_eos=True)
SESSIONS = 12
PIECES = 16  # text pieces (of 250 characters) per session


class Replica:
    """`sinkstream serve --state-store` on a fixed port: kill -9 and restart at the same address."""

    def __init__(self, model_dir: Path, store_url: str, log_path: Path) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "sinkstream", "serve", "--model", str(model_dir), "--port",
                     str(self.port), "--state-store", store_url, "--lease-ttl", str(LEASE_TTL_S),
                     "--grace", "0.5", "--plain-logs", "--threads", "1"]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log,
                                         text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        line = self.proc.stdout.readline()
        assert line.startswith("sinkstream: listening on "), line
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def text(sotu_path) -> str:
    return sotu_path.read_text(encoding="utf-8")[:PIECES * 250]


def pieces(text: str) -> list[str]:
    return [text[i:i + 250] for i in range(0, len(text), 250)]


def outcome(chunks, generations) -> dict:
    return {"ids": [t for c in chunks for t in c.token_ids],
            "logprobs": [x for c in chunks for x in c.logprobs] + [t.logprob for g in generations
                                                                  for t in g.tokens],
            "generated": [([t.token_id for t in g.tokens], g.text, g.stop_reason) for g in generations]}


def exact(result: dict) -> dict:
    """What must be identical: every token id, the generated tokens and text, the tokens seen."""
    return {k: v for k, v in result.items() if k != "logprobs"}


def close(got: list[float], want: list[float]) -> bool:
    """Log-probs equal up to float rounding: a replica batches a session with different other sessions
    than the reference run did (measured differences are about 1e-5), which changes float sums, never a
    token; a lost or repeated chunk would move them by far more."""
    return len(got) == len(want) and all(
        (math.isnan(g) and math.isnan(w)) or abs(g - w) <= 1e-4 for g, w in zip(got, want, strict=True))


def workload(address: str, session_id: str, text: str, progress: list[int], seed: int) -> tuple[dict, int]:
    """Open `session_id`, stream `text` in pieces, generate, append, generate, detach; (outcome, resumes).
    progress[0] counts the chunks seen so far."""
    with SinkStreamClient(address, timeout=300, resume=POLICY) as client:
        session = client.open_session(SETTINGS, seed=seed, session_id=session_id)
        chunks, gens = [], []
        for chunk in session.stream_text(pieces(text)):
            chunks.append(chunk)
            progress[0] += 1
        gens.append(session.generate(GENERATE))
        chunks += session.append_text(" And then the story went on.")
        gens.append(session.generate(GENERATE))
        session.detach()
        result = outcome(chunks, gens)
        result["tokens_seen"] = client.get_session(session_id).tokens_seen
        return result, session.resumes


def state_of(client, session_id: str) -> list:
    """Everything Redis holds of a session: generation, lease, log, snapshots."""
    names = SessionKeys.of(SessionKey("default", session_id))
    return [client.get(names.generation), client.lrange(names.log, 0, -1), client.get(names.snapshot),
            client.get(names.previous)]


def generation(client, session_id: str) -> int:
    return int(client.get(SessionKeys.of(SessionKey("default", session_id)).generation))


def lease_owner(client, session_id: str) -> str | None:
    raw = client.get(SessionKeys.of(SessionKey("default", session_id)).lease)
    return json.loads(raw)["owner"] if raw is not None else None


def test_kill_9_of_a_replica_moves_only_its_sessions_with_every_acknowledged_token(
        model_dir, redis_server, text, tmp_path):
    redis_server.client.flushdb()
    replicas = [Replica(model_dir, redis_server.url, tmp_path / f"replica-{i}.log") for i in range(3)]
    proxy = None
    try:
        for replica in replicas:
            replica.start()
        proxy = start_proxy([r.address for r in replicas], tmp_path)
        wait_for("every replica UP", lambda: set(proxy.server_states().values()) == {"UP"})
        ids = [f"fo-{i:02d}" for i in range(SESSIONS)]
        # one uninterrupted server: every workload on one replica, directly (other ids, same seeds)
        want = {i: workload(replicas[0].address, f"ref-{i}", text, [0], seed=n)[0]
                for n, i in enumerate(ids)}
        with SinkStreamClient(replicas[0].address, timeout=60) as client:
            for i in ids:
                client.delete_session(f"ref-{i}")

        progress = {i: [0] for i in ids}
        with futures.ThreadPoolExecutor(SESSIONS) as pool:
            runs = {i: pool.submit(workload, proxy.address, i, text, progress[i], n)
                    for n, i in enumerate(ids)}
            wait_for("every session mid-stream", lambda: all(progress[i][0] >= 3 for i in ids)
                     or any(r.done() for r in runs.values()))
            owners = {i: lease_owner(redis_server.client, i) for i in ids}
            generations = {i: generation(redis_server.client, i) for i in ids}
            counts = {r.address: sum(o == r.address for o in owners.values()) for r in replicas}
            assert sum(counts.values()) == SESSIONS, owners  # every session is attached, under a lease
            assert sum(c > 0 for c in counts.values()) > 1, f"every session is on one replica: {owners}"
            victim = max(replicas, key=lambda r: counts[r.address])
            victim.kill()
            results = {i: run.result(timeout=300) for i, run in runs.items()}

        moved = [i for i in ids if owners[i] == victim.address]
        stayed = [i for i in ids if i not in moved]
        for i in ids:
            assert exact(results[i][0]) == exact(want[i]), f"session {i} differs from an uninterrupted run"
            assert close(results[i][0]["logprobs"], want[i]["logprobs"]), f"session {i}'s log-probs differ"
        for i in moved:  # taken over once, by a live replica
            assert results[i][1] >= 1
            assert generation(redis_server.client, i) == generations[i] + 1
        for i in stayed:  # never moved: no takeover, the call never broke
            assert results[i][1] == 0
            assert generation(redis_server.client, i) == generations[i]

        # the killed replica comes back at its address; it holds nothing and writes nothing of the moved
        # sessions (a resume through the proxy would take one back, from the shared state)
        before = {i: state_of(redis_server.client, i) for i in ids}
        victim.start()
        wait_for("the restarted replica UP", lambda: set(proxy.server_states().values()) == {"UP"})
        with SinkStreamClient(victim.address, timeout=60) as client:
            assert client.list_sessions() == []
        time.sleep(2 * LEASE_TTL_S)
        assert {i: state_of(redis_server.client, i) for i in ids} == before

        # every session goes on through the proxy wherever it now routes, from the shared state
        with SinkStreamClient(proxy.address, timeout=120, resume=POLICY) as client:
            for i in ids:
                with client.resume_session(i) as session:
                    assert session.opened.tokens_seen == want[i]["tokens_seen"]
                    session.append_text(" The end.")
    finally:
        if proxy is not None:
            proxy.stop()
        for replica in replicas:
            replica.stop()


def owner_trailer(address: str, session_id: str) -> str | None:
    """The `x-session-owner` trailing metadata of a resume of `session_id` at `address` (None if absent)."""
    with grpc.insecure_channel(address) as channel:
        call = pb_grpc.SinkStreamStub(channel).Stream(
            iter([pb.StreamRequest(resume=pb.ResumeSession(session_id=session_id))]), timeout=30)
        with pytest.raises(grpc.RpcError) as refused:
            list(call)
        return dict(refused.value.trailing_metadata() or ()).get("x-session-owner")


def test_a_paused_replica_loses_its_sessions_and_its_writes_are_refused(model_dir, redis_server, text,
                                                                          tmp_path):
    """Replica A holds a session with an open call; A is paused (SIGSTOP) past its lease; B takes the
    session over (from the shared log) and writes to it. A continues: its writes are refused, it drops
    the session and ends its call with UNAVAILABLE naming the owner; B's state is intact."""
    redis_server.client.flushdb()
    a = Replica(model_dir, redis_server.url, tmp_path / "a.log")
    b = Replica(model_dir, redis_server.url, tmp_path / "b.log")
    a.args += ["--idle-evict", "0.5"]
    try:
        a.start()
        b.start()
        with SinkStreamClient(a.address, timeout=60, resume=ResumePolicy(resume_timeout_s=0)) as client_a:
            session_a = client_a.open_session(SETTINGS, seed=1, session_id="paused")
            first = session_a.append_text(text[:1000])
            assert lease_owner(redis_server.client, "paused") == a.address
            # B refuses the session while A holds it, naming A
            with SinkStreamClient(b.address, timeout=60, resume=ResumePolicy(resume_timeout_s=0)) as client_b:
                with pytest.raises(SinkStreamError) as refused:
                    client_b.resume_session("paused")
                assert refused.value.code == grpc.StatusCode.UNAVAILABLE
                assert a.address in refused.value.message
                assert owner_trailer(b.address, "paused") == a.address
                a.proc.send_signal(signal.SIGSTOP)
                wait_for("A's lease to lapse", lambda: lease_owner(redis_server.client, "paused") is None)
                with client_b.resume_session("paused") as session_b:
                    assert session_b.opened.tokens_seen == first[-1].tokens_seen
                    seen_by_b = session_b.append_text(text[1000:1500])[-1].tokens_seen
            assert generation(redis_server.client, "paused") == 2
            # B may still be writing what its closed call left (its log's last records, its snapshot):
            # take B's state once two reads half a second apart agree, so only A could change it later.
            after_b = settled_state(redis_server.client, "paused")
            a.proc.send_signal(signal.SIGCONT)
            with pytest.raises(SinkStreamError) as ended:
                session_a.append_text(text[1000:1200])
                session_a.append_text(text[1200:1400])
            assert ended.value.code == grpc.StatusCode.UNAVAILABLE
            assert "another replica" in ended.value.message
        wait_for("A dropping the session", lambda: "session dropped" in a.log_path.read_text())
        time.sleep(1.0)  # A's idle eviction would have written a snapshot by now, had it kept the session
        assert state_of(redis_server.client, "paused") == after_b
        with SinkStreamClient(b.address, timeout=60) as client_b:
            assert client_b.get_session("paused").tokens_seen == seen_by_b
    finally:
        a.stop()
        b.stop()


def settled_state(client, session_id: str):
    """The session's stored state once it stops changing (two reads 0.5 s apart agree; at most 30 s)."""
    previous = state_of(client, session_id)
    for _ in range(60):
        time.sleep(0.5)
        current = state_of(client, session_id)
        if current == previous:
            return current
        previous = current
    raise AssertionError(f"session {session_id}'s stored state kept changing for 30 s")


def raw_stream(address: str, first: pb.StreamRequest, texts: list[str]) -> tuple[str, list]:
    """One call of unnumbered requests: `first`, each text appended and flushed, then half-close; (the
    session id, the chunk results as (token ids, log-probs))."""
    requests = [first] + [pb.StreamRequest(append_text=pb.AppendText(text=t, flush=True)) for t in texts]
    with grpc.insecure_channel(address) as channel:
        replies = list(pb_grpc.SinkStreamStub(channel).Stream(iter(requests), timeout=120))
    assert not any(r.HasField("error") or r.HasField("ack") for r in replies)
    chunks = [(list(r.chunk.token_ids), ["nan" if math.isnan(x) else x for x in r.chunk.logprobs])
              for r in replies if r.HasField("chunk")]
    return replies[0].session_opened.session_id, chunks


def test_a_session_of_unnumbered_requests_and_an_assigned_id_moves_with_every_token(model_dir, redis_server,
                                                                                      text, tmp_path):
    """The open went to one replica (the server chose the id) and the next call reaches another, as with
    HAProxy's round robin for an open without `x-session-id`: that replica takes the session over from
    the shared log (a shared store logs a session from its open, numbered requests or not) and continues
    it exactly as the first replica would have."""
    redis_server.client.flushdb()
    a = Replica(model_dir, redis_server.url, tmp_path / "a.log")
    b = Replica(model_dir, redis_server.url, tmp_path / "b.log")
    settings = pb.SessionSettings(sink_tokens=4, window=60, chunk=16,
                                  analysis=pb.AnalysisOptions(logprobs=True, token_ids=True))
    open_request = pb.StreamRequest(open=pb.OpenSession(settings=settings, seed=5))
    try:
        a.start()
        b.start()
        _, want = raw_stream(a.address, open_request, [text[:700], text[700:1400]])
        session_id, first = raw_stream(a.address, open_request, [text[:700]])
        resume = pb.StreamRequest(resume=pb.ResumeSession(session_id=session_id))
        _, then = raw_stream(b.address, resume, [text[700:1400]])
        assert first + then == want
        assert generation(redis_server.client, session_id) == 2
    finally:
        a.stop()
        b.stop()
