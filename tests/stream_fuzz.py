"""Fuzzing the Stream surface: hypothesis strategies for random request sequences, a runner that sends
them from concurrent clients with the generated stubs (plus raw bytes for undecodable messages), and
the invariants checked after each example.

Used by tests/test_fuzz_stream.py (a few derandomized examples in CI) and scripts/fuzz_stream.py (the
long run). Invariants, per example:
- every call ends with a status the .proto documents for what was sent (never UNKNOWN, never INTERNAL,
  never a hang: every call has a deadline), every in-stream `Error` carries a documented code, no
  generation ends with STOP_REASON_ERROR, every response has its `kind` set and echoes a request id
  that was sent (or is empty);
- the server answers SERVING on grpc.health.v1 afterwards;
- two canary sessions running alongside get what they get alone on a fresh server: the `private` one
  (a cache shape no fuzz client uses, so every forward pass it is in holds only its own rows) bit for
  bit; the `batch-mate` one (the shape most fuzz sessions use, so it shares passes with them) exact
  token ids and text, logprobs within 1e-4 (batched passes of other sizes round differently).

Inputs that trigger bugs already reported in issue 12 are behind KNOWN_BUGS switches: off by default
(CI stays green while the fixes land), on with SINKSTREAM_FUZZ_KNOWN_BUGS=all (or a comma list of names).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import strategies as st

from sinkstream.v1 import sinkstream_pb2 as pb
from sinkstream.v1 import sinkstream_pb2_grpc as pb_grpc

STREAM_METHOD = "/sinkstream.v1.SinkStream/Stream"
CALL_DEADLINE_S = 30.0  # a call still open after this is a hang (an example needs well under a second)
VOCAB_SIZE = 512  # stories260K
MAX_REQUEST_ID_BYTES = 256  # the server's limit (service/convert.py)
SERVER_MAX_NEW_TOKENS = 32  # the fuzz server's limit: keeps every generation short

# Findings of issue 12 whose inputs would fail an invariant until their fix lands: name -> finding.
# Inputs that trigger a bug not fixed yet go here (name -> finding), generated only when switched on. The
# three the first runs found (extreme sampling parameters, unholdable tiers, a refused close) are fixed and
# generated always; tests/test_fuzz_stream.py keeps their minimal reproductions as regression tests.
KNOWN_BUGS: dict[str, str] = {}


def enabled_known_bugs() -> frozenset[str]:
    """The KNOWN_BUGS names whose inputs are generated (SINKSTREAM_FUZZ_KNOWN_BUGS: 'all' or a comma list)."""
    value = os.environ.get("SINKSTREAM_FUZZ_KNOWN_BUGS", "")
    if value.strip() == "all":
        return frozenset(KNOWN_BUGS)
    names = frozenset(n.strip() for n in value.split(",") if n.strip())
    unknown = names - KNOWN_BUGS.keys()
    if unknown:
        raise ValueError(f"unknown SINKSTREAM_FUZZ_KNOWN_BUGS names {sorted(unknown)}; "
                         f"known: {sorted(KNOWN_BUGS)}")
    return names


# ---------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    """A cache shape (SessionSettings without analysis)."""

    sink_tokens: int
    window: int
    chunk: int

    def settings(self, **analysis) -> pb.SessionSettings:
        return pb.SessionSettings(sink_tokens=self.sink_tokens, window=self.window, chunk=self.chunk,
                                  analysis=pb.AnalysisOptions(**analysis))


BATCH_MATE_SHAPE = Shape(4, 60, 16)  # the shape fuzz sessions use most: the batch-mate canary shares it
FUZZ_SHAPES = (BATCH_MATE_SHAPE, Shape(0, 24, 8))
PRIVATE_SHAPE = Shape(2, 40, 12)  # never used by a fuzz session


# ---------------------------------------------------------------------------------------------- statuses
# How a Stream call may end, from the .proto: OK; INVALID_ARGUMENT (a bad field, a malformed message);
# NOT_FOUND (resume of an unknown id); ALREADY_EXISTS (open of a live id); ABORTED (resume of an attached
# session); FAILED_PRECONDITION (first request not open/resume); RESOURCE_EXHAUSTED (limits: sessions,
# cache shapes, message size). CANCELLED only when the client cancelled the call itself.
STREAM_END_CODES = frozenset({
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED})
# A rejected request inside a healthy stream (StreamResponse.error): bad fields, misplaced open/resume,
# generate on an empty stream; RESOURCE_EXHAUSTED for a checkpoint the disk cannot hold.
IN_STREAM_ERROR_CODES = frozenset({
    pb.ERROR_CODE_INVALID_ARGUMENT, pb.ERROR_CODE_FAILED_PRECONDITION, pb.ERROR_CODE_RESOURCE_EXHAUSTED})


# ---------------------------------------------------------------------------------------------- strategies
U32_EDGES = (0, 1, 2, 7, 255, 511, 512, 513, 2**31 - 1, 2**31, 2**32 - 1)
U64_EDGES = (0, 1, 2**53, 2**63 - 1, 2**63, 2**64 - 1)
FLOAT_EDGES = (0.0, -0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 3.4e38, -3.4e38, 1e-45)
ID_POOL = ("fz-a", "fz-b", "fz-c")  # fuzz sessions' ids, so opens collide and resumes find something
# Text the model knows, multi-byte text and odd code points: pieces are cut anywhere between code points.
STORY = "Once upon a time, there was a little girl named Lily. She loved to play outside. "
MULTIBYTE = "héllo wörld — ünïcödé 😀👩‍👩‍👧 中文字符 \u0301e\u200d\ufeff "

u32 = st.one_of(st.sampled_from(U32_EDGES), st.integers(0, 2**32 - 1))
u64 = st.one_of(st.sampled_from(U64_EDGES), st.integers(0, 2**64 - 1))
any_float = st.one_of(st.sampled_from(FLOAT_EDGES), st.floats(width=32))


def _cut(source: str) -> st.SearchStrategy[str]:
    return st.tuples(st.integers(0, len(source)), st.integers(0, 120)).map(
        lambda t: (source * 3)[t[0]:t[0] + t[1]])


texts = st.one_of(
    st.just(""), _cut(STORY), _cut(MULTIBYTE),
    st.text(max_size=200),  # any code points but surrogates (protobuf strings are UTF-8)
    st.text(alphabet="ab \n", min_size=500, max_size=1500),  # long
)
request_ids = st.one_of(
    st.just(""), st.just("dup"), st.text(alphabet="abc123-", max_size=12), st.text(max_size=20),
    st.text(alphabet="x", min_size=250, max_size=1000),  # around and past the server's 256-byte limit
)
session_ids = st.one_of(
    st.just(""), st.sampled_from(ID_POOL),
    st.sampled_from((".", "..", "-rf", "a/b", "../x", "é", " ", "\x00")),
    st.text(alphabet="Zz9._-", min_size=1, max_size=140), st.text(max_size=10),
)


@st.composite
def analysis_options(draw) -> pb.AnalysisOptions:
    return pb.AnalysisOptions(logprobs=draw(st.booleans()), token_ids=draw(st.booleans()),
                              embeddings=draw(st.booleans()),
                              top_k=draw(st.one_of(st.integers(0, 8), st.sampled_from((64, 65, 2**32 - 1)))))


@st.composite
def session_settings(draw, known_bugs: frozenset[str]) -> pb.SessionSettings:
    """Mostly the fuzz shapes (so sessions batch together), sometimes arbitrary numbers."""
    settings = pb.SessionSettings(analysis=draw(analysis_options()))
    if draw(st.integers(0, 3)):
        shape = draw(st.sampled_from(FUZZ_SHAPES))
        settings.sink_tokens, settings.window, settings.chunk = shape.sink_tokens, shape.window, shape.chunk
    else:
        for name in ("sink_tokens", "window", "chunk"):
            if draw(st.booleans()):
                setattr(settings, name, draw(st.one_of(u32, st.integers(0, 80))))
        for _ in range(draw(st.integers(0, 3))):
            settings.tiers.add(slots=draw(st.one_of(u32, st.integers(0, 16))),
                               ratio=draw(st.one_of(u32, st.integers(0, 8))))
        settings.merge_policy = draw(st.sampled_from(("", "mean", "attention", "heavy-hitters", "max", "é")))
    if (settings.sink_tokens, settings.window, settings.chunk) == (
            PRIVATE_SHAPE.sink_tokens, PRIVATE_SHAPE.window, PRIVATE_SHAPE.chunk) and not settings.tiers:
        settings.window += 1  # keep the private canary's shape to itself
    return settings


@st.composite
def generate_requests(draw, known_bugs: frozenset[str]) -> pb.Generate:
    sane_temperature = st.one_of(st.just(0.0), st.floats(0.25, 2.0, width=32))
    g = pb.Generate(
        temperature=draw(st.one_of(sane_temperature, any_float)),
        top_k=draw(st.one_of(st.integers(0, 20), u32)),
        top_p=draw(st.one_of(st.just(0.0), st.floats(0.125, 1.0, width=32), st.sampled_from(
            (1.5, -0.5, math.nan, math.inf)))),
        repetition_penalty=draw(st.one_of(st.just(0.0), st.floats(0.5, 2.0, width=32), any_float)),
        max_new_tokens=draw(st.one_of(st.integers(0, 8), st.sampled_from(
            (SERVER_MAX_NEW_TOKENS + 1, 2**32 - 1)))),
        stop_sequences=draw(st.lists(st.one_of(st.just(""), st.text(max_size=4), st.sampled_from(
            (" ", ".", "e", "😀"))), max_size=18)),
        include_stop_sequence=draw(st.booleans()),
        time_limit_ms=draw(st.sampled_from((0, 0, 1, 50, 2**32 - 1))),
        ignore_eos=draw(st.booleans()),
    )
    if draw(st.booleans()):
        g.seed = draw(u64)
    return g


def _message(request_id: str, **kind) -> pb.StreamRequest:
    return pb.StreamRequest(request_id=request_id, **kind)


@st.composite
def open_request(draw, known_bugs: frozenset[str]) -> pb.StreamRequest:
    request = pb.OpenSession(settings=draw(session_settings(known_bugs)), session_id=draw(session_ids))
    if draw(st.booleans()):
        request.seed = draw(u64)
    return _message(draw(request_ids), open=request)


@st.composite
def resume_request(draw) -> pb.StreamRequest:
    request = pb.ResumeSession(session_id=draw(session_ids))
    if draw(st.booleans()):
        request.analysis.CopyFrom(draw(analysis_options()))
    return _message(draw(request_ids), resume=request)


UNKNOWN_FIELD = b"\x52\x03abc"  # field 10, length-delimited: a oneof member this server does not know


@st.composite
def later_request(draw, known_bugs: frozenset[str]) -> pb.StreamRequest | bytes:
    """Any request after the first, valid or not; bytes are sent as they are."""
    rid = draw(request_ids)
    kind = draw(st.sampled_from((
        "append_text", "append_text", "append_text", "append_tokens", "generate", "generate", "cancel",
        "checkpoint", "close", "empty", "unknown_field", "open", "resume", "undecodable")))
    if kind == "append_text":
        return _message(rid, append_text=pb.AppendText(text=draw(texts), flush=draw(st.booleans())))
    if kind == "append_tokens":
        ids = draw(st.lists(st.one_of(st.integers(0, VOCAB_SIZE - 1), st.sampled_from(
            (VOCAB_SIZE, 2**32 - 1))), max_size=80))
        return _message(rid, append_tokens=pb.AppendTokens(ids=ids, flush=draw(st.booleans())))
    if kind == "generate":
        return _message(rid, generate=draw(generate_requests(known_bugs)))
    if kind in ("cancel", "checkpoint", "close"):
        cls = {"cancel": pb.CancelGeneration, "checkpoint": pb.Checkpoint, "close": pb.Close}[kind]
        return _message(rid, **{kind: cls()})
    if kind == "empty":
        return _message(rid)
    if kind == "unknown_field":
        return _message(rid).SerializeToString() + UNKNOWN_FIELD
    if kind == "open":
        return draw(open_request(known_bugs))
    if kind == "resume":
        return draw(resume_request())
    return draw(undecodable)


undecodable = st.sampled_from((
    b"\xff\xff\xff\xff\x0f",  # a truncated field key
    b"\x22\x04\x0a\x02\xc3\x28",  # append_text.text holding invalid UTF-8 (a 2-byte character cut)
    b"\x22\x05\x0a\x03\xe2\x82",  # append_text.text cut inside a 3-byte character
    b"\x2a\x03\x0a\x05\x01",  # append_tokens.ids: a packed field whose length runs past the message
    b"\x12",  # open with no length
))


@dataclass
class CallScript:
    """One Stream call: its requests in order, and after how many responses the client cancels it."""

    requests: list[pb.StreamRequest | bytes]
    cancel_after: int | None = None

    @property
    def raw(self) -> bool:
        return any(isinstance(r, bytes) for r in self.requests)

    def describe(self) -> str:
        lines = [f"call (cancel after {self.cancel_after} responses):" if self.cancel_after is not None
                 else "call:"]
        for r in self.requests:
            if isinstance(r, bytes):
                lines.append(f"  bytes {r!r}")
            else:
                lines.append("  " + _short(r))
        return "\n".join(lines)


def _short(message: pb.StreamRequest) -> str:
    text = str(message).replace("\n", " ")
    return text if len(text) <= 400 else text[:400] + f"... ({len(text)} chars)"


@st.composite
def call_scripts(draw, known_bugs: frozenset[str]) -> CallScript:
    first = draw(st.one_of(open_request(known_bugs), open_request(known_bugs), resume_request(),
                           later_request(known_bugs)))
    rest = draw(st.lists(later_request(known_bugs), max_size=8))
    cancel_after = draw(st.one_of(st.none(), st.none(), st.none(), st.integers(0, 6)))
    return CallScript([first, *rest], cancel_after)


def client_scripts(known_bugs: frozenset[str], max_calls: int = 2) -> st.SearchStrategy[list[CallScript]]:
    """One client: a few Stream calls made one after the other."""
    return st.lists(call_scripts(known_bugs), min_size=1, max_size=max_calls)


# ---------------------------------------------------------------------------------------------- running
@dataclass
class Outcome:
    """What the calls of one example did: counts of statuses seen, and invariant violations."""

    statuses: Counter = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    def merge(self, other: Outcome) -> None:
        self.statuses.update(other.statuses)
        self.violations += other.violations


def _request_id(request: pb.StreamRequest | bytes) -> str:
    """The request id the server sees in a request ("" for undecodable bytes)."""
    if not isinstance(request, bytes):
        return request.request_id
    try:
        return pb.StreamRequest.FromString(request).request_id
    except DecodeError:
        return ""


def _serialize(request: pb.StreamRequest | bytes) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


def run_call(channel: grpc.Channel, script: CallScript, outcome: Outcome,
             deadline_s: float = CALL_DEADLINE_S) -> None:
    """Make one Stream call and check every response and its final status.

    Synchronous on purpose: when the server ends a call while a grpc.aio client is still writing
    requests, grpc.aio reports INTERNAL "Internal error from Core" instead of the server's status (the
    sync client reports the server's); that would hide the status under test."""
    if script.raw:
        method = channel.stream_stream(STREAM_METHOD, request_serializer=_serialize,
                                       response_deserializer=pb.StreamResponse.FromString)
    else:
        method = pb_grpc.SinkStreamStub(channel).Stream
    sent_ids = {_request_id(r) for r in script.requests} | {""}
    call = method(iter(script.requests), timeout=deadline_s)
    received = 0
    try:
        for response in call:
            received += 1
            _check_response(response, sent_ids, script, outcome)
            if script.cancel_after is not None and received >= script.cancel_after:
                call.cancel()
                break
    except grpc.RpcError:
        pass  # the status is read below
    code = call.code()
    outcome.statuses[f"stream end: {code.name}"] += 1
    cancelled_by_us = script.cancel_after is not None and code == grpc.StatusCode.CANCELLED
    if code not in STREAM_END_CODES and not cancelled_by_us:
        outcome.violations.append(f"call ended with {code.name}: {call.details()!r}\n{script.describe()}")


