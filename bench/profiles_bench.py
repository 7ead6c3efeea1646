"""The measured effect of each `--profile` (core.profiles), against no profile (issue 17).

Per profile (each window fitted to the model's trained context, as the CLI does): KV bytes per session
(engine.cache_bytes, one row), weight bytes, streaming NLL and ingest tokens/s over the first --tokens
tokens of sotu.txt, and greedy decode ms/token (generate with the profile's --speculate, from a fresh row
prompted with the first 128 tokens of sotu.txt; the window is not full then, so speculation can run).

  SINKSTREAM_CACHE_DIR=/tmp/ggufcache python bench/profiles_bench.py --model stories --tokens 3000
  SINKSTREAM_CACHE_DIR=/tmp/ggufcache python bench/profiles_bench.py --model smollm2 --tokens 1200
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
sys.path.insert(0, str(ROOT / "bench"))

from smollm2_speed_bench import GGUF, SHARED, load_average, sotu_ids  # noqa: E402

from sinkstream.core.config import StreamConfig, TierSpec  # noqa: E402
from sinkstream.core.hardware_facts import trained_context  # noqa: E402
from sinkstream.core.model_loading import load_model  # noqa: E402
from sinkstream.core.profiles import PROFILE_SETTINGS, RunSettings, resolve  # noqa: E402
from sinkstream.core.sampling import SamplingParams  # noqa: E402
from sinkstream.core.speculative import generate_speculative  # noqa: E402
from sinkstream.core.streaming import StreamingInference  # noqa: E402
from sinkstream.core.weight_quant import weight_bytes  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MODELS = {"stories": SHARED / "models" / "stories260K", "smollm2": GGUF}
PROMPT_TOKENS, NEW_TOKENS = 128, 48


def stream_config(s: RunSettings) -> StreamConfig:
    return StreamConfig(sink_tokens=s.sink_tokens, window=s.window, chunk=s.chunk,
                        tiers=TierSpec.parse(s.tiers), kv_dtype=s.kv_dtype,
                        keep_rotated_keys=s.keep_rotated_keys)


@torch.inference_mode()
def measure(path: Path, s: RunSettings, ids: list[int], repeats: int) -> dict:
    loaded = load_model(str(path), weights_dtype=s.weights_dtype)
    engine = StreamingInference(loaded.model, stream_config(s), tokenizer=loaded.tokenizer)
    row = engine.open_row()
    t0 = time.perf_counter()
    logprobs = torch.cat([r.logprobs for r in engine.append(row, ids)])
    ingest_s = time.perf_counter() - t0
    decode = []
    for _ in range(repeats):
        engine.close_row(row)
        row = engine.open_row()
        for _ in engine.append(row, ids[:PROMPT_TOKENS]):
            pass
        params = SamplingParams(temperature=0.0, max_new_tokens=NEW_TOKENS, stop_on_eos=False)
        t0 = time.perf_counter()
        n = sum(1 for _ in generate_speculative(engine, row, params, loaded.tokenizer, k=s.speculate))
        decode.append((time.perf_counter() - t0) / n)
    return {"settings": s.__dict__, "kv_bytes_session": engine.cache_bytes,
            "weight_bytes": weight_bytes(loaded.model), "nll": float(-logprobs[1:].mean()),
            "ingest_tok_s": len(ids) / ingest_s, "decode_ms_token": 1e3 * statistics.median(decode)}


def markdown(d: dict) -> str:
    base = d["rows"]["(none)"]
    lines = [
        f"# Profiles measured: {d['model']}",
        "",
        f"Command: `{d['command']}`",
        "",
        f"First {d['tokens']:,} tokens of sotu.txt; decode: greedy, {NEW_TOKENS} tokens after a "
        f"{PROMPT_TOKENS}-token prompt, median of {d['repeats']}. torch {d['torch']}, "
        f"{d['threads']} thread(s), {d['cores']} shared cores, load average {d['load_before']} before, "
        f"{d['load_after']} after (timings are noisy).",
        "",
        "| profile | window | tiers | chunk | kv | weights | speculate | kept keys | KV bytes/session | "
        "weight bytes | NLL | vs none | ingest tok/s | decode ms/token |",
        "|---|---:|---|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in d["rows"].items():
        s = r["settings"]
        lines.append(
            f"| {name} | {s['window']} | {s['tiers'] or '-'} | {s['chunk']} | {s['kv_dtype']} | "
            f"{s['weights_dtype']} | {s['speculate']} | {'on' if s.get('keep_rotated_keys') else 'off'} | "
            f"{r['kv_bytes_session']:,} | {r['weight_bytes']:,} | "
            f"{r['nll']:.4f} | {(r['nll'] / base['nll'] - 1) * 100:+.2f}% | {r['ingest_tok_s']:.0f} | "
            f"{r['decode_ms_token']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), default="stories")
    ap.add_argument("--tokens", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = MODELS[args.model]
    load_before = load_average()
    ids = sotu_ids(load_model(str(path)).tokenizer, args.tokens)
    rows = {}
    for name in ["(none)", *PROFILE_SETTINGS]:
        profile = None if name == "(none)" else name
        settings = resolve(profile, {}, max_positions=trained_context(path)).settings
        rows[name] = measure(path, settings, ids, args.repeats)
        print(name, json.dumps({k: v for k, v in rows[name].items() if k != "settings"}), flush=True)
    command = "SINKSTREAM_CACHE_DIR=/tmp/ggufcache python bench/profiles_bench.py " + " ".join(sys.argv[1:])
    d = {"command": command,
         "model": path.name, "tokens": args.tokens, "repeats": args.repeats, "threads": args.threads,
         "torch": torch.__version__, "cores": os.cpu_count(), "load_before": load_before,
         "load_after": load_average(), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"profiles_{args.model}.json").write_text(json.dumps(d, indent=1))
    (RESULTS / f"profiles_{args.model}.md").write_text(markdown(d))
    print(markdown(d))


if __name__ == "__main__":
    main()
