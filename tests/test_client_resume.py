"""The clients' automatic resume, transport level, against tests/durable_script.py (a real gRPC server
following the acknowledgement contract with a toy model, crashing at chosen responses): the caller of the
sync and asyncio sessions sees exactly what an uninterrupted run gives (every chunk's token once, each
generation whole), whatever response the crash hits, with UNAVAILABLE, CANCELLED or INTERNAL.
End to end against the real server (kill -9, restart): tests/test_durable_resume.py."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random

import grpc
import pytest
from durable_script import DurableScript, serve

from sinkstream.clients.aio import AsyncSinkStreamClient
from sinkstream.clients.client import SinkStreamClient
from sinkstream.clients.results import GenerateParams, SinkStreamError
from sinkstream.clients.resume import ResumePolicy

FAST = ResumePolicy(resume_timeout_s=10, initial_backoff_s=0.01, max_backoff_s=0.05)
PIECES = [f"piece {i} of the document; " * (1 + i % 3) for i in range(12)]


def summary(chunks, generations) -> tuple:
    ids = [t for c in chunks for t in c.token_ids]
    lps = ["nan" if math.isnan(x) else x for c in chunks for x in c.logprobs]
    gens = [([t.token_id for t in g.tokens], [t.index for t in g.tokens], g.text, g.tokens_seen)
            for g in generations]
    return ids, lps, gens, [c.tokens_seen for c in chunks][-1:]


def run_sync(address: str, policy: ResumePolicy = FAST, token: str | None = None) -> tuple[tuple, int]:
    with SinkStreamClient(address, timeout=60, resume=policy, token=token) as client:
        session = client.open_session()
        chunks = list(session.stream_text(PIECES))
        chunks += session.append_tokens([5, 6, 7])
        gens = [session.generate(GenerateParams(max_new_tokens=12))]
        chunks += session.append_text("and then some more")
        streamed = list(session.generate_stream(GenerateParams(max_new_tokens=6)))
        assert streamed == session.last_generation.tokens
        gens.append(session.last_generation)
        chunks += session.append_text("the end")
        session.close()
    return summary(chunks, gens), session.resumes


def run_async(address: str, policy: ResumePolicy = FAST, token: str | None = None) -> tuple[tuple, int]:
    async def main():
        async with AsyncSinkStreamClient(address, timeout=60, resume=policy, token=token) as client:
            session = await client.open_session()
            chunks = [c async for c in session.stream_text(PIECES)]
            chunks += await session.append_tokens([5, 6, 7])
            gens = [await session.generate(GenerateParams(max_new_tokens=12))]
            chunks += await session.append_text("and then some more")
            streamed = [t async for t in session.generate_stream(GenerateParams(max_new_tokens=6))]
            assert streamed == session.last_generation.tokens
            gens.append(session.last_generation)
            chunks += await session.append_text("the end")
            await session.close()
        return summary(chunks, gens), session.resumes

    return asyncio.run(main())


def scripted(crash_at: list[int], code=grpc.StatusCode.UNAVAILABLE, acks: bool = True):
    servicer = DurableScript(crash_at, code, acks)
    server, address = serve(servicer)
    return servicer, server, address


@pytest.fixture(scope="module")
def uninterrupted():
    servicer, server, address = scripted([])
    try:
        want, resumes = run_sync(address)
        assert resumes == 0
        return want, servicer.sent
    finally:
        server.stop(0)


@pytest.mark.parametrize("runner", [run_sync, run_async], ids=["sync", "asyncio"])
@pytest.mark.parametrize("seed", range(6))
def test_crashes_anywhere_are_invisible_to_the_caller(uninterrupted, runner, seed):
    want, responses = uninterrupted
    rng = random.Random(seed)
    crashes = sorted(rng.sample(range(1, responses), 1 + seed % 3))
    code = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.INTERNAL][seed % 3]
    servicer, server, address = scripted(crashes, code)
    try:
        got, resumes = runner(address)
    finally:
        server.stop(0)
    assert got == want
    assert resumes == len(crashes) and not servicer.crash_at  # every crash happened and was resumed


@pytest.mark.parametrize("runner", [run_sync, run_async], ids=["sync", "asyncio"])
def test_a_resumed_call_carries_the_token_and_the_routing_metadata(uninterrupted, runner):
    """Each resume reconnects with the client's token (a server with --auth-tokens would refuse it
    otherwise) and routes on the session's id (the server assigned it: the first call had none)."""
    want, responses = uninterrupted
    servicer, server, address = scripted([responses // 3, 2 * responses // 3])
    try:
        got, resumes = runner(address, token="resume-token-0123456789")
    finally:
        server.stop(0)
    assert got == want and resumes == 2
    wanted = ("authorization", "x-session-id")
    sent = [{k: v for k, v in call.items() if k in wanted} for call in servicer.calls]
    bearer = {"authorization": "Bearer resume-token-0123456789"}
    assert sent == [bearer] + [{**bearer, "x-session-id": "s1"}] * 2


def test_a_gone_session_fails_with_a_clear_error_and_resume_can_be_turned_off():
    servicer, server, address = scripted([4])
    try:
        with SinkStreamClient(address, timeout=60, resume=FAST) as client:
            session = client.open_session()
            session.append_text("abc")
            servicer.sessions.clear()  # the session is gone (expired, closed elsewhere)
            with pytest.raises(SinkStreamError) as caught:
                session.append_text("defgh")
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        message = caught.value.message
        assert "could not be resumed" in message and "gone from the server" in message
        servicer.crash_at = [servicer.sent + 1]
        with SinkStreamClient(address, timeout=60, resume=ResumePolicy(resume_timeout_s=0)) as client:
            session = client.open_session()
            with pytest.raises(SinkStreamError) as caught:
                session.append_text("abcdef")
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE and session.resumes == 0
    finally:
        server.stop(0)


def test_resuming_gives_up_after_the_resume_timeout():
    servicer, server, address = scripted([3])
    with SinkStreamClient(address, timeout=60, resume=ResumePolicy(
            resume_timeout_s=0.5, initial_backoff_s=0.05, max_backoff_s=0.1)) as client:
        session = client.open_session()
        session.append_text("abc")
        server.stop(0).wait()  # the server never comes back
        with pytest.raises(SinkStreamError) as caught:
            session.append_text("defgh")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and "gave up after 0.5 s" in caught.value.message


@pytest.mark.parametrize("runner", [run_sync, run_async], ids=["sync", "asyncio"])
def test_a_close_whose_answer_is_lost_still_closes(uninterrupted, runner):
    want, responses = uninterrupted
    servicer, server, address = scripted([responses - 1])  # the crash swallows the Closed answer
    try:
        got, resumes = runner(address)
    finally:
        server.stop(0)
    assert got == want and resumes == 0 and not servicer.sessions


@pytest.mark.parametrize("runner", [run_sync, run_async], ids=["sync", "asyncio"])
def test_a_tiny_replay_buffer_applies_backpressure_and_changes_nothing(uninterrupted, runner):
    want, responses = uninterrupted
    tiny = dataclasses.replace(FAST, max_unacked_requests=1)  # every send waits for the previous ack
    servicer, server, address = scripted([responses // 3, 2 * responses // 3])
    try:
        got, resumes = runner(address, tiny)
    finally:
        server.stop(0)
    assert got == want and resumes == 2


@pytest.mark.parametrize("runner", [run_sync, run_async], ids=["sync", "asyncio"])
def test_a_server_that_never_acknowledges_bounds_the_buffer_and_ends_auto_resume(uninterrupted, runner,
                                                                                 caplog):
    want, responses = uninterrupted
    capped = dataclasses.replace(FAST, max_unacked_requests=3, first_ack_timeout_s=0.2)
    servicer, server, address = scripted([], acks=False)
    try:
        assert runner(address, capped) == (want, 0)  # numbering stops, nothing else changes
        assert "no acknowledgement after 4 requests" in caplog.text  # the cap, not more
        servicer.crash_at = [servicer.sent + responses // 2]
        with pytest.raises(SinkStreamError) as caught:
            runner(address, capped)
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE  # not resumed: nothing could be replayed
    finally:
        server.stop(0)
