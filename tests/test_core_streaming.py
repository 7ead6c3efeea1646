"""StreamingInference against independent references: a dense HF forward, a plain-tensor StreamingLLM
reference written here, and the published greedy output of stories260K."""

from __future__ import annotations

import json
import math

import pytest
import torch
from batched_streams import feed_batched
from tiny_models import FAMILIES, tiny_config, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, GPT2Config, GPT2LMHeadModel

from sinkstream.core.config import ConfigError, StreamConfig, TierSpec
from sinkstream.core.generation import generate
from sinkstream.core.model_loading import load_model
from sinkstream.core.model_support import UnsupportedModelError, check_supported
from sinkstream.core.sampling import SamplingParams
from sinkstream.core.snapshot import SnapshotError, load_snapshot, save_snapshot
from sinkstream.core.streaming import NoFreeRowError, StreamingInference

REFERENCE_CONTINUATION = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
    "One day, she saw a big, red ball. She wanted to play with it, but it was too high."
)


@pytest.fixture(scope="module")
def stories(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def stream_logprobs(engine: StreamingInference, ids: list[int]) -> torch.Tensor:
    row = engine.open_row()
    return torch.cat([r.logprobs for r in engine.append(row, ids)])


def dense_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) from one plain forward pass (NaN for the first token), plus the last
    position's full next-token distribution."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits.float(), -1)[0]
    tokens = torch.tensor(ids)
    scored = lp[:-1].gather(1, tokens[1:, None])[:, 0]
    return torch.cat((torch.tensor([math.nan]), scored)), lp[-1]


# ------------------------------------------------------------------ before eviction: dense equality
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_matches_dense_forward_on_stories260k(stories, chunk):
    model, _ = stories
    ids = [1] + torch.randint(3, 512, (299,), generator=torch.Generator().manual_seed(1)).tolist()
    engine = StreamingInference(model, StreamConfig(sink_tokens=4, window=400, chunk=chunk))
    row = engine.open_row()
    got = torch.cat([r.logprobs for r in engine.append(row, ids)])
    want, want_next = dense_logprobs(model, ids)
    assert torch.isnan(got[0])
    assert (got[1:] - want[1:]).abs().max() <= 1e-4
    assert (engine.next_logprobs(row) - want_next).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_matches_dense_forward_every_family(family, chunk):
    model = tiny_model(family)
    ids = torch.randint(0, 97, (150,), generator=torch.Generator().manual_seed(2)).tolist()
    engine = StreamingInference(model, StreamConfig(sink_tokens=4, window=160, chunk=chunk))
    row = engine.open_row()
    for start in range(0, len(ids), chunk):
        piece = ids[start : start + chunk]
        got = engine.step({row: piece})[row].logprobs
        want, want_next = dense_logprobs(model, ids[: start + len(piece)])
        assert torch.allclose(got, want[start : start + len(piece)], atol=1e-4, rtol=0, equal_nan=True)
        assert (engine.next_logprobs(row) - want_next).abs().max() <= 1e-4