def _check_response(response: pb.StreamResponse, sent_ids: set[str], script: CallScript,
                    outcome: Outcome) -> None:
    kind = response.WhichOneof("kind")
    outcome.statuses[f"response: {kind}"] += 1
    if kind is None:
        outcome.violations.append(f"a response without kind\n{script.describe()}")
    if response.request_id not in sent_ids:
        outcome.violations.append(f"response echoes request id {response.request_id[:40]!r} that was "
                                  f"never sent\n{script.describe()}")
    if kind == "error":
        name = pb.ErrorCode.Name(response.error.code)
        outcome.statuses[f"in-stream error: {name}"] += 1
        if response.error.code not in IN_STREAM_ERROR_CODES:
            outcome.violations.append(f"in-stream error {name} {response.error.field}: "
                                      f"{response.error.message}\n{script.describe()}")
    elif kind == "generation_complete":
        reason = pb.StopReason.Name(response.generation_complete.stop_reason)
        outcome.statuses[f"stop reason: {reason}"] += 1
        if response.generation_complete.stop_reason in (pb.STOP_REASON_ERROR, pb.STOP_REASON_UNSPECIFIED):
            outcome.violations.append(f"generation ended with {reason}: "
                                      f"{response.generation_complete.error_message}\n{script.describe()}")


