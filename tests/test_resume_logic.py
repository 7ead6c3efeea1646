"""The client's durability bookkeeping (clients/resume.py) against straightforward references: numbering,
the replay buffer (what is re-sent after a resume at any acknowledged point), its cap, and the
de-duplication of chunk results and generated tokens a resumed stream delivers again."""

from __future__ import annotations

import dataclasses
import math
import random

import grpc
import pytest

from sinkstream.clients import protocol
from sinkstream.clients.results import ChunkResult, GeneratedToken, SinkStreamError
from sinkstream.clients.resume import Delivered, ReplayBuffer, ResumePolicy, new_token
from sinkstream.v1 import sinkstream_pb2 as pb


def random_request(rng: random.Random) -> pb.StreamRequest:
    kind = rng.choice(["text", "tokens", "message", "generate", "checkpoint", "cancel"])
    if kind == "text":
        return protocol.append_text_request("x" * rng.randrange(50), flush=rng.random() < 0.3)
    if kind == "tokens":
        return protocol.append_tokens_request(range(rng.randrange(20)), flush=rng.random() < 0.3)
    if kind == "message":
        return protocol.append_message_request("user", "hi", flush=rng.random() < 0.5)
    if kind == "generate":
        return pb.StreamRequest(generate=pb.Generate(max_new_tokens=4))
    return protocol.checkpoint_request() if kind == "checkpoint" else protocol.cancel_request()


@pytest.mark.parametrize("seed", range(20))
def test_resend_is_every_unacknowledged_request_plus_lost_answers(seed):
    rng = random.Random(seed)
    start = rng.choice([0, 0, 7])  # a new session, or one resumed at acked_seq 7
    buffer = ReplayBuffer(ResumePolicy(), acked_seq=start)
    sent: list[pb.StreamRequest] = []
    answered: set[str] = set()
    acked = start
    for i in range(rng.randrange(5, 60)):
        request = random_request(rng)
        request.request_id = str(i)
        buffer.number(request)
        sent.append(request)
        if rng.random() < 0.3:  # cumulative acks, sometimes repeated or stale
            acked = max(acked, rng.randrange(acked, buffer.last_seq + 1))
            buffer.on_ack(acked)
        if rng.random() < 0.5:  # some final answers arrive
            for r in sent:
                kind = r.WhichOneof("kind")
                final = {"generate": "generation_complete", "checkpoint": "checkpointed"}.get(kind)
                if kind.startswith("append") and getattr(r, kind).flush:
                    final = "flushed"
                if final and r.request_id not in answered and rng.random() < 0.5:
                    assert buffer.on_answer(r.request_id, final)
                    answered.add(r.request_id)
                    if r.seq > acked:  # still replayable: a re-delivery of its answer is dropped
                        assert not buffer.on_answer(r.request_id, final)
    numbered = [r for r in sent if r.seq]
    # numbering: 1, 2, 3, ... after the starting point, only for state-changing requests
    assert [r.seq for r in numbered] == list(range(start + 1, start + 1 + len(numbered)))
    assert all(r.WhichOneof("kind") in ("append_text", "append_tokens", "append_message", "generate")
               for r in numbered)
    assert all(r.WhichOneof("kind") in ("checkpoint", "cancel") for r in sent if not r.seq)
    # the reference: after a resume at `at`, every numbered request above it in order, and for earlier
    # requests whose final answer was lost, what makes the server answer again
    at = rng.randrange(acked, buffer.last_seq + 1)
    cancel = rng.random() < 0.5
    want = []
    for r in sent:
        kind = r.WhichOneof("kind")
        flush = kind.startswith("append") and getattr(r, kind).flush
        if r.seq > at:
            want.append(r)
        elif r.request_id in answered:
            continue
        elif flush:
            want.append(pb.StreamRequest(request_id=r.request_id, append_text=pb.AppendText(flush=True)))
        elif kind in ("generate", "checkpoint"):
            want.append(r)
    if cancel:
        want.append(protocol.cancel_request())
    assert buffer.resend_after(at, cancel) == want
    assert buffer.unacked_count() == buffer.last_seq - at


