"""What a session reports about its own state is exact (issue 12, finding 7): cache occupancy counts the
attention sinks from the first token, and after a CancelGeneration the stream holds exactly the generated
tokens the client was sent."""

from __future__ import annotations

import pytest
from service_support import start_server, stories

from sinkstream.clients.client import SinkStreamClient
from sinkstream.clients.results import GenerateParams, SessionSettings
from sinkstream.core.config import StreamConfig, TierSpec
from sinkstream.core.streaming import StreamingInference

TEXT = ("Once upon a time there was a little girl named Lily. She loved to play outside in the sun. One day "
        "she saw a big red ball in the park and ran to get it. The ball was very big and shiny.")


@pytest.mark.parametrize("config", [StreamConfig(sink_tokens=4, window=24, chunk=8),
                                    StreamConfig(sink_tokens=4, window=16, chunk=4,
                                                 tiers=(TierSpec(slots=4, ratio=2),))])
def test_sink_used_counts_the_sinks_from_the_first_token(model_dir, config):
    loaded = stories(model_dir)
    engine = StreamingInference(loaded.model, config, tokenizer=loaded.tokenizer)
    row = engine.open_row()
    ids = loaded.tokenizer.encode(TEXT)
    assert len(ids) > config.sink_tokens + config.window + config.chunk
    for start in range(0, len(ids), 3):
        engine.step({row: ids[start:start + 3]})
        st = engine.stats(row)
        assert st.sink_used == min(config.sink_tokens, st.tokens_seen)
        assert st.sink_used + st.window_used + sum(st.tier_used) == st.cache_used


def test_cache_stats_report_sinks_before_the_window_is_full(model_dir):
    server = start_server(model_dir)
    try:
        with SinkStreamClient(server.address, timeout=60) as client, \
                client.open_session(SessionSettings(sink_tokens=4, window=60, chunk=8)) as session:
            first = session.append_tokens([1, 2, 3, 4, 5, 6, 7, 8])[0]
            assert (first.cache.sink_used, first.cache.window_used, first.cache.used) == (4, 4, 8)
    finally:
        server.stop()


def test_after_cancel_generation_the_stream_holds_exactly_the_tokens_sent(model_dir):
    server = start_server(model_dir)
    try:
        with SinkStreamClient(server.address, timeout=60) as client, \
                client.open_session(SessionSettings(sink_tokens=4, window=60, chunk=8)) as session:
            session.append_text(TEXT)
            before = client.get_session(session.id).tokens_seen
            received = []
            for token in session.generate_stream(GenerateParams(max_new_tokens=4000, ignore_eos=True)):
                received.append(token)
                if len(received) == 5:
                    session.cancel_generation()
            result = session.last_generation
            assert result.stop_reason == "CANCELLED"
            assert result.generated_tokens == len(received) == len(result.tokens)
            assert result.tokens_seen == before + len(received)
            assert client.get_session(session.id).tokens_seen == before + len(received)
    finally:
        server.stop()
