"""`serve --speculate N` (service/scheduler.py): generations through a speculating server equal those of the
same server with speculation off, token for token (ids, text, log-probs), also when a stop sequence or
max_new_tokens ends a round early and beside another session's input; speculation is proven to have run
by the server's counters of speculative passes and accepted draft tokens, which must equal the counts of
the core's own speculative decoder on the same stream."""

from __future__ import annotations

import random
import threading
import urllib.request
from dataclasses import dataclass

import pytest
import torch
from durable_support import killed_run, mismatches, uninterrupted
from service_support import pieces, reference_chunks, start_server, stories

from sinkstream.clients.client import SinkStreamClient
from sinkstream.clients.results import GenerateParams, GenerationResult, SessionSettings
from sinkstream.core.config import StreamConfig
from sinkstream.core.generation import Generation
from sinkstream.core.sampling import SamplingParams
from sinkstream.core.speculative import SpeculativeDecoder
from sinkstream.core.streaming import StreamingInference
from sinkstream.core.text import IncrementalEncoder
from sinkstream.v1 import sinkstream_pb2 as pb

K = 4
CONFIG = StreamConfig(sink_tokens=4, window=252, chunk=32)
SETTINGS = SessionSettings(sink_tokens=4, window=252, chunk=32, logprobs=True)
PROMPT = ("Tom had a red ball. He liked to play with the ball. Tom had a red ball. He liked to play with "
          "the ball.")
PASSES, ACCEPTED = "sinkstream_speculative_passes_total", "sinkstream_speculative_accepted_tokens_total"


@pytest.fixture(scope="module")
def plain(model_dir):
    srv = start_server(model_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def speculating(model_dir):
    srv = start_server(model_dir, speculate=K, metrics_port=0)
    yield srv
    srv.stop()


@dataclass
class Rounds:
    """The core speculative decoder's run: tokens, and per pass how many tokens it emitted and whether it
    verified a draft."""

    token_ids: list[int]
    emitted: list[int]
    speculative: list[bool]

    @property
    def passes(self) -> int:
        return sum(self.speculative)

    @property
    def accepted(self) -> int:
        return sum(n - 1 for n, spec in zip(self.emitted, self.speculative, strict=True) if spec)

    def ends(self) -> set[int]:
        """Token counts at which a pass ended."""
        ends, total = set(), 0
        for n in self.emitted:
            total += n
            ends.add(total)
        return ends


@torch.inference_mode()
def core_rounds(model_dir, prompt: str, params: SamplingParams, seed: int | None = None) -> Rounds:
    """The prompt appended, then SpeculativeDecoder rounds on one stream in this process."""
    loaded = stories(model_dir)
    engine = StreamingInference(loaded.model, CONFIG, tokenizer=loaded.tokenizer)
    row = engine.open_row(seed)
    encoder = IncrementalEncoder(loaded.tokenizer)
    for _ in engine.append(row, encoder.push(prompt) + encoder.flush()):
        pass
    decoder = SpeculativeDecoder(Generation(engine, row, params, loaded.tokenizer), K)
    rounds = Rounds([], [], [])
    while not decoder.gen.finished:
        first = decoder.first()
        drafts = decoder.propose(first)
        if drafts:
            emitted = decoder.verify(first, drafts)
        else:
            engine.step({row: [first[0]]})
            emitted = [decoder.gen.accept(*first)]
        rounds.token_ids += [t.token_id for t in emitted]
        rounds.emitted.append(len(emitted))
        rounds.speculative.append(bool(drafts))
    return rounds


def counters(server) -> tuple[float, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics",
                                  timeout=10).read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith((PASSES, ACCEPTED))}
    return values[PASSES], values[ACCEPTED]


def generate(server, prompt: str, params: GenerateParams, seed: int | None = None) -> GenerationResult:
    with SinkStreamClient(server.address, timeout=120) as client, \
            client.open_session(SETTINGS, seed=seed) as session:
        session.append_text(prompt)
        return session.generate(params)


def assert_same_generation(got: GenerationResult, want: GenerationResult) -> None:
    assert [t.token_id for t in got.tokens] == [t.token_id for t in want.tokens]
    assert [t.text for t in got.tokens] == [t.text for t in want.tokens]
    assert got.text == want.text and got.stop_reason == want.stop_reason
    assert got.generated_tokens == want.generated_tokens and got.tokens_seen == want.tokens_seen
    assert [t.index for t in got.tokens] == list(range(len(want.tokens)))
    for a, b in zip(got.tokens, want.tokens, strict=True):
        assert abs(a.logprob - b.logprob) <= 1e-4


