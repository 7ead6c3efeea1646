"""Weight-only quantisation (`--weights-dtype`, core.weight_quant) on SmolLM2-135M-Instruct.Q4_1.gguf, with
llama.cpp on the same file as an optional column (issue 17).

Per weights dtype and thread count:
  decode   ms per greedy token with a full cache (S = 4, W = 956, C = 64: S + W + C = 1024);
  prefill  tokens/s of 64-token chunks over the same full cache (as issue 17 measures: ~1k cached tokens),
           every chunk token's log-probabilities computed (as `analyze` needs);
  bytes    of the model's parameters and buffers (tied / shared storage counted once);
  NLL      streaming NLL over a held-out slice of sotu.txt (tokens 20,000-21,024: past what the other
           benches read), relative to float32;
  greedy   the shared README's three reference outputs (dense transformers generate, greedy): held or not.
`--kept-keys int4` also times int4 with the keys kept rotated between passes (StreamConfig.keep_rotated_keys).
Every dtype is loaded at once and timed in turn, step by step, so all see the same machine load.

llama.cpp (if `llama_cpp` imports: `pip install llama-cpp-python`): the same GGUF and thread count; decode =
one token evaluated after 1,020 cached tokens, prefill = a 64-token batch after 960 cached tokens (logits of
the last token only, so it does less work than ours), the cache rolled back after each timed step.

  SINKSTREAM_CACHE_DIR=/tmp/ggufcache python bench/weights_dtype_bench.py --threads 2,1
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

from smollm2_speed_bench import GGUF, load_average, sotu_ids  # noqa: E402

from sinkstream.core.config import WEIGHTS_DTYPES, StreamConfig  # noqa: E402
from sinkstream.core.model_loading import load_model  # noqa: E402
from sinkstream.core.streaming import StreamingInference  # noqa: E402
from sinkstream.core.weight_quant import weight_bytes  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SINKS, WINDOW, CHUNK = 4, 956, 64
HELD_OUT = (20_000, 21_024)  # token range of sotu.txt scored for NLL
# The shared README's reference outputs (plain transformers, dense, greedy, fp32 de-quantised weights).
REFERENCES = [
    ("chat", "What is the capital of France?", "The capital of France is Paris.<|im_end|>"),
    ("chat", "Write a haiku about the sea.",
     "The waves of the sea, a silent beauty,\nA gentle lapping of the shore,\nA reminder of the beauty that "
     "lies beneath,\nA reminder of the ocean's power.<|im_end|>"),
    ("text", "The capital of France is", " Paris.\n\nThe answer is: 2018-01-22 "),
]


KEPT = " +kept keys"  # suffix of a variant with StreamConfig.keep_rotated_keys (--keep-rotated-keys)


def engine_for(model, keep_rotated_keys: bool = False) -> tuple[StreamingInference, int]:
    engine = StreamingInference(model, StreamConfig(sink_tokens=SINKS, window=WINDOW, chunk=CHUNK,
                                                    keep_rotated_keys=keep_rotated_keys))
    return engine, engine.open_row()


@torch.inference_mode()
def nll(model, ids: list[int]) -> float:
    engine, row = engine_for(model)
    logprobs = torch.cat([r.logprobs for r in engine.append(row, ids)])
    return float(-logprobs[1:].mean())


@torch.inference_mode()
def greedy_checks(loaded) -> list[dict]:
    """Each README reference: the model's dense greedy continuation and whether it is the reference."""
    tok = loaded.tokenizer
    out = []
    for kind, prompt, expected in REFERENCES:
        if kind == "chat":
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
        n_new = len(tok(expected, add_special_tokens=False)["input_ids"])
        gen = loaded.model.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False)
        got = tok.decode(gen[0, len(ids):])
        out.append({"prompt": prompt, "expected": expected, "got": got, "holds": got == expected})
    return out


@torch.inference_mode()
def warm(engines: dict, ids: list[int]) -> int:
    """Fill every engine's cache past capacity (evicting from then on); returns the next unused position."""
    pos = SINKS + WINDOW + 2 * CHUNK
    for engine, row in engines.values():
        for _ in engine.append(row, ids[:pos]):
            pass
    return pos


