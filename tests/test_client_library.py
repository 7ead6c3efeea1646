"""The Python client library for people who embed it: retries with backoff on UNAVAILABLE only for calls
safe to repeat, files streamed with a progress callback (sync and asyncio), and passage finding/locating."""

from __future__ import annotations

import asyncio
import inspect
import math
from concurrent import futures

import grpc
import pytest
from service_support import start_server

from sinkstream.clients.aio import AsyncSession, AsyncSinkStreamClient
from sinkstream.clients.client import Session, SinkStreamClient
from sinkstream.clients.passages import find_passages, locate
from sinkstream.clients.results import SessionSettings, SinkStreamError
from sinkstream.v1 import sinkstream_pb2 as pb
from sinkstream.v1 import sinkstream_pb2_grpc as pb_grpc


class FlakyServicer(pb_grpc.SinkStreamServicer):
    """Answers UNAVAILABLE to the first `failures` calls of each method, then succeeds."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = {"ModelInfo": 0, "DeleteSession": 0}

    def _maybe_fail(self, name: str, context) -> None:
        self.calls[name] += 1
        if self.calls[name] <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")

    def ModelInfo(self, request, context):  # noqa: N802
        self._maybe_fail("ModelInfo", context)
        return pb.ModelInfoResponse(name="flaky", vocab_size=7)

    def DeleteSession(self, request, context):  # noqa: N802
        self._maybe_fail("DeleteSession", context)
        return pb.DeleteSessionResponse(tokens_seen=3)


@pytest.fixture
def flaky():
    servicer = FlakyServicer(failures=2)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_SinkStreamServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_safe_calls_are_retried_on_unavailable(flaky):
    servicer, address = flaky
    with SinkStreamClient(address, timeout=30) as client:
        assert client.model_info().name == "flaky"
        assert servicer.calls["ModelInfo"] == 3
        # DeleteSession is not safe to repeat: the first UNAVAILABLE is the caller's to handle
        with pytest.raises(SinkStreamError) as caught:
            client.delete_session("s")
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE and servicer.calls["DeleteSession"] == 1


def test_retries_can_be_turned_off(flaky):
    servicer, address = flaky
    with SinkStreamClient(address, timeout=30, retry_attempts=1) as client, \
            pytest.raises(SinkStreamError) as caught:
        client.model_info()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE and servicer.calls["ModelInfo"] == 1


def test_asyncio_client_retries_too(flaky):
    servicer, address = flaky

    async def main() -> str:
        async with AsyncSinkStreamClient(address, timeout=30) as client:
            return (await client.model_info()).name

    assert asyncio.run(main()) == "flaky" and servicer.calls["ModelInfo"] == 3


@pytest.fixture(scope="module")
def server(model_dir):
    srv = start_server(model_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def document(sotu_path, tmp_path_factory):
    path = tmp_path_factory.mktemp("doc") / "doc.txt"
    path.write_text(sotu_path.read_text(encoding="utf-8")[:9000], encoding="utf-8")
    return path


def test_stream_file_reports_progress_sync_and_asyncio(server, document):
    size = document.stat().st_size
    settings = SessionSettings(window=60, chunk=32, logprobs=True)
    with SinkStreamClient(server.address, timeout=60) as client:
        want = len(client.tokenize(document.read_text(encoding="utf-8"), add_bos=True))
        seen: list[tuple[int, int | None]] = []
        with client.open_session(settings) as session:
            chunks = list(session.stream_file(document, progress=lambda *a: seen.append(a), block_chars=2048))
    assert sum(c.num_tokens for c in chunks) == want == session.last_flush.tokens_seen
    assert len(seen) == math.ceil(len(document.read_text(encoding="utf-8")) / 2048)
    assert [s for s, _ in seen] == sorted(s for s, _ in seen) and seen[-1] == (size, size)

    async def main() -> tuple[int, list]:
        calls: list = []
        async with AsyncSinkStreamClient(server.address, timeout=60) as client:
            session = await client.open_session(settings)
            total = sum([c.num_tokens async for c in session.stream_file(
                document, progress=lambda *a: calls.append(a), block_chars=4096)])
            await session.close()
        return total, calls

    total, calls = asyncio.run(main())
    assert total == want and calls[-1] == (size, size)


def test_find_passages_picks_planted_peaks_without_overlap():
    nll = [1.0] * 1000
    nll[0] = math.nan  # the first token is never scored
    for start, value in ((100, 9.0), (700, 5.0), (108, 8.0)):  # 108 overlaps the first peak
        nll[start:start + 16] = [value] * 16
    passages = find_passages(nll, count=3, span=16)
    assert [p.rank for p in passages] == [1, 2, 3]
    assert passages[0].mean_nll > passages[1].mean_nll > passages[2].mean_nll
    assert passages[0].token_start in range(96, 112) and passages[1].token_start in range(688, 704)
    spans = sorted((p.token_start, p.token_end) for p in passages)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert find_passages([math.nan, 2.0], count=5, span=32)[0].mean_nll == 2.0  # short stream: one window


def test_locate_finds_byte_offsets_lines_and_columns(tmp_path):
    # a character-level tokenizer: token i is character i, so every true offset is known
    lines = [f"l\u00edne {i}: " + "abcdefghij"[i % 10] * (i % 7 + 3) for i in range(400)]
    text = "\n".join(lines)
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")

    def tokenize(s: str) -> list[int]:
        return [ord(c) for c in s]

    ids = tokenize(text)
    nll = [0.0] * len(ids)
    target = text.index("l\u00edne 321: ")
    nll[target:target + 12] = [5.0] * 12
    (p,) = find_passages(nll, count=1, span=12)
    locate([p], path, ids, tokenize, radius_bytes=256)
    raw = text.encode("utf-8")
    assert p.byte_start == len(text[:p.token_start].encode("utf-8"))
    assert p.byte_end == len(text[:p.token_end].encode("utf-8"))
    assert abs(p.token_start - target) < 12  # windows are sampled every span/4 tokens
    assert p.line == raw.count(b"\n", 0, p.byte_start) + 1 in (321, 322)
    assert p.column == p.token_start - (text.rfind("\n", 0, p.token_start) + 1) + 1
    assert text[p.token_start:p.token_end].strip() in p.excerpt


def public_api(cls: type) -> dict[str, list[tuple[str, object, object]]]:
    """Public methods (the context-manager protocol included, as sync names; construction excluded) and
    their parameters: name, kind, default. Annotations may differ (a grpc.aio.Channel, AsyncIterator)."""
    names = {"__aenter__": "__enter__", "__aexit__": "__exit__"}
    api = {}
    for name, member in inspect.getmembers(cls, callable):
        if name.startswith("_") and name not in ("__enter__", "__exit__", "__aenter__", "__aexit__"):
            continue
        params = inspect.signature(member).parameters.values()
        api[names.get(name, name)] = [(p.name, p.kind, p.default) for p in params]
    return api


@pytest.mark.parametrize(("sync", "asynchronous"), [(SinkStreamClient, AsyncSinkStreamClient),
                                                    (Session, AsyncSession)])
def test_sync_and_async_clients_have_the_same_api(sync, asynchronous):
    assert public_api(sync) == public_api(asynchronous)
    init = [(p.name, p.kind, p.default) for p in inspect.signature(sync.__init__).parameters.values()]
    if sync is SinkStreamClient:  # the clients are built alike; sessions by their client's transport
        assert init == [(p.name, p.kind, p.default)
                        for p in inspect.signature(asynchronous.__init__).parameters.values()]
    # every method that does I/O is a coroutine (or an async iterator) on the asyncio side
    for name, method in inspect.getmembers(asynchronous, inspect.isfunction):
        if not name.startswith("_") and name not in ("abort", "stream_file"):
            assert inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method), name
