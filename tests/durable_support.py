"""Helpers for the durability tests: a raw Stream call driven request by request (numbered requests,
acks), a real `sinkstream serve` subprocess that can be killed with SIGKILL, and the minimal client-side
re-send logic (resume, then send again every numbered request after SessionOpened.acked_seq)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from sinkstream.v1 import sinkstream_pb2 as pb
from sinkstream.v1 import sinkstream_pb2_grpc as pb_grpc

_END = object()


class RawStream:
    """One Stream call: `send` queues a request, `next` / `until` read responses in order."""

    def __init__(self, channel: grpc.Channel, first: pb.StreamRequest, timeout: float = 60,
                 metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._requests.put(first)
        self._call = pb_grpc.SinkStreamStub(channel).Stream(self._iterate(), timeout=timeout,
                                                            metadata=metadata)
        self._responses = iter(self._call)

    def _iterate(self) -> Iterator[pb.StreamRequest]:
        while True:
            item = self._requests.get()
            if item is _END:
                return
            yield item

    def send(self, request: pb.StreamRequest) -> None:
        self._requests.put(request)

    def next(self) -> pb.StreamResponse:
        return next(self._responses)

    def until(self, done: Callable[[pb.StreamResponse], bool]) -> list[pb.StreamResponse]:
        """Responses up to and including the first for which `done` is true."""
        got = []
        while True:
            response = self.next()
            got.append(response)
            if done(response):
                return got

    def close(self) -> None:
        """Half-close (the session is detached) and drain the call."""
        self._requests.put(_END)
        for _ in self._responses:
            pass

    def cancel(self) -> None:
        self._call.cancel()


def acked(seq: int) -> Callable[[pb.StreamResponse], bool]:
    return lambda r: r.WhichOneof("kind") == "ack" and r.ack.seq >= seq


def open_request(session_id: str, chunk: int = 16, window: int = 64, sink: int = 4,
                 seed: int | None = None) -> pb.StreamRequest:
    settings = pb.SessionSettings(sink_tokens=sink, window=window, chunk=chunk,
                                  analysis=pb.AnalysisOptions(logprobs=True))
    request = pb.StreamRequest(open=pb.OpenSession(session_id=session_id, settings=settings))
    if seed is not None:
        request.open.seed = seed
    return request


def resume_request(session_id: str) -> pb.StreamRequest:
    return pb.StreamRequest(resume=pb.ResumeSession(session_id=session_id))


def _server_log():
    """Where the server's log goes: $SINKSTREAM_TEST_SERVER_LOG (appended) when set, else nowhere."""
    path = os.environ.get("SINKSTREAM_TEST_SERVER_LOG")
    return open(path, "a") if path else subprocess.DEVNULL  # noqa: SIM115 (the child keeps it open)


class ServeProcess:
    """`sinkstream serve` on an OS-picked port; `kill9` ends it with SIGKILL."""

    def __init__(self, model_dir: Path, state_dir: Path, *extra: str) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sinkstream", "serve", "--model", str(model_dir), "--port", "0",
             "--state-dir", str(state_dir), "--log-level", "warning", "--threads", "1", *extra],
            stdout=subprocess.PIPE, stderr=_server_log(), text=True, env=env)
        for line in self.proc.stdout:
            found = re.search(r"listening on (\S+)", line)
            if found:
                self.address = found.group(1)
                break
        else:
            raise RuntimeError(f"server did not start (exit {self.proc.wait()})")
        self.channel = grpc.insecure_channel(self.address)
        grpc.channel_ready_future(self.channel).result(timeout=60)

    def kill9(self) -> None:
        self.channel.close()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


# ---------------------------------------------------------------------------------------------------
# kill -9 trials: a scripted session, driven with numbered requests, killed, resumed, compared


def scripted_requests(text: str, piece: int, final_tokens: int = 30) -> list[pb.StreamRequest]:
    """Numbered requests 1..N: `text` appended in pieces (the last one flushed), a sampled generation on
    the session's RNG, two more appends, a greedy generation, then a final greedy continuation."""
    requests = [pb.StreamRequest(append_text=pb.AppendText(text=text[i:i + piece]))
                for i in range(0, len(text), piece)]
    requests[-1].append_text.flush = True
    requests.append(pb.StreamRequest(generate=pb.Generate(temperature=0.8, top_k=40, max_new_tokens=80)))
    requests.append(pb.StreamRequest(append_text=pb.AppendText(text=" Then the cat said hello to")))
    requests.append(pb.StreamRequest(append_text=pb.AppendText(text=" the big dog.", flush=True)))
    requests.append(pb.StreamRequest(generate=pb.Generate(max_new_tokens=60, ignore_eos=True)))
    requests.append(pb.StreamRequest(generate=pb.Generate(max_new_tokens=final_tokens, ignore_eos=True)))
    for seq, request in enumerate(requests, 1):
        request.seq = seq
        request.request_id = f"r{seq}"
    return requests