@torch.inference_mode()
def time_ours(engines: dict, ids: list[int], pos: int, chunks: int, steps: int) -> tuple[dict, int]:
    """Per dtype: chunk and single-token step times over full caches, dtypes interleaved step by step;
    returns them and the next unused position of `ids`."""
    chunk_s = {k: [] for k in engines}
    for i in range(chunks + 1):  # the first round is warm-up
        piece = ids[pos : pos + CHUNK]
        pos += CHUNK
        for k, (engine, row) in engines.items():
            t0 = time.perf_counter()
            engine.step({row: piece})
            if i:
                chunk_s[k].append(time.perf_counter() - t0)
    decode_s = {k: [] for k in engines}
    tokens = {k: int(e.next_logprobs(r).argmax()) for k, (e, r) in engines.items()}
    for i in range(steps + 1):
        for k, (engine, row) in engines.items():
            t0 = time.perf_counter()
            engine.step({row: [tokens[k]]})
            tokens[k] = int(engine.next_logprobs(row).argmax())
            if i:
                decode_s[k].append(time.perf_counter() - t0)
    return {k: {"chunk_s": chunk_s[k], "decode_s": decode_s[k]} for k in engines}, pos


def time_llama_cpp(threads: int, ids: list[int], chunks: int, steps: int) -> dict | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=str(GGUF), n_ctx=2048, n_batch=CHUNK, n_ubatch=CHUNK, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    base = SINKS + WINDOW  # 960 cached tokens before a chunk, as ours holds
    llm.eval(ids[:base])
    chunk_s = []
    for i in range(chunks + 1):
        piece = ids[base + i * CHUNK : base + (i + 1) * CHUNK]
        llm.n_tokens = base  # eval() drops the cache past n_tokens first
        t0 = time.perf_counter()
        llm.eval(piece)
        if i:
            chunk_s.append(time.perf_counter() - t0)
    llm.n_tokens = base
    llm.eval(ids[base : base + CHUNK - 4])  # 1,020 cached tokens
    cached = llm.n_tokens
    decode_s = []
    token = ids[cached]
    for i in range(steps + 1):
        llm.n_tokens = cached
        t0 = time.perf_counter()
        llm.eval([token])
        if i:
            decode_s.append(time.perf_counter() - t0)
    return {"chunk_s": chunk_s, "decode_s": decode_s, "version": llama_cpp.__version__}