# ------------------------------------------------------------------ after eviction: plain reference
class ReferenceStreamingLlama:
    """StreamingLLM semantics in plain tensors for a Llama checkpoint: keep the first `sinks` tokens and
    the `window` most recent; keys stored without RoPE and rotated to their slot positions at each step;
    a chunk attends to the kept tokens as they stood before it plus its own earlier tokens."""

    def __init__(self, model, sinks: int, window: int) -> None:
        c = model.config
        self.w = {k: v.detach().float() for k, v in model.state_dict().items()}
        self.layers, self.heads = c.num_hidden_layers, c.num_attention_heads
        self.kv_heads = c.num_key_value_heads
        self.head_dim = c.hidden_size // c.num_attention_heads
        self.eps, self.sinks, self.window = c.rms_norm_eps, sinks, window
        theta = c.rope_parameters["rope_theta"]
        self.inv_freq = 1.0 / theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        self.k = [torch.zeros(self.kv_heads, 0, self.head_dim) for _ in range(self.layers)]
        self.v = [torch.zeros(self.kv_heads, 0, self.head_dim) for _ in range(self.layers)]

    def rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        ang = pos[:, None].float() * self.inv_freq[None]
        cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
        return x * cos + rotated * sin

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def heads_of(self, h: torch.Tensor, weight: str, heads: int) -> torch.Tensor:
        """Project h [n, hidden] and split into [heads, n, head_dim]."""
        return (h @ self.w[weight].T).view(h.shape[0], heads, self.head_dim).transpose(0, 1)

    def forward_chunk(self, ids: list[int]) -> torch.Tensor:
        """Log-probs [n, vocab] after each chunk token; then evicts down to sinks + window."""
        n, kept = len(ids), self.k[0].shape[1]
        pos = torch.arange(kept, kept + n)
        all_pos = torch.arange(kept + n)
        causal = torch.ones(n, kept + n, dtype=torch.bool)
        causal[:, kept:] = torch.ones(n, n, dtype=torch.bool).tril()
        x = self.w["model.embed_tokens.weight"][torch.tensor(ids)]
        group = self.heads // self.kv_heads
        for i in range(self.layers):
            p = f"model.layers.{i}."
            h = self.norm(x, self.w[p + "input_layernorm.weight"])
            q = self.heads_of(h, p + "self_attn.q_proj.weight", self.heads)
            k = self.heads_of(h, p + "self_attn.k_proj.weight", self.kv_heads)
            v = self.heads_of(h, p + "self_attn.v_proj.weight", self.kv_heads)
            self.k[i] = torch.cat((self.k[i], k), 1)  # position-free keys
            self.v[i] = torch.cat((self.v[i], v), 1)
            keys = self.rope(self.k[i], all_pos).repeat_interleave(group, 0)
            vals = self.v[i].repeat_interleave(group, 0)
            scores = self.rope(q, pos) @ keys.transpose(1, 2) / math.sqrt(self.head_dim)
            att = scores.masked_fill(~causal, -math.inf).softmax(-1) @ vals
            x = x + att.transpose(0, 1).reshape(n, -1) @ self.w[p + "self_attn.o_proj.weight"].T
            h = self.norm(x, self.w[p + "post_attention_layernorm.weight"])
            gate = torch.nn.functional.silu(h @ self.w[p + "mlp.gate_proj.weight"].T)
            x = x + (gate * (h @ self.w[p + "mlp.up_proj.weight"].T)) @ self.w[p + "mlp.down_proj.weight"].T
        logits = self.norm(x, self.w["model.norm.weight"]) @ self.w["lm_head.weight"].T
        for i in range(self.layers):
            total = self.k[i].shape[1]
            if total > self.sinks + self.window:
                keep = list(range(self.sinks)) + list(range(total - self.window, total))
                self.k[i], self.v[i] = self.k[i][:, keep], self.v[i][:, keep]
        return torch.log_softmax(logits, -1)


@pytest.mark.parametrize("chunk", [1, 8])
def test_matches_plain_reference_after_eviction(stories, chunk):
    model, _ = stories
    sinks, window = 4, 32
    ids = [1] + torch.randint(3, 512, (3 * (sinks + window) + 20,),
                              generator=torch.Generator().manual_seed(3)).tolist()
    engine = StreamingInference(model, StreamConfig(sink_tokens=sinks, window=window, chunk=chunk))
    got = stream_logprobs(engine, ids)
    ref = ReferenceStreamingLlama(model, sinks, window)
    want, prev = [math.nan], None
    for start in range(0, len(ids), chunk):
        piece = ids[start : start + chunk]
        lp = ref.forward_chunk(piece)
        if prev is None:  # the stream's first token has no prediction
            dists, targets = lp[:-1], piece[1:]
        else:
            dists, targets = torch.cat((prev[None], lp[:-1])), piece
        want += dists.gather(1, torch.tensor(targets, dtype=torch.long)[:, None])[:, 0].tolist()
        prev = lp[-1]
    want_t = torch.tensor(want)
    assert engine.cache.tokens_seen[0] == len(ids) > 3 * (sinks + window)
    assert (got[1:] - want_t[1:]).abs().max() <= 1e-4


def test_positions_stay_inside_trained_context(stories):
    model, _ = stories
    config = StreamConfig(sink_tokens=4, window=100, chunk=16)
    engine = StreamingInference(model, config)
    row = engine.open_row()
    seen = []
    original = engine.cache.begin_step

    def spy(rows, ids, lengths):
        position_ids, mask = original(rows, ids, lengths)
        seen.append(int(position_ids.max()))
        return position_ids, mask

    engine.cache.begin_step = spy
    for _ in engine.append(row, torch.randint(3, 512, (2000,)).tolist()):
        pass
    assert max(seen) == config.sink_tokens + config.window + config.chunk - 1 < 512


