"""Fault isolation inside a batch: one session's parameters, sampler or row failing never changes another
session's results in the same forward passes (issue 12, finding 1).

Session A ingests and generates greedily while a hostile session B, on the same engine (same settings,
so the same batched passes), sends what used to break the shared pass. A's results must equal A's run
alone on the same server; B gets a clear error or valid output.
"""

from __future__ import annotations

import math
import threading

import grpc
import pytest
from service_support import start_server, stories

from sinkstream.clients.client import SinkStreamClient
from sinkstream.clients.results import GenerateParams, SessionSettings, SinkStreamError
from sinkstream.core.sampling import Sampler, SamplingError, SamplingParams
from sinkstream.core.streaming import StreamingInference

SETTINGS = SessionSettings(sink_tokens=4, window=60, chunk=16, logprobs=True)
ROUNDS = 3
POISON = 7  # a row whose whole input is this id fails in the injected-fault test


@pytest.fixture(scope="module")
def server(model_dir):
    srv = start_server(model_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def prompt_ids(model_dir) -> list[int]:
    text = ("Once upon a time there was a little girl named Lily. She loved to play outside in the sun. "
            "One day she saw a big red ball in the park and ran to get it.")
    ids = stories(model_dir).tokenizer.encode(text)
    assert POISON not in ids
    return ids


def run_a(address: str, prompt: list[int]) -> list:
    """Session A: ROUNDS x (append the prompt, generate 16 greedy tokens); every result it gets."""
    got = []
    with SinkStreamClient(address, timeout=120) as client, client.open_session(SETTINGS) as a:
        for _ in range(ROUNDS):
            chunks = a.append_tokens(prompt)
            got.append([lp for c in chunks for lp in c.logprobs])
            result = a.generate(GenerateParams(max_new_tokens=16, ignore_eos=True))
            got.append((result.stop_reason, [(t.token_id, t.logprob) for t in result.tokens]))
    return got


def run_a_beside(address: str, prompt: list[int], hostile) -> list:
    """Run A while `hostile(client, stop)` runs in another thread until A is done; A's results."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def hostile_thread() -> None:
        try:
            with SinkStreamClient(address, timeout=120) as client:
                hostile(client, stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=hostile_thread)
    thread.start()
    try:
        got = run_a(address, prompt)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    return got


def assert_same(got: list, alone: list) -> None:
    assert len(got) == len(alone)
    for g, w in zip(got, alone, strict=True):
        if isinstance(w, tuple):  # a generation: same stop reason, same ids, same log-probs
            assert g[0] == w[0]
            assert [t for t, _ in g[1]] == [t for t, _ in w[1]]
            assert [lp for _, lp in g[1]] == pytest.approx([lp for _, lp in w[1]], abs=1e-4)
        else:
            assert g == pytest.approx(w, abs=1e-4, nan_ok=True)


# Parameters that passed validation before and broke the sampler (temperature 1e-45 is the smallest float32:
# log-probs / T overflowed to -inf everywhere, so torch.multinomial got NaN), plus extreme valid ones.
HOSTILE = [
    GenerateParams(temperature=1e-45, max_new_tokens=4),
    GenerateParams(temperature=1e-45, top_k=5, max_new_tokens=4),
    GenerateParams(temperature=3e38, max_new_tokens=4),
    GenerateParams(temperature=1.0, repetition_penalty=3e38, max_new_tokens=4),
    GenerateParams(temperature=float("nan"), max_new_tokens=4),
    GenerateParams(temperature=1e-6, max_new_tokens=4),
    GenerateParams(temperature=1e6, top_p=1e-30, max_new_tokens=4),
    GenerateParams(temperature=1.0, repetition_penalty=1000.0, top_p=1e-30, max_new_tokens=4),
]


def test_hostile_sampling_parameters_never_touch_another_session(server, prompt_ids):
    alone = run_a(server.address, prompt_ids)
    outcomes: list = []

    def hostile(client: SinkStreamClient, stop: threading.Event) -> None:
        with client.open_session(SETTINGS) as b:
            b.append_tokens(prompt_ids[:20])
            i = 0
            while not stop.is_set():
                params = HOSTILE[i % len(HOSTILE)]
                i += 1
                try:
                    outcomes.append((params, b.generate(params)))
                except SinkStreamError as exc:
                    outcomes.append((params, exc))

    got = run_a_beside(server.address, prompt_ids, hostile)
    assert_same(got, alone)
    assert len(outcomes) >= len(HOSTILE)
    for params, outcome in outcomes:
        if isinstance(outcome, SinkStreamError):  # refused up front, naming the field
            assert outcome.code == grpc.StatusCode.INVALID_ARGUMENT, outcome
            assert outcome.field in ("generate.temperature", "generate.repetition_penalty"), outcome
        else:  # valid output
            assert outcome.stop_reason in ("MAX_TOKENS", "EOS_TOKEN"), (params, outcome)
            assert outcome.tokens and all(math.isfinite(t.logprob) for t in outcome.tokens)
    refused = {id(p) for p, o in outcomes if isinstance(o, SinkStreamError)}
    assert refused == {id(p) for p in HOSTILE[:5]}


def test_a_failing_sampler_fails_only_its_generation(server, prompt_ids, monkeypatch):
    alone = run_a(server.address, prompt_ids)
    real_sample = Sampler.sample

    def sample(self, logprobs, context_ids=None):
        if self.params.seed == 666:
            raise RuntimeError("injected sampler failure")
        return real_sample(self, logprobs, context_ids)

    monkeypatch.setattr(Sampler, "sample", sample)
    results = []

    def hostile(client: SinkStreamClient, stop: threading.Event) -> None:
        with client.open_session(SETTINGS) as b:
            b.append_tokens(prompt_ids[:20])
            while not stop.is_set():
                results.append(b.generate(GenerateParams(temperature=1.0, seed=666, max_new_tokens=4)))
            assert b.append_tokens(prompt_ids[:16])  # the session itself is still usable

    got = run_a_beside(server.address, prompt_ids, hostile)
    assert_same(got, alone)
    assert results
    for r in results:
        assert (r.stop_reason, r.generated_tokens, r.tokens) == ("ERROR", 0, [])
        assert "injected sampler failure" in r.error_message


def test_a_failing_row_fails_only_its_own_input(server, prompt_ids, monkeypatch):
    """A pass that fails because of one row is run again row by row: the other rows' results are exact,
    and the failing row's request gets an error saying how many input tokens were not processed."""
    alone = run_a(server.address, prompt_ids)
    real_step = StreamingInference.step

    def step(self, inputs, **kwargs):
        if any(len(ids) > 1 and all(t == POISON for t in ids) for ids in inputs.values()):
            raise RuntimeError("injected row failure")
        return real_step(self, inputs, **kwargs)

    monkeypatch.setattr(StreamingInference, "step", step)
    errors: list[SinkStreamError] = []
    seen: list[int] = []

    def hostile(client: SinkStreamClient, stop: threading.Event) -> None:
        with client.open_session(SETTINGS) as b:
            b.append_tokens(prompt_ids[:16])
            while not stop.is_set():
                try:
                    b.append_tokens([POISON] * 16)
                except SinkStreamError as exc:
                    errors.append(exc)
                seen.append(client.get_session(b.id).tokens_seen)

    got = run_a_beside(server.address, prompt_ids, hostile)
    assert_same(got, alone)
    assert errors
    for exc in errors:
        assert exc.code == grpc.StatusCode.INTERNAL
        assert "16 input tokens were not processed" in exc.message and "injected row failure" in exc.message
    assert set(seen) == {16}  # none of the poisoned input entered the stream


def test_sampling_parameters_are_bounded_to_what_the_sampler_computes():
    for field, params in [("temperature", SamplingParams(temperature=1e-45)),
                          ("temperature", SamplingParams(temperature=math.inf)),
                          ("temperature", SamplingParams(temperature=math.nan)),
                          ("temperature", SamplingParams(temperature=1e7)),
                          ("top_p", SamplingParams(top_p=math.nan)),
                          ("repetition_penalty", SamplingParams(repetition_penalty=math.nan)),
                          ("repetition_penalty", SamplingParams(repetition_penalty=1e30)),
                          ("repetition_penalty", SamplingParams(repetition_penalty=1e-30))]:
        with pytest.raises(SamplingError) as info:
            params.validate()
        assert info.value.field == field


def test_sampler_gives_a_token_for_every_extreme_valid_parameter():
    import torch

    logprobs = torch.log_softmax(torch.randn(512, generator=torch.Generator().manual_seed(0)) * 30, -1)
    logprobs[:100] = -3.0e38  # near the float32 limit
    context = torch.arange(0, 512, 3)
    for t in (9.99999997e-7, 1e-3, 1.0, 1e6):
        for penalty in (1e-3, 1.0, 1e3):
            for top_p in (1e-30, 0.5, 1.0):
                for top_k in (0, 1, 600):
                    params = SamplingParams(temperature=t, repetition_penalty=penalty, top_p=top_p,
                                            top_k=top_k, seed=1)
                    token = Sampler(params).sample(logprobs, context)
                    assert 0 <= token < 512
    greedy = Sampler(SamplingParams()).sample(logprobs, context)
    assert greedy == int(logprobs.argmax())
