"""Peak RSS of `sinkstream analyze` at 100 kB and at 5 MB of text, in-process and over gRPC: memory must
not grow with the document (issue 12, finding 8; target: growth under 3%).

    python bench/analyze_memory_bench.py [--model ../shared/models/stories260K]
                                         [--text ../shared/data/sotu.txt] [--sizes 100000,5000000]

Each run is a fresh `python -m sinkstream analyze` process (with --json, --csv, --tokens-jsonl and
--plot, so the streamed outputs are part of the measure); its peak RSS is the ru_maxrss os.wait4 reports.
Over gRPC, a fresh `sinkstream serve` process serves each run; its peak RSS (VmHWM) is read before it stops.
The documents are sotu.txt repeated and cut to the size. Writes bench/results/analyze_memory.md.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SINKSTREAM_SHARED", ROOT.parent / "shared"))
SHAPE = ["--window", "252", "--chunk", "64"]
START_TIMEOUT_S = 120
# One torch thread per process: on a shared machine, oversubscribed threads make runs 10x slower and noisy.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def make_document(source: Path, size: int, out: Path) -> Path:
    """`size` bytes of `source` repeated (cut at a character boundary)."""
    text = source.read_text(encoding="utf-8")
    data = (text * (size // len(text.encode("utf-8")) + 1)).encode("utf-8")[:size]
    out.write_bytes(data.decode("utf-8", errors="ignore").encode("utf-8"))
    return out


def run_measured(cmd: list[str]) -> tuple[int, float, float]:
    """Run `cmd`; (exit status, peak RSS in MiB, seconds)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.stderr.write(proc.stderr.read().decode())
    proc.stderr.close()
    return proc.returncode, usage.ru_maxrss / 1024, time.perf_counter() - started


def start_server(model: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "sinkstream", "serve", "--model", model, "--port", "0",
                             "--threads", "1", "--log-level", "warning"], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True, env=ENV)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:  # bounded: the first line says where it listens
        line = proc.stdout.readline()
        if match := re.search(r"listening on (\S+)", line):
            return proc, match.group(1)
        if not line:
            break
    proc.kill()
    raise RuntimeError("server did not start")


def server_peak_mib(proc: subprocess.Popen) -> float:
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def analyze_cmd(doc: Path, where: list[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "sinkstream", "analyze", str(doc), *where, *SHAPE, "--quiet",
            "--json", str(out / "a.json"), "--csv", str(out / "a.csv"),
            "--tokens-jsonl", str(out / "t.jsonl"), "--plot", str(out / "a.png")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(SHARED / "models" / "stories260K"))
    parser.add_argument("--text", default=str(SHARED / "data" / "sotu.txt"))
    parser.add_argument("--sizes", default="100000,5000000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []  # (mode, size, client MiB, server MiB or None, seconds)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        for size in sizes:
            doc = make_document(Path(args.text), size, tmp_path / f"doc{size}.txt")
            code, peak, secs = run_measured(analyze_cmd(doc, ["--model", args.model], tmp_path))
            assert code == 0, f"in-process analyze failed ({code})"
            rows.append(("in-process", size, peak, None, secs))
            print(f"in-process {size:>10,} B: peak RSS {peak:8.1f} MiB  {secs:6.1f} s", flush=True)
            server, address = start_server(args.model)
            try:
                code, peak, secs = run_measured(analyze_cmd(doc, ["--server", address], tmp_path))
                server_peak = server_peak_mib(server)
            finally:
                server.terminate()
                server.wait(timeout=60)
            assert code == 0, f"analyze --server failed ({code})"
            rows.append(("gRPC", size, peak, server_peak, secs))
            print(f"gRPC       {size:>10,} B: client {peak:8.1f} MiB, server {server_peak:8.1f} MiB  "
                  f"{secs:6.1f} s", flush=True)
    write_report(rows, sizes)


def growth(rows: list, mode: str, column: int, sizes: list[int]) -> str:
    small, big = (next(r[column] for r in rows if r[0] == mode and r[1] == s) for s in (sizes[0], sizes[-1]))
    return f"{100 * (big - small) / small:+.1f}%"


def write_report(rows: list, sizes: list[int]) -> None:
    lines = ["# `sinkstream analyze` peak RSS vs document size", "",
             "`python bench/analyze_memory_bench.py` (stories260K, window 252, chunk 64; --json, --csv, "
             "--tokens-jsonl and --plot written; one torch thread; each run a fresh process, "
             "peak = ru_maxrss / VmHWM).", "",
             "| mode | text bytes | client peak RSS (MiB) | server peak RSS (MiB) | seconds |",
             "|---|---:|---:|---:|---:|"]
    for mode, size, peak, server, secs in rows:
        lines.append(f"| {mode} | {size:,} | {peak:.1f} | {'' if server is None else f'{server:.1f}'} | "
                     f"{secs:.1f} |")
    lines += ["", f"Growth from {sizes[0]:,} to {sizes[-1]:,} bytes (target: under 3%):", "",
              f"- in-process: {growth(rows, 'in-process', 2, sizes)}",
              f"- gRPC client: {growth(rows, 'gRPC', 2, sizes)}",
              f"- gRPC server: {growth(rows, 'gRPC', 3, sizes)}", ""]
    out = ROOT / "bench" / "results" / "analyze_memory.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