def run_client(address: str, calls: Sequence[CallScript], outcome: Outcome) -> None:
    """One client (its own channel) making its calls one after the other."""
    with grpc.insecure_channel(address) as channel:
        for script in calls:
            run_call(channel, script, outcome)


async def health_status(channel: grpc.aio.Channel) -> str:
    """The server's overall health (grpc.health.v1), or the failure's status name."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def delete_fuzz_sessions(channel: grpc.aio.Channel) -> None:
    """Forget every session the example left behind, so the next starts from the same server state."""
    stub = pb_grpc.SinkStreamStub(channel)
    listing = await stub.ListSessions(pb.ListSessionsRequest(), timeout=10)
    for info in listing.sessions:
        for _ in range(50):  # a call's end detaches its session a moment after the client sees it
            try:
                await stub.DeleteSession(pb.DeleteSessionRequest(session_id=info.session_id), timeout=10)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    break
                await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------------------------- canary
CANARY_DOCUMENT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her "
    "friends. One day, she saw a big red ball under a tree. She ran to get it, but a small dog took it "
    "first. Lily was sad, so her mom said: \"Let's share.\" The dog wagged its tail and they played.")
CANARY_PIECE_CHARS = 23  # cuts words and sentences; the server's tokenization must not care
CANARY_GENERATE = pb.Generate(max_new_tokens=SERVER_MAX_NEW_TOKENS, ignore_eos=True)


@dataclass(frozen=True)
class CanaryResult:
    """Everything a canary session receives that a neighbour could disturb."""

    chunk_token_ids: tuple[int, ...]
    chunk_logprobs: tuple[float, ...]
    generated_ids: tuple[int, ...]
    generated_logprobs: tuple[float, ...]
    text: str
    stop_reason: str


def canary_requests() -> list[pb.StreamRequest]:
    pieces = [CANARY_DOCUMENT[i:i + CANARY_PIECE_CHARS]
              for i in range(0, len(CANARY_DOCUMENT), CANARY_PIECE_CHARS)]
    requests = [_message(f"canary-{i}", append_text=pb.AppendText(text=p)) for i, p in enumerate(pieces)]
    requests[-1].append_text.flush = True
    requests.append(_message("canary-generate", generate=CANARY_GENERATE))
    requests.append(_message("canary-close", close=pb.Close()))
    return requests


async def run_canary(channel: grpc.aio.Channel, shape: Shape) -> CanaryResult:
    """Open a session of `shape` with logprobs and token ids, append the canary document in fixed pieces,
    generate greedily, close; AssertionError on any error or unexpected status."""
    opening = _message("canary-open",
                       open=pb.OpenSession(settings=shape.settings(logprobs=True, token_ids=True)))
    call = pb_grpc.SinkStreamStub(channel).Stream(iter([opening, *canary_requests()]),
                                                  timeout=CALL_DEADLINE_S)
    ids: list[int] = []
    logprobs: list[float] = []
    gen_ids: list[int] = []
    gen_logprobs: list[float] = []
    complete = None
    async for response in call:
        kind = response.WhichOneof("kind")
        if kind == "chunk":
            ids += response.chunk.token_ids
            logprobs += response.chunk.logprobs
        elif kind == "token":
            gen_ids.append(response.token.token_id)
            gen_logprobs.append(response.token.logprob)
        elif kind == "generation_complete":
            complete = response.generation_complete
        elif kind == "error":
            raise AssertionError(f"canary request {response.request_id} refused: {response.error}")
    code = await call.code()
    assert code == grpc.StatusCode.OK, f"canary call ended with {code.name}: {await call.details()}"
    assert complete is not None, "canary generation never completed"
    return CanaryResult(tuple(ids), tuple(logprobs), tuple(gen_ids), tuple(gen_logprobs), complete.text,
                        pb.StopReason.Name(complete.stop_reason))


def float_bits(values: Sequence[float]) -> tuple[bytes, ...]:
    """Each float32's bytes: exact comparison that also tells NaN payloads and -0.0 apart."""
    return tuple(struct.pack("<f", v) for v in values)


