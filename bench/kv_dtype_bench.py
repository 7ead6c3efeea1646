"""KV cache storage formats (issue 17): bytes per session, NLL and throughput of --kv-dtype.

For each model, the first TOKENS tokens of sotu.txt stream through StreamingInference (S = 4, chunk C)
with the cache stored as float32, bfloat16, int8 and int4 at a window W, and as float32, int8 and int4 at 4W:

  kv bytes/session  the stored keys, values (and int8/int4 scales) of one row, plus its count and token ids
  NLL               mean next-token NLL over every scored token; relative to float32 at the same window
  tokens/s          analysis throughput of the run (the configurations run one after another in one process:
                    compare ratios, and only on a quiet machine)

"Equal bytes" compares int8 and int4 at 4W with float32 at W: is quantising better than a shorter window?

  SINKSTREAM_CACHE_DIR=/tmp/ggufcache python bench/kv_dtype_bench.py [--tokens 3000] [--models stories]
  (results: bench/results/kv_dtype_<models>.md and .json)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sinkstream.core.config import StreamConfig  # noqa: E402
from sinkstream.core.model_loading import load_model  # noqa: E402
from sinkstream.core.streaming import StreamingInference  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SHARED = Path(os.environ.get("SINKSTREAM_SHARED", ROOT.parent / "shared"))
SOTU = SHARED / "data" / "sotu.txt"
MODELS = {  # name: (path, window, chunk); 4 * window + chunk + 4 sinks fits the trained context
    "stories": (SHARED / "models" / "stories260K", 96, 32),
    "smollm2": (SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf", 128, 64),
}
RUNS = (("float32", 1), ("bfloat16", 1), ("int8", 1), ("int4", 1), ("float32", 4), ("int8", 4), ("int4", 4))


def session_kv_bytes(engine: StreamingInference) -> int:
    """Bytes one row holds: stored keys/values/scales [L, H, N, *] and its count and token ids [N]."""
    cache = engine.cache
    per_row = sum(t[:, 0].nbytes for t in cache.storage.tensors())
    return per_row + cache.count[0].nbytes + cache.token_ids[0].nbytes


def run(model, ids: list[int], kv_dtype: str, window: int, chunk: int) -> dict:
    engine = StreamingInference(model, StreamConfig(sink_tokens=4, window=window, chunk=chunk,
                                                    kv_dtype=kv_dtype))
    row = engine.open_row()
    start = time.perf_counter()
    for result in engine.append(row, ids):
        last = result
    elapsed = time.perf_counter() - start
    return {"kv_dtype": kv_dtype, "window": window, "kv_bytes_per_session": session_kv_bytes(engine),
            "engine_cache_bytes": engine.cache_bytes, "nll": last.mean_nll,
            "tokens_per_s": len(ids) / elapsed}


def bench_model(name: str, tokens: int, threads: int) -> list[dict]:
    path, window, chunk = MODELS[name]
    loaded = load_model(str(path), dtype=torch.float32)
    text = SOTU.read_text()[: tokens * 8]
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    rows = []
    for kv_dtype, factor in RUNS:
        row = run(loaded.model, ids, kv_dtype, window * factor, chunk)
        row.update(model=name, tokens=len(ids), threads=threads)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | kv dtype | window | KV bytes/session | NLL | vs float32 same window | tokens/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["window"] == r["window"]
                    and b["kv_dtype"] == "float32")
        rel = (r["nll"] / base["nll"] - 1) * 100
        lines.append(f"| {r['model']} | {r['kv_dtype']} | {r['window']} | {r['kv_bytes_per_session']:,} | "
                     f"{r['nll']:.4f} | {rel:+.2f}% | {r['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--models", default="stories,smollm2")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [r for name in args.models.split(",") for r in bench_model(name, args.tokens, args.threads)]
    RESULTS.mkdir(exist_ok=True)
    stem = "kv_dtype_" + args.models.replace(",", "_")
    (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    command = f"python bench/kv_dtype_bench.py --tokens {args.tokens} --models {args.models}"
    (RESULTS / f"{stem}.md").write_text(
        f"# KV cache storage formats (--kv-dtype)\n\n`{command}` ({args.threads} threads; first "
        f"{args.tokens} tokens of sotu.txt; S = 4; the machine was shared, so tokens/s compare only "
        f"within one model's rows)\n\n{table(rows)}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
