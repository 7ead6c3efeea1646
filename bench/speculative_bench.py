"""Speculative decoding (issue 17): greedy decode tokens/s with and without --speculate, same output.

Cases: stories260K continuing a repetitive story, with a window that stays roomy and with one shorter than
the prompt (every token generated with the window full); SmolLM2-135M-Instruct copying a repeated passage
of sotu.txt (repetitive text, roomy and full window) and answering a chat message (its chat template).
Each case generates the same greedy continuation plainly and with prompt-lookup drafts (k tokens per
round), alternating, `--repeats` times each; reported: median tokens/s, forward passes, and whether the
outputs are identical.

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
FULL_WINDOW = 32  # stories' "window full" case: shorter than its prompt


def prompts(tokenizer, name: str) -> dict[str, tuple[list[int], StreamConfig]]:
    """Each case's prompt and stream config."""
    def roomy(ids: list[int]) -> StreamConfig:  # the window never fills during generation
        return StreamConfig(sink_tokens=4, window=1020 if len(ids) > 200 else 400, chunk=32)

    if name == "stories":
        story = tokenizer(REPETITIVE_STORY)["input_ids"]
        # A prompt longer than the window: every token is generated with the window full.
        return {"repetitive story": (story, roomy(story)),
                "repetitive story, window full": (story, StreamConfig(sink_tokens=4, window=FULL_WINDOW,
                                                                      chunk=32))}
    passage = (SHARED / "data" / "sotu.txt").read_text()[:400]
    copy = tokenizer(f"{passage}\n\n{passage}\n\n{passage[:80]}", add_special_tokens=False)["input_ids"]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Write a short story about a cat."}],
                                         add_generation_prompt=True, tokenize=True)
    if not isinstance(chat, list):
        chat = chat["input_ids"]
    # window full: shorter than the prompt but holding one passage (the draft looks up only the window).
    return {"repetitive text (copy)": (copy, roomy(copy)), "chat": (list(chat), roomy(chat)),
            "repetitive text (copy), window full": (copy, StreamConfig(sink_tokens=4, window=128, chunk=32))}


def decode(model, ids: list[int], config: StreamConfig, new_tokens: int,
           k: int) -> tuple[list[int], float, int]:
    """Greedy continuation of ids: (tokens, seconds of generation, forward passes of generation)."""
    engine = StreamingInference(model, config)
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
    load_before = f"{os.getloadavg()[0]:.1f}"
    rows = []
    for name in args.models.split(","):
        loaded = load_model(str(STORIES if name == "stories" else SMOLLM2))
        new_tokens = 100 if name == "stories" else 48
        for case, (ids, config) in prompts(loaded.tokenizer, name).items():
            times: dict[int, list[float]] = {0: [], args.k: []}
            outputs, passes = {}, {}
            for _ in range(args.repeats):
                for k in (0, args.k):  # alternate, so both see the same machine load
                    tokens, seconds, passes[k] = decode(loaded.model, ids, config, new_tokens, k)
                    times[k].append(len(tokens) / seconds)
                    outputs[k] = tokens
            row = {"model": name, "case": case, "window": config.window, "prompt_tokens": len(ids),
                   "k": args.k, "new_tokens": new_tokens,
                   "plain_tok_s": statistics.median(times[0]), "spec_tok_s": statistics.median(times[args.k]),
                   "plain_passes": passes[0], "spec_passes": passes[args.k],
                   "identical": outputs[0] == outputs[args.k]}
            row["speedup"] = row["spec_tok_s"] / row["plain_tok_s"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    lines = ["| model | case | prompt / window | plain tok/s | --speculate tok/s | speed-up | forward passes "
             "| same output |", "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['case']} | {r['prompt_tokens']} / {r['window']} | "
                     f"{r['plain_tok_s']:.1f} | {r['spec_tok_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['plain_passes']} -> {r['spec_passes']} | {r['identical']} |")
    stem = "speculative_" + args.models.replace(",", "_")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    (RESULTS / f"{stem}.md").write_text(
        f"# Speculative decoding (--speculate {args.k})\n\n`python bench/speculative_bench.py --k {args.k} "
        f"--repeats {args.repeats} --models {args.models} --threads {args.threads}` (greedy, median of "
        f"{args.repeats}; plain and speculative alternate; the machine was shared, load average "
        f"{load_before} before and {os.getloadavg()[0]:.1f} after on {os.cpu_count()} cores: timings are "
        f"noisy, forward-pass counts are exact)\n\n"
        + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