def test_quality_holds_past_trained_context(stories):
    """Dense attention collapses past 512 positions; the sink cache keeps NLL near its early level."""
    model, tok = stories
    engine = StreamingInference(model, StreamConfig(sink_tokens=4, window=200, chunk=64))
    row = engine.open_row()
    # A long in-distribution stream: the model's own sampled stories.
    text_ids = tok("Once upon a time")["input_ids"]
    list(engine.append(row, text_ids))
    params = SamplingParams(temperature=1.0, seed=7, max_new_tokens=2800, stop_on_eos=False)
    ids = text_ids + [t.token_id for t in generate(engine, row, params)]
    dense_lp, _ = dense_logprobs(model, ids)
    stream_lp = stream_logprobs(StreamingInference(model, StreamConfig(4, 200, 64)), ids)
    late = slice(2300, len(ids))
    assert -stream_lp[late].mean() < 0.6 * -dense_lp[late].mean()


# ------------------------------------------------------------------ generation
def test_greedy_reproduces_published_reference(stories):
    model, tok = stories
    engine = StreamingInference(model, StreamConfig(sink_tokens=4, window=200, chunk=32), tokenizer=tok)
    row = engine.open_row()
    prompt = tok("Once upon a time")["input_ids"]
    assert prompt == [1, 403, 407, 261, 378]
    list(engine.append(row, prompt))
    out = list(generate(engine, row, SamplingParams(max_new_tokens=200, stop_on_eos=False), tok))
    text = "Once upon a time" + "".join(t.text for t in out)
    assert text.startswith(REFERENCE_CONTINUATION)


def test_seeded_sampling_is_reproducible(stories):
    model, tok = stories
    runs = []
    for _ in range(2):
        engine = StreamingInference(model, StreamConfig(4, 64, 16))
        row = engine.open_row()
        list(engine.append(row, tok("One day")["input_ids"]))
        params = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=123, max_new_tokens=60)
        runs.append([t.token_id for t in generate(engine, row, params)])
    assert runs[0] == runs[1] and len(set(runs[0])) > 5


def eos_rigged_model(eos: int):
    """A tiny random Llama whose LM head makes `eos` the argmax everywhere (zero weights, a bias on eos)."""
    model = tiny_model("llama")
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[eos] = 10.0
    model.set_output_embeddings(head)
    return model


def eos_run(model, **params) -> list:
    engine = StreamingInference(model, StreamConfig(sink_tokens=4, window=60, chunk=16))
    row = engine.open_row()
    list(engine.append(row, [1, 5, 6, 7]))
    return list(generate(engine, row, SamplingParams(max_new_tokens=5, **params)))


def test_generation_stops_at_eos():
    model = eos_rigged_model(eos=2)
    assert model.config.eos_token_id == 2
    out = eos_run(model)
    assert [(t.token_id, t.stop_reason) for t in out] == [(2, "EOS_TOKEN")]
    out = eos_run(model, stop_on_eos=False)  # EOS, not something else, is what stopped it
    assert [t.token_id for t in out] == [2] * 5 and out[-1].stop_reason == "MAX_TOKENS"


def test_eos_ids_of_the_generation_config_stop_generation():
    model = eos_rigged_model(eos=7)
    model.generation_config.eos_token_id = [2, 7]  # the model config says 2 only
    assert [(t.token_id, t.stop_reason) for t in eos_run(model)] == [(7, "EOS_TOKEN")]


# ------------------------------------------------------------------ memory invariant
def test_cache_bytes_constant_after_100k_tokens():
    model = tiny_model("llama")
    engine = StreamingInference(model, StreamConfig(sink_tokens=4, window=60, chunk=128))
    row = engine.open_row()
    storage = engine.cache.keys.data_ptr()
    ids = torch.randint(0, 97, (100_000,), generator=torch.Generator().manual_seed(4)).tolist()
    list(engine.append(row, ids[:1000]))
    bytes_1k = engine.cache_bytes
    for _ in engine.append(row, ids[1000:]):
        pass
    assert engine.cache.tokens_seen[row] == 100_000
    assert engine.cache_bytes == bytes_1k
    assert engine.cache.keys.data_ptr() == storage
    assert engine.stats(row).cache_used == 4 + 60


