"""Durability benchmark (issue 14): ingest tokens/s with the write-ahead log on against off, at 1 and 8
concurrent streams, and recovery time after kill -9 against the length of the log replayed.

    python bench/durability_bench.py [--model ../shared/models/stories260K] [--chars 24000] [--rounds 2]

Each configuration runs a real `sinkstream serve` process (--threads 1) with a --state-dir on the same
disk; with durability on every append is numbered and the run ends when the last one is acknowledged
(fsync'd), with it off when the last one is flushed. Rounds run off then on back to back; the table shows
the best round of each and the median of the per-round ratios (on a shared, loaded machine the per-round
ratio is the steadier figure).
Appends `## <model>` sections to bench/results/durability.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from durable_support import RawStream, ServeProcess  # noqa: E402

from sinkstream.service.write_ahead_log import read_log  # noqa: E402
from sinkstream.v1 import sinkstream_pb2 as pb  # noqa: E402
from sinkstream.v1 import sinkstream_pb2_grpc as pb_grpc  # noqa: E402

PIECE = 2000  # characters per numbered append
SETTINGS = pb.SessionSettings(sink_tokens=4, window=252, chunk=64)


def requests(text: str) -> list[pb.StreamRequest]:
    out = [pb.StreamRequest(seq=seq, append_text=pb.AppendText(text=text[i:i + PIECE]))
           for seq, i in enumerate(range(0, len(text), PIECE), 1)]
    out[-1].append_text.flush = True
    # then an empty numbered append: its record follows those of every chunk run, so its ack says they are
    # all on disk too (a kill -9 right after the flush's ack could otherwise lose the last chunks' runs,
    # which no ack promised, and recovery would hold their input as pending)
    out.append(pb.StreamRequest(seq=len(out) + 1, append_text=pb.AppendText(text="")))
    return out


def ingest(server: ServeProcess, session_id: str, text: str) -> int:
    """Append `text` in numbered pieces; returns tokens_seen once the last piece is flushed and acked."""
    stream = RawStream(server.channel, pb.StreamRequest(open=pb.OpenSession(session_id=session_id,
                                                                            settings=SETTINGS)), timeout=600)
    stream.next()
    sent = requests(text)
    for request in sent:
        stream.send(request)
    flushed, acked, tokens = False, False, 0
    while not (flushed and acked):
        response = stream.next()
        kind = response.WhichOneof("kind")
        if kind == "flushed":
            flushed, tokens = True, response.flushed.tokens_seen
        elif kind == "ack" and response.ack.seq == sent[-1].seq:
            acked = True
        elif kind == "error":
            raise RuntimeError(str(response))
    stream.close()
    return tokens


def throughput(model: Path, durability: str, streams: int, text: str, tag: str) -> tuple[float, int]:
    """(tokens/s, tokens) of `streams` sessions ingesting `text` each at once."""
    with tempfile.TemporaryDirectory(dir=ROOT) as state:
        server = ServeProcess(model, Path(state), "--durability", durability, "--max-resident", "16")
        try:
            ingest(server, "warmup", text[:4000])
            results: list[int] = []
            threads = [threading.Thread(target=lambda i=i: results.append(ingest(server, f"{tag}{i}", text)))
                       for i in range(streams)]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - started
        finally:
            server.stop()
    assert len(results) == streams
    return sum(results) / elapsed, sum(results)


def recovery_time(model: Path, text: str) -> tuple[int, int, int, float]:
    """Ingest `text` durably, kill -9, restart: (tokens, log records, log bytes, seconds GetSession took
    to recover the session)."""
    with tempfile.TemporaryDirectory(dir=ROOT) as state:
        server = ServeProcess(model, Path(state))
        try:
            tokens = ingest(server, "r", text)
        finally:
            server.kill9()
        log = Path(state) / "r.wal"
        records, size = len(read_log(log).records), log.stat().st_size
        server = ServeProcess(model, Path(state))
        try:
            stub = pb_grpc.SinkStreamStub(server.channel)
            started = time.perf_counter()
            info = stub.GetSession(pb.GetSessionRequest(session_id="r"), timeout=600)
            elapsed = time.perf_counter() - started
            assert info.tokens_seen == tokens
        finally:
            server.stop()
    return tokens, records, size, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT.parent / "shared" / "models" / "stories260K")
    parser.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "sotu.txt")
    parser.add_argument("--chars", type=int, default=24000, help="characters each stream ingests")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--recovery", default="4000,16000,64000", help="log lengths (characters) to recover")
    args = parser.parse_args()
    text = args.text.read_text(encoding="utf-8")
    body = text[:args.chars]
    lines = [f"\n## {args.model.name}\n",
             f"`python bench/durability_bench.py --model {args.model} --chars {args.chars} "
             f"--rounds {args.rounds} --streams {args.streams} --recovery {args.recovery}`\n",
             "| streams | tokens | off tok/s (best) | on tok/s (best) | on/off (best) | on/off per round "
             "(median) | per-round on/off |", "|---|---|---|---|---|---|---|"]
    for streams in map(int, args.streams.split(",")):
        rates: dict[str, list[float]] = {"off": [], "on": []}
        tokens = 0
        for round_ in range(args.rounds):
            for durability in ("off", "on"):
                rate, tokens = throughput(args.model, durability, streams, body, f"s{round_}")
                rates[durability].append(rate)
                print(f"streams {streams} round {round_} durability {durability}: {rate:,.0f} tok/s",
                      flush=True)
        # each round runs off then on back to back: their ratio cancels slow drifts of the machine's load
        ratios = [on / off for off, on in zip(rates["off"], rates["on"], strict=True)]
        best_off, best_on = max(rates["off"]), max(rates["on"])
        lines.append(f"| {streams} | {tokens:,} | {best_off:,.0f} | {best_on:,.0f} | "
                     f"{best_on / best_off:.2f} | {statistics.median(ratios):.2f} | "
                     f"{', '.join(f'{r:.2f}' for r in ratios)} |")
    if args.recovery:
        lines += ["", "Recovery after kill -9 (no snapshot: the whole log is replayed on the first "
                  "GetSession):", "", "| tokens | log records | log bytes | recovery s | tokens/s replayed |",
                  "|---|---|---|---|---|"]
        for chars in map(int, args.recovery.split(",")):
            tokens, records, size, seconds = recovery_time(args.model, text[:chars])
            print(f"recovery of {tokens} tokens: {seconds:.3f} s", flush=True)
            lines.append(f"| {tokens:,} | {records:,} | {size:,} | {seconds:.3f} | {tokens / seconds:,.0f} |")
    out = ROOT / "bench" / "results" / "durability.md"
    if not out.exists():
        out.write_text("# Durability: write-ahead log on vs off, recovery time\n")
    with out.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
