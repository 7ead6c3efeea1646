"""Memory tiers (core.tiers): proportional-attention exactness, tiers-off identity, long-run invariants,
the `mean` policy against a plain-tensor reference written here, heavy-hitter grouping, snapshots."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from sinkstream.core.config import ConfigError, StreamConfig, TierSpec
from sinkstream.core.dense import DenseInference
from sinkstream.core.generation import generate
from sinkstream.core.sampling import SamplingParams
from sinkstream.core.sink_cache import CacheHooks
from sinkstream.core.snapshot import SnapshotError, load_snapshot, save_snapshot
from sinkstream.core.streaming import StreamingInference
from sinkstream.core.tiers import OBSERVED_QUERIES, Units, block_groups, merge_units

POLICIES = ("mean", "attention", "heavy-hitters")


@pytest.fixture(scope="module")
def stories(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def random_ids(n: int, seed: int, vocab: int = 512) -> list[int]:
    return [1] + torch.randint(3, vocab, (n - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine: StreamingInference, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1 (the first token has no prediction)."""
    row = engine.open_row()
    return torch.cat([r.logprobs for r in engine.append(row, ids)])[1:]


# ------------------------------------------------------------------ proportional attention is exact
def test_merged_identical_tokens_attend_like_the_tokens_function_level():
    gen = torch.Generator().manual_seed(0)
    n, heads, d = 5, 2, 8
    q = torch.randn(1, heads, 3, d, generator=gen)
    others_k, others_v = torch.randn(2, 1, heads, 4, d, generator=gen)
    k, v = torch.randn(2, 1, heads, 1, d, generator=gen)
    # n identical tokens, merged by merge_units into one slot that stands for n
    copies = Units(k.expand(1, heads, n, d).clone(), v.expand(1, heads, n, d).clone(), torch.ones(n),
                   torch.zeros(n))
    merged = merge_units(copies, torch.zeros(n, dtype=torch.long), 1, torch.rand(n, generator=gen) + 0.1)
    assert merged.count.tolist() == [n]
    slot_k = torch.cat((others_k, merged.keys), 2)
    slot_v = torch.cat((others_v, merged.values), 2)
    bias = torch.cat((torch.zeros(4), merged.count.log()))[None, None, None]
    got = torch.nn.functional.scaled_dot_product_attention(q, slot_k, slot_v, attn_mask=bias)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, torch.cat((others_k, k.expand(1, heads, n, d)), 2),
        torch.cat((others_v, v.expand(1, heads, n, d)), 2))
    assert (got - want).abs().max() <= 1e-5
    without_bias = torch.nn.functional.scaled_dot_product_attention(q, slot_k, slot_v)
    assert (without_bias - want).abs().max() > 1e-3  # the +log(n) is what makes it exact


