"""SmolLM2-135M-Instruct long-document quality, StreamingLLM-style (issue 13).

Mean NLL per 1,000-token segment over the first N tokens of sotu.txt (default 100,000), for four setups
at an equal budget of cache slots (sinks + tier slots + window = BUDGET):

  dense        transformers' own forward over a growing DynamicCache (chunks of 512), positions
               0, 1, 2, ... until DENSE_TOKENS (default 12,288): past the trained 8,192 positions it is
               outside what the model learnt, and its cost grows with the history, so it stops there
  window only  StreamingInference, S = 0, W = BUDGET
  sinks        StreamingInference, S = 4, W = BUDGET - 4
  sinks+tiers  StreamingInference, S = 4, tiers TIERS, W = BUDGET - 4 - tier slots

Every token's log-prob comes from the model's forward pass on the stream so far (the streaming setups:
whatever their bounded cache holds). Each setup's result is written to the JSON file as soon as it
finishes, so a long run that is stopped keeps what it measured; `--only NAME` reruns one setup.

  SINKSTREAM_CACHE_DIR=/tmp/ggufcache python bench/smollm2_long_nll_bench.py            # ~35 min here
  python bench/smollm2_long_nll_bench.py --tokens 20000 --dense-tokens 9000             # a short run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smollm2_speed_bench import sotu_ids  # noqa: E402  (bench/ is on sys.path when run as a script)

from sinkstream.core.config import StreamConfig, TierSpec  # noqa: E402
from sinkstream.core.model_loading import load_model  # noqa: E402
from sinkstream.core.streaming import StreamingInference  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SHARED = Path(os.environ.get("SINKSTREAM_SHARED", ROOT.parent / "shared"))
GGUF = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SOTU = SHARED / "data" / "sotu.txt"
SEGMENT = 1000
BUDGET = 1024
CHUNK = 256
TIERS = "64x4,32x16"
DENSE_CHUNK = 512
TRAINED_CONTEXT = 8192


def setups() -> dict[str, StreamConfig]:
    tier_slots = sum(t.slots for t in TierSpec.parse(TIERS))
    return {
        "window only": StreamConfig(sink_tokens=0, window=BUDGET, chunk=CHUNK),
        "sinks": StreamConfig(sink_tokens=4, window=BUDGET - 4, chunk=CHUNK),
        "sinks+tiers": StreamConfig(sink_tokens=4, window=BUDGET - 4 - tier_slots, chunk=CHUNK,
                                    tiers=TierSpec.parse(TIERS)),
    }


def segment_means(logprobs: list[float]) -> list[float]:
    """Mean NLL of each SEGMENT-token segment [n_segments]; the first token (NaN, unpredicted) skipped."""
    out = []
    for start in range(0, len(logprobs) - SEGMENT + 1, SEGMENT):
        seg = [-x for x in logprobs[start : start + SEGMENT] if not math.isnan(x)]
        out.append(sum(seg) / len(seg))
    return out


def run_streaming(model, config: StreamConfig, ids: list[int]) -> tuple[list[float], float]:
    engine = StreamingInference(model, config)
    row = engine.open_row()
    logprobs: list[float] = []
    t0 = time.perf_counter()
    for start in range(0, len(ids), 16 * CHUNK):  # progress every 4k tokens
        for result in engine.append(row, ids[start : start + 16 * CHUNK]):
            logprobs.extend(result.logprobs.tolist())
        print(f"  {len(logprobs):>7} tokens, {len(logprobs) / (time.perf_counter() - t0):.0f} tok/s, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    assert len(logprobs) == len(ids)
    return logprobs, time.perf_counter() - t0


@torch.inference_mode()
def run_dense(model, ids: list[int]) -> tuple[list[float], float]:
    """Transformers' forward over one growing DynamicCache, chunk by chunk: token i is predicted from
    tokens 0..i-1 at positions 0..i."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    logprobs = [float("nan")]
    t0 = time.perf_counter()
    previous_last = None
    for start in range(0, len(ids), DENSE_CHUNK):
        chunk = ids[start : start + DENSE_CHUNK]
        logits = model(input_ids=torch.tensor([chunk]), past_key_values=cache, use_cache=True).logits[0]
        lp = torch.log_softmax(logits.float(), dim=-1)
        if previous_last is not None:  # the previous chunk's last position predicts this chunk's first
            logprobs.append(float(previous_last[chunk[0]]))
        targets = torch.tensor(chunk[1:])
        logprobs.extend(lp[:-1].gather(1, targets[:, None])[:, 0].tolist())
        previous_last = lp[-1]
        print(f"  dense {start + len(chunk):>6} tokens, {time.perf_counter() - t0:.0f} s", flush=True)
    return logprobs, time.perf_counter() - t0


