"""Speculative decoding (core.speculative) against plain decoding: greedy output and the cache afterwards are
plain greedy's, rejected draft tokens leave no trace in the ring, and with sampling the acceptance rule
keeps the exact distribution (chi-square against probabilities computed here by plain steps)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sinkstream.core.config import StreamConfig, TierSpec
from sinkstream.core.generation import Generation, generate
from sinkstream.core.sampling import Sampler, SamplingParams
from sinkstream.core.speculative import (
    SpeculativeDecoder,
    SpeculativeRound,
    generate_speculative,
    ngram_draft,
)
from sinkstream.core.streaming import StreamingInference

REPETITIVE = "Tom has a red ball. Tom has a red ball. Tom has a red ball. Tom has a red ball. Tom has a"


@pytest.fixture(scope="module")
def stories(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def count_passes(engine: StreamingInference) -> list[int]:
    """A one-element counter of the model's forward passes (a forward pre-hook on the base model)."""
    passes = [0]
    engine.base.register_forward_pre_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
    return passes


def assert_same_storage(a: StreamingInference, b: StreamingInference) -> None:
    """Every slot's stored keys and values agree to float rounding (1e-4); with int8 storage the
    de-quantised values agree to one quantisation step (a value rounding differently in a multi-token
    pass than in a one-token pass can land on the neighbouring step)."""
    sa, sb = a.cache.storage, b.cache.storage
    if not sa.quantized:
        torch.testing.assert_close(sb.keys, sa.keys, rtol=0, atol=1e-4)
        torch.testing.assert_close(sb.values, sa.values, rtol=0, atol=1e-4)
        return
    for qa, qb, scale_a, scale_b in ((sa.keys, sb.keys, sa.key_scales, sb.key_scales),
                                     (sa.values, sb.values, sa.value_scales, sb.value_scales)):
        step = torch.maximum(scale_a, scale_b)
        assert bool(((qa * scale_a - qb * scale_b).abs() <= step + 1e-4).all())


def full_window_passes(engine: StreamingInference, row: int) -> list[int]:
    """A one-element counter of the forward passes that start with the row's window full."""
    passes = [0]
    full = engine.config.window

    def hook(*_):
        passes[0] += engine.cache.window_used[row] == full

    engine.base.register_forward_pre_hook(hook)
    return passes


