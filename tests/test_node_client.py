"""The Node.js client (clients/node, stubs built at run time from protos/) end to end against a live server:
its token counts, perplexity and greedy generation equal what the Python client gets, also when characters
outside the BMP (emoji) and CJK are cut by the pieces the Node client reads the file in."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import pytest
from conftest import REPO_ROOT
from service_support import start_server

from sinkstream.clients.client import SinkStreamClient
from sinkstream.clients.results import GenerateParams, SessionSettings

NODE_DIR = REPO_ROOT / "clients" / "node"
PROMPT = " Once upon a time"
NODE_PIECE_BYTES = 64 * 1024  # client.js's default --piece-bytes

pytestmark = [
    pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed"),
    pytest.mark.skipif(not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(),
                       reason="clients/node/node_modules missing: run `npm ci` in clients/node"),
]


@pytest.fixture(scope="module")
def server(model_dir):
    srv = start_server(model_dir)
    yield srv
    srv.stop()


def run_node(server, doc, *args: str) -> tuple[list[dict], dict[str, list[dict]]]:
    """client.js's events for `doc`, in order and by type."""
    proc = subprocess.run(["node", "client.js", "--server", server.address, "--file", str(doc), *args],
                          cwd=NODE_DIR, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    by_type: dict[str, list[dict]] = {}
    for event in events:
        by_type.setdefault(event["type"], []).append(event)
    return events, by_type


def cut_characters(text: str, piece_bytes: int) -> list[str]:
    """The characters of `text` whose UTF-8 bytes a cut every `piece_bytes` bytes splits."""
    cut, start = [], 0
    for ch in text:
        end = start + len(ch.encode("utf-8"))
        if start // piece_bytes != (end - 1) // piece_bytes:
            cut.append(ch)
        start = end
    return cut


def test_node_client_streams_a_document_and_generates(server, sotu_path, tmp_path):
    ascii_text = sotu_path.read_text(encoding="utf-8")[:70_000]  # two 64 KiB pieces on the Node side
    assert ascii_text.isascii()
    # an emoji (a surrogate pair in UTF-16, 4 bytes in UTF-8) across the first piece boundary, counted in
    # UTF-16 code units as well as in bytes, with CJK after it
    at = NODE_PIECE_BYTES - 1
    text = ascii_text[:at] + "😀 漢字と猫 " + ascii_text[at:]
    assert text.encode("utf-16-le")[2 * at:2 * at + 4].decode("utf-16-le") == "😀"
    assert cut_characters(text, NODE_PIECE_BYTES) == ["😀"]
    doc = tmp_path / "doc.txt"
    doc.write_text(text, encoding="utf-8")
    events, by_type = run_node(server, doc, "--prompt", PROMPT, "--max-new-tokens", "20")

    # the reference: the same requests through the Python client
    with SinkStreamClient(server.address, timeout=120) as client:
        want_ids = client.tokenize(text, add_bos=True)
        with client.open_session(SessionSettings(logprobs=True)) as session:
            want_chunks = list(session.stream_text([text]))
            want_flush = session.last_flush
            session.send_text(PROMPT)
            want_gen = session.generate(GenerateParams(max_new_tokens=20))
            session.close()

    assert events[0]["type"] == "opened" and events[-1]["type"] == "closed"
    chunks = [e for e in events if e["type"] == "chunk"]
    (flushed,) = by_type["flushed"]
    first_part = chunks[:len(want_chunks)]
    assert [c["num_tokens"] for c in first_part] == [c.num_tokens for c in want_chunks]
    assert sum(c["num_tokens"] for c in first_part) == len(want_ids) == flushed["tokens_seen"] > 20_000
    assert math.isclose(flushed["perplexity"], want_flush.perplexity, rel_tol=1e-6)
    assert all(c["cache_used"] <= 256 for c in chunks)

    (gen,) = by_type["generation"]
    assert gen["text"].strip() and gen["text"] == want_gen.text
    assert gen["generated_tokens"] == want_gen.generated_tokens == len(by_type["token"])
    assert "".join(t["text"] for t in by_type["token"]) == gen["text"]
    assert gen["stop_reason"] == f"STOP_REASON_{want_gen.stop_reason}"
    assert gen["tokens_seen"] == events[-1]["tokens_seen"] == want_gen.tokens_seen


def test_node_client_pieces_cut_inside_characters(server, tmp_path):
    # 7-byte pieces cut many 3-byte (CJK) and 4-byte (emoji, outside the BMP) characters; the tokens must
    # be those of the whole text
    text = "".join(f"Line {i}: 猫と犬 🐉 dragons 😀👍🏽 日本語のテキスト, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 café.\n" for i in range(12))
    cut = cut_characters(text, 7)
    assert any(len(ch.encode("utf-8")) == 4 for ch in cut) and any(len(ch.encode("utf-8")) == 3 for ch in cut)
    doc = tmp_path / "doc.txt"
    doc.write_text(text, encoding="utf-8")
    events, by_type = run_node(server, doc, "--piece-bytes", "7")

    with SinkStreamClient(server.address, timeout=120) as client:
        want_ids = client.tokenize(text, add_bos=True)
        with client.open_session(SessionSettings(logprobs=True)) as session:
            want_chunks = list(session.stream_text([text]))
            want_flush = session.last_flush
            session.close()

    (flushed,) = by_type["flushed"]
    assert flushed["tokens_seen"] == len(want_ids) == events[-1]["tokens_seen"]
    assert [c["num_tokens"] for c in by_type["chunk"]] == [c.num_tokens for c in want_chunks]
    assert math.isclose(flushed["perplexity"], want_flush.perplexity, rel_tol=1e-6)


def test_node_client_with_tls_and_a_token(model_dir, tmp_path):
    """Against a server with TLS and --auth-tokens: with the CA and a token it streams and generates the
    same as the Python client; without the token it is refused (UNAUTHENTICATED = 16)."""
    from tls_support import CertificateAuthority

    from sinkstream.service.tls import TLSFiles

    ca = CertificateAuthority(tmp_path / "ca")
    issued = ca.issue("server", server=True)
    token = "node-token-0123456789"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{token} node\n")
    secured = start_server(model_dir, tls=TLSFiles(issued.cert, issued.key), auth_tokens=tokens)
    try:
        doc = tmp_path / "doc.txt"
        doc.write_text("Once upon a time there was a little dog. " * 20, encoding="utf-8")
        events, by_type = run_node(secured, doc, "--tls-ca", str(ca.cert), "--token", token,
                                   "--prompt", PROMPT, "--max-new-tokens", "8")
        with SinkStreamClient(secured.address, timeout=60, token=token, tls_ca=ca.cert) as client, \
                client.open_session(SessionSettings(logprobs=True)) as session:
            list(session.stream_text([doc.read_text(encoding="utf-8")]))
            want_flush = session.last_flush
            session.send_text(PROMPT)
            want_gen = session.generate(GenerateParams(max_new_tokens=8))
            session.close()
        (flushed,) = by_type["flushed"]
        assert flushed["tokens_seen"] == want_flush.tokens_seen
        assert by_type["generation"][0]["text"] == want_gen.text

        proc = subprocess.run(["node", "client.js", "--server", secured.address, "--file", str(doc),
                               "--tls-ca", str(ca.cert)], cwd=NODE_DIR, capture_output=True, text=True,
                              timeout=180)
        assert proc.returncode != 0 and "sinkstream: 16 " in proc.stderr
        with SinkStreamClient(secured.address, timeout=60, token=token, tls_ca=ca.cert) as client:
            assert client.list_sessions() == []  # the refused client opened nothing
    finally:
        secured.stop()