def canary_differences(alone: CanaryResult, got: CanaryResult, *, logprob_atol: float) -> list[str]:
    """How `got` differs from `alone` (empty when equal); logprob_atol 0 means bit for bit."""
    problems = []
    for name in ("chunk_token_ids", "generated_ids", "text", "stop_reason"):
        if getattr(alone, name) != getattr(got, name):
            problems.append(f"{name}: alone {getattr(alone, name)!r}, got {getattr(got, name)!r}")
    for name in ("chunk_logprobs", "generated_logprobs"):
        want, have = getattr(alone, name), getattr(got, name)
        if logprob_atol == 0:
            same = float_bits(want) == float_bits(have)
        else:
            same = len(want) == len(have) and all(
                (math.isnan(a) and math.isnan(b)) or abs(a - b) <= logprob_atol
                for a, b in zip(want, have, strict=True))
        if not same:
            problems.append(f"{name} differ (atol {logprob_atol})")
    return problems


# ---------------------------------------------------------------------------------------------- one example
CANARY_SHAPES = {"private": (PRIVATE_SHAPE, 0.0), "batch-mate": (BATCH_MATE_SHAPE, 1e-4)}


async def alone_canaries(address: str) -> dict[str, CanaryResult]:
    """The canaries' results on an otherwise idle server (run this on a fresh one)."""
    async with grpc.aio.insecure_channel(address) as channel:
        return {name: await run_canary(channel, shape) for name, (shape, _) in CANARY_SHAPES.items()}


