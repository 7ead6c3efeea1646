"""Bad input gets the right status code and never hurts the server or other sessions; health, reflection
and metrics answer."""

from __future__ import annotations

import errno
import time
import urllib.request

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from service_support import start_server

from sinkstream.clients.client import SinkStreamClient
from sinkstream.clients.results import GenerateParams, SessionSettings, SinkStreamError
from sinkstream.clients.resume import ResumePolicy
from sinkstream.v1 import sinkstream_pb2 as pb

MAX_MESSAGE = 1 << 20


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = start_server(model_dir, max_message_bytes=MAX_MESSAGE, max_sessions=6, metrics_port=0,
                       state_dir=tmp_path_factory.mktemp("state"))
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    with SinkStreamClient(server.address, timeout=30, max_message_bytes=4 * MAX_MESSAGE) as c:
        yield c
        assert c.health() == "SERVING"
        assert c.health("sinkstream.v1.SinkStream") == "SERVING"


@pytest.fixture(scope="module")
def bystander(server):
    """A session that lives through every bad request of this module and must stay correct."""
    with SinkStreamClient(server.address, timeout=30) as c:
        session = c.open_session(SessionSettings(window=60, chunk=16))
        session.append_text("Once upon a time")
        yield session
        assert session.generate(GenerateParams(max_new_tokens=11)).text == \
            ", there was a little girl named Lily."
        session.close()


def refused(call) -> SinkStreamError:
    with pytest.raises(SinkStreamError) as err:
        call()
    return err.value


@pytest.mark.parametrize(("settings", "field"), [
    (SessionSettings(window=0), "open.settings.window"),
    (SessionSettings(chunk=0), "open.settings.chunk"),
    (SessionSettings(window=500, chunk=64), "open.settings.window"),  # beyond the trained context
    (SessionSettings(merge_policy="bogus"), "open.settings.merge_policy"),
    (SessionSettings(top_k=10_000), "open.settings.analysis.top_k"),
])
def test_invalid_settings_name_the_field(client, bystander, settings, field):
    err = refused(lambda: client.open_session(settings))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.field == field


def test_invalid_requests_inside_a_stream_are_reported_and_stream_survives(client, bystander):
    with client.open_session() as session:
        err = refused(lambda: session.generate(GenerateParams(temperature=-1)))
        assert (err.code, err.field) == (grpc.StatusCode.INVALID_ARGUMENT, "generate.temperature")
        err = refused(lambda: session.generate(GenerateParams(top_p=2.0)))
        assert err.field == "generate.top_p"
        err = refused(lambda: session.generate(GenerateParams(max_new_tokens=10**6)))
        assert err.field == "generate.max_new_tokens"
        err = refused(lambda: session.append_tokens([1, 100_000]))
        assert (err.code, err.field) == (grpc.StatusCode.INVALID_ARGUMENT, "append_tokens.ids")
        session._send(pb.StreamRequest())  # no kind set
        err = refused(lambda: session._collect_chunks_until(type(None)))
        assert err.field == "kind"
        session._send(pb.StreamRequest(open=pb.OpenSession()))
        err = refused(lambda: session._collect_chunks_until(type(None)))
        assert err.code == grpc.StatusCode.FAILED_PRECONDITION
        # still usable
        assert session.append_tokens([1, 403, 407])[-1].tokens_seen == 3


