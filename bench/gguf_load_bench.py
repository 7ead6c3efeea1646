"""Cold and warm start of a GGUF model (`--model file.gguf`): de-quantising on first use versus reading the
cached safetensors entry (core/gguf_loading.py), each in a fresh process.

    python bench/gguf_load_bench.py [--gguf ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf]
                                    [--cold-runs 2] [--warm-runs 3]

Each run is a fresh `python -c` process that imports the stack and calls `load_model(path)`; it reports the
seconds of the import, of `load_model` (with whether the cache was hit) and of hashing the file, and its
peak RSS (ru_maxrss). A cold run gets an empty cache directory ($SINKSTREAM_CACHE_DIR); the warm runs share
one that a cold run filled. For comparison, "transformers, no cache" is what every start would cost
without the cache: `AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`. Writes
bench/results/gguf_load.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SINKSTREAM_SHARED", ROOT.parent / "shared"))
RESULTS = ROOT / "bench" / "results" / "gguf_load.md"

LOAD_OURS = """
import json, resource, sys, time
t0 = time.perf_counter()
from sinkstream.core.gguf_loading import file_sha256
from sinkstream.core.model_loading import load_model
t1 = time.perf_counter()
loaded = load_model(sys.argv[1])
t2 = time.perf_counter()
file_sha256(sys.argv[1])
t3 = time.perf_counter()
for f in loaded.gguf.folder.iterdir():
    file_sha256(f)
t4 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "hash_s": t3 - t2, "entry_hash_s": t4 - t3,
                  "cache_hit": loaded.gguf.cache_hit,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

LOAD_TRANSFORMERS = """
import json, resource, sys, time
from pathlib import Path
t0 = time.perf_counter()
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
t1 = time.perf_counter()
path = Path(sys.argv[1])
AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "hash_s": 0.0, "entry_hash_s": 0.0,
                  "cache_hit": None,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(code: str, gguf: Path, cache: Path) -> dict:
    """One fresh process; its measures plus its wall time."""
    env = {**os.environ, "SINKSTREAM_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(gguf)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"run failed:\n{proc.stderr}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall}


def row(kind: str, runs: list[dict]) -> str:
    def median(key: str) -> str:
        return f"{statistics.median(r[key] for r in runs):.2f}"

    hits = {r["cache_hit"] for r in runs}
    hit = "-" if hits == {None} else ", ".join(sorted({"hit" if h else "miss" for h in hits}))
    return (f"| {kind} | {len(runs)} | {hit} | {median('wall_s')} | {median('import_s')} "
            f"| {median('load_s')} | {median('hash_s')} | {median('entry_hash_s')} | {median('rss_mib')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, default=SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--cold-runs", type=int, default=2)
    parser.add_argument("--warm-runs", type=int, default=3)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="gguf-bench-") as tmp:
        cold = []
        for i in range(args.cold_runs):
            cold.append(run(LOAD_OURS, args.gguf, Path(tmp) / f"cold{i}"))
            print("cold", cold[-1], flush=True)
        warm = []
        for _ in range(args.warm_runs):
            warm.append(run(LOAD_OURS, args.gguf, Path(tmp) / "cold0"))
            print("warm", warm[-1], flush=True)
        plain = [run(LOAD_TRANSFORMERS, args.gguf, Path(tmp) / "unused")]
        print("transformers", plain[-1], flush=True)
        entry_bytes = sum(f.stat().st_size for f in (Path(tmp) / "cold0").rglob("*") if f.is_file())
    load_after = os.getloadavg()[0]
    lines = [
        "# GGUF cold start vs warm start",
        "",
        f"`python bench/gguf_load_bench.py --gguf {args.gguf.name} --cold-runs {args.cold_runs} "
        f"--warm-runs {args.warm_runs}` (fp32; each run a fresh process; medians; 2 CPU cores, "
        f"1-minute load average {load_before:.2f} before, {load_after:.2f} after).",
        "",
        "| start | runs | cache | process wall s | imports s | load_model s | sha256 of the GGUF s "
        "| sha256 of the entry s | peak RSS MiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
        row("cold (empty cache: de-quantise, save, load)", cold),
        row("warm (cache hit: hash, verify entry, load folder)", warm),
        row("transformers `from_pretrained(gguf_file=)`, no cache", plain),
        "",
        f"Cache entry on disk: {entry_bytes / 1e6:.0f} MB (fp32 safetensors + tokenizer files + manifest), "
        f"for a {args.gguf.stat().st_size / 1e6:.0f} MB GGUF file.",
        "",
        "A warm `load_model` hashes the GGUF (the cache key) and every file of the entry (the manifest "
        "check), then loads a local folder. The two sha256 columns time those hashes alone (measured again "
        "after the load): hashing the GGUF on every start is cheap enough to need no cache of its own.",
    ]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