def check(plain, speculating, model_dir, params: GenerateParams, core: SamplingParams) -> GenerationResult:
    """Generate on both servers: same result; the speculating server's counters moved exactly as the core
    decoder's rounds say."""
    want = generate(plain, PROMPT, params)
    before = counters(speculating)
    got = generate(speculating, PROMPT, params)
    after = counters(speculating)
    assert_same_generation(got, want)
    rounds = core_rounds(model_dir, PROMPT, core)
    assert rounds.token_ids == [t.token_id for t in want.tokens]
    assert rounds.passes > 0 and rounds.accepted > 0  # the case does speculate
    assert (after[0] - before[0], after[1] - before[1]) == (rounds.passes, rounds.accepted)
    return want


def test_greedy_generation_is_the_plain_servers(plain, speculating, model_dir):
    check(plain, speculating, model_dir, GenerateParams(max_new_tokens=60, ignore_eos=True),
          SamplingParams(max_new_tokens=60, stop_on_eos=False))


def test_max_new_tokens_landing_mid_round(plain, speculating, model_dir):
    free = core_rounds(model_dir, PROMPT, SamplingParams(max_new_tokens=60, stop_on_eos=False))
    n = next(n for n in range(10, 60) if n not in free.ends())  # inside a pass of the unlimited run
    want = check(plain, speculating, model_dir, GenerateParams(max_new_tokens=n, ignore_eos=True),
                 SamplingParams(max_new_tokens=n, stop_on_eos=False))
    assert len(want.tokens) == n and want.stop_reason == "MAX_TOKENS"


def test_stop_sequence_landing_mid_round(plain, speculating, model_dir):
    loaded = stories(model_dir)
    free = core_rounds(model_dir, PROMPT, SamplingParams(max_new_tokens=60, stop_on_eos=False))
    text = loaded.tokenizer.decode(free.token_ids)
    for end in range(12, 60):  # a stop sequence whose first occurrence ends inside an unlimited run's pass
        stop = loaded.tokenizer.decode(free.token_ids[end - 2:end]).strip()
        first_end = text.find(stop) + len(stop)
        if len(stop) >= 3 and first_end == len(loaded.tokenizer.decode(free.token_ids[:end])) \
                and end not in free.ends():
            break
    else:
        pytest.fail("no stop sequence ends inside a speculative pass")
    want = check(plain, speculating, model_dir,
                 GenerateParams(max_new_tokens=60, ignore_eos=True, stop_sequences=[stop]),
                 SamplingParams(max_new_tokens=60, stop_on_eos=False, stop_sequences=(stop,)))
    assert want.stop_reason == "STOP_SEQUENCE" and len(want.tokens) == end


