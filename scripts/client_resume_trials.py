"""Randomized kill -9 trials of the Python client's automatic resume (issue 14, client side).

One real `sinkstream serve --state-dir` process on a fixed port; each trial runs the sync client's
workload of tests/test_durable_resume.py (a document streamed with stream_text, a sampled generation,
an append, another generation, close) and SIGKILLs the server at a random chunk result (ingest) or
generated token (generation) the client received, restarting it on the same port and directory in the
background. The client resumes on its own. A trial passes when everything the caller received (token
ids, log-probs, perplexity, generated ids, log-probs and text) equals the uninterrupted run's. A trial
whose client raised DATA_LOSS lost chunk results in flight that the server does not send again (the
server's recovery replays processed input silently); it is counted apart: the client refused to hand
over a stream with a hole.

    python scripts/client_resume_trials.py [--trials 20] [--seed 14] [--chars 12000]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from test_durable_resume import SETTINGS, ServerProcess, free_port, run_sync  # noqa: E402

from sinkstream.clients.client import SinkStreamClient  # noqa: E402
from sinkstream.clients.results import SinkStreamError  # noqa: E402


def wait_until_serving(address: str) -> None:
    for _ in range(120):
        try:
            with SinkStreamClient(address, timeout=5) as client:
                client.model_info()
                return
        except SinkStreamError:
            time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--chars", type=int, default=12000, help="characters of the document streamed")
    parser.add_argument("--model", type=Path, default=REPO.parent / "shared" / "models" / "stories260K")
    parser.add_argument("--text", type=Path, default=REPO.parent / "shared" / "data" / "sotu.txt")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    text = args.text.read_text(encoding="utf-8")[:args.chars]
    counts = {"equal": 0, "DATA_LOSS": 0, "different": 0, "error": 0}
    with tempfile.TemporaryDirectory() as state:
        server = ServerProcess(args.model, Path(state), free_port())
        try:
            want = run_sync(server.address, text, None, None)
            chunks = len(want["ids"]) // SETTINGS.chunk
            print(f"{'trial':>5} {'kill at':>16} {'result':>10}  seconds")
            for trial in range(args.trials):
                kill_at = (("ingest", rng.randrange(1, chunks - 1)) if trial % 2 == 0
                           else ("generate", rng.randrange(1, 100)))
                started = time.perf_counter()
                try:
                    got = run_sync(server.address, text, kill_at, server)
                    result = "equal" if got == want else "different"
                except (SinkStreamError, AssertionError) as exc:
                    data_loss = isinstance(exc, SinkStreamError) and exc.code == grpc.StatusCode.DATA_LOSS
                    result = "DATA_LOSS" if data_loss else "error"
                    print(f"      {exc}")
                    wait_until_serving(server.address)  # the background restart may still be starting
                counts[result] += 1
                print(f"{trial:>5} {kill_at[0]:>9} {kill_at[1]:>6} {result:>10}  "
                      f"{time.perf_counter() - started:.1f}", flush=True)
        finally:
            server.stop()
    print(" ".join(f"{k}={v}" for k, v in counts.items()))
    return 0 if counts["different"] == counts["error"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
