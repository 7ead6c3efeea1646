"""Security end to end against live servers: TLS and mutual TLS with certificates made in the test, bearer
tokens on every call but health (reflection included, unary calls and the Stream alike), the health-only
port, tenants that cannot see or touch each other's sessions, the loopback-only rule without tokens, and
SIGHUP reloading the tokens of a `sinkstream serve` subprocess."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from functools import partial

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from service_support import reference_chat, start_server, stories
from tls_support import CertificateAuthority

from sinkstream.clients.client import SinkStreamClient
from sinkstream.clients.results import GenerateParams, SessionSettings, SinkStreamError
from sinkstream.core.config import StreamConfig
from sinkstream.core.sampling import SamplingParams
from sinkstream.service.server import ServerConfig, ServerThread
from sinkstream.service.tls import TLSFiles

ALICE, BOB, CAROL = "alice-token-0123456789", "bob-token-0123456789ab", "carol-token-0123456789"
TOKENS = f"# token tenant\n{ALICE} alice\n{BOB} bob  # bob's\n\n"
CONFIG = StreamConfig(sink_tokens=4, window=40, chunk=8)
SETTINGS = SessionSettings(sink_tokens=4, window=40, chunk=8)
TURNS = ["Once upon a time", " The dog said hello.", " Then the sun came out and"]
PARAMS = GenerateParams(temperature=0.8, top_k=20, max_new_tokens=24)
CORE_PARAMS = SamplingParams(temperature=0.8, top_k=20, max_new_tokens=24)
SEED = 99
UNARY = ["tokenize", "model_info", "list_sessions", "get_session", "delete_session"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(folder / "ca")
    other_ca = CertificateAuthority(folder / "other", "another CA")
    server = ca.issue("server", server=True)
    (server.cert.parent / "ca.pem").write_bytes(ca.cert.read_bytes())  # beside the server's, for client()
    return {"ca": ca, "other_ca": other_ca, "server": server,
            "client": ca.issue("client", server=False), "stranger": other_ca.issue("stranger", server=False)}


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(TOKENS)
    return path


@pytest.fixture(scope="module")
def secured(model_dir, pki, tokens_file):
    """TLS and tokens, with a health-only port."""
    srv = start_server(model_dir, tls=TLSFiles(pki["server"].cert, pki["server"].key),
                       auth_tokens=tokens_file, health_port=0)
    yield srv
    srv.stop()


def client(server, token: str | None = ALICE, **tls) -> SinkStreamClient:
    """A client of `server` with `token`; TLS trusting the test CA unless other TLS arguments are given."""
    tls = tls or {"tls_ca": server.server.config.tls.cert.parent / "ca.pem"}
    return SinkStreamClient(server.address, timeout=30, retry_attempts=1, token=token, **tls)


def unary(c: SinkStreamClient, name: str):
    args = {"tokenize": ("hello",), "get_session": ("some-id",), "delete_session": ("some-id",)}
    return getattr(c, name)(*args.get(name, ()))


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(SinkStreamError) as err:
        call()
    return err.value.code


# ---------------------------------------------------------------------- TLS
def test_tls_client_with_the_ca_and_token_is_served(secured):
    text = "Once upon a time there was a dog."
    with client(secured) as c:
        assert c.model_info().name == "stories260K"  # the folder's name, not its path on the server
        with c.open_session(SETTINGS) as session:
            chunks = session.append_text(text) + session.flush()
            assert chunks[-1].tokens_seen == len(c.tokenize(text, add_bos=True))


def test_plaintext_and_wrong_ca_are_refused(secured, pki):
    with SinkStreamClient(secured.address, timeout=10, retry_attempts=1, token=ALICE) as plain:
        assert code_of(plain.model_info) == grpc.StatusCode.UNAVAILABLE
    with client(secured, tls_ca=pki["other_ca"].cert) as wrong:
        assert code_of(wrong.model_info) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_from_the_ca(model_dir, pki, tokens_file):
    files = TLSFiles(pki["server"].cert, pki["server"].key, client_ca=pki["ca"].cert)
    srv = start_server(model_dir, tls=files, auth_tokens=tokens_file)
    try:
        ca = pki["ca"].cert
        with client(srv, tls_ca=ca) as no_cert:
            assert code_of(no_cert.model_info) == grpc.StatusCode.UNAVAILABLE
        stranger = pki["stranger"]
        with client(srv, tls_ca=ca, tls_cert=stranger.cert, tls_key=stranger.key) as wrong_cert:
            assert code_of(wrong_cert.model_info) == grpc.StatusCode.UNAVAILABLE
        own = pki["client"]
        with client(srv, tls_ca=ca, tls_cert=own.cert, tls_key=own.key) as good:
            assert good.model_info().name == "stories260K"
            with good.open_session(SETTINGS) as session:
                chunks = session.append_text("Once upon a time") + session.flush()
                assert chunks[-1].tokens_seen == len(good.tokenize("Once upon a time", add_bos=True))
    finally:
        srv.stop()


# ---------------------------------------------------------------------- tokens
@pytest.mark.parametrize("token", [None, "not-a-valid-token-at-all", ALICE[:-1]])
def test_calls_without_a_valid_token_are_unauthenticated(secured, token):
    with client(secured, token=token) as c:
        for name in UNARY:
            assert code_of(lambda name=name: unary(c, name)) == grpc.StatusCode.UNAUTHENTICATED, name
        assert code_of(lambda: c.open_session(SETTINGS)) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: c.resume_session("some-id")) == grpc.StatusCode.UNAUTHENTICATED
        reflection = c.channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        with pytest.raises(grpc.RpcError) as err:
            list(reflection(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                            metadata=metadata, timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert c.health() == "SERVING"  # the standard health service needs no token


def test_reflection_with_a_token_lists_the_services(secured):
    with client(secured) as c:
        reflection = c.channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        (reply,) = list(reflection(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                   metadata=c.metadata, timeout=10))
        names = {s.name for s in reply.list_services_response.service}
        assert "sinkstream.v1.SinkStream" in names


def test_health_port_is_plaintext_health_only(secured):
    with grpc.insecure_channel(f"127.0.0.1:{secured.server.health_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "sinkstream.v1.SinkStream"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with SinkStreamClient(f"127.0.0.1:{secured.server.health_port}", timeout=10, retry_attempts=1,
                              channel=channel, token=ALICE) as api:
            assert code_of(api.model_info) == grpc.StatusCode.UNIMPLEMENTED  # no API on that port


def test_a_token_file_that_does_not_parse_is_refused_at_start(model_dir, tmp_path):
    for text, why in [("short alice\n", "at least"), (f"{ALICE}\n", "TOKEN TENANT"),
                      (f"{ALICE} ../x\n", "not a valid name"), (f"{ALICE} a\n{ALICE} b\n", "twice"),
                      ("# nothing\n", "no tokens")]:
        path = tmp_path / "tokens"
        path.write_text(text)
        with pytest.raises(ValueError, match=why) as err:
            start_server(model_dir, auth_tokens=path)
        assert ALICE not in str(err.value)  # tokens never appear in messages


# ---------------------------------------------------------------------- binding without tokens
def test_without_tokens_only_loopback_unless_insecure_allow_remote(model_dir):
    loaded = stories(model_dir)
    with pytest.raises(ValueError, match="--insecure-allow-remote"):
        ServerThread(ServerConfig(model=str(model_dir), host="0.0.0.0", port=0), loaded)
    srv = ServerThread(ServerConfig(model=str(model_dir), host="0.0.0.0", port=0, grace_s=0.5,
                                    insecure_allow_remote=True), loaded)
    try:
        with SinkStreamClient(f"127.0.0.1:{srv.port}", timeout=10) as c:
            assert c.health() == "SERVING"
    finally:
        srv.stop()


# ---------------------------------------------------------------------- tenants
@pytest.fixture(scope="module")
def reference(model_dir):
    return reference_chat(stories(model_dir), CONFIG, [(t, CORE_PARAMS) for t in TURNS], seed=SEED)


def turn(session, text: str) -> tuple[list[int], str, str]:
    session.append_text(text)
    result = session.generate(PARAMS)
    return [t.token_id for t in result.tokens], result.text, result.stop_reason


def not_found_message(call) -> str:
    with pytest.raises(SinkStreamError) as err:
        call()
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    return str(err.value)


def test_tenants_cannot_see_or_touch_each_others_sessions(secured, reference):
    with client(secured, ALICE) as alice, client(secured, BOB) as bob:
        replies = []
        with alice.open_session(SETTINGS, seed=SEED) as session:  # a server-chosen id
            own_id = session.id
            replies.append(turn(session, TURNS[0]))
        with alice.open_session(SETTINGS, session_id="chat-1") as named:
            named.append_text("Alice's private text")
        with alice.open_session(SETTINGS, session_id="closed-1") as closed:
            closed.close()
        before = {s.session_id: s for s in alice.list_sessions()}
        assert {own_id, "chat-1"} <= set(before) and "closed-1" not in before  # (+ earlier tests')
        assert len(own_id) >= 32  # 128 random bits, in hex

        assert bob.list_sessions() == []
        for sid in (own_id, "chat-1", "closed-1"):
            unknown = sid[::-1] + "-never-used"
            expected = not_found_message(partial(bob.get_session, unknown)).replace(repr(unknown), repr(sid))
            assert not_found_message(partial(bob.get_session, sid)) == expected  # no hint it exists
            assert not_found_message(partial(bob.delete_session, sid)) == expected
            assert not_found_message(partial(bob.resume_session, sid)) == expected  # and so no append

        with bob.open_session(SETTINGS, session_id="chat-1") as bobs:  # ids are namespaced per tenant
            bobs.append_text("Bob's own text")
        assert [s.session_id for s in bob.list_sessions()] == ["chat-1"]

        after = {s.session_id: s for s in alice.list_sessions()}
        assert after == before  # unchanged: same tokens seen, same state
        for text in TURNS[1:]:
            with alice.resume_session(own_id) as session:
                replies.append(turn(session, text))
        assert replies == reference  # the owner's session continued exactly as if alone
        assert alice.get_session("chat-1").tokens_seen == before["chat-1"].tokens_seen
        bob.delete_session("chat-1")
        assert alice.get_session("chat-1").tokens_seen == before["chat-1"].tokens_seen
        alice.delete_session("chat-1")
        alice.delete_session(own_id)


def test_tenants_sessions_persist_under_their_tenant(model_dir, tmp_path, tokens_file):
    state = tmp_path / "state"
    srv = start_server(model_dir, auth_tokens=tokens_file, state_dir=state, idle_evict_s=0)
    try:
        for token, text in ((ALICE, "Alice's text"), (BOB, "Bob's longer text than Alice's")):
            with SinkStreamClient(srv.address, timeout=30, token=token) as c, \
                    c.open_session(SETTINGS, session_id="chat-1") as session:
                session.append_text(text)
                session.flush()
        seen = {}
        for token in (ALICE, BOB):
            with SinkStreamClient(srv.address, timeout=30, token=token) as c:
                seen[token] = c.get_session("chat-1").tokens_seen
        assert seen[ALICE] != seen[BOB]
    finally:
        srv.stop()
    assert sorted(p.relative_to(state).as_posix() for p in state.rglob("*.safetensors")) == [
        "tenants/alice/chat-1.safetensors", "tenants/bob/chat-1.safetensors"]
    srv = start_server(model_dir, auth_tokens=tokens_file, state_dir=state)
    try:
        for token in (ALICE, BOB):
            with SinkStreamClient(srv.address, timeout=30, token=token) as c:
                assert [s.session_id for s in c.list_sessions()] == ["chat-1"]
                assert c.get_session("chat-1").tokens_seen == seen[token]
    finally:
        srv.stop()


# ---------------------------------------------------------------------- SIGHUP
def test_sighup_reloads_tokens_and_keeps_them_on_a_bad_file(model_dir, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{ALICE} alice\n{BOB} bob\n")
    proc = subprocess.Popen([sys.executable, "-m", "sinkstream", "serve", "--model", str(model_dir),
                             "--port", "0", "--auth-tokens", str(tokens), "--grace", "0.5", "--plain-logs"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)  # line by line
    reader.start()
    try:
        line = proc.stdout.readline()
        assert line.startswith("sinkstream: listening on "), line
        address = line.split()[3]

        def status(token: str) -> grpc.StatusCode:
            with SinkStreamClient(address, timeout=10, retry_attempts=1, token=token) as c:
                try:
                    c.list_sessions()
                except SinkStreamError as exc:
                    return exc.code
                return grpc.StatusCode.OK

        assert [status(t) for t in (ALICE, BOB, CAROL)] == [grpc.StatusCode.OK, grpc.StatusCode.OK,
                                                             grpc.StatusCode.UNAUTHENTICATED]
        with SinkStreamClient(address, timeout=30, token=BOB) as c:
            expected = len(c.tokenize("Once upon a time there was a dog", add_bos=True))
            attached = c.open_session(SETTINGS)  # a stream open across the reload
            attached.append_text("Once upon a time")
            tokens.write_text(f"{ALICE} alice\n{CAROL} carol\n")
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: status(CAROL) == grpc.StatusCode.OK)
            assert status(BOB) == grpc.StatusCode.UNAUTHENTICATED  # removed
            assert status(ALICE) == grpc.StatusCode.OK
            attached.append_text(" there was a dog")  # the stream opened before the reload goes on
            assert attached.close().tokens_seen == expected  # (a token checks calls as they start)
        tokens.write_text("not a tokens file\n")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: any("tokens not reloaded" in line for line in log))
        assert status(CAROL) == grpc.StatusCode.OK  # the previous tokens stay in force
        assert status(BOB) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        reader.join(10)
    text = "".join(log)
    assert "no --auth-tokens" not in text and "tokens reloaded" in text
    assert CAROL not in text and ALICE not in text and BOB not in text  # tokens are never logged


def wait_until(predicate, tries: int = 400) -> None:
    for _ in range(tries):
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_serve_options_make_the_security_config():
    from pathlib import Path

    from sinkstream.clients.cli.serve import build_parser, config_from_args, tls_files
    from sinkstream.service.quotas import TenantQuotas

    parser = build_parser()
    args = parser.parse_args(["--model", "m", "--tls-cert", "c.pem", "--tls-key", "k.pem",
                              "--tls-client-ca", "ca.pem", "--auth-tokens", "tokens", "--health-port", "9",
                              "--tenant-max-sessions", "3", "--tenant-max-rows", "2", "--max-batch-tokens",
                              "128", "--stalled-reader-timeout", "5", "--insecure-allow-remote"])
    config = config_from_args(args, tls_files(parser, args))
    assert config.tls == TLSFiles(Path("c.pem"), Path("k.pem"), Path("ca.pem"))
    assert (config.auth_tokens, config.health_port, config.insecure_allow_remote) == (Path("tokens"), 9, True)
    assert config.quotas == TenantQuotas(max_sessions=3, max_rows=2)
    assert (config.max_batch_tokens, config.stalled_reader_s) == (128, 5.0)
    defaults = parser.parse_args(["--model", "m"])
    assert tls_files(parser, defaults) is None and config_from_args(defaults).auth_tokens is None
    for alone in (["--tls-cert", "c.pem"], ["--tls-key", "k.pem"], ["--tls-client-ca", "ca.pem"]):
        with pytest.raises(SystemExit):
            tls_files(parser, parser.parse_args(["--model", "m", *alone]))


def test_reloaded_certificates_serve_new_connections_and_open_streams_go_on(model_dir, tmp_path, tokens_file):
    """What SIGHUP runs (SinkStreamServer.reload): new handshakes get the new certificate, a stream on a
    connection made before goes on."""
    first, second = CertificateAuthority(tmp_path / "ca1"), CertificateAuthority(tmp_path / "ca2", "CA two")
    live = TLSFiles(tmp_path / "server.crt", tmp_path / "server.key")
    issued = first.issue("server", server=True)
    live.cert.write_bytes(issued.cert.read_bytes())
    live.key.write_bytes(issued.key.read_bytes())
    srv = start_server(model_dir, tls=live, auth_tokens=tokens_file)
    try:
        with client(srv, tls_ca=first.cert) as old:
            session = old.open_session(SETTINGS)
            session.append_text("Once upon a time")
            renewed = second.issue("server", server=True)
            live.cert.write_bytes(renewed.cert.read_bytes())
            live.key.write_bytes(renewed.key.read_bytes())

            async def reload() -> None:
                srv.server.reload()
            srv.call(reload())
            with client(srv, tls_ca=second.cert) as new:
                assert new.model_info().name == "stories260K"
            own_pool = [("grpc.use_local_subchannel_pool", 1)]  # a new connection, not old's
            with grpc.secure_channel(srv.address, grpc.ssl_channel_credentials(first.cert.read_bytes()),
                                     options=own_pool) as channel, \
                    SinkStreamClient(srv.address, channel=channel, token=ALICE, timeout=10) as stale:
                assert code_of(stale.model_info) == grpc.StatusCode.UNAVAILABLE
            session.append_text(" there was a dog")  # the old stream goes on
            expected = len(old.tokenize("Once upon a time there was a dog", add_bos=True))
            assert session.close().tokens_seen == expected
    finally:
        srv.stop()
