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
    """Past the point where the window fills (so rounds stop drafting there), the tokens, the counters,
    slot counts and token ids are plain greedy's exactly; keys and values agree to float rounding (a
    token's keys come from a multi-token pass instead of a one-token pass). Fewer forward passes ran."""
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
