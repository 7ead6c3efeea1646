"""`StreamConfig.keep_rotated_keys`: keys kept rotated between passes in a drifting frame (core.sink_cache)
must give what re-rotating every key at every pass gives, however the stream is chunked, batched, saved
and restored, and the fast path must actually run."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from batched_streams import feed_batched
from service_support import reference_chat, start_server, stories
from tiny_models import FAMILIES, tiny_model
from transformers import AutoModelForCausalLM

from sinkstream.clients.client import SinkStreamClient
from sinkstream.clients.results import GenerateParams, SessionSettings
from sinkstream.core.config import StreamConfig, TierSpec
from sinkstream.core.sampling import SamplingParams
from sinkstream.core.sink_cache import CacheHooks, ForwardStep
from sinkstream.core.speculative import generate_speculative
from sinkstream.core.streaming import StreamingInference

# Float rounding: chunk keys arrive rotated at drifted positions, so their position-free form differs in
# the last bits (measured: up to 2.3e-5). With int8 storage such a difference can flip a code (measured:
# up to 5e-3 on one log-prob).
TOL = 1e-4
INT8_TOL = 2e-2


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()


def random_ids(n: int, seed: int) -> list[int]:
    return [1] + torch.randint(3, 512, (n - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine: StreamingInference, ids: list[int], sizes: list[int]) -> torch.Tensor:
    """Log-probs of a stream fed in pieces cycling through `sizes`, then the next-token distribution."""
    row = engine.open_row()
    out, start, i = [], 0, 0
    while start < len(ids):
        piece = ids[start : start + sizes[i % len(sizes)]]
        out.append(engine.step({row: piece})[row].logprobs)
        start, i = start + len(piece), i + 1
    return torch.cat((torch.cat(out), engine.next_logprobs(row)))


CONFIGS = [  # (config, stream length): every stream runs several frame wraps past the full window
    pytest.param(StreamConfig(sink_tokens=4, window=32, chunk=8), 260, id="sinks"),
    pytest.param(StreamConfig(sink_tokens=0, window=24, chunk=8), 200, id="no-sinks"),
    pytest.param(StreamConfig(sink_tokens=4, window=32, chunk=8, tiers=TierSpec.parse("8x4,4x4")), 260,
                 id="tiers"),
    pytest.param(StreamConfig(sink_tokens=4, window=32, chunk=8, kv_dtype="int8"), 260, id="int8"),
    # S + W + C = 512 = the trained context: no room to drift, every pass re-rotates (frame_span 0).
    pytest.param(StreamConfig(sink_tokens=4, window=444, chunk=64), 600, id="no-drift-room"),
]


@pytest.mark.parametrize("config, length", CONFIGS)
@pytest.mark.parametrize("sizes", [[1], [8, 1, 3, 1, 1, 5]], ids=["decode", "mixed"])
def test_kept_rotated_keys_equal_rotating_every_pass(model, config, length, sizes):
    ids = random_ids(length, seed=len(sizes))
    want = run(StreamingInference(model, config), ids, sizes)
    kept = StreamingInference(model, replace(config, keep_rotated_keys=True))
    got = run(kept, ids, sizes)
    assert kept.cache.tokens_seen[0] == len(ids)
    tol = INT8_TOL if config.kv_dtype == "int8" else TOL
    assert torch.allclose(got, want, atol=tol, equal_nan=True)


class PassRecorder(CacheHooks):
    """Records whether each pass updated the kept rotated keys incrementally."""

    def __init__(self) -> None:
        self.incremental: list[bool] = []

    def step_started(self, step: ForwardStep) -> None:
        self.incremental.append(step.incremental)


def test_decode_rotates_only_new_keys_except_when_the_frame_wraps(model):
    config = StreamConfig(sink_tokens=4, window=32, chunk=8, keep_rotated_keys=True)
    engine = StreamingInference(model, config)
    recorder = PassRecorder()
    engine.cache.set_hooks(recorder)
    assert engine.cache.frame_span == 32
    row = engine.open_row()
    ids = random_ids(200, seed=5)
    for token in ids:
        engine.step({row: [token]})
    # One token per pass. Before pass i, i - 32 tokens have left the window; the first 4 became sinks, so
    # the anchor (window start - prefix slots) is i - 36 from pass 36 on, and the frame re-bases (a full
    # rotation) whenever it reaches a multiple of 32. The first pass has no frame yet.
    wraps = [i for i in range(37, len(ids)) if (i - 36) % 32 == 0]
    full = [i for i, inc in enumerate(recorder.incremental) if not inc]
    assert full == [0, *wraps]


def test_kept_rotated_keys_batched_rows_equal_each_stream_alone(model):
    config = StreamConfig(sink_tokens=4, window=40, chunk=16, keep_rotated_keys=True)
    streams = [random_ids(n, seed) for n, seed in ((150, 1), (97, 2), (201, 3))]
    sizes = [16, 1, 3]
    alone = [run(StreamingInference(model, replace(config, keep_rotated_keys=False)), s, [size])
             for s, size in zip(streams, sizes, strict=True)]
    engine = StreamingInference(model, config, max_rows=4)  # 3 of 4 rows: passes gather their rows
    rows = [engine.open_row() for _ in streams]
    got = feed_batched(engine, rows, streams, sizes)
    for i, row in enumerate(rows):
        mine = torch.cat((got[i], engine.next_logprobs(row)))
        assert torch.allclose(mine, alone[i], atol=TOL, equal_nan=True)


def test_restored_row_continues_as_the_uninterrupted_stream(model):
    config = StreamConfig(sink_tokens=4, window=32, chunk=8, keep_rotated_keys=True)
    ids = random_ids(300, seed=9)
    whole = run(StreamingInference(model, config), ids, [1])
    first = StreamingInference(model, config)
    row = first.open_row()
    for token in ids[:170]:
        first.step({row: [token]})
    tensors, meta = first.snapshot(row)
    second = StreamingInference(model, config, max_rows=2)
    second.open_row()  # the restored stream lands on another row
    other = second.open_row()
    second.restore(other, {k: v.clone() for k, v in tensors.items()}, meta)
    rest = [second.step({other: [t]})[other].logprobs for t in ids[170:]]
    got = torch.cat((*rest, second.next_logprobs(other)))
    assert torch.allclose(got, whole[170:], atol=TOL, equal_nan=True)


def test_speculation_with_kept_rotated_keys_is_plain_greedy(model):
    config = StreamConfig(sink_tokens=4, window=64, chunk=8, keep_rotated_keys=True)
    prompt = random_ids(20, seed=4) * 3
    params = SamplingParams(temperature=0.0, max_new_tokens=60)

    def tokens(k: int) -> list[int]:
        engine = StreamingInference(model, config)
        row = engine.open_row()
        for _ in engine.append(row, prompt):
            pass
        return [t.token_id for t in generate_speculative(engine, row, params, k=k)]

    assert tokens(4) == tokens(0)


def test_server_with_kept_rotated_keys_generates_what_the_plain_core_does(model_dir):
    """`serve --keep-rotated-keys on`: a session's greedy reply over a sliding 24-token window is the
    in-process core's without the option, token for token."""
    plain = StreamConfig(sink_tokens=4, window=24, chunk=8)
    params = SamplingParams(temperature=0.0, max_new_tokens=120)
    want = reference_chat(stories(model_dir), plain, [("Tom had a red kite.", params)])
    server = start_server(model_dir, defaults=replace(plain, keep_rotated_keys=True))
    try:
        with SinkStreamClient(server.address, timeout=60) as client, \
                client.open_session(SessionSettings(sink_tokens=4, window=24, chunk=8)) as session:
            session.send_text("Tom had a red kite.")
            result = session.generate(GenerateParams(temperature=0.0, max_new_tokens=120))
    finally:
        server.stop()
    assert [t.token_id for t in result.tokens] == want[0][0] and len(want[0][0]) == 120


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_keeps_rotated_keys_exactly(family):
    """Every supported family (partial rotary dims, qk norms, biases) scores a stream sliding through a
    16-token window, frame wraps included, as it does when every key is rotated at every pass."""
    model = tiny_model(family)
    config = StreamConfig(sink_tokens=2, window=16, chunk=4)
    ids = torch.randint(0, 97, (120,), generator=torch.Generator().manual_seed(3)).tolist()
    want = run(StreamingInference(model, config), ids, [1, 4, 2])
    got = run(StreamingInference(model, replace(config, keep_rotated_keys=True)), ids, [1, 4, 2])
    assert torch.allclose(got, want, atol=TOL, equal_nan=True)
