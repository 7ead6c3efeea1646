"""Fuzz test of the Stream surface: random request sequences from concurrent clients against one real server
never get an undocumented status, never take the server out of SERVING, and never change what a canary
session running alongside gets (see stream_fuzz.py for the strategies and invariants; the long run is
scripts/fuzz_stream.py).

Inputs that hit bugs already reported in issue 12 are left out here (stream_fuzz.KNOWN_BUGS); each has
its own strict xfail test below, which starts passing - and so fails as XPASS - when its fix lands."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from service_support import start_server
from stream_fuzz import (
    BATCH_MATE_SHAPE,
    SERVER_MAX_NEW_TOKENS,
    CallScript,
    Outcome,
    alone_canaries,
    client_scripts,
    enabled_known_bugs,
    run_call,
    run_example,
)

from sinkstream.v1 import sinkstream_pb2 as pb

CLIENTS = 3


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    # A state directory so checkpoints and evictions are exercised too; room for every client's shapes.
    srv = start_server(model_dir, state_dir=tmp_path_factory.mktemp("fuzz-state"),
                       max_new_tokens=SERVER_MAX_NEW_TOKENS, max_cache_shapes=2 * CLIENTS + 2)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def alone(server):
    """The canaries' results on the fresh server, before any fuzz client ran."""
    return asyncio.run(alone_canaries(server.address))


# No shrinking: a violation already prints its whole example, and shrinking would take minutes.
@settings(max_examples=15, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(clients=st.lists(client_scripts(enabled_known_bugs()), min_size=CLIENTS, max_size=CLIENTS))
def test_random_streams_keep_server_serving_and_canaries_exact(server, alone, clients):
    outcome = asyncio.run(run_example(server.address, clients, alone))
    assert not outcome.violations, "\n".join(outcome.violations)


def _open(shape_settings: pb.SessionSettings) -> pb.StreamRequest:
    return pb.StreamRequest(request_id="open", open=pb.OpenSession(settings=shape_settings))


def test_subnormal_temperature_never_touches_batch_mates(server, alone):
    """Fuzz finding (issue 12 #1): temperature = 1e-45 passed validation, the sampler divided to inf and
    multinomial failed the whole batched pass, dropping the batch-mate canary's input with INTERNAL."""
    script = CallScript([
        _open(BATCH_MATE_SHAPE.settings()),
        pb.StreamRequest(request_id="a", append_text=pb.AppendText(text="Once upon a time")),
        pb.StreamRequest(request_id="g", generate=pb.Generate(temperature=1e-45, max_new_tokens=8)),
    ])
    outcome = asyncio.run(run_example(server.address, [[script]], alone))
    assert not outcome.violations, "\n".join(outcome.violations)


def test_a_refused_close_leaves_the_stream_usable(server):
    """Fuzz finding: open, then close with a 300-byte request id. The close is refused (in-stream
    INVALID_ARGUMENT); the server used to stop reading, so the call hung to its deadline, attached."""
    script = CallScript([_open(BATCH_MATE_SHAPE.settings()),
                         pb.StreamRequest(request_id="x" * 300, close=pb.Close())])
    outcome = Outcome()
    with grpc.insecure_channel(server.address) as channel:
        run_call(channel, script, outcome, deadline_s=5.0)
    assert not outcome.violations, "\n".join(outcome.violations)


@pytest.mark.parametrize("tier", [pb.TierSpec(slots=2, ratio=2**32 - 1), pb.TierSpec(slots=2, ratio=8)])
def test_unholdable_tiers_are_invalid_argument(server, tier):
    """Fuzz finding (issue 12 #6): tiers the core's tier check refuses used to pass the service's
    validation and end the call INTERNAL at row creation."""
    async def status() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = pb_grpc_stub(channel).Stream(iter([_open(pb.SessionSettings(tiers=[tier]))]), timeout=30)
            try:
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return await call.code()

    assert asyncio.run(status()) == grpc.StatusCode.INVALID_ARGUMENT


def pb_grpc_stub(channel: grpc.aio.Channel):
    from sinkstream.v1 import sinkstream_pb2_grpc
    return sinkstream_pb2_grpc.SinkStreamStub(channel)
