"""`serve --speculate` (issue 17): decode tokens/s of one session through a real server, with and without
speculative decoding, same output.

Two `sinkstream serve` processes (`--threads`, default 1 each: the machine is shared), one plain and one with
`--speculate K`, run side by side; each case is generated on one, then the other, alternating, `--repeats`
times. Cases: stories260K continuing a repetitive story; SmolLM2-135M-Instruct copying a repeated passage
of sotu.txt (repetitive text) and one chat session (the chat protocol: a user message, then a greedy chat
reply). Decode tokens/s = (tokens - 1) / (time of the last token - time of the first), read by the client
(time to first token excluded); reported: the median, and whether both servers gave identical tokens.

  SINKSTREAM_CACHE_DIR=/tmp/ggufcache python bench/speculative_serving_bench.py [--k 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grpc_bench import start_server  # noqa: E402  (bench/ is on sys.path when run as a script)
from speculative_bench import REPETITIVE_STORY, SHARED, SMOLLM2, STORIES  # noqa: E402

from sinkstream.clients.client import SinkStreamClient  # noqa: E402
from sinkstream.clients.results import GenerateParams, SessionSettings  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WINDOWS = {"stories": 400, "smollm2": 1020}  # the window stays filling for the whole run (speculation
# stops once it is full; README), within the model's trained context
CAT = "Write a short story about a cat."


def cases(model: str) -> dict[str, tuple[str | None, str | None, int]]:
    """case -> (text to append, user message for a chat reply, tokens to generate)."""
    if model == "stories":
        return {"repetitive story": (REPETITIVE_STORY, None, 100)}
    passage = (SHARED / "data" / "sotu.txt").read_text()[:400]
    return {"repetitive text (copy)": (f"{passage}\n\n{passage}\n\n{passage[:80]}", None, 48),
            "chat": (None, CAT, 48)}


def run_case(address: str, window: int, text: str | None, message: str | None,
             tokens: int) -> tuple[list[int], float]:
    """One new session: (greedy token ids, decode tokens/s)."""
    settings = SessionSettings(sink_tokens=4, window=window, chunk=32)
    with SinkStreamClient(address, timeout=600) as client, client.open_session(settings) as session:
        if message is None:
            session.append_text(text)
        else:
            session.append_message("user", message)
        params = GenerateParams(max_new_tokens=tokens, ignore_eos=True, chat_reply=message is not None)
        ids, times = [], []
        for token in session.generate_stream(params):
            ids.append(token.token_id)
            times.append(time.perf_counter())
        session.close()  # free its row
    return ids, (len(ids) - 1) / (times[-1] - times[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="stories,smollm2")
    args = parser.parse_args()
    rows = []
    for model in args.models.split(","):
        path = str(STORIES if model == "stories" else SMOLLM2)
        servers = {k: start_server(path, 4, args.threads, ("--speculate", str(k))) for k in (0, args.k)}
        try:
            for case, (text, message, tokens) in cases(model).items():
                rates: dict[int, list[float]] = {0: [], args.k: []}
                outputs: dict[int, list[int]] = {}
                for _ in range(args.repeats):
                    for k, (_, address) in servers.items():  # alternate: both see the same machine load
                        outputs[k], rate = run_case(address, WINDOWS[model], text, message, tokens)
                        rates[k].append(rate)
                row = {"model": model, "case": case, "k": args.k, "new_tokens": tokens,
                       "plain_tok_s": statistics.median(rates[0]),
                       "spec_tok_s": statistics.median(rates[args.k]),
                       "plain_runs": rates[0], "spec_runs": rates[args.k],
                       "identical": outputs[0] == outputs[args.k], "load_avg": os.getloadavg()}
                row["speedup"] = row["spec_tok_s"] / row["plain_tok_s"]
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=60)
    lines = ["| model | case | tokens | plain tok/s | --speculate tok/s | speed-up | same output | load avg "
             "(1/5/15 min) |", "|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        load = "/".join(f"{x:.1f}" for x in r["load_avg"])
        lines.append(f"| {r['model']} | {r['case']} | {r['new_tokens']} | {r['plain_tok_s']:.1f} | "
                     f"{r['spec_tok_s']:.1f} | {r['speedup']:.2f}x | {r['identical']} | {load} |")
    stem = "speculative_serving_" + args.models.replace(",", "_")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    command = (f"SINKSTREAM_CACHE_DIR=/tmp/ggufcache python bench/speculative_serving_bench.py --k {args.k} "
               f"--repeats {args.repeats} --threads {args.threads} --models {args.models}")
    (RESULTS / f"{stem}.md").write_text(
        f"# `serve --speculate {args.k}`: one session's decode tokens/s through the server\n\n`{command}`\n\n"
        f"Greedy; two servers (plain, --speculate {args.k}) with {args.threads} torch thread(s) each, "
        f"alternating, median of {args.repeats}; decode tokens/s excludes the time to first token. The "
        "machine has 2 cores shared with other workers: the load average (taken when each case ended) is "
        f"given per row. Window {WINDOWS}, S = 4, C = 32.\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