def markdown(data: dict) -> str:
    names = list(data["setups"])
    segments = max(len(s["segment_nll"]) for s in data["setups"].values())
    lines = [
        "# SmolLM2-135M-Instruct: NLL per 1k-token segment over a long document",
        "",
        "Commands (each setup's result is kept in the JSON file as it finishes; `--only` reruns some):",
        "",
        *[f"- {name}: `{s.get('command', data['command'])}`" for name, s in data["setups"].items()],
        "",
        f"Model `{data['model']}` (fp32 from the Q4_1 GGUF), trained context {TRAINED_CONTEXT}. Text: the "
        f"first {data['tokens']:,} tokens of sotu.txt. Equal budget of {BUDGET} cache slots for the "
        f"streaming setups, chunk {CHUNK}; dense is transformers' plain forward over a growing cache, up "
        f"to {data['dense_tokens']:,} tokens. Mean NLL in nats per token.",
        "",
        "| setup | shape | tokens | seconds | tok/s | mean NLL | first 8k | after 8k | worst segment |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        s = data["setups"][name]
        seg = s["segment_nll"]
        early, late = seg[:8], seg[8:]
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
        lines.append(f"| {name} | {s['shape']} | {s['tokens']:,} | {s['seconds']:.0f} | "
                     f"{s['tokens'] / s['seconds']:.0f} | {mean(seg):.3f} | {mean(early):.3f} | "
                     f"{mean(late):.3f} | {max(seg):.3f} (segment {seg.index(max(seg)) + 1}) |")
    lines += ["", "Per segment (segment k covers tokens (k-1)*1000 .. k*1000-1):", "",
              "| segment | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    shown = sorted(set(range(0, min(segments, 20))) | set(range(19, segments, 10)) | {segments - 1})
    for k in shown:
        cells = [f"{data['setups'][n]['segment_nll'][k]:.3f}" if k < len(data["setups"][n]["segment_nll"])
                 else "" for n in names]
        lines.append(f"| {k + 1} | " + " | ".join(cells) + " |")
    lines += ["", "Plot: `smollm2_long_nll.png`."]
    return "\n".join(lines) + "\n"


def rewrite(json_path: Path) -> None:
    """Write the markdown and the plot again from a results file."""
    data = json.loads(json_path.read_text())
    json_path.with_suffix(".md").write_text(markdown(data))
    plot(data, json_path.with_suffix(".png"))


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, s in data["setups"].items():
        seg = s["segment_nll"]
        ax.plot([(k + 1) * SEGMENT for k in range(len(seg))], seg, label=f"{name} ({s['shape']})", lw=1.2)
    ax.axvline(TRAINED_CONTEXT, color="grey", ls=":", lw=1)
    ax.text(TRAINED_CONTEXT, ax.get_ylim()[1], " trained context", va="top", fontsize=8, color="grey")
    ax.set_xscale("log")
    ax.set_xlabel("tokens of sotu.txt")
    ax.set_ylabel("mean NLL per 1k-token segment (nats)")
    ax.set_title("SmolLM2-135M-Instruct, equal cache budget of 1024 slots")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--dense-tokens", type=int, default=12_288)
    ap.add_argument("--only", action="append", help="run only this setup (repeatable); keep the others")
    ap.add_argument("--out", default=str(RESULTS / "smollm2_long_nll"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--rewrite", action="store_true", help="only rewrite the report from the JSON file")
    args = ap.parse_args()
    if args.rewrite:
        rewrite(Path(args.out).with_suffix(".json"))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    json_path = out.with_suffix(".json")
    data = json.loads(json_path.read_text()) if json_path.exists() and args.only else {"setups": {}}
    loaded = load_model(str(GGUF), dtype=torch.float32)
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = sotu_ids(tokenizer, args.tokens)
    data.update(command="python bench/smollm2_long_nll_bench.py " + " ".join(sys.argv[1:]),
                model=GGUF.name, tokens=len(ids), dense_tokens=args.dense_tokens)
    todo = ["dense", *setups()]
    for name in todo:
        if args.only and name not in args.only:
            continue
        print(f"{name}:", flush=True)
        if name == "dense":
            logprobs, seconds = run_dense(model, ids[: args.dense_tokens])
            shape = f"positions 0..{args.dense_tokens - 1}"
        else:
            config = setups()[name]
            logprobs, seconds = run_streaming(model, config, ids)
            shape = f"S={config.sink_tokens} W={config.window}" + (f" tiers {TIERS}" if config.tiers else "")
        data["setups"][name] = {"shape": shape, "tokens": len(logprobs), "seconds": seconds,
                                "segment_nll": segment_means(logprobs), "command": data["command"],
                                "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg())}
        json_path.write_text(json.dumps(data, indent=1))
        out.with_suffix(".md").write_text(markdown(data))
        plot(data, out.with_suffix(".png"))
        print(f"{name}: {len(logprobs)} tokens in {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