def test_an_acknowledgement_beyond_what_was_sent_is_refused():
    buffer = ReplayBuffer(ResumePolicy())
    buffer.number(tokens(1))
    with pytest.raises(SinkStreamError) as caught:
        buffer.resend_after(2, cancel_pending=False)
    assert caught.value.code == grpc.StatusCode.DATA_LOSS and "another client" in caught.value.message


def tokens(i: int) -> pb.StreamRequest:
    """An append of one token, with a request id of its own (the session stamps one on every request)."""
    request = protocol.append_tokens_request([i], flush=False)
    request.request_id = f"r{next(IDS)}"
    return request


IDS = iter(range(1 << 30))


def test_the_buffer_is_capped_backpressure_once_acked_and_given_up_if_never_acked():
    policy = ResumePolicy(max_unacked_bytes=1000, max_unacked_requests=5, first_ack_timeout_s=0)
    acking = ReplayBuffer(policy)
    silent = ReplayBuffer(policy)
    for buffer in (acking, silent):
        for i in range(5):
            buffer.number(tokens(i))
        assert not buffer.full()
    acking.on_ack(1)
    for buffer in (acking, silent):
        buffer.number(tokens(9))
    assert acking.unacked_count() == 5 and not acking.full()
    acking.number(tokens(9))
    assert acking.full() and not acking.give_up_if_never_acked()  # the sender waits for acks
    acking.on_ack(3)
    assert not acking.full()
    patient = ReplayBuffer(dataclasses.replace(policy, first_ack_timeout_s=1e9))
    for i in range(6):
        patient.number(tokens(i))
    assert patient.full() and not patient.give_up_if_never_acked()  # waits for the first ack a while
    # a server that never acknowledged: numbering stops, the buffer is emptied, no replay is possible
    assert silent.full() and silent.give_up_if_never_acked()
    assert not silent.durable and silent.unacked_count() == 0 and not silent.full()
    later = tokens(1)
    silent.number(later)
    assert later.seq == 0
    with pytest.raises(SinkStreamError) as caught:
        silent.resend_after(2, cancel_pending=False)
    assert caught.value.code == grpc.StatusCode.DATA_LOSS and "cannot be replayed" in caught.value.message
    big = ReplayBuffer(policy)
    big.number(protocol.append_text_request("y" * 2000, flush=False))
    assert big.full()  # the byte cap counts too


def chunks_of(positions: list[int], start: int = 0) -> list[ChunkResult]:
    """Chunk results covering stream positions [start, end) cut at `positions`; token i has id i and
    log-prob -i/100 (token 0 NaN)."""
    out, first = [], start
    for end in positions:
        ids = list(range(first, end))
        out.append(ChunkResult(num_tokens=len(ids), tokens_seen=end, scored_tokens=end, mean_nll=0.0,
                               perplexity=1.0, token_ids=ids,
                               logprobs=[math.nan if i == 0 else -i / 100 for i in ids]))
        first = end
    return out


@pytest.mark.parametrize("seed", range(20))
def test_chunk_dedup_delivers_each_token_exactly_once(seed):
    rng = random.Random(seed)
    n = rng.randrange(50, 400)
    cuts = sorted(rng.sample(range(1, n), rng.randrange(1, 12))) + [n]
    delivered = Delivered(0)
    got: list[ChunkResult] = []
    # the original stream up to a crash point, then a resumed stream re-delivering from an earlier point
    # (the server's recovered position), chunked differently
    crash = rng.randrange(len(cuts))
    for c in chunks_of(cuts[:crash]):
        if (kept := delivered.chunk(c)) is not None:
            got.append(kept)
    delivered.resumed = True
    restart = rng.choice([0] + cuts[:crash])  # the server recovered to a chunk boundary it had
    recuts = sorted(set(rng.sample(range(restart + 1, n + 1), min(5, n - restart))) | {n})
    for c in chunks_of(recuts, restart):
        if (kept := delivered.chunk(c)) is not None:
            got.append(kept)
    ids = [i for c in got for i in c.token_ids]
    assert ids == list(range(n))
    lps = [x for c in got for x in c.logprobs]
    assert math.isnan(lps[0]) and lps[1:] == [-i / 100 for i in range(1, n)]
    assert all(c.num_tokens == len(c.token_ids) for c in got)