def test_ngram_draft_proposes_what_followed_the_latest_match():
    assert ngram_draft([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 2) == [7, 5]  # latest occurrence of 1 2 3
    assert ngram_draft([4, 5, 6, 4, 5], 3) == [6, 4, 5]
    assert ngram_draft([8, 1, 2, 8], 4) == [1, 2, 8]  # falls back to the 1-gram
    assert ngram_draft([1, 2, 3], 3) == []
    assert ngram_draft([], 3) == [] and ngram_draft([5], 3) == []


@pytest.mark.parametrize("config", [
    StreamConfig(sink_tokens=4, window=96, chunk=16),
    StreamConfig(sink_tokens=4, window=64, chunk=16, tiers=TierSpec.parse("8x4")),
], ids=["window", "tiers"])
def test_greedy_speculation_is_plain_greedy_and_leaves_the_same_cache(stories, config):
    """Past the point where the window fills, the tokens, the counters, slot counts and token ids are
    plain greedy's exactly; keys and values agree to float rounding (a token's keys come from a
    multi-token pass instead of a one-token pass). Fewer forward passes ran."""
    model, tok = stories
    prompt = tok(REPETITIVE)["input_ids"]
    params = SamplingParams(max_new_tokens=80)
    runs = {}
    for name in ("plain", "speculative"):
        engine = StreamingInference(model, config)
        row = engine.open_row(seed=0)
        list(engine.append(row, prompt))
        passes = count_passes(engine)
        tokens = (generate(engine, row, params) if name == "plain"
                  else generate_speculative(engine, row, params, k=4))
        runs[name] = ([(t.token_id, t.logprob, t.stop_reason) for t in tokens], engine, passes[0])
    (plain, a, plain_passes), (spec, b, spec_passes) = runs["plain"], runs["speculative"]
    assert [t for t, _, _ in spec] == [t for t, _, _ in plain]
    assert [r for _, _, r in spec] == [r for _, _, r in plain]
    torch.testing.assert_close(torch.tensor([lp for _, lp, _ in spec]),
                               torch.tensor([lp for _, lp, _ in plain]), rtol=0, atol=1e-4)
    assert len(prompt) + len(plain) > config.window  # the window filled during generation
    assert spec_passes < plain_passes == len(plain)
    assert (a.cache.tokens_seen, a.cache.sink_used, a.cache.window_used) == \
        (b.cache.tokens_seen, b.cache.sink_used, b.cache.window_used)
    assert torch.equal(a.cache.count, b.cache.count) and torch.equal(a.cache.token_ids, b.cache.token_ids)
    torch.testing.assert_close(b.cache.keys, a.cache.keys, rtol=0, atol=1e-4)
    torch.testing.assert_close(b.cache.values, a.cache.values, rtol=0, atol=1e-4)
    torch.testing.assert_close(b.next_logprobs(0), a.next_logprobs(0), rtol=0, atol=1e-4)
    if a.tier_memory is not None:
        assert a.tier_memory.used(0) == b.tier_memory.used(0)


@pytest.mark.parametrize("kv_dtype", ["model", "int8"])
def test_rejected_tokens_leave_no_trace(stories, kv_dtype):
    """step_prefix over [t, d1, d2] keeping 1 leaves the row as step([t]) does: identical counters, counts,
    token ids, and storage of every other slot (int8 scales too); t's own slot agrees to float rounding."""
    model, tok = stories
    config = StreamConfig(sink_tokens=4, window=32, chunk=8, kv_dtype=kv_dtype)
    ids = tok(REPETITIVE)["input_ids"]
    engines = []
    for _ in range(2):
        engine = StreamingInference(model, config)
        row = engine.open_row()
        list(engine.append(row, ids[:30]))  # a few steps: the ring slots hold earlier tokens' data
        engines.append(engine)
    plain, spec = engines
    plain.step({0: [ids[30]]})
    seen = []
    spec.step_prefix(0, [ids[30], 17, 23], lambda lp: seen.append(lp.shape) or 1)
    assert seen == [torch.Size([3, model.config.vocab_size])]
    counters = [(e.cache.tokens_seen, e.cache.sink_used, e.cache.window_used) for e in (plain, spec)]
    assert counters[0] == counters[1]
    assert torch.equal(plain.cache.count, spec.cache.count)
    assert torch.equal(plain.cache.token_ids, spec.cache.token_ids)
    t_slot = plain.cache.ring_start + 30 % plain.cache.ring_size
    others = torch.ones(plain.cache.num_slots, dtype=torch.bool)
    others[t_slot] = False
    for a, b in zip(plain.cache.storage.tensors(), spec.cache.storage.tensors(), strict=True):
        assert torch.equal(a[:, :, :, others], b[:, :, :, others])
    slot = torch.tensor([t_slot])
    storage = plain.cache.storage
    step = 0.0 if kv_dtype == "model" else max(float(storage.key_scales[:, 0, :, t_slot].max()),
                                               float(storage.value_scales[:, 0, :, t_slot].max()))
    for a, b in zip(plain.cache.storage.gather(0, slot), spec.cache.storage.gather(0, slot), strict=True):
        assert float((a - b).abs().max()) <= step + 1e-4  # float rounding, int8: at most one step
    torch.testing.assert_close(spec.next_logprobs(0), plain.next_logprobs(0), rtol=0, atol=1e-4)


def test_sampled_acceptance_keeps_the_distribution(stories):
    """Two sampled tokens (top-k 3, temperature 1) with the stories model's real distributions: x1 drawn
    as generation draws it, x2 drafted as the second most likely token after x1 and judged by
    SpeculativeRound (accepted sometimes, replaced from the residual otherwise). Over many seeds the pairs
    follow P(x1) P(x2 | x1) computed by plain steps (chi-square, p > 0.001)."""
    model, tok = stories
    engine = StreamingInference(model, StreamConfig(sink_tokens=4, window=64, chunk=8))
    row = engine.open_row(seed=0)
    list(engine.append(row, tok("Lily saw a big")["input_ids"]))
    after_prompt = engine.snapshot(row)
    params = SamplingParams(temperature=1.0, top_k=3, max_new_tokens=2)
    sampler = Sampler(params)
    p0 = sampler.distribution(engine.next_logprobs(row))
    joint, second_choice, after = {}, {}, {}
    for x1 in p0.nonzero()[:, 0].tolist():
        engine.restore(row, *after_prompt)
        engine.step({row: [x1]})
        after[x1] = engine.next_logprobs(row).clone()
        p1 = sampler.distribution(after[x1])
        second_choice[x1] = int(p1.topk(2).indices[1])
        for x2 in p1.nonzero()[:, 0].tolist():
            joint[(x1, x2)] = float(p0[x1] * p1[x2])
    engine.restore(row, *after_prompt)

    trials = 4000
    counts = dict.fromkeys(joint, 0)
    accepted = 0
    for seed in range(trials):
        gen = Generation(engine, row, SamplingParams(temperature=1.0, top_k=3, max_new_tokens=2, seed=seed))
        x1, lp1 = gen.choose()
        judged = SpeculativeRound(gen, (x1, lp1), [second_choice[x1]])
        verified = torch.stack((after[x1], torch.zeros_like(after[x1])))  # [1 + k, V]: row 0 judges d1
        kept = judged.keep(verified)
        x2 = second_choice[x1] if kept == 2 else judged.carry[0]
        assert [t.token_id for t in judged.emitted] == [x1, x2][:kept]
        counts[(x1, x2)] += 1
        accepted += kept == 2
    expected = torch.tensor([joint[c] * trials for c in counts], dtype=torch.float64)
    observed = torch.tensor([counts[c] for c in counts], dtype=torch.float64)
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    dof = len(counts) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                            torch.tensor(chi2 / 2, dtype=torch.float64)))
    assert p_value > 1e-3, (chi2, dof, counts, joint)
    assert 0 < accepted < trials  # both the accept and the residual paths ran