def test_unknown_closed_and_busy_sessions(client, bystander):
    assert refused(lambda: client.resume_session("no-such-session")).code == grpc.StatusCode.NOT_FOUND
    assert refused(lambda: client.get_session("no-such-session")).code == grpc.StatusCode.NOT_FOUND
    assert refused(lambda: client.delete_session("no-such-session")).code == grpc.StatusCode.NOT_FOUND
    assert refused(lambda: client.resume_session("bad id!")).code == grpc.StatusCode.INVALID_ARGUMENT
    # attached elsewhere: cannot be resumed or deleted
    assert refused(lambda: client.resume_session(bystander.id)).code == grpc.StatusCode.ABORTED
    assert refused(lambda: client.delete_session(bystander.id)).code == grpc.StatusCode.FAILED_PRECONDITION
    # appending to a closed session
    session = client.open_session(session_id="to-close")
    session.append_text("Hello")
    assert session.close().tokens_seen > 0
    assert refused(lambda: session.append_text("more")).code == grpc.StatusCode.FAILED_PRECONDITION
    err = refused(lambda: client.resume_session("to-close"))
    assert err.code == grpc.StatusCode.NOT_FOUND and "closed" in err.message
    # duplicate id
    with client.open_session(session_id="twice"):
        assert refused(lambda: client.open_session(session_id="twice")).code == grpc.StatusCode.ALREADY_EXISTS
    assert client.delete_session("twice") == 0


