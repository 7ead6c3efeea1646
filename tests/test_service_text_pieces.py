"""Over gRPC: the same text sent as one message or as many random pieces gives the same tokens and the same
per-token log-probabilities (the server tokenizes incrementally and feeds whole chunks as they complete)."""

from __future__ import annotations

import random

import pytest
from service_support import start_server

from sinkstream.clients.client import SinkStreamClient
from sinkstream.clients.results import SessionSettings

MIXED_IN = ["é", "日本語", "😀", "👍🏽", "naïve", "  ", "\n", "—", "中文"]


@pytest.fixture(scope="module")
def server(model_dir):
    srv = start_server(model_dir)
    yield srv
    srv.stop()


def random_pieces(text: str, rng: random.Random, count: int) -> list[str]:
    cuts = sorted(rng.randrange(len(text) + 1) for _ in range(count))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def test_one_message_and_random_pieces_give_identical_logprobs(server, sotu_path):
    rng = random.Random(11)
    sotu = sotu_path.read_text(encoding="utf-8")
    start = rng.randrange(len(sotu) - 5000)
    text = sotu[start:start + 4000]
    for _ in range(20):
        pos = rng.randrange(len(text))
        text = text[:pos] + rng.choice(MIXED_IN) + text[pos:]
    # window 124: the stream runs through many evictions, so chunk boundaries would matter if they moved
    settings = SessionSettings(sink_tokens=4, window=124, chunk=64, logprobs=True, token_ids=True)
    results = []
    with SinkStreamClient(server.address, timeout=60) as client:
        for pieces in ([text], random_pieces(text, rng, 300)):
            with client.open_session(settings) as session:
                chunks = list(session.stream_text(pieces))
            results.append(([i for c in chunks for i in c.token_ids],
                            [lp for c in chunks for lp in c.logprobs]))
        reference_ids = client.tokenize(text, add_bos=True)
    (one_ids, one_lp), (piece_ids, piece_lp) = results
    assert one_ids == piece_ids == reference_ids
    assert len(one_ids) > 1000
    assert str(one_lp) == str(piece_lp)  # bit-identical, NaN first entry included
