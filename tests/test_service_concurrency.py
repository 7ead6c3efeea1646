"""Concurrent sessions batched together equal each alone; cancellation and deadlines stop generation and
leave the session usable."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from service_support import reference_chat, reference_chunks, start_server, stories

from sinkstream.clients.client import SinkStreamClient
from sinkstream.clients.results import GenerateParams, SessionSettings, SinkStreamError
from sinkstream.core.config import StreamConfig
from sinkstream.core.sampling import SamplingParams
from sinkstream.service.tenants import DEFAULT_TENANT, SessionKey
from sinkstream.v1 import sinkstream_pb2 as pb

SESSIONS = 8
CONFIG = StreamConfig(sink_tokens=4, window=60, chunk=16)
SETTINGS = SessionSettings(sink_tokens=4, window=60, chunk=16, logprobs=True)
LONG = GenerateParams(max_new_tokens=4096, ignore_eos=True)


@pytest.fixture(scope="module")
def server(model_dir):
    srv = start_server(model_dir)
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    with SinkStreamClient(server.address, timeout=120) as c:
        yield c


def settled_tokens(client: SinkStreamClient, session_id: str) -> int:
    """tokens_seen once the session is detached and has stopped growing."""
    deadline = time.monotonic() + 30
    last = -1
    while time.monotonic() < deadline:
        info = client.get_session(session_id)
        if not info.attached and info.tokens_seen == last:
            return last
        last = info.tokens_seen
        time.sleep(0.2)
    raise AssertionError(f"session {session_id} kept running after its call ended")


def test_concurrent_sessions_equal_each_alone(server, model_dir, sotu_path):
    text = sotu_path.read_text(encoding="utf-8")
    texts = [text[i * 1500:(i + 1) * 1500] for i in range(SESSIONS)]
    barrier = threading.Barrier(SESSIONS)
    got: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            with SinkStreamClient(server.address, timeout=120) as client, \
                    client.open_session(SETTINGS) as session:
                barrier.wait()
                chunks = session.append_text(texts[i])
                result = session.generate(GenerateParams(max_new_tokens=16))
                got[i] = ([lp for c in chunks for lp in c.logprobs], [t.token_id for t in result.tokens])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(SESSIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    loaded = stories(model_dir)
    for i in range(SESSIONS):
        want_lp = torch.cat([r.logprobs for r in reference_chunks(loaded, CONFIG, [texts[i]])])
        assert torch.allclose(torch.tensor(got[i][0]), want_lp, atol=1e-4, equal_nan=True), i
        (want_ids, _, _), = reference_chat(loaded, CONFIG, [(texts[i], SamplingParams(max_new_tokens=16))])
        assert got[i][1] == want_ids, i
    registry = server.server.metrics.registry
    rows = registry.get_sample_value("sinkstream_batch_rows_sum")
    passes = registry.get_sample_value("sinkstream_batch_rows_count")
    assert rows > passes, "no forward pass batched two sessions"


def test_cancel_generation_keeps_session_usable(client):
    with client.open_session(SETTINGS) as session:
        session.append_text("Once upon a time")
        for token in session.generate_stream(LONG):
            if token.index == 4:
                session.cancel_generation()
        result = session.last_generation
        assert result.stop_reason == "CANCELLED"
        assert 5 <= result.generated_tokens < 4096
        assert result.tokens_seen == 5 + result.generated_tokens  # BOS + 4 prompt tokens + generated
        session.append_text(" The end.")
        again = session.generate(GenerateParams(max_new_tokens=3, ignore_eos=True))
        assert again.stop_reason == "MAX_TOKENS" and again.generated_tokens == 3


def test_time_limit_stops_generation(client):
    with client.open_session(SETTINGS) as session:
        session.append_text("Once upon a time")
        result = session.generate(GenerateParams(max_new_tokens=4096, ignore_eos=True, time_limit_ms=300))
        assert result.stop_reason == "TIME_LIMIT"
        assert result.generated_tokens < 4096


def test_client_cancel_stops_work_and_session_resumes(client):
    session = client.open_session(SETTINGS)
    session.append_text("Once upon a time")
    for token in session.generate_stream(LONG):
        if token.index == 10:
            session.abort()  # cancel the whole call, as a crashing client would
            break
    seen = settled_tokens(client, session.id)
    assert seen < 4096
    with client.resume_session(session.id) as resumed:
        assert resumed.opened.tokens_seen == seen
        result = resumed.generate(GenerateParams(max_new_tokens=4, ignore_eos=True))
        assert result.tokens_seen == seen + 4


def test_deadline_stops_generation_and_session_resumes(client):
    session = client.open_session(SETTINGS, timeout=1.0)
    session.append_text("Once upon a time")
    with pytest.raises(SinkStreamError) as err:
        for _ in session.generate_stream(LONG):
            pass
    assert err.value.code.name == "DEADLINE_EXCEEDED"
    seen = settled_tokens(client, session.id)
    with client.resume_session(session.id) as resumed:
        assert resumed.opened.tokens_seen == seen
        resumed.append_text(" and")
        assert resumed.generate(GenerateParams(max_new_tokens=2, ignore_eos=True)).generated_tokens == 2


def test_fast_writer_is_held_back_by_bounded_queues(server, client, monkeypatch):
    """A client that writes much faster than the model reads and never reads its responses: the server
    buffers a bounded number of requests, input tokens and responses, and flow control stops the writer."""
    from sinkstream.service import backpressure
    from sinkstream.service.backpressure import INBOX_LIMIT, OUTBOX_LIMIT

    # A small token budget, so that it binds before the 16-request inbox does (the real one is 64k tokens,
    # which 16 requests of the maximal message size would pass many times over).
    monkeypatch.setattr(backpressure, "INPUT_BUDGET_MIN", 2048)

    piece = "the cat sat on the mat and " * 80  # ~2 kB, ~700 tokens
    total = 4000  # ~8 MB if the server buffered everything
    session = client.open_session(SessionSettings(window=60, chunk=16))
    sent = 0

    def write() -> None:
        nonlocal sent
        try:
            for _ in range(total):
                session.send_text(piece)
                sent += 1
        except SinkStreamError:
            pass  # the call was cancelled below

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    state = server.server.manager.sessions[SessionKey(DEFAULT_TENANT, session.id)]
    time.sleep(2)
    # The writer gets ahead only by what HTTP/2 windows hold (a few MB), then at the model's pace
    # (~700 tokens per request): far from all of its 4000 requests.
    assert sent < total, "the writer was never held back"
    assert state.inbox.qsize() <= INBOX_LIMIT
    assert state.outbox.qsize() <= OUTBOX_LIMIT + 2
    assert len(state.pending) <= 2 * len(piece)  # about one request's tokens, never the backlog
    held = sum(len(w.ids) for w in list(state.inbox._queue) if hasattr(w, "ids")) + len(state.pending)
    assert held <= 2048 + len(piece), held  # the budget plus at most one request's tokens
    session.abort()
    writer.join(10)
    settled_tokens(client, session.id)  # work stops once the call is gone
    client.delete_session(session.id)


def test_unread_error_replies_stay_bounded(server, client):
    """A client that sends many invalid requests and never reads: the replies the server queues for it
    stay bounded (it stops reading the stream instead), and other sessions are served meanwhile."""
    from sinkstream.service.backpressure import OUTBOX_LIMIT

    total, sent = 20_000, 0  # with long request ids (echoed): MBs of replies, more than HTTP/2 windows hold

    def requests():
        nonlocal sent
        yield pb.StreamRequest(request_id="open", open=pb.OpenSession(session_id="never-reads"))
        for i in range(total):
            sent += 1
            yield pb.StreamRequest(request_id=f"{i:0250d}", generate=pb.Generate(max_new_tokens=10**6))

    call = client.stub.Stream(requests(), timeout=60)
    try:
        assert next(call).session_opened.session_id == "never-reads"
        manager = server.server.manager
        deadline, most = time.monotonic() + 3, 0
        while time.monotonic() < deadline:
            state = manager.sessions[SessionKey(DEFAULT_TENANT, "never-reads")]
            most = max(most, state.outbox.qsize() if state.outbox is not None else 0)
            time.sleep(0.01)
        assert 0 < most <= OUTBOX_LIMIT + 2
        assert sent < total, "the writer was never held back"
        with client.open_session(SETTINGS) as other:
            other.append_text("Once upon a time")
            assert other.generate(GenerateParams(max_new_tokens=3, ignore_eos=True)).generated_tokens == 3
        reply = next(call)  # the replies are all there, in order
        assert (reply.request_id, reply.error.field) == ("0" * 250, "generate.max_new_tokens")
    finally:
        call.cancel()
    settled_tokens(client, "never-reads")
    client.delete_session("never-reads")


def test_request_id_length_is_limited(client):
    first = pb.StreamRequest(open=pb.OpenSession(settings=pb.SessionSettings(chunk=16)))
    too_long = pb.StreamRequest(request_id="x" * 257, append_tokens=pb.AppendTokens(ids=[1, 403]))
    at_limit = pb.StreamRequest(request_id="é" * 128, append_tokens=pb.AppendTokens(ids=[1, 403], flush=True))
    opened, error, *rest = list(client.stub.Stream(iter([first, too_long, at_limit]), timeout=10))
    assert (error.request_id, error.error.field) == ("", "request_id")  # not echoed
    assert error.error.code == pb.ERROR_CODE_INVALID_ARGUMENT and "256 bytes" in error.error.message
    assert [r.WhichOneof("kind") for r in rest] == ["chunk", "flushed"]
    assert {r.request_id for r in rest} == {"é" * 128}
    assert rest[-1].flushed.tokens_seen == 2
    client.delete_session(opened.session_opened.session_id)
