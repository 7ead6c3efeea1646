"""Stream rows: opening one never disturbs anything outside the engine."""

from __future__ import annotations

import torch
from tiny_models import tiny_model

from sinkstream.core.config import StreamConfig
from sinkstream.core.streaming import StreamingInference


def test_unseeded_row_leaves_the_global_rng_alone():
    engine = StreamingInference(tiny_model("llama"), StreamConfig(sink_tokens=4, window=28, chunk=8))
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    engine.open_row()  # no seed: the row draws its own entropy
    assert torch.equal(torch.rand(4), expected)


def test_unseeded_rows_sample_differently_and_seeded_rows_repeat():
    config = StreamConfig(sink_tokens=4, window=28, chunk=8)
    engine = StreamingInference(tiny_model("llama"), config, max_rows=4)
    a, b = engine.open_row(), engine.open_row()
    c, d = engine.open_row(seed=7), engine.open_row(seed=7)
    draw = [torch.rand(8, generator=engine.generators[r]) for r in (a, b, c, d)]
    assert not torch.equal(draw[0], draw[1])
    assert torch.equal(draw[2], draw[3])