def _zero_rotary(x: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    x[..., :rotary_dim] = 0.0
    return x


def test_merged_identical_tokens_attend_like_the_tokens_end_to_end():
    """A tier slot standing for n identical (key, value) tokens, through a whole model, gives the same
    outputs as n window slots holding those tokens. The keys' rotary dims are zero so the n copies are
    identical at any position (phi3 here rotates only half of each head)."""
    model = tiny_model("phi3")
    n, chunk = 6, [5, 9, 11, 17]
    with_tier = StreamingInference(model, StreamConfig(sink_tokens=2, window=8, chunk=4,
                                                       tiers=TierSpec.parse("4x2")))
    plain = StreamingInference(model, StreamConfig(sink_tokens=2, window=n, chunk=4))
    gen = torch.Generator().manual_seed(1)
    a, b = with_tier.cache, plain.cache
    layers, _, kv_heads, _, d = a.keys.shape
    rd = a.rope.rotary_dim
    sink_k = _zero_rotary(torch.randn(layers, kv_heads, 2, d, generator=gen), rd)
    sink_v = torch.randn(layers, kv_heads, 2, d, generator=gen)
    tok_k = _zero_rotary(torch.randn(layers, kv_heads, 1, d, generator=gen), rd)
    tok_v = torch.randn(layers, kv_heads, 1, d, generator=gen)
    for engine in (with_tier, plain):
        row = engine.open_row()
        engine.cache.keys[:, row, :, :2] = sink_k
        engine.cache.values[:, row, :, :2] = sink_v
        engine.cache.count[row, :2] = 1.0
        engine.cache.sink_used[row] = 2
        engine.cache.tokens_seen[row] = 2 + n
    slot = with_tier.tier_memory.base[0]
    a.keys[:, 0, :, slot : slot + 1] = tok_k
    a.values[:, 0, :, slot : slot + 1] = tok_v
    a.count[0, slot] = float(n)
    window_slots = b.ring_start + torch.arange(2, 2 + n) % b.ring_size
    b.keys[:, 0, :, window_slots] = tok_k.expand(layers, kv_heads, n, d)
    b.values[:, 0, :, window_slots] = tok_v.expand(layers, kv_heads, n, d)
    b.count[0, window_slots] = 1.0
    b.window_used[0] = n
    got = with_tier.step({0: chunk})[0]
    want = plain.step({0: chunk})[0]
    assert (with_tier.next_logprobs(0) - plain.next_logprobs(0)).abs().max() <= 1e-5
    assert torch.allclose(got.logprobs[1:], want.logprobs[1:], atol=1e-5, rtol=0)


# ------------------------------------------------------------------ tiers disabled, or not reached yet
@pytest.mark.parametrize("policy", POLICIES)
def test_empty_tiers_change_no_logits_before_a_token_passes_the_sinks(stories, policy):
    """Over the first S + W tokens nothing reaches the tiers: their slots are empty, masked out and take
    no position, so the logits equal those of the same cache without tiers (a wider mask may reorder
    the attention sums, hence 1e-5). The next chunk does reach the tiers."""
    model, _ = stories
    sinks, window, chunk = 4, 60, 16
    ids = random_ids(sinks + window, seed=2)
    plain = run(StreamingInference(model, StreamConfig(sinks, window, chunk)), ids)
    engine = StreamingInference(model, StreamConfig(sinks, window, chunk, tiers=TierSpec.parse("24x4,8x2"),
                                                    merge_policy=policy))
    tiered = run(engine, ids)
    assert engine.cache.sink_used[0] == sinks and engine.tier_memory.received[0] == 0
    assert (tiered - plain).abs().max() <= 1e-5
    list(engine.append(0, random_ids(chunk, seed=3)))
    assert engine.tier_memory.received[0] > 0


@pytest.mark.parametrize("policy", POLICIES)
def test_tiers_off_builds_no_tier_machinery_and_matches_the_default_config(policy):
    """tiers=() builds no TierMemory, no tier region and no eviction handler, and leaves the model's
    attention alone whatever merge_policy says; over 3 * (S + W) tokens its logits are bit-identical to
    an engine whose config gives no tiers field."""
    model = tiny_model("llama")  # a fresh model: no other test's observer installed
    attention = model.config._attn_implementation
    ids = random_ids(3 * (4 + 60), seed=2, vocab=97)
    default = run(StreamingInference(model, StreamConfig(sink_tokens=4, window=60, chunk=16)), ids)
    engine = StreamingInference(model, StreamConfig(sink_tokens=4, window=60, chunk=16, tiers=(),
                                                    merge_policy=policy))
    assert engine.tier_memory is None and type(engine.cache.hooks) is CacheHooks  # evictions are dropped
    assert engine.cache.ring_start == 4
    assert model.config._attn_implementation == attention
    assert torch.equal(run(engine, ids), default)


def test_attention_observer_changes_no_output(stories):
    """Installing the attention-accounting wrapper leaves every output bit-identical: tiered streams
    before any merge, and plain streams and the dense baseline on the same model."""
    model, _ = stories
    ids = random_ids(70, seed=3)  # evicts 6 tokens into tier 1: no block of r1 * 2 = 8 forms
    plain_before = run(StreamingInference(model, StreamConfig(4, 60, 16)), ids)
    dense_before = torch.cat([r.logprobs for r in DenseInference(model, chunk=16).append(ids)])
    config = StreamConfig(4, 60, 16, tiers=TierSpec.parse("24x4"))
    mean = run(StreamingInference(model, config), ids)
    observed_engine = StreamingInference(model, StreamConfig(4, 60, 16, tiers=config.tiers,
                                                              merge_policy="heavy-hitters"))
    observed = run(observed_engine, ids)
    assert model.config._attn_implementation == "sinkstream_observed_sdpa"
    assert observed_engine.tier_memory.attention.sum() > 0
    assert torch.equal(observed, mean)
    assert torch.equal(run(StreamingInference(model, StreamConfig(4, 60, 16)), ids), plain_before)
    # the dense path builds its own mask: the registered mask function must match sdpa's
    dense_after = torch.cat([r.logprobs for r in DenseInference(model, chunk=16).append(ids)])
    assert torch.equal(dense_after[1:], dense_before[1:])


# ------------------------------------------------------------------ invariants over a long stream
@pytest.fixture
def one_thread():
    """A model this small runs many times faster on one thread (two threads thrash on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("policy", POLICIES)
def test_invariants_over_100k_tokens(policy, one_thread):
    model = tiny_model("llama")
    config = StreamConfig(sink_tokens=4, window=32, chunk=64, tiers=TierSpec.parse("20x4,8x4,4x2"),
                          merge_policy=policy)
    engine = StreamingInference(model, config)
    tiers, cache = engine.tier_memory, engine.cache
    row = engine.open_row()
    storage = (cache.keys.data_ptr(), cache.values.data_ptr())
    bytes_at_start = engine.cache_bytes
    ids = torch.randint(0, 97, (100_000,), generator=torch.Generator().manual_seed(4)).tolist()
    capacities = [t.slots for t in config.tiers]
    for result in engine.append(row, ids):
        used = tiers.used(row)
        assert all(u <= c for u, c in zip(used, capacities, strict=True))
        evicted = result.tokens_seen - cache.sink_used[row] - cache.window_used[row]
        assert tiers.received[row] == evicted
        assert tiers.represented(row) == evicted - tiers.dropped[row]
        assert engine.stats(row).cache_used == 4 + sum(used) + cache.window_used[row]
    assert result.tokens_seen == 100_000 and tiers.dropped[row] > 0
    assert engine.cache_bytes == bytes_at_start
    assert (cache.keys.data_ptr(), cache.values.data_ptr()) == storage
    # every tier full (or within a ratio of full) and in age order: coarser tiers stand for more tokens
    counts = [cache.count[row, b : b + c] for b, c in zip(tiers.base, capacities, strict=True)]
    means = [float(c[c > 0].mean()) for c in counts]
    assert means == sorted(means) and means[-1] > means[0]
    if policy != "heavy-hitters":
        assert means == [4.0, 16.0, 32.0]


def test_cache_bytes_count_the_tiers_own_tensors(stories):
    """Tiers add their slots' storage to cache_bytes and also their per-slot attention record."""
    model, _ = stories
    rows, tiers = 2, TierSpec.parse("24x4,8x2")
    plain = StreamingInference(model, StreamConfig(4, 60, 16), max_rows=rows)
    tiered = StreamingInference(model, StreamConfig(4, 60, 16, tiers=tiers), max_rows=rows)
    layers, _, kv_heads, slots, head_dim = tiered.cache.keys.shape
    # k and v of every layer, the rotated-key workspace, count, id
    per_slot = (2 * layers + 1) * kv_heads * head_dim * tiered.cache.keys.element_size() + 4 + 8
    attention = rows * slots * 4  # float32, every slot of every row
    assert tiered.cache_bytes - plain.cache_bytes == rows * sum(t.slots for t in tiers) * per_slot + attention


# ------------------------------------------------------------------ `mean` against a plain reference
class ReferenceTieredLlama:
    """Llama forward over [sinks | tiers, oldest first | window | chunk] in plain tensors, with the tier
    rule spelled out token by token: each evicted token joins tier 1's pending list; every r1 pending
    tokens become one slot (their mean); a tier holding more merged slots than its room (tier 1: slots
    minus r1 - 1 kept for pending tokens) sends its oldest slots on, r(k+1) at a time, each group becoming
    one slot of tier k+1 standing for the mean of all its tokens; the last tier drops its oldest slot.
    A slot keeps the sum of its tokens' keys and values and their number; attention adds log(number)."""

    def __init__(self, model, sinks: int, window: int, tiers: tuple[TierSpec, ...]) -> None:
        c = model.config
        self.w = {k: v.detach().float() for k, v in model.state_dict().items()}
        self.n_layers, self.heads = c.num_hidden_layers, c.num_attention_heads
        self.kv_heads = c.num_key_value_heads
        self.d = c.hidden_size // self.heads
        self.eps, self.sinks, self.window, self.tiers = c.rms_norm_eps, sinks, window, tiers
        self.inv_freq = 1.0 / c.rope_parameters["rope_theta"] ** (torch.arange(0, self.d, 2).float() / self.d)
        self.plain: list[tuple[torch.Tensor, torch.Tensor]] = []  # (k, v) [layers, kv, d] per kept token
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        # per tier, oldest first: [key sum, value sum, tokens]
        self.slots: list[list[list]] = [[] for _ in tiers]

    def _memory(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values [layers, kv, m, d] and log-count bias [m] of sinks, tiers, pending, window."""
        entries = [(k, v, 1) for k, v in self.plain[: self.sinks]]
        for tier in reversed(self.slots):
            entries += [(ks / n, vs / n, n) for ks, vs, n in tier]
        entries += [(k, v, 1) for k, v in self.pending + self.plain[self.sinks :]]
        if not entries:
            empty = torch.zeros(self.n_layers, self.kv_heads, 0, self.d)
            return empty, empty, torch.zeros(0)
        keys = torch.stack([e[0] for e in entries], 2)
        values = torch.stack([e[1] for e in entries], 2)
        return keys, values, torch.tensor([math.log(e[2]) for e in entries])

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angle = positions[:, None].float() * self.inv_freq
        cos, sin = torch.cat((angle, angle), -1).cos(), torch.cat((angle, angle), -1).sin()
        half = self.d // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w[name]

    def forward_chunk(self, ids: list[int]) -> torch.Tensor:
        """Log-probs [n, vocab] after each chunk token; then the kept tokens evict into the tiers."""
        mem_k, mem_v, bias = self._memory()
        m, n = bias.shape[0], len(ids)
        scores_bias = torch.cat((bias.expand(n, m), torch.zeros(n, n).masked_fill(
            torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)), 1)
        positions = torch.arange(m + n)
        x = self.w["model.embed_tokens.weight"][torch.tensor(ids)]
        new_k, new_v = [], []
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            h = self._norm(x, p + "input_layernorm.weight")
            q, k, v = ((h @ self.w[p + f"self_attn.{name}_proj.weight"].T).view(n, -1, self.d).transpose(0, 1)
                       for name in "qkv")
            new_k.append(k)
            new_v.append(v)
            keys = self._rope(torch.cat((mem_k[i], k), 1), positions)
            values = torch.cat((mem_v[i], v), 1)
            group = self.heads // self.kv_heads
            keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
            scores = self._rope(q, positions[m:]) @ keys.transpose(1, 2) / math.sqrt(self.d) + scores_bias
            out = (scores.softmax(-1) @ values).transpose(0, 1).reshape(n, -1)
            x = x + out @ self.w[p + "self_attn.o_proj.weight"].T
            h = self._norm(x, p + "post_attention_layernorm.weight")
            act = torch.nn.functional.silu(h @ self.w[p + "mlp.gate_proj.weight"].T) * (
                h @ self.w[p + "mlp.up_proj.weight"].T)
            x = x + act @ self.w[p + "mlp.down_proj.weight"].T
        logits = self._norm(x, "model.norm.weight") @ self.w["lm_head.weight"].T
        keys, values = torch.stack(new_k), torch.stack(new_v)  # [layers, kv, n, d]
        self.plain += [(keys[:, :, j], values[:, :, j]) for j in range(n)]
        while len(self.plain) > self.sinks + self.window:
            self._evict(*self.plain.pop(self.sinks))
        return torch.log_softmax(logits, -1)

    def _evict(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.pending.append((k, v))
        r1 = self.tiers[0].ratio
        if len(self.pending) < r1:
            return
        self.slots[0].append([sum(p[0] for p in self.pending), sum(p[1] for p in self.pending), r1])
        self.pending = []
        for t, tier in enumerate(self.tiers):
            room = tier.slots - (r1 - 1 if t == 0 else 0)
            while len(self.slots[t]) > room:
                if t + 1 == len(self.tiers):
                    self.slots[t].pop(0)
                    continue
                r = self.tiers[t + 1].ratio
                group, self.slots[t] = self.slots[t][:r], self.slots[t][r:]
                self.slots[t + 1].append([sum(g[0] for g in group), sum(g[1] for g in group),
                                          sum(g[2] for g in group)])


@pytest.mark.parametrize("chunk", [1, 8, 13])
def test_mean_policy_matches_plain_reference(stories, chunk):
    model, _ = stories
    sinks, window, tiers = 4, 24, TierSpec.parse("8x4,4x2")
    ids = random_ids(320, seed=5)
    engine = StreamingInference(model, StreamConfig(sinks, window, chunk, tiers=tiers))
    got = run(engine, ids)
    ref = ReferenceTieredLlama(model, sinks, window, tiers)
    want, prev = [math.nan], None
    for start in range(0, len(ids), chunk):
        piece = ids[start : start + chunk]
        lp = ref.forward_chunk(piece)
        dists, targets = (lp[:-1], piece[1:]) if prev is None else (torch.cat((prev[None], lp[:-1])), piece)
        want += dists.gather(1, torch.tensor(targets)[:, None])[:, 0].tolist()
        prev = lp[-1]
    assert engine.tier_memory.dropped[0] > 0  # the stream went through every tier and out
    assert engine.tier_memory.used(0) == [len(ref.slots[0]) + len(ref.pending), len(ref.slots[1])]
    assert (got - torch.tensor(want[1:])).abs().max() <= 1e-4
    assert (engine.next_logprobs(0) - prev).abs().max() <= 1e-4


# ------------------------------------------------------------------ attention accounting
def test_attention_accounting_matches_eager_attention_weights():
    """What the observer adds per forward pass equals the model's own (eager) attention weights summed
    over layers, heads and each row's last OBSERVED_QUERIES real queries; padded queries count nothing."""
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    engine = StreamingInference(model, StreamConfig(4, 16, 8, tiers=TierSpec.parse("8x2"),
                                                    merge_policy="attention"), max_rows=2)
    assert model.config._attn_implementation == "sinkstream_observed_eager"
    captured: list[torch.Tensor] = []
    hooks = [layer.self_attn.register_forward_hook(lambda m, i, o: captured.append(o[1]))
             for layer in model.model.layers]
    rows = [engine.open_row(), engine.open_row()]
    gen = torch.Generator().manual_seed(9)
    tiers, cache = engine.tier_memory, engine.cache
    try:
        for lengths in [(8, 3), (8, 8), (5, 8), (8, 1), (8, 8), (2, 7), (8, 8), (8, 8)]:
            captured.clear()
            before = tiers.attention.clone()
            chunk_slots = [cache.ring_start + (cache.tokens_seen[r] + torch.arange(n)) % cache.ring_size
                           for r, n in zip(rows, lengths, strict=True)]
            engine.step({r: torch.randint(0, 97, (n,), generator=gen).tolist()
                         for r, n in zip(rows, lengths, strict=True)})
            weights = torch.stack(captured)  # [layers, b, heads, n, N]
            for i, (r, n) in enumerate(zip(rows, lengths, strict=True)):
                expected = weights[:, i, :, max(0, n - OBSERVED_QUERIES) : n].sum((0, 1, 2))
                start = before[r].clone()
                start[chunk_slots[i]] = 0.0
                window = (cache.count[r] == 1) & (torch.arange(cache.num_slots) >= cache.ring_start)
                assert window.sum() == cache.window_used[r]
                got = tiers.attention[r]
                assert torch.allclose(got[window], start[window] + expected[window], atol=1e-5)
    finally:
        for h in hooks:
            h.remove()
    assert tiers.received[rows[0]] > 0 and tiers.attention[:, 4 : cache.ring_start].sum() > 0


# ------------------------------------------------------------------ heavy hitters
def test_heavy_hitters_keep_the_most_attended_token_of_each_block():
    gen = torch.Generator().manual_seed(6)
    blocks, size, slots = 50, 16, 4
    attention = torch.rand(blocks, size, generator=gen)
    group = block_groups(attention, slots, heavy=1)
    top = attention.argmax(1)
    for b in range(blocks):
        g = group[b].tolist()
        assert sorted(set(g)) == list(range(slots))
        assert g.count(g[top[b]]) == 1  # the heavy hitter is alone in its slot
        firsts = [g.index(s) for s in range(slots)]
        assert firsts == sorted(firsts)  # slots ordered by their first token
        light = [x for i, x in enumerate(g) if i != top[b]]
        assert light == sorted(light)  # the other tokens merge in runs of consecutive tokens
    assert torch.equal(block_groups(attention, 1, heavy=0), torch.zeros(blocks, size, dtype=torch.long))


# ------------------------------------------------------------------ configuration
def test_tier_configs_are_validated(stories):
    model, _ = stories
    with pytest.raises(ConfigError, match=r"4 \+ 48 \+ 400 \+ 64 = 516 exceeds"):
        StreamingInference(model, StreamConfig(4, 400, 64, tiers=TierSpec.parse("32x4,16x4")))
    with pytest.raises(ConfigError, match="tier 1"):
        StreamingInference(model, StreamConfig(4, 60, 16, tiers=TierSpec.parse("6x4"),
                                               merge_policy="heavy-hitters"))
    with pytest.raises(ConfigError, match="tiers"):
        TierSpec.parse("32x")


# ------------------------------------------------------------------ snapshot / restore
@pytest.mark.parametrize("policy", POLICIES)
def test_snapshot_restore_with_tiers_continues_identically(stories, tmp_path, policy):
    model, tok = stories
    config = StreamConfig(4, 40, 16, tiers=TierSpec.parse("24x4,8x2"), merge_policy=policy)
    engine = StreamingInference(model, config, tokenizer=tok)
    row = engine.open_row(seed=8)
    list(engine.append(row, tok("Once upon a time there was a big dog named Max. " * 30)["input_ids"]))
    assert engine.tier_memory.used(row)[1] > 0
    save_snapshot(tmp_path / "s.safetensors", *engine.snapshot(row))
    params = SamplingParams(temperature=0.8, max_new_tokens=60, stop_on_eos=False)
    original = [t.token_id for t in generate(engine, row, params)]
    after = engine.tier_memory.used(row)

    other = StreamingInference(model, config, max_rows=2, tokenizer=tok)
    other.open_row()
    restored = other.open_row()
    other.restore(restored, *load_snapshot(tmp_path / "s.safetensors"))
    assert [t.token_id for t in generate(other, restored, params)] == original
    assert other.tier_memory.used(restored) == after
    assert other.stats(restored).tier_used == after


def test_corrupt_tier_snapshot_is_refused(stories):
    model, _ = stories
    config = StreamConfig(4, 40, 16, tiers=TierSpec.parse("24x4,8x2"))
    engine = StreamingInference(model, config)
    row = engine.open_row()
    list(engine.append(row, random_ids(300, seed=10)))
    tensors, meta = engine.snapshot(row)
    bad_pending = {**meta, "tiers": {**meta["tiers"], "pending": 99}}
    bad_merged = {**meta, "tiers": {**meta["tiers"], "merged": [1, 2, 3]}}
    no_attention = {k: v for k, v in tensors.items() if k != "tiers.attention"}
    for t, m in ((tensors, bad_pending), (tensors, bad_merged), (no_attention, meta)):
        with pytest.raises(SnapshotError):
            engine.restore(row, t, m)


TIER_CONFIG = StreamConfig(4, 40, 16, tiers=TierSpec.parse("24x4,8x2"))


def _target_and_twin(model) -> tuple[StreamingInference, StreamingInference, int]:
    """Two engines whose row holds the same stream of its own (the twin is never restored into)."""
    engines = []
    for _ in range(2):
        engine = StreamingInference(model, TIER_CONFIG)
        row = engine.open_row(seed=3)
        list(engine.append(row, random_ids(150, seed=11)))
        engines.append(engine)
    assert engines[0].tier_memory.used(row)[0] > 0
    return engines[0], engines[1], row


def assert_refused_and_unchanged(model, bad: list[tuple[dict, dict]]) -> None:
    """Each (tensors, meta) raises SnapshotError on restore, and the target row keeps its whole state:
    snapshot, stats, next-token distribution and the logits of a continuation."""
    target, twin, row = _target_and_twin(model)
    before_tensors, before_meta = target.snapshot(row)
    before_stats, before_next = target.stats(row), target.next_logprobs(row).clone()
    for tensors, meta in bad:
        with pytest.raises(SnapshotError):
            target.restore(row, tensors, meta)
        after_tensors, after_meta = target.snapshot(row)
        assert after_meta == before_meta
        assert after_tensors.keys() == before_tensors.keys()
        assert all(torch.equal(after_tensors[k], before_tensors[k]) for k in before_tensors)
        assert target.stats(row) == before_stats
        assert torch.equal(target.next_logprobs(row), before_next)
    continuation = random_ids(80, seed=12)
    assert torch.equal(run_on(target, row, continuation), run_on(twin, row, continuation))


def run_on(engine: StreamingInference, row: int, ids: list[int]) -> torch.Tensor:
    return torch.cat([r.logprobs for r in engine.append(row, ids)])


@pytest.fixture(scope="module")
def tier_snapshot(stories) -> tuple[dict[str, torch.Tensor], dict]:
    """A snapshot of a stream whose tokens went through both tiers, with tokens pending in tier 1."""
    model, _ = stories
    engine = StreamingInference(model, TIER_CONFIG)
    row = engine.open_row(seed=2)
    list(engine.append(row, random_ids(302, seed=10)))
    assert engine.tier_memory.used(row)[1] > 0
    return engine.snapshot(row)


def test_refused_tier_snapshot_changes_nothing(stories, tier_snapshot):
    tensors, meta = tier_snapshot
    tiers = meta["tiers"]
    no_attention = {k: v for k, v in tensors.items() if k != "tiers.attention"}
    short_attention = {**tensors, "tiers.attention": tensors["tiers.attention"][:-1]}
    assert_refused_and_unchanged(stories[0], [
        (tensors, {**meta, "tiers": {**tiers, "pending": 99}}),
        (tensors, {**meta, "tiers": {**tiers, "merged": [1, 2, 3]}}),
        (tensors, {**meta, "tiers": {**tiers, "merged": "many"}}),
        (no_attention, meta),
        (short_attention, meta),
        # the cache part is checked before the tiers are: nothing is written before both pass
        ({**tensors, "keys": tensors["keys"][..., :-1]}, meta),
        ({**tensors, "count": tensors["count"].double()}, meta),
        (tensors, {**meta, "tokens_seen": meta["tokens_seen"] - 1}),
        (tensors, {**meta, "window_used": 7}),
    ])


def test_snapshot_without_tier_state_is_refused(stories, tier_snapshot):
    tensors, meta = tier_snapshot
    tiers = meta["tiers"]
    assert_refused_and_unchanged(stories[0], [
        (tensors, {k: v for k, v in meta.items() if k != "tiers"}),
        (tensors, {**meta, "tiers": None}),
        *[(tensors, {**meta, "tiers": {k: v for k, v in tiers.items() if k != key}}) for key in tiers],
    ])


def test_tier_snapshot_disagreeing_with_its_slots_is_refused(stories, tier_snapshot):
    """The recorded tier usage and counters must agree with the restored slot counts."""
    tensors, meta = tier_snapshot
    tiers = meta["tiers"]
    merged, pending = tiers["merged"], tiers["pending"]
    received, dropped = tiers["received"], tiers["dropped"]
    assert dropped > 0 and pending > 0

    def with_tiers(**changes) -> dict:
        return {**meta, "tiers": {**tiers, **changes}}

    assert_refused_and_unchanged(stories[0], [
        (tensors, with_tiers(merged=[0, 0])),
        (tensors, with_tiers(merged=[merged[0] - 1, merged[1]])),
        (tensors, with_tiers(merged=[merged[0], merged[1] - 1])),
        (tensors, with_tiers(pending=pending - 1)),
        (tensors, with_tiers(received=-1)),
        (tensors, with_tiers(dropped=-1)),
        (tensors, with_tiers(dropped=dropped + 4)),
        (tensors, with_tiers(received=received + 4, dropped=dropped + 4)),  # more than was evicted
    ])
