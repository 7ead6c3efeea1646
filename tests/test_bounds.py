"""Bounded work per message and per session: a big append is admitted in slices within the session's input
budget while other sessions and health checks keep being answered, and a session whose client left stops
using compute, keeping its admitted input for a resume."""

from __future__ import annotations

import threading

import pytest
from service_support import start_server, stories

from sinkstream.clients.client import SinkStreamClient
from sinkstream.clients.results import SessionSettings
from sinkstream.core.text import IncrementalEncoder
from sinkstream.service.backpressure import input_budget
from sinkstream.v1 import sinkstream_pb2 as pb

CHUNK = 64
PHRASE = "Once upon a time there was a little girl. "


@pytest.fixture(scope="module")
def server(model_dir):
    srv = start_server(model_dir)
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    with SinkStreamClient(server.address, timeout=60, max_message_bytes=64 << 20) as c:
        yield c


class HeldCall:
    """A raw Stream call: opens `session_id`, sends `requests`, then keeps its request side open."""

    def __init__(self, client: SinkStreamClient, session_id: str, requests: list[pb.StreamRequest],
                 resume: bool = False) -> None:
        self.release = threading.Event()
        first = (pb.StreamRequest(resume=pb.ResumeSession(session_id=session_id)) if resume else
                 pb.StreamRequest(open=pb.OpenSession(session_id=session_id,
                                                      settings=pb.SessionSettings(chunk=CHUNK))))

        def outgoing():
            yield first
            yield from requests
            self.release.wait()

        self.call = client.stub.Stream(outgoing(), timeout=120)
        self.opened = next(self.call)

    def cancel(self) -> None:
        self.call.cancel()
        self.release.set()


def wait_until(check, client: SinkStreamClient, rounds: int = 2000):
    """Poll `check()` (GetSession-based) until true; each try is one unary round trip."""
    for _ in range(rounds):
        if value := check():
            return value
        client.health()
    raise AssertionError("condition never became true")


def settled_after_detach(client: SinkStreamClient, session_id: str, bystander) -> tuple[int, int]:
    """(tokens_seen, pending_tokens) once the session is detached and a later round of the scheduler has
    completed (a bystander flush is answered only after a whole round)."""
    wait_until(lambda: not client.get_session(session_id).attached, client)
    bystander.append_tokens([403])  # flushes: a complete scheduler round after the detach
    info = client.get_session(session_id)
    return info.tokens_seen, info.pending_tokens


def test_big_text_does_not_stall_other_sessions_and_stays_within_budget(client):
    reps = 3_000_000 // len(PHRASE)  # about 3 MB of text: far more tokens than the budget
    big = HeldCall(client, "big-text",
                   [pb.StreamRequest(request_id="big", append_text=pb.AppendText(text=PHRASE * reps,
                                                                                  flush=True))])
    try:
        wait_until(lambda: client.get_session("big-text").tokens_seen > 0, client)
        with client.open_session(SessionSettings(chunk=CHUNK)) as other:
            # another session's work and a health check are answered while the big message is worked on
            assert other.append_text("Once upon a time")[-1].tokens_seen == 5
            assert client.health() == "SERVING"
            info = client.get_session("big-text")
            assert info.tokens_seen + info.pending_tokens < reps  # the big message is not done
            assert info.pending_tokens <= input_budget(CHUNK)  # one message cannot bypass the budget
            other.close()
    finally:
        big.cancel()


def test_detached_session_stops_computing_and_keeps_its_input_for_resume(client):
    ids = [403, 407, 261, 378] * 100_000  # far more than the budget; admitted in slices
    held = HeldCall(client, "left", [pb.StreamRequest(request_id="many",
                                                      append_tokens=pb.AppendTokens(ids=ids))])
    with client.open_session(SessionSettings(chunk=CHUNK)) as bystander:
        wait_until(lambda: client.get_session("left").tokens_seen > 0, client)
        held.cancel()
        tokens, pending = settled_after_detach(client, "left", bystander)
        assert 0 < tokens + pending < len(ids)  # the rest of the message was never admitted
        assert pending <= input_budget(CHUNK)
        bystander.append_tokens([403])
        bystander.append_tokens([403])
        info = client.get_session("left")
        assert (info.tokens_seen, info.pending_tokens) == (tokens, pending)  # no compute without a client
        bystander.close()
    # on resume the kept input is processed first: nothing admitted was lost
    with client.resume_session("left") as resumed:
        assert resumed.opened.tokens_seen == tokens
        chunks = resumed.append_tokens([403])  # flushes
        assert chunks[-1].tokens_seen == tokens + pending + 1
        assert sum(c.num_tokens for c in chunks) == pending + 1
        resumed.close()


def test_tokenize_in_slices_equals_the_whole_text_at_once(client, model_dir):
    # Tokenize (and append_text) work through a big text in slices; the slices never change the ids.
    text = (PHRASE + "Lily\u00e9 " + "x" * 5000) * 20  # spaces, a long word, non-ASCII; > 2 slices
    encoder = IncrementalEncoder(stories(model_dir).tokenizer)
    assert client.tokenize(text, add_bos=True) == encoder.push(text) + encoder.flush()
