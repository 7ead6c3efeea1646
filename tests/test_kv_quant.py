"""The KV cache stored as float32, bfloat16, int8 or int4 (core.kv_quant): the model-dtype path is unchanged
bit for bit, int8 and int4 storage de-quantise to what plain reference quantisers written here give, and
quantised sessions snapshot and restore exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sinkstream.core.config import ConfigError, StreamConfig, TierSpec
from sinkstream.core.kv_quant import KVStorage
from sinkstream.core.snapshot import load_snapshot, save_snapshot
from sinkstream.core.streaming import StreamingInference

SHAPES = dict(sink_tokens=4, window=40, chunk=16, tiers=TierSpec.parse("8x4"))


@pytest.fixture(scope="module")
def model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()


def token_stream(n: int, vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine: StreamingInference, ids: list[int]) -> tuple[int, torch.Tensor]:
    row = engine.open_row(seed=0)
    return row, torch.cat([r.logprobs for r in engine.append(row, ids)])


def reference_int8(x: torch.Tensor) -> torch.Tensor:
    """De-quantised x [..., D]: each vector scaled by max|x| / 127, rounded to integers in -127..127."""
    scale = x.abs().amax(-1, keepdim=True) / 127
    q = torch.where(scale > 0, torch.round(x / scale), torch.zeros_like(x)).clamp(-127, 127)
    return q * scale


def put_and_read(storage: KVStorage, heads: int, dim: int, gen: torch.Generator):
    """Put random keys (with outlier channels) and values (one all-zero vector) of two rows at scattered
    slots of layer 1 (the chunk path), read them back: (keys, values, read keys, read values), each
    [2, H, 4, D]."""
    keys = torch.randn(2, heads, 4, dim, generator=gen) * torch.logspace(-3, 2, dim)
    values = torch.randn(2, heads, 4, dim, generator=gen)
    values[0, 0, 0] = 0.0
    chosen_rows, chosen_slots = torch.tensor([2, 0]), torch.tensor([[1, 3, 5, 7], [0, 2, 4, 6]])
    index = (chosen_rows[:, None, None], torch.arange(heads)[None, :, None], chosen_slots[:, None, :])
    storage.put(1, index, keys, values)
    read_k, read_v = storage.read(1, chosen_rows)
    written = (torch.arange(2)[:, None, None], torch.arange(heads)[None, :, None], chosen_slots[:, None, :])
    return keys, values, read_k[written], read_v[written]


def reference_int4(x: torch.Tensor, group: int) -> torch.Tensor:
    """De-quantised x [..., D]: each run of `group` elements mapped to 16 levels from its min to its max."""
    *lead, d = x.shape
    out = torch.empty_like(x)
    for start in range(0, d, group):
        g = x[..., start : start + group]
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        step = (hi - lo) / 15
        q = torch.where(step > 0, torch.round((g - lo) / step), torch.zeros_like(g)).clamp(0, 15)
        out[..., start : start + group] = lo + q * step
    return out


@pytest.mark.parametrize("dim, group", [(64, 32), (8, 8), (48, 16)])
def test_storage_int4_matches_reference_quantiser(dim, group):
    """put/read and assign/gather de-quantise to the reference's values, within half a step of the
    original; the codes take half a byte per element; zero vectors stay zero; a move is exact."""
    layers, rows, heads, slots = 2, 3, 2, 10
    storage = KVStorage((layers, rows, heads, slots, dim), "int4", torch.float32, torch.device("cpu"))
    assert storage.keys.shape[-1] == dim // 2 and storage.keys.dtype == torch.uint8
    assert storage.key_scales.shape[-1] == 2 * dim // group
    gen = torch.Generator().manual_seed(7)
    keys, values, got_k, got_v = put_and_read(storage, heads, dim, gen)
    for got, x in ((got_k, keys), (got_v, values)):
        # float rounding only (a code off by one would be a whole step, (max - min) / 15, off)
        torch.testing.assert_close(got, reference_int4(x, group), rtol=1e-5, atol=1e-6 * float(x.abs().max()))
        spread = x.reshape(*x.shape[:-1], -1, group)
        half_step = ((spread.amax(-1) - spread.amin(-1)) / 30).repeat_interleave(group, -1)
        assert bool(((got - x).abs() <= half_step * (1 + 1e-4) + 1e-6).all())
    assert bool((got_v[0, 0, 0] == 0).all())
    tier_k = torch.randn(layers, heads, 3, dim, generator=gen)
    tier_v = torch.randn(layers, heads, 3, dim, generator=gen)
    storage.assign(1, 4, tier_k, tier_v)
    back_k, back_v = storage.gather(1, torch.tensor([4, 5, 6]))
    torch.testing.assert_close(back_k, reference_int4(tier_k, group), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(back_v, reference_int4(tier_v, group), rtol=1e-5, atol=1e-6)
    storage.move(1, slice(0, 3), torch.tensor([4, 5, 6]))
    moved_k, moved_v = storage.gather(1, torch.tensor([0, 1, 2]))
    assert torch.equal(moved_k, back_k) and torch.equal(moved_v, back_v)


def test_storage_int8_matches_reference_quantiser():
    """put/read (chunk path) and assign/gather (tier path) de-quantise to the reference's values, and every
    element is within half a quantisation step (max|x| / 254) of the original; zero vectors stay zero."""
    layers, rows, heads, slots, dim = 2, 3, 2, 10, 8
    storage = KVStorage((layers, rows, heads, slots, dim), "int8", torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    keys, values, got_k, got_v = put_and_read(storage, heads, dim, gen)
    for got, x in ((got_k, keys), (got_v, values)):
        torch.testing.assert_close(got, reference_int8(x), rtol=1e-6, atol=0)
        bound = x.abs().amax(-1, keepdim=True) / 254
        assert bool(((got - x).abs() <= bound * (1 + 1e-5)).all())
    assert bool((got_v[0, 0, 0] == 0).all())

    tier_k = torch.randn(layers, heads, 3, dim, generator=gen)
    tier_v = torch.randn(layers, heads, 3, dim, generator=gen)
    storage.assign(1, 4, tier_k, tier_v)
    back_k, back_v = storage.gather(1, torch.tensor([4, 5, 6]))
    torch.testing.assert_close(back_k, reference_int8(tier_k), rtol=1e-6, atol=0)
    torch.testing.assert_close(back_v, reference_int8(tier_v), rtol=1e-6, atol=0)
    # a move copies the stored bytes: no second rounding
    storage.move(1, slice(0, 3), torch.tensor([4, 5, 6]))
    moved_k, moved_v = storage.gather(1, torch.tensor([0, 1, 2]))
    assert torch.equal(moved_k, back_k) and torch.equal(moved_v, back_v)


def test_storage_bfloat16_is_a_round_to_bfloat16():
    storage = KVStorage((1, 1, 1, 4, 8), "bfloat16", torch.float32, torch.device("cpu"))
    x = torch.randn(1, 1, 4, 8, generator=torch.Generator().manual_seed(2))
    index = (torch.tensor([0])[:, None, None], torch.arange(1)[None, :, None], torch.arange(4)[None, None, :])
    storage.put(0, index, x, -x)
    k, v = storage.read(0, None)
    assert torch.equal(k, x.bfloat16().float()) and torch.equal(v, (-x).bfloat16().float())


@pytest.mark.parametrize("shapes", [dict(sink_tokens=4, window=40, chunk=16), SHAPES])
def test_float32_kv_dtype_is_the_model_path_bit_for_bit(model, shapes):
    """On a float32 model, kv_dtype float32 and the default give identical logprobs and identical storage
    after the window has wrapped many times (and the tiers filled)."""
    ids = token_stream(300, model.config.vocab_size)
    default = StreamingInference(model, StreamConfig(**shapes))
    explicit = StreamingInference(model, StreamConfig(**shapes, kv_dtype="float32"))
    row_a, lp_a = run(default, ids)
    row_b, lp_b = run(explicit, ids)
    torch.testing.assert_close(lp_a, lp_b, rtol=0, atol=0, equal_nan=True)  # the first token's is NaN
    assert torch.equal(default.cache.keys, explicit.cache.keys)
    assert torch.equal(default.cache.values, explicit.cache.values)
    assert default.cache_bytes == explicit.cache_bytes


@pytest.mark.parametrize("kv_dtype, within", [("bfloat16", 0.02), ("int8", 0.02), ("int4", 0.05)])
def test_quantised_cache_stays_close_to_float(model, kv_dtype, within):
    """A stream through a bfloat16, int8 or int4 cache (keys rotated after de-quantisation) scores every
    token close to the float32 cache: if positions were wrong the NLL would not stay within 2% (int4: 5%)."""
    ids = token_stream(300, model.config.vocab_size, seed=3)
    _, reference = run(StreamingInference(model, StreamConfig(**SHAPES)), ids)
    engine = StreamingInference(model, StreamConfig(**SHAPES, kv_dtype=kv_dtype))
    _, got = run(engine, ids)
    ref_nll, got_nll = -float(reference[1:].mean()), -float(got[1:].mean())
    assert abs(got_nll - ref_nll) / ref_nll < within
    assert float((got[1:] - reference[1:]).abs().max()) < 0.5 if kv_dtype != "int4" else 1.5
    stored = {"bfloat16": torch.bfloat16, "int8": torch.int8, "int4": torch.uint8}
    assert engine.cache.keys.dtype == stored[kv_dtype]


def test_int8_cache_bytes_are_smaller(model):
    config = StreamConfig(**SHAPES)
    plain = StreamingInference(model, config)
    int8 = StreamingInference(model, StreamConfig(**SHAPES, kv_dtype="int8"))
    layers, rows, heads, slots, dim = plain.cache.keys.shape
    vectors = 2 * layers * rows * heads * slots
    assert plain.cache.storage.nbytes == vectors * dim * 4
    # int8 data and a float32 scale per vector, plus a float32 read workspace [rows, H, N, D] for each
    assert int8.cache.storage.nbytes == vectors * (dim + 4) + 2 * rows * heads * slots * dim * 4


@pytest.mark.parametrize("kv_dtype, stored", [("int8", torch.int8), ("int4", torch.uint8)])
def test_quantised_snapshot_restores_exactly(model, tmp_path, kv_dtype, stored):
    """An int8 or int4 session saved to a file and restored into a fresh engine continues exactly as the
    original: same logprobs, same stored data and scales."""
    config = StreamConfig(**SHAPES, kv_dtype=kv_dtype)
    ids = token_stream(260, model.config.vocab_size, seed=4)
    first = StreamingInference(model, config)
    row, _ = run(first, ids[:200])
    tensors, meta = first.snapshot(row)
    assert set(tensors) >= {"key_scales", "value_scales"} and tensors["keys"].dtype == stored
    save_snapshot(tmp_path / "s.safetensors", tensors, meta)
    second = StreamingInference(model, config, max_rows=2)
    second.open_row()  # restore into row 1, not the row the snapshot came from
    other = second.open_row()
    second.restore(other, *load_snapshot(tmp_path / "s.safetensors"))
    cont_a = torch.cat([r.logprobs for r in first.append(row, ids[200:])])
    cont_b = torch.cat([r.logprobs for r in second.append(other, ids[200:])])
    torch.testing.assert_close(cont_a, cont_b, rtol=0, atol=0)
    for a, b in zip(first.cache.storage.tensors(), second.cache.storage.tensors(), strict=True):
        assert torch.equal(a[:, row], b[:, other])


@pytest.mark.parametrize("saved, loaded", [("int8", "model"), ("int4", "int8"), ("int8", "int4")])
def test_snapshot_of_another_kv_dtype_is_refused(model, saved, loaded):
    source = StreamingInference(model, StreamConfig(**SHAPES, kv_dtype=saved))
    row, _ = run(source, token_stream(50, model.config.vocab_size))
    target_engine = StreamingInference(model, StreamConfig(**SHAPES, kv_dtype=loaded))
    target = target_engine.open_row()
    before = [t.clone() for t in target_engine.cache.storage.tensors()]
    with pytest.raises(ValueError, match="snapshot"):
        target_engine.restore(target, *source.snapshot(row))
    assert all(torch.equal(a, b) for a, b in zip(target_engine.cache.storage.tensors(), before, strict=True))


def test_unknown_kv_dtype_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        StreamConfig(kv_dtype="int3").validate()
    assert err.value.field == "kv_dtype"
