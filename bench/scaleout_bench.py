"""Scale-out benchmark (issue 16): aggregate ingest tokens/s with 1, 2 and 3 replicas behind HAProxy
sharing a Redis session store, the per-replica cost of the Redis store against the state directory, and
the failover time from kill -9 of a replica to the first token its sessions get again.

    python bench/scaleout_bench.py [--model ../shared/models/stories260K] [--streams 6] [--chars 12000]
                                   [--rounds 2] [--lease-ttl 2] [--check-inter 200ms]

Everything is real and on loopback: a redis-server (appendonly yes, appendfsync always), `sinkstream serve`
replicas (--threads 1) and HAProxy running deploy/haproxy.cfg. Each stream is a session of the sync client
(numbered appends: durable, acknowledged once Redis or the disk has them) with its own id, so HAProxy
hashes the streams over the replicas. The best of --rounds is kept. Writes bench/results/scaleout.md.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from redis_support import RedisServer  # noqa: E402
from test_haproxy_routing import start_proxy, wait_for  # noqa: E402

from sinkstream.clients.client import SinkStreamClient  # noqa: E402
from sinkstream.clients.results import SessionSettings  # noqa: E402
from sinkstream.clients.resume import ResumePolicy  # noqa: E402

SETTINGS = SessionSettings(sink_tokens=4, window=252, chunk=64)
PIECE = 1000  # characters per numbered append
CLOSED_PORT = "127.0.0.1:1"
POLICY = ResumePolicy(resume_timeout_s=120, initial_backoff_s=0.05, max_backoff_s=0.25)


class Replica:
    """`sinkstream serve` on an OS-picked port with the given store options."""

    def __init__(self, model: Path, *store: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sinkstream", "serve", "--model", str(model), "--port", "0",
             "--threads", "1", "--log-level", "warning", "--max-resident", "16", *store],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        found = re.search(r"listening on (\S+)", self.proc.stdout.readline())
        assert found, "the replica did not start"
        self.address = found.group(1)
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(60)


def ingest(address: str, session_id: str, text: str, stamps: list[float] | None = None) -> int:
    """Stream `text` into a new session in numbered pieces; returns its tokens. `stamps`: the time each
    chunk result arrived is appended."""
    with SinkStreamClient(address, timeout=600, resume=POLICY) as client:
        session = client.open_session(SETTINGS, session_id=session_id)
        tokens = 0
        for chunk in session.stream_text([text[i:i + PIECE] for i in range(0, len(text), PIECE)]):
            tokens = chunk.tokens_seen
            if stamps is not None:
                stamps.append(time.monotonic())
        session.detach()
        return tokens


def aggregate(address: str, streams: int, text: str, tag: str) -> float:
    """tokens/s of `streams` sessions ingesting `text` at once through `address`."""
    ingest(address, f"{tag}-warm", text[:2000])
    with futures.ThreadPoolExecutor(streams) as pool:
        started = time.perf_counter()
        tokens = sum(pool.map(lambda i: ingest(address, f"{tag}-{i}", text), range(streams)))
        return tokens / (time.perf_counter() - started)


def cluster_rate(model: Path, url: str, replicas: int, streams: int, text: str, tmp: Path, tag: str,
                 check_inter: str) -> float:
    tmp.mkdir(parents=True)
    servers = [Replica(model, "--state-store", url) for _ in range(replicas)]
    os.environ["SINKSTREAM_CHECK_INTER"] = check_inter
    # the config has three server lines: the unused ones name a closed port, are marked DOWN, get nothing
    proxy = start_proxy([s.address for s in servers] + [CLOSED_PORT] * (3 - replicas), tmp)
    want = {f"replica-{i + 1}": "UP" if i < replicas else "DOWN" for i in range(3)}
    try:
        wait_for(f"{replicas} replicas UP", lambda: proxy.server_states() == want)
        return aggregate(proxy.address, streams, text, tag)
    finally:
        proxy.stop()
        for s in servers:
            s.stop()


def single_rate(model: Path, store: tuple[str, ...], streams: int, text: str, tag: str) -> float:
    server = Replica(model, *store)
    try:
        return aggregate(server.address, streams, text, tag)
    finally:
        server.stop()


def failover(model: Path, url: str, streams: int, text: str, tmp: Path, lease_ttl: float,
             check_inter: str) -> list[float]:
    """Seconds from kill -9 of the replica holding most streams to the first chunk each of its sessions
    got after it (3 replicas behind HAProxy, Redis store)."""
    tmp.mkdir(parents=True)
    servers = [Replica(model, "--state-store", url, "--lease-ttl", str(lease_ttl)) for _ in range(3)]
    os.environ["SINKSTREAM_CHECK_INTER"] = check_inter
    proxy = start_proxy([s.address for s in servers], tmp)
    stamps = {i: [] for i in range(streams)}
    try:
        wait_for("replicas UP", lambda: set(proxy.server_states().values()) == {"UP"})
        with futures.ThreadPoolExecutor(streams) as pool:
            runs = [pool.submit(ingest, proxy.address, f"fo-{i}", text, stamps[i]) for i in range(streams)]
            wait_for("every stream going", lambda: all(len(s) >= 2 for s in stamps.values()))
            holders = {}
            for server in servers:
                with SinkStreamClient(server.address, timeout=30) as client:
                    holders.update({info.session_id: server for info in client.list_sessions()
                                    if info.attached})
            victim = max(servers, key=lambda s: sum(h is s for h in holders.values()))
            moved = [i for i in range(streams) if holders.get(f"fo-{i}") is victim]
            victim.proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            for run in runs:
                run.result(timeout=600)
        return [min(t for t in stamps[i] if t > killed) - killed for i in moved]
    finally:
        proxy.stop()
        for s in servers:
            s.stop()


def rounds(rates: list[float]) -> str:
    return ", ".join(f"{r:,.0f}" for r in rates)


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT.parent / "shared" / "models" / "stories260K")
    parser.add_argument("--text", type=Path, default=ROOT.parent / "shared" / "data" / "sotu.txt")
    parser.add_argument("--streams", type=int, default=6)
    parser.add_argument("--chars", type=int, default=12000, help="characters each stream ingests")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lease-ttl", type=float, default=2.0)
    parser.add_argument("--check-inter", default="200ms", help="HAProxy health check interval")
    args = parser.parse_args()
    text = args.text.read_text(encoding="utf-8")[:args.chars]
    lines = ["# Scale-out: replicas behind HAProxy with a Redis session store (issue 16)", "",
             f"`python bench/scaleout_bench.py --model {args.model} --streams {args.streams} "
             f"--chars {args.chars} "
             f"--rounds {args.rounds} --lease-ttl {args.lease_ttl:g} --check-inter {args.check_inter}`", "",
             f"Model {args.model.name}; {os.cpu_count()} CPU cores shared with other jobs; load average at "
             f"start {load_average()} (1, 5, 15 min)."]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        redis_server = RedisServer(tmp / "redis")
        try:
            store_rates: dict[str, list[float]] = {"directory": [], "redis": []}
            for round_ in range(args.rounds):
                for name, store in (("directory", ("--state-dir", str(tmp / f"state-{round_}"))),
                                    ("redis", ("--state-store", redis_server.url))):
                    rate = single_rate(args.model, store, args.streams, text, f"one-{name}-{round_}")
                    store_rates[name].append(rate)
                    print(f"1 replica, {name} store, round {round_}: {rate:,.0f} tok/s", flush=True)
            lines += ["", f"One replica, direct (no proxy), {args.streams} streams at once, durable numbered "
                      "appends:", "", "| store | tok/s (best round) | every round |", "|---|---|---|"]
            lines += [f"| {name} | {max(rates):,.0f} | {rounds(rates)} |"
                      for name, rates in store_rates.items()]
            lines.append(f"\nRedis/directory (best rounds): "
                         f"{max(store_rates['redis']) / max(store_rates['directory']):.2f}")

            cluster: dict[int, list[float]] = {1: [], 2: [], 3: []}
            for round_ in range(args.rounds):
                for replicas in (1, 2, 3):
                    rate = cluster_rate(args.model, redis_server.url, replicas, args.streams, text,
                                        tmp / f"p{replicas}-{round_}", f"c{replicas}-{round_}",
                                        args.check_inter)
                    cluster[replicas].append(rate)
                    print(f"{replicas} replicas behind HAProxy, round {round_}: {rate:,.0f} tok/s",
                          flush=True)
            lines += ["", f"Aggregate ingest through HAProxy, Redis store, {args.streams} streams:", "",
                      "| replicas | tok/s (best round) | vs 1 replica | every round |", "|---|---|---|---|"]
            lines += [f"| {n} | {max(rates):,.0f} | {max(rates) / max(cluster[1]):.2f} | {rounds(rates)} |"
                      for n, rates in cluster.items()]

            times = failover(args.model, redis_server.url, args.streams, text * 3, tmp / "fo", args.lease_ttl,
                             args.check_inter)
            print(f"failover: {times}", flush=True)
            lines += ["", f"Failover: kill -9 of the replica holding most of {args.streams} streams "
                      f"(3 replicas, --lease-ttl {args.lease_ttl:g}, HAProxy check inter {args.check_inter}, "
                      "fall 2); seconds from the kill to the first chunk result each of its sessions got "
                      "after it:", "",
                      f"sessions moved: {len(times)}; min {min(times):.2f} s, median "
                      f"{statistics.median(times):.2f} s, max {max(times):.2f} s"]
        finally:
            redis_server.stop()
    lines.append(f"\nLoad average at the end: {load_average()}.")
    out = ROOT / "bench" / "results" / "scaleout.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
