"""Ingest and generation over gRPC equal the in-process core for the same settings."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from service_support import pieces, reference_chat, reference_chunks, start_server, stories

from sinkstream.clients.client import SinkStreamClient
from sinkstream.clients.results import GenerateParams, SessionSettings
from sinkstream.clients.results import TierSpec as ClientTier
from sinkstream.core.config import StreamConfig, TierSpec
from sinkstream.core.sampling import SamplingParams

PUBLISHED = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
             "One day, she saw a big, red ball. She wanted to play with it, but it was too high.")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    # Sessions of 6 cache shapes, at most 4 in memory at once: idle ones go to disk to make room.
    srv = start_server(model_dir, state_dir=tmp_path_factory.mktemp("state"), max_cache_shapes=4)
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    with SinkStreamClient(server.address, timeout=60) as c:
        yield c


def test_sotu_stream_totals_equal_in_process(client, model_dir, sotu_path):
    # 40k characters (~20k tokens): well past the 512-token trained context, through many evictions.
    text = sotu_path.read_text(encoding="utf-8")[:40_000]
    config = StreamConfig(sink_tokens=4, window=124, chunk=64)
    settings = SessionSettings(sink_tokens=4, window=124, chunk=64, logprobs=True)
    with client.open_session(settings) as session:
        chunks = list(session.stream_text(pieces(text, 8192)))
        flushed = session.last_flush
    want = reference_chunks(stories(model_dir), config, pieces(text, 8192))
    assert [c.num_tokens for c in chunks] == [len(r.token_ids) for r in want]
    got_lp = torch.tensor([lp for c in chunks for lp in c.logprobs])
    want_lp = torch.cat([r.logprobs for r in want])
    assert torch.allclose(got_lp, want_lp, atol=1e-4, equal_nan=True)
    assert chunks[-1].tokens_seen == flushed.tokens_seen == want[-1].tokens_seen > 10_000
    assert math.isclose(flushed.mean_nll, want[-1].mean_nll, rel_tol=1e-5)
    assert chunks[-1].cache.used == chunks[-1].cache.capacity == 4 + 124


def test_analysis_options_equal_in_process(client, model_dir, sotu_path):
    text = sotu_path.read_text(encoding="utf-8")[:3000]
    config = StreamConfig(sink_tokens=2, window=60, chunk=16)
    settings = SessionSettings(sink_tokens=2, window=60, chunk=16, logprobs=True, top_k=3, embeddings=True,
                               token_ids=True)
    with client.open_session(settings) as session:
        chunks = session.append_text(text)
    want = reference_chunks(stories(model_dir), config, [text], top_k=3, embeddings=True)
    assert len(chunks) == len(want)
    for got, ref in zip(chunks, want, strict=True):
        assert got.token_ids == ref.token_ids
        assert torch.allclose(torch.tensor(got.top_k_logprobs), ref.topk_logprobs, atol=1e-4, equal_nan=True)
        assert torch.equal(torch.tensor(got.top_k_ids)[1:], ref.topk_ids[1:])  # row 0 ranks NaNs
        assert torch.allclose(torch.tensor(got.embedding), ref.embedding, atol=1e-4)
    assert client.tokenize(text, add_bos=True) == [i for c in chunks for i in c.token_ids]


def test_published_reference_output_over_grpc(client):
    with client.open_session() as session:
        session.append_text("Once upon a time")
        result = session.generate(GenerateParams(max_new_tokens=400, stop_sequences=("too high.",),
                                                 include_stop_sequence=True))
    assert "Once upon a time" + result.text == PUBLISHED
    assert result.stop_reason == "STOP_SEQUENCE"
    assert result.tokens[0].token_id == 432  # ","


def test_sampled_generation_equals_in_process(client, model_dir):
    prompt = "Tom had a red kite."
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=1234,
                            max_new_tokens=48)
    want = reference_chat(stories(model_dir), StreamConfig(sink_tokens=4, window=60, chunk=8),
                          [(prompt, params)])
    with client.open_session(SessionSettings(sink_tokens=4, window=60, chunk=8)) as session:
        session.send_text(prompt)  # no flush: Generate flushes pending text itself
        result = session.generate(GenerateParams(temperature=0.9, top_k=40, top_p=0.95,
                                                 repetition_penalty=1.1, seed=1234, max_new_tokens=48))
    assert [t.token_id for t in result.tokens] == want[0][0]
    assert result.text == want[0][1] == "".join(t.text for t in result.tokens)
    assert result.stop_reason == want[0][2]


def test_cli_analyze_and_generate_over_grpc(server, model_dir, sotu_path, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(sotu_path.read_text(encoding="utf-8")[:6000], encoding="utf-8")
    out = tmp_path / "summary.json"
    run = [sys.executable, "-m", "sinkstream"]
    subprocess.run([*run, "analyze", str(doc), "--server", server.address, "--quiet", "--window", "100",
                    "--chunk", "32", "--json", str(out)], cwd=REPO_ROOT, check=True, capture_output=True)
    summary = json.loads(out.read_text())
    want = reference_chunks(stories(model_dir), StreamConfig(sink_tokens=4, window=100, chunk=32),
                            [doc.read_text(encoding="utf-8")])
    assert summary["tokens"] == want[-1].tokens_seen
    assert math.isclose(summary["mean_nll"], want[-1].mean_nll, rel_tol=1e-5)
    printed = subprocess.run([*run, "generate", "--server", server.address, "--prompt", "Once upon a time",
                              "--max-new-tokens", "100", "--stop", "too high."], cwd=REPO_ROOT, check=True,
                             capture_output=True, text=True).stdout
    assert printed.strip() == PUBLISHED.removesuffix("too high.").strip()


def test_tiered_session_equals_in_process(client, model_dir, sotu_path):
    text = sotu_path.read_text(encoding="utf-8")[:4000]
    config = StreamConfig(sink_tokens=4, window=64, chunk=16, tiers=(TierSpec(16, 4),), merge_policy="mean")
    settings = SessionSettings(sink_tokens=4, window=64, chunk=16, tiers=(ClientTier(16, 4),),
                               merge_policy="mean", logprobs=True)
    with client.open_session(settings) as session:
        chunks = session.append_text(text)
    want = reference_chunks(stories(model_dir), config, [text])
    got_lp = torch.tensor([lp for c in chunks for lp in c.logprobs])
    assert torch.allclose(got_lp, torch.cat([r.logprobs for r in want]), atol=1e-4, equal_nan=True)
    assert chunks[-1].cache.tier_used[0] > 0