def test_sampled_speculative_generation_runs_end_to_end(stories):
    """generate_speculative with sampling yields max_new_tokens tokens from the top-k support, seeded runs
    repeat exactly, and the cache counts every emitted token."""
    model, tok = stories
    prompt = tok(REPETITIVE)["input_ids"]
    runs = []
    for _ in range(2):
        engine = StreamingInference(model, StreamConfig(sink_tokens=4, window=200, chunk=16))
        row = engine.open_row(seed=0)
        list(engine.append(row, prompt))
        params = SamplingParams(temperature=0.7, top_k=5, max_new_tokens=30, seed=7)
        runs.append([t.token_id for t in generate_speculative(engine, row, params, k=4)])
        assert engine.cache.tokens_seen[row] == len(prompt) + 30
    assert runs[0] == runs[1] and len(runs[0]) == 30


def test_an_end_of_sequence_id_inside_a_round_ends_it_as_plain_decoding_does(stories):
    """A token that ends the generation like EOS (`stop_ids`) accepted mid-round: the round keeps nothing
    after it, the generation ends with EOS_TOKEN there, and the stream holds what plain decoding left."""
    model, tok = stories
    config = StreamConfig(sink_tokens=4, window=200, chunk=16)
    ids = tok(REPETITIVE)["input_ids"]

    def run(k: int, stop_ids: tuple[int, ...]) -> tuple[list[tuple[int, float, str | None]], list[int], int]:
        engine = StreamingInference(model, config)
        row = engine.open_row()
        list(engine.append(row, ids))
        params = SamplingParams(max_new_tokens=60, stop_on_eos=True)
        decoder = SpeculativeDecoder(Generation(engine, row, params, None, stop_ids), k)
        tokens, emitted = [], []
        while not decoder.gen.finished:
            got = decoder.round()
            tokens += [(t.token_id, t.logprob, t.stop_reason) for t in got]
            emitted.append(len(got))
        return tokens, emitted, engine.cache.tokens_seen[row]

    free, rounds, _ = run(4, ())
    ends = {sum(rounds[:i + 1]) for i in range(len(rounds))}
    # a token first seen inside a multi-token round: stopping on it cuts that round
    end = next(i + 1 for i, (t, _, _) in enumerate(free) if i + 1 not in ends and t not in
               {x for x, _, _ in free[:i]} and t != free[-1][0])
    stop = (free[end - 1][0],)
    plain, _, plain_seen = run(0, stop)
    spec, _, spec_seen = run(4, stop)
    assert [(t, r) for t, _, r in spec] == [(t, r) for t, _, r in plain]
    assert len(spec) == end and spec[-1][2] == "EOS_TOKEN" and spec_seen == plain_seen == len(ids) + end
    assert all(abs(a[1] - b[1]) <= 1e-4 for a, b in zip(spec, plain, strict=True))