# ------------------------------------------------------------------ snapshot / restore
@pytest.mark.parametrize("temperature, bystanders", [(0.8, 1), (0.0, 0)])
def test_snapshot_restore_continues_identically(stories, tmp_path, temperature, bystanders):
    """A row restored from a file into a fresh engine (at another row index when there are bystanders) is
    the same stream: the next chunk gets bit-identical log-probs (its first token is scored by the
    restored next-token distribution, the rest by forward passes over the restored cache), and generation
    continues identically (sampled: from the restored RNG state)."""
    model, tok = stories
    config = StreamConfig(sink_tokens=4, window=48, chunk=16)
    engine = StreamingInference(model, config, max_rows=2)
    row = engine.open_row(seed=5)
    prompt = tok("Once upon a time there was a big dog. " * 8)["input_ids"]
    assert len(prompt) > config.window + config.chunk  # sinks filled, window evicting, ring wrapped
    list(engine.append(row, prompt))
    save_snapshot(tmp_path / "s.safetensors", *engine.snapshot(row))

    fresh = StreamingInference(model, config, max_rows=2)
    for _ in range(bystanders):
        list(fresh.append(fresh.open_row(seed=9), [1, 403, 407]))  # another stream sharing the cache
    restored = fresh.open_row()
    assert restored == row + bystanders
    fresh.restore(restored, *load_snapshot(tmp_path / "s.safetensors"))
    assert fresh.stats(restored) == engine.stats(row)

    chunk = tok("The dog ran to the park and played.", add_special_tokens=False)["input_ids"]
    want = torch.cat([r.logprobs for r in engine.append(row, chunk)])
    got = torch.cat([r.logprobs for r in fresh.append(restored, chunk)])
    assert not want.isnan().any() and torch.equal(got, want)
    params = SamplingParams(temperature=temperature, max_new_tokens=30, stop_on_eos=False)
    original = [t.token_id for t in generate(engine, row, params)]
    assert [t.token_id for t in generate(fresh, restored, params)] == original


def test_snapshot_missing_state_raises_snapshot_error(stories):
    """Any required entry missing (or of the wrong kind) is SnapshotError, which callers handle, and the
    target row keeps its state."""
    model, _ = stories
    engine = StreamingInference(model, StreamConfig(sink_tokens=4, window=32, chunk=8), max_rows=2)
    source, target = engine.open_row(), engine.open_row()
    list(engine.append(source, list(range(3, 90))))
    list(engine.append(target, list(range(100, 140))))
    tensors, meta = engine.snapshot(source)
    before = engine.snapshot(target)
    bad = [(tensors, {k: v for k, v in meta.items() if k != key}) for key in meta if key != "format"]
    bad += [({k: v for k, v in tensors.items() if k != key}, meta) for key in tensors]
    bad += [(tensors, {**meta, "config": {k: v for k, v in meta["config"].items() if k != "tiers"}}),
            (tensors, {**meta, "config": None}), (tensors, {**meta, "tokens_seen": "87"}),
            (tensors, [])]
    for t, m in bad:
        with pytest.raises(SnapshotError):
            engine.restore(target, t, m)
    after = engine.snapshot(target)
    assert after[1] == before[1] and all(torch.equal(after[0][k], before[0][k]) for k in before[0])


# ------------------------------------------------------------------ batching
def test_batched_rows_equal_each_stream_alone(stories):
    model, _ = stories
    config = StreamConfig(sink_tokens=4, window=40, chunk=16)
    gen = torch.Generator().manual_seed(6)
    streams = [[1] + torch.randint(3, 512, (int(n),), generator=gen).tolist() for n in (150, 97, 201)]
    # Chunk boundaries change what a token sees after eviction, so each stream keeps its own sizes.
    sizes = [16, 5, 11]
    alone = []
    for s, size in zip(streams, sizes, strict=True):
        solo = StreamingInference(model, config)
        row = solo.open_row()
        alone.append(torch.cat([solo.step({row: s[i : i + size]})[row].logprobs
                                for i in range(0, len(s), size)]))

    engine = StreamingInference(model, config, max_rows=4)
    rows = [engine.open_row() for _ in streams]
    got = feed_batched(engine, rows, streams, sizes)
    for i in range(len(streams)):
        assert torch.allclose(got[i], alone[i], atol=1e-5, equal_nan=True)


