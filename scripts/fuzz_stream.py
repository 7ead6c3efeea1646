"""Long fuzz run of the Stream surface (the CI test is tests/test_fuzz_stream.py): random request sequences
from K concurrent clients plus two canaries against one server on 127.0.0.1, for N examples or S seconds,
whichever ends first. Prints a table of the statuses seen and every invariant violation (with its
example; --dump-dir keeps each failing example as JSON for tests/stream_fuzz.load_example).

It lives in scripts/, not bench/: it measures correctness, not speed, and writes no bench/results table.

    .venv/bin/python scripts/fuzz_stream.py --examples 200 --clients 4 --seconds 300 [--known-bugs all]

Exit code 1 when any invariant was violated.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from service_support import start_server  # noqa: E402  (tests/ is on sys.path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=100, help="examples at most")
    parser.add_argument("--clients", type=int, default=4, help="concurrent fuzz clients per example")
    parser.add_argument("--seconds", type=float, default=300.0, help="stop starting examples after this")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (same seed, same inputs)")
    parser.add_argument("--known-bugs", default="", help="'all' or a comma list of stream_fuzz.KNOWN_BUGS "
                        "names whose inputs are generated too")
    parser.add_argument("--model", type=Path, default=ROOT.parent / "shared" / "models" / "stories260K")
    parser.add_argument("--dump-dir", type=Path, help="write each failing example here as JSON")
    args = parser.parse_args()
    os.environ["SINKSTREAM_FUZZ_KNOWN_BUGS"] = args.known_bugs
    import stream_fuzz  # reads the switch at strategy build time

    with tempfile.TemporaryDirectory(prefix="sinkstream-fuzz-") as state:
        server = start_server(args.model, state_dir=Path(state),
                              max_new_tokens=stream_fuzz.SERVER_MAX_NEW_TOKENS,
                              max_cache_shapes=2 * args.clients + 2)
        try:
            return run(args, server.address, stream_fuzz)
        finally:
            server.stop()


def run(args: argparse.Namespace, address: str, stream_fuzz) -> int:
    alone = asyncio.run(stream_fuzz.alone_canaries(address))
    total = stream_fuzz.Outcome()
    failing: list[list[str]] = []
    end = time.monotonic() + args.seconds
    examples = Counter()
    clients_strategy = st.lists(stream_fuzz.client_scripts(stream_fuzz.enabled_known_bugs()),
                                min_size=args.clients, max_size=args.clients)

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(clients=clients_strategy)
    def one(clients) -> None:
        if time.monotonic() > end:
            return  # out of time: let hypothesis finish its remaining examples at no cost
        outcome = asyncio.run(stream_fuzz.run_example(address, clients, alone))
        examples["run"] += 1
        total.merge(dataclasses.replace(outcome, violations=[]))
        if outcome.violations:
            failing.append(outcome.violations)
            if args.dump_dir is not None:
                args.dump_dir.mkdir(parents=True, exist_ok=True)
                stream_fuzz.dump_example(str(args.dump_dir / f"example-{examples['run']}.json"), clients)

    started = time.monotonic()
    one()
    elapsed = time.monotonic() - started
    print(f"\n{examples['run']} examples x {args.clients} clients in {elapsed:.0f} s (seed {args.seed}, "
          f"known bugs: {args.known_bugs or 'none'})\n")
    print("| what | count |\n|---|---:|")
    for key, count in sorted(total.statuses.items()):
        print(f"| {key} | {count} |")
    print(f"\nexamples with violations: {len(failing)}")
    for i, violations in enumerate(failing, 1):
        print(f"\n--- failing example {i} ---")
        print("\n".join(violations))
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
