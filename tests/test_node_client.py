"""The Node.js client (clients/node, stubs built at run time from protos/) end to end against a live server:
its token counts, perplexity and greedy generation equal what the Python client gets."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import pytest
from conftest import REPO_ROOT
from service_support import start_server

from clients.client import SinkStreamClient
from clients.results import GenerateParams, SessionSettings

NODE_DIR = REPO_ROOT / "clients" / "node"
PROMPT = " Once upon a time"

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


def test_node_client_streams_a_document_and_generates(server, sotu_path, tmp_path):
    text = sotu_path.read_text(encoding="utf-8")[:70_000]  # two 64 KiB pieces on the Node side
    doc = tmp_path / "doc.txt"
    doc.write_text(text, encoding="utf-8")
    proc = subprocess.run(["node", "client.js", "--server", server.address, "--file", str(doc),
                           "--prompt", PROMPT, "--max-new-tokens", "20"],
                          cwd=NODE_DIR, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    by_type: dict[str, list[dict]] = {}
    for event in events:
        by_type.setdefault(event["type"], []).append(event)

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