# ------------------------------------------------------------------ bad input
def test_bad_configs_raise_clear_errors(stories):
    model, _ = stories
    # too many positions: every part and the limit are stated; the largest part is the field named
    with pytest.raises(ConfigError) as exc:
        StreamingInference(model, StreamConfig(sink_tokens=4, window=500, chunk=64))
    assert exc.value.field == "window"
    assert str(exc.value) == (
        "window: sink_tokens + tier slots + window + chunk = 4 + 0 + 500 + 64 = 568 exceeds the model's "
        "trained context (max_position_embeddings = 512) by 56: lower window to <= 444 or chunk to <= 8")
    with pytest.raises(ConfigError, match=r"4 \+ 0 \+ 200 \+ 400 = 604 .* by 92: lower chunk to <= 308 or "
                                          r"window to <= 108$") as exc:
        StreamingInference(model, StreamConfig(sink_tokens=4, window=200, chunk=400))
    assert exc.value.field == "chunk"
    with pytest.raises(ConfigError, match=r"4 \+ 416 \+ 64 \+ 32 = 516 .*= 512\) by 4") as exc:
        StreamingInference(model, StreamConfig(sink_tokens=4, window=64, chunk=32, tiers=(TierSpec(416, 2),)))
    assert exc.value.field == "tiers"
    with pytest.raises(ConfigError, match="window: must be > 0"):
        StreamingInference(model, StreamConfig(window=0))
    with pytest.raises(ConfigError, match="chunk"):
        StreamConfig(chunk=0).validate()
    with pytest.raises(ConfigError, match="merge_policy"):
        StreamConfig(merge_policy="median").validate()
    with pytest.raises(UnsupportedModelError, match="model_type 'bert' is not supported"):
        check_supported(BertConfig())


def test_unsupported_models_raise_clear_errors(tmp_path):
    # a causal LM without rotary embeddings, handed straight to the engine
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    with pytest.raises(UnsupportedModelError,
                       match="model_type 'gpt2' is not supported: sinkstream needs a causal LM with rotary"):
        StreamingInference(gpt2, StreamConfig(sink_tokens=4, window=60, chunk=16))
    # a RoPE family with a rope scaling type whose tables the core cannot reproduce
    config = tiny_config("llama")
    config.rope_parameters = {"rope_type": "proportional", "rope_theta": 10000.0, "factor": 2.0}
    llama = AutoModelForCausalLM.from_config(config).eval()
    refused = "rope scaling type 'proportional' is not supported"
    with pytest.raises(UnsupportedModelError, match=refused):
        StreamingInference(llama, StreamConfig(sink_tokens=4, window=60, chunk=16))
    # ... and from a checkpoint folder in the legacy `rope_scaling` spelling, refused before any weight loads
    legacy = {k: v for k, v in tiny_config("llama").to_dict().items() if k != "rope_parameters"}
    legacy.update(rope_theta=10000.0, rope_scaling={"type": "proportional", "factor": 2.0})
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    with pytest.raises(UnsupportedModelError, match=refused):
        load_model(str(tmp_path))


def test_bad_steps_change_nothing(stories):
    model, _ = stories
    engine = StreamingInference(model, StreamConfig(4, 32, 8), max_rows=1)
    row = engine.open_row()
    list(engine.append(row, [1, 5, 6, 7]))
    before = engine.snapshot(row)
    for bad in ({row: []}, {row: list(range(9))}, {row: [600]}, {row + 1: [5]}):
        with pytest.raises((ValueError, KeyError)):
            engine.step(bad)
    after = engine.snapshot(row)
    assert after[1] == before[1] and all(torch.equal(after[0][k], before[0][k]) for k in before[0])
    with pytest.raises(NoFreeRowError):
        engine.open_row()


def test_a_model_without_rope_fields_is_refused_clearly():
    from transformers import MambaConfig, MambaForCausalLM

    mamba = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, state_size=4))
    with pytest.raises(UnsupportedModelError, match="model_type 'mamba' is not supported"):
        StreamingInference(mamba, StreamConfig())


def test_a_failed_snapshot_write_leaves_no_file(tmp_path, monkeypatch):
    import sinkstream.core.snapshot as snapshot

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
