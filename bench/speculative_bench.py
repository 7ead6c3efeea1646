"""Speculative decoding (issue 17): greedy decode tokens/s with and without --speculate, same output.

Cases: stories260K continuing a repetitive story; SmolLM2-135M-Instruct copying a repeated passage of
sotu.txt (repetitive text) and answering a chat message (its chat template). Each case generates the same
greedy continuation plainly and with prompt-lookup drafts (k tokens per round), alternating, `--repeats`
times each; reported: median tokens/s, forward passes, and whether the outputs are identical.

  SINKSTREAM_CACHE_DIR=/tmp/ggufcache python bench/speculative_bench.py [--k 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sinkstream.core.config import StreamConfig  # noqa: E402
from sinkstream.core.model_loading import load_model  # noqa: E402
from sinkstream.core.sampling import SamplingParams  # noqa: E402
from sinkstream.core.speculative import generate_speculative  # noqa: E402
from sinkstream.core.streaming import StreamingInference  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SHARED = Path(os.environ.get("SINKSTREAM_SHARED", ROOT.parent / "shared"))
STORIES = SHARED / "models" / "stories260K"
SMOLLM2 = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
REPETITIVE_STORY = "Tom has a red ball. Tom has a red ball. Tom has a red ball. Tom has a"


def prompts(tokenizer, name: str) -> dict[str, list[int]]:
    if name == "stories":
        return {"repetitive story": tokenizer(REPETITIVE_STORY)["input_ids"]}
    passage = (SHARED / "data" / "sotu.txt").read_text()[:400]
    copy = tokenizer(f"{passage}\n\n{passage}\n\n{passage[:80]}", add_special_tokens=False)["input_ids"]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Write a short story about a cat."}],
                                         add_generation_prompt=True, tokenize=True)
    if not isinstance(chat, list):
        chat = chat["input_ids"]
    return {"repetitive text (copy)": copy, "chat": list(chat)}


def decode(model, ids: list[int], new_tokens: int, k: int) -> tuple[list[int], float, int]:
    """Greedy continuation of ids: (tokens, seconds of generation, forward passes of generation)."""
    engine = StreamingInference(model, StreamConfig(sink_tokens=4, window=1020 if len(ids) > 200 else 400,
                                                    chunk=32))
    row = engine.open_row(seed=0)
    list(engine.append(row, ids))
    passes = [0]
    engine.base.register_forward_pre_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
    params = SamplingParams(max_new_tokens=new_tokens, stop_on_eos=False)
    start = time.perf_counter()
    tokens = [t.token_id for t in generate_speculative(engine, row, params, k=k)]
    return tokens, time.perf_counter() - start, passes[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="stories,smollm2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        loaded = load_model(str(STORIES if name == "stories" else SMOLLM2))
        new_tokens = 100 if name == "stories" else 48
        for case, ids in prompts(loaded.tokenizer, name).items():
            times: dict[int, list[float]] = {0: [], args.k: []}
            outputs, passes = {}, {}
            for _ in range(args.repeats):
                for k in (0, args.k):  # alternate, so both see the same machine load
                    tokens, seconds, passes[k] = decode(loaded.model, ids, new_tokens, k)
                    times[k].append(len(tokens) / seconds)
                    outputs[k] = tokens
            row = {"model": name, "case": case, "k": args.k, "new_tokens": new_tokens,
                   "plain_tok_s": statistics.median(times[0]), "spec_tok_s": statistics.median(times[args.k]),
                   "plain_passes": passes[0], "spec_passes": passes[args.k],
                   "identical": outputs[0] == outputs[args.k]}
            row["speedup"] = row["spec_tok_s"] / row["plain_tok_s"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    lines = ["| model | case | plain tok/s | --speculate tok/s | speed-up | forward passes | same output |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['case']} | {r['plain_tok_s']:.1f} | {r['spec_tok_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['plain_passes']} -> {r['spec_passes']} | {r['identical']} |")
    stem = "speculative_" + args.models.replace(",", "_")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / f"{stem}.md").write_text(
        f"# Speculative decoding (--speculate {args.k})\n\n`python bench/speculative_bench.py --k {args.k} "
        f"--repeats {args.repeats} --models {args.models} --threads {args.threads}` (greedy, median of "
        f"{args.repeats}; plain and speculative alternate; the machine was shared)\n\n"
        + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