LONG = REPETITIVE + " red ball. " + REPETITIVE  # 90+ tokens: enough to fill a 32-token window and go on


def fed_one_by_one(model, config: StreamConfig, context: list[int], tokens: list[int]):
    """An engine fed `context` in chunks, then `tokens` one per pass: (engine, next-token log-probs
    [len(tokens), V] after each of them)."""
    engine = StreamingInference(model, config)
    row = engine.open_row(seed=0)
    list(engine.append(row, context))
    after = []
    for t in tokens:
        engine.step({row: [t]})
        after.append(engine.next_logprobs(row).clone())
    return engine, torch.stack(after)


@pytest.mark.parametrize(("config", "context", "room"), [
    (StreamConfig(sink_tokens=4, window=32, chunk=16), 50, 4),  # full window: 3 drops, 3 sink copies
    (StreamConfig(sink_tokens=4, window=32, chunk=16), 30, 9),  # 4 evictions fill the sinks, 2 drop
    (StreamConfig(sink_tokens=0, window=32, chunk=16), 50, 16),  # no sinks: drops need no copies
    (StreamConfig(sink_tokens=4, window=32, chunk=16, kv_dtype="int8"), 50, 4),
    (StreamConfig(sink_tokens=4, window=32, chunk=16, tiers=TierSpec.parse("8x4")), 49, 3),  # pending 1 of 3
], ids=["full-window", "sinks-fill", "no-sinks", "int8", "tiers-pending"])
@pytest.mark.parametrize("keep_all", [True, False], ids=["keep-all", "keep-2"])
def test_decode_equivalent_pass_is_one_token_steps(stories, config, context, room, keep_all):
    """step_prefix over n = decode_equivalent_room tokens at (or filling) a full window gives, for every
    token, the next-token distribution that n one-token steps give (1e-4), and keeping k of them leaves
    the row as k one-token steps do: counters, slot counts and ids exactly, every slot's storage
    (including the free ring slots that held shifted sinks during the pass) to float rounding."""
    model, tok = stories
    ids = tok(LONG)["input_ids"]
    spec = StreamingInference(model, config)
    row = spec.open_row(seed=0)
    list(spec.append(row, ids[:context]))
    assert spec.decode_equivalent_room(row) == room
    tokens = ids[context : context + room]
    keep = room if keep_all else 2
    seen = []
    spec.step_prefix(row, tokens, lambda lp: seen.append(lp.clone()) or keep)
    plain, after = fed_one_by_one(model, config, ids[:context], tokens)
    torch.testing.assert_close(seen[0], after, rtol=0, atol=1e-4)
    if not keep_all:
        plain, _ = fed_one_by_one(model, config, ids[:context], tokens[:keep])
    assert (spec.cache.tokens_seen, spec.cache.sink_used, spec.cache.window_used) == \
        (plain.cache.tokens_seen, plain.cache.sink_used, plain.cache.window_used)
    assert torch.equal(spec.cache.count, plain.cache.count)
    assert torch.equal(spec.cache.token_ids, plain.cache.token_ids)
    assert_same_storage(plain, spec)
    torch.testing.assert_close(spec.next_logprobs(row), plain.next_logprobs(row), rtol=0, atol=1e-4)
    if config.tiers:
        assert spec.tier_memory.used(row) == plain.tier_memory.used(row)


