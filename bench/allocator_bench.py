"""What keeping freed memory mapped buys: page faults and time per chunked forward pass, plain vs tuned.

Usage: python bench/allocator_bench.py [--passes 30]
Runs the same passes in two fresh processes (glibc defaults, then `keep_freed_memory()`), on a worker
thread as the server runs them: a one-layer Llama with a 32000-token vocabulary, so each pass's logits
and log-softmax ([64, 32000] float32, 8 MB each) dominate. Prints a markdown table and writes
bench/results/allocator.md. Fault counts depend on the machine (glibc version, kernel, other load):
this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_PROBE = """
import json, resource, sys, threading, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
from sinkstream.core.config import StreamConfig
from sinkstream.core.streaming import StreamingInference
from sinkstream.service.allocator import keep_freed_memory

tuned = keep_freed_memory() if sys.argv[1] == "tuned" else False
passes = int(sys.argv[2])
torch.set_num_threads(1)
torch.manual_seed(0)
config = LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
engine = StreamingInference(LlamaForCausalLM(config).eval(), StreamConfig(sink_tokens=4, window=60, chunk=64))
row = engine.open_row(seed=0)
out = {}

def run():
    engine.step({row: list(range(3, 67))})
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for i in range(passes):
        engine.step({row: list(range(3 + i, 67 + i))})
    out["seconds"] = time.perf_counter() - start
    out["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

worker = threading.Thread(target=run)
worker.start()
worker.join()
print(json.dumps({"tuned": tuned, **out}))
"""


def measure(mode: str, passes: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, mode, str(passes)], cwd=REPO, check=True,
                          capture_output=True, text=True)
    return json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passes", type=int, default=30)
    args = parser.parse_args()
    plain, tuned = measure("plain", args.passes), measure("tuned", args.passes)
    rows = [("glibc defaults", plain), ("keep_freed_memory()", tuned)]
    lines = [
        f"# Allocator tuning ({args.passes} passes of a 64-token chunk, vocab 32000, 1 thread, "
        f"{platform.machine()}, glibc {platform.libc_ver()[1]})",
        "",
        "| allocator | minor page faults | faults / pass | ms / pass |",
        "|---|---:|---:|---:|",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['faults']} | {r['faults'] / args.passes:.0f} | "
                     f"{1000 * r['seconds'] / args.passes:.2f} |")
    ratio = plain["faults"] / max(tuned["faults"], 1)
    lines += ["", f"Faults plain / tuned: {ratio:.1f}x; time plain / tuned: "
              f"{plain['seconds'] / tuned['seconds']:.2f}x."]
    text = "\n".join(lines)
    print(text)
    (REPO / "bench" / "results").mkdir(exist_ok=True)
    (REPO / "bench" / "results" / "allocator.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