def test_speculating_beside_an_appending_session_equals_each_alone(plain, speculating, model_dir, sotu_path):
    text = sotu_path.read_text(encoding="utf-8")[:6000]
    params = GenerateParams(max_new_tokens=60, ignore_eos=True)
    alone = generate(plain, PROMPT, params)
    barrier = threading.Barrier(2)
    got: dict[str, object] = {}
    errors: list[BaseException] = []

    def speculate() -> None:
        with SinkStreamClient(speculating.address, timeout=120) as client, \
                client.open_session(SETTINGS) as session:
            session.append_text(PROMPT)
            barrier.wait()
            got["generation"] = session.generate(params)

    def append() -> None:
        with SinkStreamClient(speculating.address, timeout=120) as client, \
                client.open_session(SETTINGS) as session:
            barrier.wait()
            for piece in pieces(text, 500):
                session.send_text(piece)
            got["chunks"] = session.flush()

    def run(target) -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    before = counters(speculating)
    threads = [threading.Thread(target=run, args=(f,)) for f in (speculate, append)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    after = counters(speculating)
    assert_same_generation(got["generation"], alone)
    rounds = core_rounds(model_dir, PROMPT, SamplingParams(max_new_tokens=60, stop_on_eos=False))
    assert (after[0] - before[0], after[1] - before[1]) == (rounds.passes, rounds.accepted) != (0, 0)
    reference = reference_chunks(stories(model_dir), CONFIG, pieces(text, 500))
    want = torch.cat([r.logprobs for r in reference])
    have = torch.tensor([lp for c in got["chunks"] for lp in c.logprobs])
    assert have.shape == want.shape
    assert torch.allclose(have[1:], want[1:], atol=1e-4)  # the first token has no prediction (nan)


SAMPLED = GenerateParams(max_new_tokens=60, ignore_eos=True, temperature=0.8, top_k=40)
SAMPLED_CORE = SamplingParams(max_new_tokens=60, stop_on_eos=False, temperature=0.8, top_k=40)


def test_sampled_generation_is_the_core_speculative_decoders(speculating, model_dir):
    """Without a write-ahead log a sampled generation speculates too: seeded, it draws exactly the tokens
    the core's speculative decoder draws on the same stream (its distribution is checked in
    tests/test_speculative.py)."""
    before = counters(speculating)
    got = generate(speculating, PROMPT, SAMPLED, seed=7)
    after = counters(speculating)
    rounds = core_rounds(model_dir, PROMPT, SAMPLED_CORE, seed=7)
    assert [t.token_id for t in got.tokens] == rounds.token_ids and len(rounds.token_ids) == 60
    assert (after[0] - before[0], after[1] - before[1]) == (rounds.passes, rounds.accepted) != (0, 0)


def test_durable_server_speculates_greedy_but_not_sampled_generations(plain, model_dir, tmp_path):
    """With a write-ahead log (numbered requests) a sampled generation decodes plainly, one sampler draw per
    logged token as crash recovery needs: same tokens as the plain server, no speculative pass. Greedy
    generations still speculate, with the plain server's output."""
    durable = start_server(model_dir, speculate=K, metrics_port=0, state_dir=tmp_path)
    try:
        before = counters(durable)
        assert_same_generation(generate(durable, PROMPT, SAMPLED, seed=7), generate(plain, PROMPT, SAMPLED,
                                                                                      seed=7))
        assert counters(durable) == before
        greedy = GenerateParams(max_new_tokens=60, ignore_eos=True)
        assert_same_generation(generate(durable, PROMPT, greedy), generate(plain, PROMPT, greedy))
        rounds = core_rounds(model_dir, PROMPT, SamplingParams(max_new_tokens=60, stop_on_eos=False))
        after = counters(durable)
        assert (after[0] - before[0], after[1] - before[1]) == (rounds.passes, rounds.accepted) != (0, 0)
    finally:
        durable.stop()


def speculating_script() -> list[pb.StreamRequest]:
    """Numbered requests: the repetitive prompt, a greedy generation, more text, another."""
    requests = [pb.StreamRequest(append_text=pb.AppendText(text=PROMPT, flush=True)),
                pb.StreamRequest(generate=pb.Generate(max_new_tokens=60, ignore_eos=True)),
                pb.StreamRequest(append_text=pb.AppendText(text=" Tom had a red ball.", flush=True)),
                pb.StreamRequest(generate=pb.Generate(max_new_tokens=40, ignore_eos=True))]
    for seq, request in enumerate(requests, 1):
        request.seq, request.request_id = seq, f"r{seq}"
    return requests


@pytest.mark.parametrize("trial", range(2))
def test_kill9_mid_speculation_then_resume_equals_an_uninterrupted_run(model_dir, tmp_path, trial):
    """A speculating durable server killed with SIGKILL mid-generation and restarted: the resumed session
    gives bit for bit the tokens, log-probs and state of an uninterrupted speculating run (recovery runs the
    logged speculative passes again)."""
    script, extra = speculating_script(), ("--speculate", str(K))
    want, want_state = uninterrupted(model_dir, tmp_path / "reference", script, 7, CONFIG.chunk,
                                     window=CONFIG.window, extra=extra)
    kill_at = random.Random(2000 + trial).randrange(5, want.responses - 5)
    got, state, run = killed_run(model_dir, tmp_path / "killed", script, 7, CONFIG.chunk, kill_at,
                                 window=CONFIG.window, extra=extra)
    assert run["killed"] == 1
    assert state == want_state
    assert mismatches(got, want) == []


def test_cancellation_and_time_limit_leave_exactly_the_sent_tokens_in_the_stream(speculating):
    """Checked before each pass, as for plain decoding: a cancelled or timed-out speculating generation
    ends with every token it emitted sent, and the stream holds the prompt and exactly those tokens (no
    rejected or unsent draft); the session goes on."""
    long = GenerateParams(max_new_tokens=200, ignore_eos=True)
    with SinkStreamClient(speculating.address, timeout=120) as client, \
            client.open_session(SETTINGS) as session:
        prompt_seen = session.append_text(PROMPT)[-1].tokens_seen
        sent = []
        for token in session.generate_stream(long):
            sent.append(token)
            if token.index == 4:
                session.cancel_generation()
        result = session.last_generation
        assert result.stop_reason == "CANCELLED" and 5 <= result.generated_tokens < 200
        assert [t.index for t in sent] == list(range(result.generated_tokens))
        assert result.tokens_seen == prompt_seen + result.generated_tokens
        seen = result.tokens_seen
        timed = session.generate(GenerateParams(max_new_tokens=4096, ignore_eos=True, time_limit_ms=200))
        assert timed.stop_reason == "TIME_LIMIT" and len(timed.tokens) == timed.generated_tokens
        assert timed.tokens_seen == seen + timed.generated_tokens
        again = session.generate(GenerateParams(max_new_tokens=3, ignore_eos=True))
        assert again.stop_reason == "MAX_TOKENS" and again.tokens_seen == timed.tokens_seen + 3