async def run_example(address: str, clients: Sequence[Sequence[CallScript]],
                      alone: dict[str, CanaryResult]) -> Outcome:
    """Run the clients and both canaries concurrently, then check health and the canaries."""
    outcome = Outcome()
    async with grpc.aio.insecure_channel(address) as channel:
        tasks = [asyncio.to_thread(run_client, address, calls, outcome) for calls in clients]
        canaries = {name: asyncio.ensure_future(run_canary(channel, shape))
                    for name, (shape, _) in CANARY_SHAPES.items()}
        results = await asyncio.gather(*tasks, *canaries.values(), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                outcome.violations.append(f"{type(result).__name__}: {result}")
        for name, task in canaries.items():
            if task.done() and not task.cancelled() and task.exception() is None:
                atol = CANARY_SHAPES[name][1]
                for problem in canary_differences(alone[name], task.result(), logprob_atol=atol):
                    outcome.violations.append(f"canary {name}: {problem}")
        health = await health_status(channel)
        outcome.statuses[f"health: {health}"] += 1
        if health != "SERVING":
            outcome.violations.append(f"health check after the example: {health}")
        await delete_fuzz_sessions(channel)
    if outcome.violations and os.environ.get("SINKSTREAM_FUZZ_DUMP"):
        dump_example(os.environ["SINKSTREAM_FUZZ_DUMP"], clients)
    if outcome.violations:
        outcome.violations.append("example:\n" + "\n".join(
            f"client {i}:\n" + "\n".join(c.describe() for c in calls) for i, calls in enumerate(clients)))
    return outcome


def dump_example(path: str, clients: Sequence[Sequence[CallScript]]) -> None:
    """Write an example as JSON (each request as hex of its bytes) for replay_example."""
    data = [[{"cancel_after": c.cancel_after, "requests": [_serialize(r).hex() for r in c.requests]}
             for c in calls] for calls in clients]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def load_example(path: str) -> list[list[CallScript]]:
    """An example written by dump_example (every request as bytes, sent as they are)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return [[CallScript([bytes.fromhex(r) for r in c["requests"]], c["cancel_after"]) for c in calls]
            for calls in data]
