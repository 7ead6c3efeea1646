"""Randomized kill -9 trials of durable sessions (issue 14).

Each trial runs a scripted session (text appended in numbered pieces, a sampled generation on the
session's RNG, more appends, a greedy generation, a final greedy continuation) against a real
`sinkstream serve` process, kills the server with SIGKILL after a random number of responses (during
ingest or during a generation), restarts it on the same --state-dir, resumes the session and re-sends
every numbered request after SessionOpened.acked_seq. A trial passes when the session's final
tokens_seen, mean NLL and acked_seq equal those of an uninterrupted run exactly, and every chunk
log-prob and generated token the client received is bit-identical to the uninterrupted run's.

    python scripts/kill9_trials.py [--trials 20] [--seed 14] [--model ../shared/models/stories260K]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from durable_support import killed_run, mismatches, scripted_requests, uninterrupted  # noqa: E402

CONFIGS = [(16, 200), (32, 97)]  # (chunk, characters per append)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--model", type=Path, default=REPO.parent / "shared" / "models" / "stories260K")
    parser.add_argument("--text", type=Path, default=REPO.parent / "shared" / "data" / "sotu.txt")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    text = args.text.read_text(encoding="utf-8")[:3000]
    references = {}
    for chunk, piece in CONFIGS:
        requests = scripted_requests(text, piece)
        with tempfile.TemporaryDirectory() as state:
            reference = uninterrupted(args.model, Path(state), requests, args.seed, chunk)
            references[chunk] = (requests, *reference)
    print(f"{'trial':>5} {'chunk':>5} {'kill after':>10} {'phase':>10} {'acked at restart':>16} "
          f"{'tokens_seen':>11} {'result':>6}  seconds")
    failures = 0
    for trial in range(args.trials):
        chunk = CONFIGS[trial % len(CONFIGS)][0]
        requests, want, want_state = references[chunk]
        kill_at = rng.randrange(3, want.responses - 3)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as state:
            got, state_after, run = killed_run(args.model, Path(state), requests, args.seed, chunk, kill_at)
        problems = mismatches(got, want)
        if state_after != want_state:
            problems.append(f"final state {state_after} != {want_state}")
        if run["died"]:
            problems.append("the call ended with an error before the kill")
        elif not run["killed"]:
            problems.append("the run ended before the kill")
        ok = not problems
        failures += not ok
        acked = run.get("acked_seq", 0)
        phase = "generation" if requests[acked].HasField("generate") else "ingest"
        print(f"{trial:>5} {chunk:>5} {kill_at:>10} {phase:>10} {acked:>16} {state_after[0]:>11} "
              f"{'pass' if ok else 'FAIL':>6}  {time.perf_counter() - started:.1f}", flush=True)
        for problem in problems[:5]:
            print(f"      {problem}")
    print(f"{args.trials - failures}/{args.trials} trials passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