def test_decode_equivalent_pass_refuses_what_it_cannot_reproduce_and_aborts_cleanly(stories):
    """One token more than decode_equivalent_room is a ValueError that changes nothing; a pass whose
    keep() raises leaves every slot's storage (shifted sink copies included) as it was."""
    model, tok = stories
    ids = tok(LONG)["input_ids"]
    engine = StreamingInference(model, StreamConfig(sink_tokens=4, window=32, chunk=16))
    row = engine.open_row(seed=0)
    list(engine.append(row, ids[:50]))
    before = [t.clone() for t in engine.cache.storage.tensors()]
    count = engine.cache.count.clone()
    counters = (engine.cache.tokens_seen[row], engine.cache.window_used[row])
    room = engine.decode_equivalent_room(row)
    with pytest.raises(ValueError, match="decode-equivalent"):
        engine.step_prefix(row, ids[50 : 51 + room], lambda lp: 1)

    def fail(lp):
        raise RuntimeError("verifier failed")

    with pytest.raises(RuntimeError, match="verifier failed"):
        engine.step_prefix(row, ids[50 : 50 + room], fail)
    assert all(torch.equal(a, b) for a, b in zip(before, engine.cache.storage.tensors(), strict=True))
    assert torch.equal(count, engine.cache.count)
    assert (engine.cache.tokens_seen[row], engine.cache.window_used[row]) == counters


@pytest.mark.parametrize(("config", "prompt_tokens"), [
    (StreamConfig(sink_tokens=4, window=32, chunk=8), None),
    (StreamConfig(sink_tokens=4, window=32, chunk=16), None),
    (StreamConfig(sink_tokens=4, window=32, chunk=8), 20),  # sinks fill during generation
    (StreamConfig(sink_tokens=4, window=32, chunk=8, tiers=TierSpec.parse("8x4,4x4")), None),
    (StreamConfig(sink_tokens=4, window=32, chunk=8, kv_dtype="int8"), None),
], ids=["window", "window-chunk16", "sinks-fill", "tiers", "int8"])
def test_greedy_speculation_stays_exact_far_past_the_full_window(stories, config, prompt_tokens):
    """200 greedy tokens through a 32-token window (so hundreds of evictions, many inside rounds): tokens,
    stop reasons and log-probs (1e-4) are plain greedy's, the cache afterwards is plain greedy's (counters,
    counts, ids exactly; every slot's storage to float rounding; tier usage), and the passes that start
    with a full window are fewer than plain's (one per token): speculation keeps working once full."""
    model, tok = stories
    prompt = tok(REPETITIVE)["input_ids"][:prompt_tokens]
    params = SamplingParams(max_new_tokens=200, stop_on_eos=False)
    runs = {}
    for name in ("plain", "speculative"):
        engine = StreamingInference(model, config)
        row = engine.open_row(seed=0)
        list(engine.append(row, prompt))
        passes = full_window_passes(engine, row)
        tokens = (generate(engine, row, params) if name == "plain"
                  else generate_speculative(engine, row, params, k=4))
        runs[name] = ([(t.token_id, t.logprob, t.stop_reason) for t in tokens], engine, passes[0])
    (plain, a, plain_full), (spec, b, spec_full) = runs["plain"], runs["speculative"]
    assert len(plain) == 200
    assert [(t, r) for t, _, r in spec] == [(t, r) for t, _, r in plain]
    torch.testing.assert_close(torch.tensor([lp for _, lp, _ in spec]),
                               torch.tensor([lp for _, lp, _ in plain]), rtol=0, atol=1e-4)
    assert (a.cache.tokens_seen, a.cache.sink_used, a.cache.window_used) == \
        (b.cache.tokens_seen, b.cache.sink_used, b.cache.window_used)
    assert torch.equal(a.cache.count, b.cache.count) and torch.equal(a.cache.token_ids, b.cache.token_ids)
    assert_same_storage(a, b)
    torch.testing.assert_close(b.next_logprobs(0), a.next_logprobs(0), rtol=0, atol=1e-4)
    if a.tier_memory is not None:
        assert a.tier_memory.used(0) == b.tier_memory.used(0)
    assert plain_full >= 200 - config.window  # plain: one pass per token once the window is full
    assert spec_full < plain_full