def test_first_request_must_open_or_resume(client, bystander):
    stub = client.stub
    call = stub.Stream(iter([pb.StreamRequest(append_text=pb.AppendText(text="hi"))]), timeout=10)
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_oversized_and_malformed_messages(client, server, bystander):
    with client.open_session() as session:
        err = refused(lambda: session.append_text("x" * (MAX_MESSAGE + 10)))
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    raw = client.channel.stream_stream("/sinkstream.v1.SinkStream/Stream",
                                       request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as err:
        list(raw(iter([b"\xff\xff\xff\xff\x0f"]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    unary = client.channel.unary_unary("/sinkstream.v1.SinkStream/Tokenize",
                                       request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as err:
        unary(b"\x0a\x02\xc3\x28", timeout=10)  # field 1 (text) holding invalid UTF-8
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_session_limit_is_resource_exhausted(client, server, bystander):
    held = []
    try:
        with pytest.raises(SinkStreamError) as err:
            for _ in range(10):
                held.append(client.open_session())
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert 0 < len(held) < 10
    finally:
        for session in held:
            session.close()


def test_unary_calls_and_reflection(client, server, bystander):
    info = client.model_info()
    assert (info.vocab_size, info.max_position_embeddings, info.bos_token_id) == (512, 512, 1)
    assert info.limits["max_message_bytes"] == MAX_MESSAGE
    assert client.tokenize("Once upon a time", add_bos=True) == [1, 403, 407, 261, 378]
    assert any(s.session_id == bystander.id for s in client.list_sessions())
    db = ProtoReflectionDescriptorDatabase(client.channel)
    services = db.get_services()
    assert "sinkstream.v1.SinkStream" in services and "grpc.health.v1.Health" in services
    method = db.FindFileContainingSymbol("sinkstream.v1.SinkStream")
    assert method.package == "sinkstream.v1"


def test_metrics_endpoint_serves_counters(client, server, bystander):
    with client.open_session() as session:
        session.append_text("Once upon a time")
        session.generate(GenerateParams(max_new_tokens=3))
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for name in ("sinkstream_tokens_processed_total{kind=\"input\"}", "sinkstream_queue_depth",
                 "sinkstream_tokens_processed_total{kind=\"generated\"}", "sinkstream_batch_rows_bucket",
                 "sinkstream_sessions{state=\"resident\"}", "sinkstream_step_seconds_bucket",
                 "sinkstream_time_to_first_token_seconds_bucket", "sinkstream_cache_bytes"):
        assert name in text, name
    generated = [line for line in text.splitlines()
                 if line.startswith("sinkstream_tokens_processed_total{kind=\"generated\"}")]
    assert float(generated[0].split()[-1]) >= 3


def test_aggressive_client_keepalive_is_not_goawayed(server, bystander):
    # gRPC's server defaults answer pings more often than every 5 minutes with GOAWAY "too_many_pings"
    # (this exact setup fails that way against a default grpc.aio server); ours accepts them.
    options = [("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_timeout_ms", 1000),
               ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]
    channel = grpc.insecure_channel(server.address, options=options)
    with SinkStreamClient(server.address, channel=channel, timeout=30) as client, \
            client.open_session() as session:
        session.append_text("Once upon a time")
        time.sleep(4)  # several keepalive pings without data
        assert session.generate(GenerateParams(max_new_tokens=3)).generated_tokens == 3


def test_default_max_new_tokens_respects_server_limit(model_dir):
    # A Generate without max_new_tokens takes the default of 64, capped by --max-new-tokens.
    small = start_server(model_dir, max_new_tokens=10)
    try:
        with SinkStreamClient(small.address, timeout=30) as client, client.open_session() as session:
            session.append_text("Once upon a time")
            result = session.generate(GenerateParams(ignore_eos=True))
            assert (result.generated_tokens, result.stop_reason) == (10, "MAX_TOKENS")
    finally:
        small.stop()


@pytest.mark.parametrize(("error", "code"), [
    (OSError(errno.ENOSPC, "No space left on device"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (PermissionError(errno.EACCES, "Permission denied"), grpc.StatusCode.RESOURCE_EXHAUSTED),
])
def test_checkpoint_write_failure_is_reported_and_stream_survives(client, server, bystander, monkeypatch,
                                                                  error, code):
    def failing_save(*args) -> int:
        raise error

    with client.open_session(timeout=10) as session:
        session.append_text("Once upon a time")
        monkeypatch.setattr(server.server.manager.store, "save", failing_save)
        err = refused(session.checkpoint)  # answered, not left waiting until the deadline
        assert (err.code, err.field) == (code, "checkpoint")
        assert error.strerror in err.message
        monkeypatch.undo()
        assert session.append_tokens([403])[-1].tokens_seen == 6
        assert session.checkpoint().tokens_seen == 6
        session.close()  # the module's server holds few sessions


def test_unexpected_error_reading_requests_ends_call_with_internal(server, bystander, monkeypatch):
    def broken(*args):
        raise RuntimeError("test: reader bug")

    # resuming off: a client that resumes on its own takes INTERNAL for a proxy's lost backend and resumes
    client = SinkStreamClient(server.address, timeout=30, resume=ResumePolicy(resume_timeout_s=0))
    session = client.open_session(timeout=10)
    session.append_text("Once upon a time")
    monkeypatch.setattr(server.server.servicer.intake, "work", broken)
    err = refused(lambda: session.append_text(" more"))
    assert err.code == grpc.StatusCode.INTERNAL and "test: reader bug" in err.message  # not OK
    monkeypatch.undo()
    with client.resume_session(session.id) as resumed:  # the session is kept
        assert resumed.opened.tokens_seen == 5
        resumed.close()
    client.close()


def test_append_after_close_on_the_wire(client, bystander):
    # The client library refuses to send after close; a raw stub does. The proto: Close is answered by
    # `closed`, then the call ends with OK; requests after it are not processed.
    requests = [pb.StreamRequest(request_id="o", open=pb.OpenSession(session_id="closed-on-wire")),
                pb.StreamRequest(request_id="a", append_tokens=pb.AppendTokens(ids=[1, 403], flush=True)),
                pb.StreamRequest(request_id="c", close=pb.Close()),
                pb.StreamRequest(request_id="late", append_text=pb.AppendText(text="more", flush=True))]
    call = client.stub.Stream(iter(requests), timeout=10)
    responses = list(call)
    assert call.code() == grpc.StatusCode.OK
    assert [(r.request_id, r.WhichOneof("kind")) for r in responses] == \
        [("o", "session_opened"), ("a", "chunk"), ("a", "flushed"), ("c", "closed")]
    assert responses[-1].closed.tokens_seen == 2
    err = refused(lambda: client.get_session("closed-on-wire"))
    assert err.code == grpc.StatusCode.NOT_FOUND and "closed" in err.message
