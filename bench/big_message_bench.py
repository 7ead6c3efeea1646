"""One big AppendText against a `sinkstream serve` subprocess: health-check latency while it is worked on,
the server's peak RSS, and whether its session keeps computing after the client left.

    python bench/big_message_bench.py --model ../shared/models/stories260K --mb 20 --seconds 10

Writes bench/results/big_message.md.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from sinkstream.clients.client import SinkStreamClient
from sinkstream.v1 import sinkstream_pb2 as pb

PHRASE = "Once upon a time there was a little girl. "
RESULTS = Path(__file__).resolve().parent / "results" / "big_message.md"


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--mb", type=float, default=20.0)
    ap.add_argument("--seconds", type=float, default=10.0, help="how long to probe health while it runs")
    args = ap.parse_args()
    proc = subprocess.Popen([sys.executable, "-m", "sinkstream", "serve", "--model", args.model,
                             "--port", "0", "--max-message-bytes", str(128 << 20), "--log-level", "warning"],
                            stdout=subprocess.PIPE, text=True)
    address = proc.stdout.readline().split()[3]
    try:
        with SinkStreamClient(address, timeout=600, max_message_bytes=128 << 20) as client:
            client.health()
            base = rss_kib(proc.pid, "VmRSS")
            text = PHRASE * int(args.mb * 2**20 / len(PHRASE))
            release = threading.Event()

            def outgoing():
                yield pb.StreamRequest(open=pb.OpenSession(session_id="big"))
                yield pb.StreamRequest(request_id="big", append_text=pb.AppendText(text=text, flush=True))
                release.wait()

            call = client.stub.Stream(outgoing(), timeout=600)
            next(call)
            latencies, end = [], time.perf_counter() + args.seconds
            while time.perf_counter() < end:
                started = time.perf_counter()
                client.health()
                latencies.append(time.perf_counter() - started)
            peak = rss_kib(proc.pid, "VmHWM")
            call.cancel()
            release.set()
            while client.get_session("big").attached:
                time.sleep(0.05)
            time.sleep(0.5)
            seen_1 = client.get_session("big").tokens_seen
            time.sleep(2.0)
            seen_2 = client.get_session("big").tokens_seen
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    latencies.sort()
    rows = [("message", f"{args.mb:g} MB AppendText (flush)"),
            ("health checks answered while it ran", f"{len(latencies)} in {args.seconds:g} s"),
            ("health latency p50 / max", f"{latencies[len(latencies) // 2] * 1e3:.1f} ms / "
                                         f"{latencies[-1] * 1e3:.1f} ms"),
            ("server RSS before / peak", f"{base / 1024:.0f} MiB / {peak / 1024:.0f} MiB"),
            ("tokens_seen growth in 2 s after the client left", f"{seen_2 - seen_1}")]
    table = "| measure | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    print(table)
    RESULTS.write_text("# One big message\n\n`python bench/big_message_bench.py --model "
                       f"{args.model} --mb {args.mb:g} --seconds {args.seconds:g}`\n\n{table}")


if __name__ == "__main__":
    main()