def markdown(d: dict) -> str:
    dtypes = d["dtypes"]
    base_nll = d["quality"].get("float32", {}).get("nll", float("nan"))  # float32 may not have run
    lines = [
        "# SmolLM2-135M-Instruct: `--weights-dtype` (weight-only quantised Linear layers) vs llama.cpp",
        "",
        f"Command: `{d['command']}`",
        "",
        f"Model `{GGUF.name}`; S = {SINKS}, W = {WINDOW}, C = {CHUNK} (S + W + C = 1024); "
        f"torch {d['torch']}, {d['cores']} cores shared with other workers: load average (1/5/15 min) "
        f"{d['load_before']} before, {d['load_after']} after. Times are medians of interleaved steps "
        "(every dtype timed in turn).",
        "",
        "| weights | threads | decode ms/token | prefill tok/s (64-token chunks over ~1k cache) | "
        f"weight bytes | NLL (sotu tokens {HELD_OUT[0]:,}-{HELD_OUT[1]:,}) | vs float32 | "
        "README greedy refs held |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for threads, run in d["timing"].items():
        for k in [k for k in run if k != "llama.cpp"]:
            t, q = run[k], d["quality"][k.removesuffix(KEPT)]
            held = sum(c["holds"] for c in q["greedy"])
            lines.append(
                f"| {k} | {threads} | {statistics.median(t['decode_s']) * 1e3:.1f} | "
                f"{CHUNK / statistics.median(t['chunk_s']):.0f} | {q['bytes']:,} | {q['nll']:.4f} | "
                f"{(q['nll'] / base_nll - 1) * 100:+.2f}% | {held}/{len(q['greedy'])} |")
        if llama := run.get("llama.cpp"):
            lines.append(
                f"| llama.cpp {llama['version']} (Q4_1 as stored) | {threads} | "
                f"{statistics.median(llama['decode_s']) * 1e3:.1f} | "
                f"{CHUNK / statistics.median(llama['chunk_s']):.0f} | {GGUF.stat().st_size:,} (file) | | | |")
    if not any("llama.cpp" in run for run in d["timing"].values()):
        lines += ["", "llama.cpp column skipped: `llama_cpp` is not importable "
                  "(`pip install llama-cpp-python`)."]
    lines += ["", "## README greedy references that do not hold", ""]
    misses = [(k, c) for k in dtypes for c in d["quality"][k]["greedy"] if not c["holds"]]
    lines += [f"- {k}: `{c['prompt']}` gave {c['got']!r}" for k, c in misses] or ["- none"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="2,1", help="comma-separated thread counts")
    ap.add_argument("--dtypes", default=",".join(WEIGHTS_DTYPES))
    ap.add_argument("--skip-quality", action="store_true", help="timings only (no NLL, no greedy checks)")
    ap.add_argument("--chunks", type=int, default=6, help="timed 64-token chunks per dtype")
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps per dtype")
    ap.add_argument("--out", default="weights_dtype")
    ap.add_argument("--kept-keys", default="",
                    help="comma-separated dtypes also timed with keys kept rotated between passes "
                         "(--keep-rotated-keys on; bytes and NLL columns: the dtype's own)")
    args = ap.parse_args()
    dtypes = args.dtypes.split(",")
    load_before, t_start = load_average(), time.perf_counter()
    loaded = {k: load_model(str(GGUF), weights_dtype=k) for k in dtypes}
    tokenizer = next(iter(loaded.values())).tokenizer
    ids = sotu_ids(tokenizer, HELD_OUT[1])
    held_out = ids[HELD_OUT[0] : HELD_OUT[1]]
    quality = {}
    for k, m in loaded.items():
        if args.skip_quality:
            quality[k] = {"bytes": weight_bytes(m.model), "nll": float("nan"), "greedy": []}
            continue
        quality[k] = {"bytes": weight_bytes(m.model), "nll": nll(m.model, held_out),
                      "greedy": greedy_checks(m)}
        print(f"{k}: {quality[k]['bytes']:,} bytes, NLL {quality[k]['nll']:.4f}, greedy refs held "
              f"{[c['holds'] for c in quality[k]['greedy']]}", flush=True)
    timing = {}

    def write() -> None:  # after each thread count: a run cut short by the machine's load keeps its figures
        d = {"command": "SINKSTREAM_CACHE_DIR=/tmp/ggufcache python bench/weights_dtype_bench.py "
                        + " ".join(sys.argv[1:]),
             "dtypes": dtypes, "quality": quality, "timing": timing, "torch": torch.__version__,
             "cores": os.cpu_count(), "load_before": load_before, "load_after": load_average(),
             "wall_s": time.perf_counter() - t_start}
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.out}.json").write_text(json.dumps(d, indent=1))
        (RESULTS / f"{args.out}.md").write_text(markdown(d))
        print(markdown(d), flush=True)

    engines = {k: engine_for(m.model) for k, m in loaded.items()}
    engines.update({k + KEPT: engine_for(loaded[k].model, keep_rotated_keys=True)
                    for k in filter(None, args.kept_keys.split(","))})
    torch.set_num_threads(int(args.threads.split(",")[0]))
    pos = warm(engines, ids)
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        run, pos = time_ours(engines, ids, pos, args.chunks, args.steps)
        if (llama := time_llama_cpp(threads, ids, args.chunks, args.steps)) is not None:
            run["llama.cpp"] = llama
        timing[threads] = run
        for k, t in run.items():
            print(f"threads {threads} {k}: decode {statistics.median(t['decode_s']) * 1e3:.1f} ms/token, "
                  f"prefill {CHUNK / statistics.median(t['chunk_s']):.0f} tok/s (load {load_average()})",
                  flush=True)
        write()


if __name__ == "__main__":
    main()