class Outcome:
    """What a client saw: chunk log-probs by the tokens_seen after the chunk, generated tokens by
    (seq, index), completions by seq."""

    def __init__(self) -> None:
        self.chunks: dict[int, list[float]] = {}
        self.tokens: dict[tuple[int, int], tuple[int, float]] = {}
        self.completes: dict[int, pb.GenerationComplete] = {}
        self.responses = 0

    def take(self, response: pb.StreamResponse) -> None:
        self.responses += 1
        kind = response.WhichOneof("kind")
        seq = int(response.request_id[1:]) if response.request_id.startswith("r") else 0
        if kind == "chunk":
            self.chunks[response.chunk.tokens_seen] = list(response.chunk.logprobs)
        elif kind == "token":
            self.tokens[(seq, response.token.index)] = (response.token.token_id, response.token.logprob)
        elif kind == "generation_complete":
            self.completes[seq] = response.generation_complete


def drive(stream: RawStream, requests: list[pb.StreamRequest], after: int, outcome: Outcome,
          kill_at: int | None = None, kill: Callable[[], None] | None = None) -> bool:
    """Send every request numbered above `after`, read until the last is acknowledged. With `kill_at`,
    call `kill` once `outcome` holds that many responses; returns False if the call died."""
    last = requests[-1].seq
    if after >= last:
        return True
    for request in requests[after:]:
        stream.send(request)
    try:
        while True:
            response = stream.next()
            outcome.take(response)
            if response.WhichOneof("kind") == "error":
                raise AssertionError(f"error response: {response}")
            if response.WhichOneof("kind") == "ack" and response.ack.seq >= last:
                return True
            if kill_at is not None and outcome.responses >= kill_at:
                kill()
                kill_at = None
    except grpc.RpcError:
        return False


def session_state(channel: grpc.Channel, session_id: str) -> tuple[int, float, int]:
    info = pb_grpc.SinkStreamStub(channel).GetSession(pb.GetSessionRequest(session_id=session_id),
                                                      timeout=60)
    return info.tokens_seen, info.mean_nll, info.acked_seq


def uninterrupted(model_dir: Path, state_dir: Path, requests: list[pb.StreamRequest], seed: int,
                  chunk: int, window: int = 64,
                  extra: tuple[str, ...] = ()) -> tuple[Outcome, tuple[int, float, int]]:
    """`extra`: more `serve` options."""
    server = ServeProcess(model_dir, state_dir, *extra)
    try:
        stream = RawStream(server.channel, open_request("ref", chunk=chunk, window=window, seed=seed))
        stream.next()
        outcome = Outcome()
        assert drive(stream, requests, 0, outcome)
        stream.close()
        return outcome, session_state(server.channel, "ref")
    finally:
        server.stop()


def killed_run(model_dir: Path, state_dir: Path, requests: list[pb.StreamRequest], seed: int, chunk: int,
               kill_at: int, window: int = 64,
               extra: tuple[str, ...] = ()) -> tuple[Outcome, tuple[int, float, int], dict[str, int]]:
    """The scripted session, its server killed with SIGKILL after `kill_at` responses, restarted on the
    same state directory, resumed, and every request after SessionOpened.acked_seq sent again."""
    server = ServeProcess(model_dir, state_dir, *extra)
    outcome = Outcome()
    try:
        stream = RawStream(server.channel, open_request("s", chunk=chunk, window=window, seed=seed))
        stream.next()
        killed = []
        finished = drive(stream, requests, 0, outcome, kill_at, lambda: (killed.append(1), server.kill9()))
    finally:
        server.stop()
    # "killed": the server was killed as planned; "died": the call ended without the kill (a failure)
    info = {"killed": len(killed), "died": int(not finished and not killed),
            "responses_before": outcome.responses}
    server = ServeProcess(model_dir, state_dir, *extra)
    try:
        stream = RawStream(server.channel, resume_request("s"))
        opened = stream.next().session_opened
        info["acked_seq"] = opened.acked_seq
        assert drive(stream, requests, opened.acked_seq, outcome)
        stream.close()
        return outcome, session_state(server.channel, "s"), info
    finally:
        server.stop()


def mismatches(got: Outcome, want: Outcome) -> list[str]:
    """How `got` differs from the uninterrupted run: every chunk and token it received must be
    bit-identical to the reference's, and every generation's completion must match."""
    problems = []
    for seen, logprobs in got.chunks.items():
        ref = want.chunks.get(seen)
        if ref is None or [repr(x) for x in ref] != [repr(x) for x in logprobs]:
            problems.append(f"chunk ending at token {seen} differs")
    for key, token in got.tokens.items():
        if want.tokens.get(key) != token:
            problems.append(f"generated token {key} is {token}, want {want.tokens.get(key)}")
    for seq, complete in want.completes.items():
        mine = got.completes.get(seq)
        if mine is not None and (mine.text, mine.stop_reason, mine.tokens_seen) != (
                complete.text, complete.stop_reason, complete.tokens_seen):
            problems.append(f"generation {seq} completed differently")
    last = max(want.completes)
    if last not in got.completes:
        problems.append("the final generation was not received")
    return problems
