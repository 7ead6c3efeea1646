"""Stream rows: opening one never disturbs anything outside the engine."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from core.config import StreamConfig
from core.model_loading import UnsupportedModelError
from core.streaming import StreamingInference


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


def test_a_model_without_rope_fields_is_refused_clearly():
    from transformers import MambaConfig, MambaForCausalLM

    mamba = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=4))
    with pytest.raises(UnsupportedModelError, match="model_type 'mamba' is not supported"):
        StreamingInference(mamba, StreamConfig())


def test_a_failed_snapshot_write_leaves_no_file(tmp_path, monkeypatch):
    import core.snapshot as snapshot

    engine = StreamingInference(tiny_model("llama"), StreamConfig(sink_tokens=4, window=28, chunk=8))
    row = engine.open_row(seed=0)
    list(engine.append(row, list(range(3, 40))))

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snapshot, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        snapshot.save_snapshot(tmp_path / "s.safetensors", *engine.snapshot(row))
    assert list(tmp_path.iterdir()) == []
