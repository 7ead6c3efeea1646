"""Core benchmark: quality, speed and memory of StreamingInference (attention sinks + sliding window).

  quality  mean next-token NLL per 512-token segment over a stream sampled from stories260K (trained
           context 512; independent stories, seed fixed, temperature 1.0, concatenated): dense full cache
           (DenseInference) vs window only (S = 0) vs sinks + window (S = 4), at W = 64 and W = 256.
  speed    tokens/s, all variants in one run, interleaved round by round in short blocks (the machine is
           shared): ratios of the fastest blocks, and the median of per-round paired ratios:
             ours C = 64/128/256   chunked ingest through StreamingInference
             ours C = 1            token-by-token ingest (StreamingLLM's reference style)
             recompute             sliding window with re-computation: a fresh forward over the last S + W
                                   tokens for every new token, scoring only the last one
             HF C                  raw Hugging Face forward of the same chunk over a DynamicCache holding
                                   S + W tokens, cropped back to S + W after each pass (same cache size,
                                   same logits + log_softmax over every chunk token as ours): the ceiling
           for stories260K (S = 4, W = 252) and a random-weight Llama (hidden 512, 8 layers, vocab 32000,
           max_position_embeddings 2048; S = 4, W = 1020).
  memory   current RSS and cache bytes while streaming sotu.txt (tokenized once, repeated) through
           stories260K to 1M tokens, and the dense cache on the same stream until a fixed budget; each in
           its own subprocess so RSS belongs to one configuration.
  profile  (not in the default run) per-step times of ours vs HF at C = 1/64/256 on the larger model and
           a cProfile of our step, single-threaded: bench/results/core_profile.md.

Each part writes bench/results/core_<part>.json; bench/results/core.md is rendered from all of them.

  python bench/core_bench.py                           # everything (about 15 min on 2 idle cores)
  python bench/core_bench.py --parts speed             # one part (quality, speed, memory), others kept
  python bench/core_bench.py --parts profile           # where our step's time goes (core_profile.md)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sinkstream.core.config import StreamConfig  # noqa: E402
from sinkstream.core.dense import DenseInference  # noqa: E402
from sinkstream.core.generation import generate  # noqa: E402
from sinkstream.core.sampling import SamplingParams  # noqa: E402
from sinkstream.core.streaming import StreamingInference  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SHARED = Path(os.environ.get("SINKSTREAM_SHARED", ROOT.parent / "shared"))
STORIES = SHARED / "models" / "stories260K"
SOTU = SHARED / "data" / "sotu.txt"
SEGMENT = 512
BOS, EOS = 1, 2


def load_stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(STORIES, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(STORIES)


def random_llama():
    """Random-weight Llama big enough that Python overhead does not dominate (hidden 512, 8 layers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()


def param_counts(model) -> tuple[int, int]:
    """(all parameters, parameters outside the embedding / tied LM head)."""
    total = sum(p.numel() for p in model.parameters())
    return total, total - model.get_input_embeddings().weight.numel()


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) so later peaks exclude set-up; False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """VmHWM: peak RSS since the process started or since reset_peak_rss."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return max_rss_bytes()


def invocation() -> str:
    return "python bench/core_bench.py " + " ".join(sys.argv[1:])


def write_json(part: str, data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = data | {"command": invocation(), "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    (RESULTS / f"core_{part}.json").write_text(json.dumps(data, indent=1) + "\n")


def read_json(part: str) -> dict | None:
    path = RESULTS / f"core_{part}.json"
    return json.loads(path.read_text()) if path.exists() else None


# ============================================================================ quality
def sample_stream(model, n_tokens: int, seed: int) -> list[int]:
    """Independent stories (BOS + sampled tokens up to EOS) concatenated until n_tokens.

    Each story fits the trained context, so no eviction happens while sampling and the streaming engine
    equals a dense forward; the stream therefore favours none of the compared caches.
    """
    max_story = 440
    engine = StreamingInference(model, StreamConfig(sink_tokens=4, window=444, chunk=64))
    params = SamplingParams(temperature=1.0, max_new_tokens=max_story, stop_on_eos=True)
    stream: list[int] = []
    story = 0
    while len(stream) < n_tokens:
        row = engine.open_row(seed=seed + story)
        engine.step({row: [BOS]})
        stream += [BOS] + [t.token_id for t in generate(engine, row, params)]
        engine.close_row(row)
        story += 1
    return stream[:n_tokens]


def token_logprobs(results) -> torch.Tensor:
    """Concatenated per-token log-probabilities [n] of an append() iterator."""
    return torch.cat([r.logprobs for r in results])


def segment_nll(logprobs: torch.Tensor) -> list[float]:
    """Mean next-token NLL per SEGMENT tokens (the stream's first token has no prediction)."""
    out = []
    for start in range(0, logprobs.numel(), SEGMENT):
        seg = logprobs[start : start + SEGMENT]
        out.append(float(-seg[~seg.isnan()].double().mean()))
    return out


def run_quality(args) -> None:
    model, _ = load_stories()
    stream_path = RESULTS / "core_stream.json"
    n_tokens = args.quality_tokens
    meta = {"seed": args.seed, "tokens": n_tokens, "temperature": 1.0}
    cached = json.loads(stream_path.read_text()) if stream_path.exists() else None
    if cached is not None and cached["meta"] == meta:
        stream = cached["ids"]
        print(f"quality: using the sampled stream in {stream_path.relative_to(ROOT)}")
    else:
        t0 = time.perf_counter()
        stream = sample_stream(model, n_tokens, args.seed)
        print(f"quality: sampled {len(stream)} tokens in {time.perf_counter() - t0:.0f} s")
        RESULTS.mkdir(parents=True, exist_ok=True)
        stream_path.write_text(json.dumps({"meta": meta, "ids": stream}) + "\n")
    stories = stream.count(BOS)

    c = args.quality_chunk
    curves: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    curves["dense (full cache)"] = segment_nll(token_logprobs(DenseInference(model, chunk=c).append(stream)))
    for window in (64, 256):
        for sinks in (0, 4):
            engine = StreamingInference(model, StreamConfig(sink_tokens=sinks, window=window, chunk=c))
            row = engine.open_row()
            name = f"S={sinks}, W={window}" + (" (window only)" if sinks == 0 else " (sinks + window)")
            curves[name] = segment_nll(token_logprobs(engine.append(row, stream)))
    print(f"quality: evaluated in {time.perf_counter() - t0:.0f} s")
    write_json("quality", {"stream": meta | {"stories": stories, "chunk": c}, "curves": curves,
                           "load_average": load_average()})


def quality_markdown(data: dict) -> list[str]:
    curves, s = data["curves"], data["stream"]
    n_seg = len(next(iter(curves.values())))
    lines = [
        "## Quality: mean NLL per 512-token segment (stories260K, trained context 512)",
        "",
        f"Stream: {s['tokens']} tokens, {s['stories']} stories sampled from stories260K itself (seed "
        f"{s['seed']}, temperature {s['temperature']}, each story within the trained context), "
        f"concatenated. Everything is fed {s['chunk']} tokens per forward pass, so a token sees the sinks, "
        f"the W most recent tokens before its chunk and its own chunk's earlier tokens.",
        "",
        "| method | " + " | ".join(f"seg {i}" for i in range(n_seg)) + " | mean |",
        "|---|" + "---:|" * (n_seg + 1),
    ]
    for name, nll in curves.items():
        cells = " | ".join(f"{x:.3f}" for x in nll)
        lines.append(f"| {name} | {cells} | {statistics.mean(nll):.3f} |")
    return lines + ["", "![NLL per segment](core_quality.png)", ""]


def quality_plot(data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, nll in data["curves"].items():
        x = [SEGMENT * (i + 0.5) for i in range(len(nll))]
        ax.plot(x, nll, marker="o", label=name, linestyle="--" if "S=0" in name else "-")
    ax.axvline(SEGMENT, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("stream position (tokens, segment centre)")
    ax.set_ylabel("mean next-token NLL (nats)")
    ax.set_title("stories260K, sampled story stream: NLL per 512-token segment")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "core_quality.png", dpi=110)
    plt.close(fig)


# ============================================================================ speed
class Timed:
    """One benchmarked variant: `step()` processes some tokens and returns how many."""

    def __init__(self, name: str, step: Callable[[], int]) -> None:
        self.name, self.step = name, step
        self.rates: list[float] = []

    def block(self, min_seconds: float) -> float:
        """Run steps for at least min_seconds; return tokens/s."""
        tokens, t0 = 0, time.perf_counter()
        while True:
            tokens += self.step()
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds:
                return tokens / elapsed


def stream_ids(vocab: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def ours(model, sinks: int, window: int, chunk: int, ids: torch.Tensor) -> Timed:
    """StreamingInference fed `chunk` tokens per step, starting from a full cache that already evicts."""
    engine = StreamingInference(model, StreamConfig(sink_tokens=sinks, window=window, chunk=chunk))
    row = engine.open_row()
    warm = sinks + window + 2 * max(chunk, 16)
    for start in range(0, warm, chunk):
        engine.step({row: ids[start : start + chunk].tolist()})
    pos = [warm]

    def step() -> int:
        start = pos[0] % (ids.numel() - chunk)
        engine.step({row: ids[start : start + chunk].tolist()})
        pos[0] += chunk
        return chunk

    return Timed(f"ours C={chunk}", step)


def hf_ceiling(model, cache_len: int, chunk: int, ids: torch.Tensor) -> Timed:
    """Raw HF forward of a `chunk` over a DynamicCache of cache_len tokens, cropped back after each pass."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids[None, :cache_len], past_key_values=cache, use_cache=True)
    pos = [cache_len]

    @torch.inference_mode()
    def step() -> int:
        start = pos[0] % (ids.numel() - chunk)
        out = model(input_ids=ids[None, start : start + chunk], past_key_values=cache, use_cache=True)
        torch.log_softmax(out.logits.float(), dim=-1)
        cache.crop(-chunk)
        pos[0] += chunk
        return chunk

    return Timed(f"HF C={chunk}", step)


def recompute(model, span: int, ids: torch.Tensor) -> Timed:
    """Sliding window with re-computation: each new token costs a fresh forward over the last `span`."""
    pos = [span]

    @torch.inference_mode()
    def step() -> int:
        end = span + pos[0] % (ids.numel() - span)
        out = model(input_ids=ids[None, end - span : end], use_cache=False, logits_to_keep=1)
        torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        pos[0] += 1
        return 1

    return Timed("recompute", step)


def speed_model(name: str, model, sinks: int, window: int, rounds: int, min_seconds: float) -> dict:
    vocab = model.config.vocab_size
    ids = stream_ids(vocab, 8192)
    chunks = (1, 64, 128, 256)
    variants = [ours(model, sinks, window, c, ids) for c in chunks]
    variants += [hf_ceiling(model, sinks + window, c, ids) for c in chunks]
    variants.append(recompute(model, sinks + window, ids))
    for v in variants:  # warm-up: first calls allocate and pick kernels
        v.block(0.0)
        v.block(0.0)
    for r in range(rounds):
        for v in variants:
            v.rates.append(v.block(min_seconds))
        print(f"speed {name}: round {r + 1}/{rounds} done (load {load_average()})")
    rates = {v.name: v.rates for v in variants}
    total, non_embedding = param_counts(model)

    def ratios(a: str, b: str) -> dict[str, float]:
        # best: fastest block of each (the least disturbed by other work on the machine);
        # paired: median over rounds of the two variants' rates in the same round.
        return {"best": max(rates[a]) / max(rates[b]),
                "paired": statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True))}

    table = {}
    for c in chunks:
        table[f"ours C={c} / HF C={c}"] = ratios(f"ours C={c}", f"HF C={c}")
        table[f"ours C={c} / ours C=1"] = ratios(f"ours C={c}", "ours C=1")
        table[f"ours C={c} / recompute"] = ratios(f"ours C={c}", "recompute")
    return {"name": name, "params": total, "non_embedding_params": non_embedding, "sinks": sinks,
            "window": window, "rounds": rounds, "min_seconds": min_seconds, "rates": rates, "ratios": table}


def run_speed(args) -> None:
    torch.set_num_threads(2)
    stories, _ = load_stories()
    rounds = args.rounds
    out = {"threads": torch.get_num_threads(), "load_average_start": load_average(), "models": []}
    out["models"].append(speed_model("stories260K", stories, 4, 252, rounds, args.min_seconds))
    out["models"].append(speed_model("random Llama", random_llama(), 4, 1020, rounds, args.min_seconds))
    out["load_average_end"] = load_average()
    write_json("speed", out)


def profile_step(args) -> None:
    """Where our step's time goes vs the HF forward: per-step times and a cProfile of our step.

    Runs with --profile-threads (default 1): on a shared machine two OpenMP threads make every small
    kernel wait for a descheduled partner, which hides the real per-operation costs.
    """
    import cProfile
    import io
    import pstats

    torch.set_num_threads(args.profile_threads)
    lines = [f"# Profile of StreamingInference.step ({torch.get_num_threads()} thread(s), load average "
             f"{load_average()})", "", f"Command: `{invocation().strip()}`", "",
             "Fastest of the paired per-step times (ours, then HF, alternating), then a cProfile of our "
             "steps sorted by cumulative time.", ""]
    cases = (("random Llama", random_llama(), 1020, (1, 64, 256)),
             ("stories260K", load_stories()[0], 252, (1,)))
    for name, model, window, chunks in cases:
        ids = stream_ids(model.config.vocab_size, 8192)
        for c in chunks:
            mine, theirs = ours(model, 4, window, c, ids), hf_ceiling(model, 4 + window, c, ids)
            for v in (mine, theirs):
                v.block(0.0)
            times: dict[str, list[float]] = {mine.name: [], theirs.name: []}
            for _ in range(max(4, 2048 // c // 8)):
                for v in (mine, theirs):
                    t0 = time.perf_counter()
                    v.step()
                    times[v.name].append(time.perf_counter() - t0)
            a, b = min(times[mine.name]), min(times[theirs.name])
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(max(4, 1024 // c // 8)):
                mine.step()
            prof.disable()
            text = io.StringIO()
            stats = pstats.Stats(prof, stream=text).sort_stats("cumulative")
            stats.print_stats(r"core/|modeling_llama.py.*\(forward\)|sdpa_attention|linear|log_softmax", 24)
            body = text.getvalue().strip().split("\n", 3)[-1]
            lines += [f"## {name}, S=4, W={window}, C={c}: fastest step ours {a * 1e3:.2f} ms, HF "
                      f"{b * 1e3:.2f} ms (ours / HF speed {b / a:.2f})", "", "```", body, "```", ""]
    (RESULTS / "core_profile.md").write_text("\n".join(lines))
    print(f"profile written to {(RESULTS / 'core_profile.md').relative_to(ROOT)}")


def ratio_cell(ratio: dict[str, float]) -> str:
    return f"{ratio['best']:.2f} ({ratio['paired']:.2f})"


def speed_markdown(data: dict) -> list[str]:
    lines = [
        "## Speed (tokens/s)",
        "",
        f"torch threads: {data['threads']}; load average (1/5/15 min) at start {data['load_average_start']}, "
        f"at end {data['load_average_end']}. The machine is shared with other engineers' jobs, so single "
        "blocks can be many times slower than on an idle machine. All variants run interleaved, round by "
        "round, each for a short timed block; *best* is the fastest block of a variant (least disturbed), "
        "*median* its median block; ratio columns give best/best, and in brackets the median over rounds of "
        "the per-round paired ratio.",
        "",
    ]
    for m in data["models"]:
        best = {k: max(v) for k, v in m["rates"].items()}
        med = {k: statistics.median(v) for k, v in m["rates"].items()}
        cache = m["sinks"] + m["window"]
        lines += [
            f"### {m['name']} ({m['params'] / 1e6:.2f} M params, {m['non_embedding_params'] / 1e6:.2f} M "
            f"without embeddings; S={m['sinks']}, W={m['window']}; {m['rounds']} rounds of "
            f">= {m['min_seconds']} s blocks)",
            "",
            "| C | ours best | ours median | HF best | HF median | ours / HF (target >= 0.8) "
            "| ours C / ours C=1 (target >= 20) | ours / recompute |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in (1, 64, 128, 256):
            r = m["ratios"]
            lines.append(
                f"| {c} | {best[f'ours C={c}']:.1f} | {med[f'ours C={c}']:.1f} | {best[f'HF C={c}']:.1f} | "
                f"{med[f'HF C={c}']:.1f} | {ratio_cell(r[f'ours C={c} / HF C={c}'])} | "
                f"{ratio_cell(r[f'ours C={c} / ours C=1'])} | {ratio_cell(r[f'ours C={c} / recompute'])} |"
            )
        lines += ["", f"HF = raw transformers forward (logits + log_softmax of every chunk token) over a "
                  f"DynamicCache of S+W = {cache} tokens, cropped back after each pass. Recompute = sliding "
                  f"window with re-computation, a fresh forward over the last {cache} tokens per token: best "
                  f"{best['recompute']:.2f}, median {med['recompute']:.2f} tok/s.", ""]
    return lines


# ============================================================================ memory
def memory_worker(kind: str, max_tokens: int, budget_s: float, chunk: int) -> None:
    """Stream sotu.txt (repeated) and print one JSON line of RSS samples; runs in its own process."""
    torch.set_num_threads(2)
    model, tokenizer = load_stories()
    text_ids = torch.tensor(tokenizer(SOTU.read_text())["input_ids"], dtype=torch.long)
    ids = text_ids.repeat(math.ceil(max_tokens / text_ids.numel()))[:max_tokens]
    del tokenizer
    if kind == "streaming":
        engine = StreamingInference(model, StreamConfig(sink_tokens=4, window=252, chunk=chunk))
        row = engine.open_row()

        def feed(part: torch.Tensor) -> float:
            return [r.mean_nll for r in engine.append(row, part)][-1]

        def cache_bytes() -> int:
            return engine.cache_bytes
    else:
        dense = DenseInference(model, chunk=chunk)

        def feed(part: torch.Tensor) -> float:
            return [r.mean_nll for r in dense.append(part)][-1]

        def cache_bytes() -> int:
            return dense.cache_bytes

    # Tokenizing the whole text at once is the set-up's peak; measure the streaming's own peak after it.
    setup_peak = max_rss_bytes()
    peak_reset = reset_peak_rss()
    checkpoints = {10_000, 100_000, 1_000_000, max_tokens}
    every = 2_048 if kind == "dense" else 10_240
    samples = [{"tokens": 0, "rss": rss_bytes(), "cache_bytes": cache_bytes(), "seconds": 0.0}]
    done, stop, t0, nll = 0, "max_tokens", time.perf_counter(), math.nan
    while done < max_tokens:
        nxt = min([x for x in checkpoints if x > done] + [done + every])
        with torch.inference_mode():
            nll = feed(ids[done:nxt])
        done = nxt
        samples.append({"tokens": done, "rss": rss_bytes(), "cache_bytes": cache_bytes(),
                        "seconds": time.perf_counter() - t0})
        if len(samples) % 10 == 0:
            print(f"memory {kind}: {done} tokens, {samples[-1]['seconds']:.0f} s", file=sys.stderr)
        if samples[-1]["seconds"] >= budget_s:
            stop = f"time budget {budget_s:.0f} s"
            break
    print(json.dumps({"kind": kind, "chunk": chunk, "text_tokens": text_ids.numel(), "samples": samples,
                      "max_rss": max(setup_peak, max_rss_bytes()),
                      "stream_peak_rss": peak_rss_bytes() if peak_reset else None,
                      "stop": stop, "mean_nll": nll}))


def run_memory(args) -> None:
    runs = {}
    for kind, tokens, budget in (("streaming", args.memory_tokens, math.inf),
                                 ("dense", args.dense_tokens, args.dense_seconds)):
        cmd = [sys.executable, __file__, "--memory-worker", kind, "--memory-tokens", str(tokens),
               "--dense-seconds", str(budget), "--memory-chunk", str(args.memory_chunk)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        runs[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"memory {kind}: {runs[kind]['samples'][-1]['tokens']} tokens in "
              f"{time.perf_counter() - t0:.0f} s (stop: {runs[kind]['stop']})")
    write_json("memory", {"runs": runs, "dense_limit": {"tokens": args.dense_tokens,
                                                          "seconds": args.dense_seconds},
                          "load_average": load_average()})


def at_tokens(samples: list[dict], tokens: int) -> dict | None:
    return next((s for s in samples if s["tokens"] == tokens), None)


def memory_markdown(data: dict) -> list[str]:
    mib = 1 << 20
    stream, dense = data["runs"]["streaming"], data["runs"]["dense"]
    lim = data["dense_limit"]
    lines = [
        "## Memory (stories260K, sotu.txt tokenized once and repeated; each run in its own process)",
        "",
        f"sotu.txt is {stream['text_tokens']} tokens. Ours: S=4, W=252, C={stream['chunk']}. Dense: "
        f"DenseInference (growing DynamicCache), C={dense['chunk']}, stopped at {lim['tokens']} tokens or "
        f"{lim['seconds']:.0f} s, whichever first (it stopped on: {dense['stop']}). RSS is current RSS "
        "(/proc/self/statm) at the checkpoint; peak while streaming is VmHWM after resetting it once the "
        "stream is tokenized; peak incl. set-up is ru_maxrss before that reset (tokenizing all of sotu.txt "
        "at once).",
        "",
        "| run | tokens | RSS MiB | cache bytes | seconds |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, run in (("ours (sinks + window)", stream), ("dense", dense)):
        marks = sorted({0, 10_000, 100_000, 1_000_000, run["samples"][-1]["tokens"]})
        for t in marks:
            s = at_tokens(run["samples"], t)
            if s is not None:
                lines.append(f"| {name} | {t} | {s['rss'] / mib:.1f} | {s['cache_bytes']} | "
                             f"{s['seconds']:.1f} |")
        if run.get("stream_peak_rss"):
            peak = run["stream_peak_rss"] / mib
            lines.append(f"| {name} | peak while streaming (VmHWM) | {peak:.1f} | | |")
        lines.append(f"| {name} | peak incl. set-up (ru_maxrss) | {run['max_rss'] / mib:.1f} | | |")
    a, b = at_tokens(stream["samples"], 100_000), at_tokens(stream["samples"], 1_000_000)
    if a and b:
        growth = (b["rss"] - a["rss"]) / a["rss"] * 100
        verdict = "met" if growth < 5 else "MISSED"
        lines += ["", f"Ours, RSS growth from 100k to 1M tokens: {growth:+.2f} % (target < 5 %: {verdict}); "
                  f"mean NLL over the stream {stream['mean_nll']:.3f} (finite: sotu.txt is out of "
                  "distribution for this model)."]
    d0, d1 = dense["samples"][0], dense["samples"][-1]
    lines += [f"Dense: RSS {d0['rss'] / mib:.1f} -> {d1['rss'] / mib:.1f} MiB and cache "
              f"{d0['cache_bytes']} -> {d1['cache_bytes']} bytes over {d1['tokens']} tokens "
              f"({(d1['rss'] - d0['rss']) / max(d1['tokens'], 1):.0f} RSS bytes per token).",
              "", "![RSS vs tokens](core_memory.png)", ""]
    return lines


def memory_plot(data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, run in (("ours: sinks + window (S=4, W=252)", data["runs"]["streaming"]),
                      ("dense full cache (stopped at budget)", data["runs"]["dense"])):
        pts = [s for s in run["samples"] if s["tokens"] > 0]
        ax.plot([s["tokens"] for s in pts], [s["rss"] / (1 << 20) for s in pts], marker=".", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("tokens streamed")
    ax.set_ylabel("current RSS (MiB)")
    ax.set_title("stories260K on sotu.txt: process RSS vs stream length")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "core_memory.png", dpi=110)
    plt.close(fig)


# ============================================================================ report
def write_report() -> None:
    lines = ["# Core benchmark: StreamingInference (attention sinks + window)", "",
             f"torch {torch.__version__}, {os.cpu_count()} CPUs. Each section names the command that "
             "produced it (`python bench/core_bench.py` runs all three).", ""]
    for part, render, plot in (("quality", quality_markdown, quality_plot),
                               ("speed", speed_markdown, None),
                               ("memory", memory_markdown, memory_plot)):
        data = read_json(part)
        if data is None:
            continue
        section = render(data)
        command = data.get("command", "?").strip()
        section[1:1] = ["", f"Command: `{command}`, finished {data.get('finished', '?')}."]
        lines += section
        if plot is not None:
            plot(data)
    if (RESULTS / "core_profile.md").exists():
        lines += ["Per-step profile of our engine vs the HF forward: [core_profile.md](core_profile.md).", ""]
    text = "\n".join(lines)
    (RESULTS / "core.md").write_text(text + "\n")
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="quality,speed,memory",
                   help="comma-separated subset of quality, speed, memory, profile")
    p.add_argument("--seed", type=int, default=1234, help="sampling seed of the quality stream")
    p.add_argument("--quality-tokens", type=int, default=9 * SEGMENT)
    p.add_argument("--quality-chunk", type=int, default=16, help="tokens per forward pass (quality runs)")
    p.add_argument("--rounds", type=int, default=12, help="interleaved timing rounds per model")
    p.add_argument("--min-seconds", type=float, default=0.3, help="minimum seconds per timed block")
    p.add_argument("--profile-threads", type=int, default=1)
    p.add_argument("--memory-tokens", type=int, default=1_000_000)
    p.add_argument("--memory-chunk", type=int, default=256)
    p.add_argument("--dense-tokens", type=int, default=100_000, help="dense baseline stops here ...")
    p.add_argument("--dense-seconds", type=float, default=60.0, help="... or after this many seconds")
    p.add_argument("--memory-worker", choices=("streaming", "dense"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_worker:
        memory_worker(args.memory_worker, args.memory_tokens, args.dense_seconds, args.memory_chunk)
        return
    torch.set_num_threads(2)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    runners = {"quality": run_quality, "speed": run_speed, "memory": run_memory, "profile": profile_step}
    for part in parts:
        if part not in runners:
            p.error(f"unknown part {part!r}; choose from {', '.join(runners)}")
    for part in parts:
        t0 = time.perf_counter()
        runners[part](args)
        print(f"== {part} finished in {time.perf_counter() - t0:.0f} s")
    write_report()


if __name__ == "__main__":
    main()
