"""Tokenization throughput: one-shot `tokenizer(text)` vs IncrementalEncoder fed UTF-8 bytes in blocks,
and one-shot `decode(ids)` vs IncrementalDecoder fed one id at a time.

Usage: python bench/text_throughput.py [--shared ../shared] [--repeat 3]
Prints a markdown table and writes bench/results/text_throughput.md. Every incremental run is checked
to give exactly the one-shot ids / text.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from transformers import AutoTokenizer

from sinkstream.core.text import IncrementalDecoder, IncrementalEncoder

REPO = Path(__file__).resolve().parent.parent


def best_time(fn, repeat: int) -> tuple[float, list[int]]:
    """Fastest wall time of `repeat` runs of fn() and its result."""
    best, result = float("inf"), []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def incremental(tokenizer, data: bytes, block: int) -> list[int]:
    encoder = IncrementalEncoder(tokenizer)
    ids: list[int] = []
    for i in range(0, len(data), block):
        ids += encoder.push(data[i:i + block])
    return ids + encoder.flush()


def streamed_decode(tokenizer, ids: list[int]) -> str:
    decoder = IncrementalDecoder(tokenizer)
    return "".join(decoder.push(i) for i in ids) + decoder.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", default=os.environ.get("SINKSTREAM_SHARED", str(REPO.parent / "shared")))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    shared = Path(args.shared)
    tokenizer = AutoTokenizer.from_pretrained(shared / "models" / "stories260K")
    sotu = (shared / "data" / "sotu.txt").read_text(encoding="utf-8")
    inputs = {"sotu.txt (1.28 MB)": sotu, "sotu.txt x3.3 (4.2 MB)": (sotu + "\n") * 3 + sotu[:400_000]}
    rows = ["| input | path | MB | tokens | seconds | tokens/s | equals one-shot |",
            "|---|---|---|---|---|---|---|"]
    for name, text in inputs.items():
        data = text.encode("utf-8")
        seconds, whole = best_time(lambda text=text: tokenizer(text)["input_ids"], args.repeat)
        rows.append(f"| {name} | one-shot tokenizer(text) | {len(data) / 1e6:.2f} | {len(whole)} | "
                    f"{seconds:.3f} | {len(whole) / seconds:,.0f} | - |")
        for block in (1 << 16, 4096, 256, 16):
            if block < 256 and len(data) > 2_000_000:
                continue  # tiny pieces on the big input only repeat the 1.28 MB figure, slowly
            seconds, ids = best_time(lambda data=data, block=block: incremental(tokenizer, data, block),
                                     args.repeat)
            rows.append(f"| {name} | incremental, {block} B pieces | {len(data) / 1e6:.2f} | {len(ids)} | "
                        f"{seconds:.3f} | {len(ids) / seconds:,.0f} | {ids == whole} |")
    ids = tokenizer(sotu[:300_000])["input_ids"]
    seconds, whole_text = best_time(lambda: tokenizer.decode(ids, skip_special_tokens=True), args.repeat)
    rows.append(f"| sotu.txt[:300k] ids | one-shot decode | 0.30 | {len(ids)} | {seconds:.3f} | "
                f"{len(ids) / seconds:,.0f} | - |")
    seconds, text = best_time(lambda: streamed_decode(tokenizer, ids), args.repeat)
    rows.append(f"| sotu.txt[:300k] ids | IncrementalDecoder, one id per push | 0.30 | {len(ids)} | "
                f"{seconds:.3f} | {len(ids) / seconds:,.0f} | {text == whole_text} |")
    table = "\n".join(rows)
    print(table)
    out = REPO / "bench" / "results" / "text_throughput.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Tokenization throughput, stories260K tokenizer (best of "
                   f"{args.repeat})\n\n`python bench/text_throughput.py`\n\n{table}\n")


if __name__ == "__main__":
    main()