def test_a_hole_after_a_resume_is_data_loss_not_silence():
    delivered = Delivered(0)
    for c in chunks_of([10, 20]):
        delivered.chunk(c)
    delivered.resumed = True
    with pytest.raises(SinkStreamError) as caught:
        delivered.chunk(chunks_of([40], start=30)[0])
    assert caught.value.code == grpc.StatusCode.DATA_LOSS and "20..30" in caught.value.message
    fresh = Delivered(100)  # an explicitly resumed session starts at its tokens_seen
    assert fresh.chunk(chunks_of([132], start=100)[0]).num_tokens == 32


def test_generated_tokens_are_deduplicated_by_index_and_must_match():
    def tok(i: int, tid: int) -> GeneratedToken:
        return GeneratedToken(token_id=tid, text=str(tid), logprob=-1.0, index=i)

    run = [tok(0, 5), tok(1, 6)]
    assert not new_token(tok(0, 5), run) and not new_token(tok(1, 6), run)
    assert new_token(tok(2, 7), run)
    with pytest.raises(SinkStreamError) as caught:
        new_token(tok(1, 9), run)
    assert caught.value.code == grpc.StatusCode.DATA_LOSS
    with pytest.raises(SinkStreamError):
        new_token(tok(4, 9), run)  # a gap in a generation


def test_backoff_is_bounded_by_the_resume_timeout():
    assert list(ResumePolicy(resume_timeout_s=0).delays()) == []
    delays = ResumePolicy(resume_timeout_s=0.05, initial_backoff_s=0.01, max_backoff_s=0.02).delays()
    assert next(delays) == 0.01 and next(delays) <= 0.02


def test_a_generation_the_server_no_longer_holds_is_data_loss_not_a_hang():
    buffer = ReplayBuffer(ResumePolicy())
    generate = pb.StreamRequest(request_id="g", generate=pb.Generate(max_new_tokens=4))
    buffer.number(generate)
    buffer.on_ack(1)  # acknowledged (the server had finished it) but its GenerationComplete was lost
    assert buffer.resend_after(1, cancel_pending=False) == [generate]  # asked again
    with pytest.raises(SinkStreamError) as caught:
        buffer.on_ack(1)  # answered with ack only: the server kept a later generation's result
    assert caught.value.code == grpc.StatusCode.DATA_LOSS and "seq 1" in caught.value.message
    again = ReplayBuffer(ResumePolicy())
    again.number(generate)
    again.on_ack(1)
    again.resend_after(1, cancel_pending=False)
    assert again.on_answer("g", "generation_complete")
    again.on_ack(1)  # the result came first: fine


def test_a_refused_request_keeps_its_number_until_acknowledged():
    """The server answers a refused numbered request with its error and acknowledges its number (it takes
    it): the request stays in the buffer until that ack, and the requests after it keep their numbers."""
    buffer = ReplayBuffer(ResumePolicy())
    refused, newest = tokens(1), tokens(2)
    buffer.number(refused)
    buffer.number(newest)
    assert (refused.seq, newest.seq) == (1, 2)
    buffer.on_error(refused.request_id)
    assert buffer.unacked_count() == 2
    assert buffer.resend_after(0, cancel_pending=False) == [refused, newest]  # a duplicate, then the next
    buffer.on_ack(1)
    assert buffer.unacked_count() == 1 and newest.seq == 2 == buffer.last_seq
    assert buffer.resend_after(1, cancel_pending=False) == [newest]
