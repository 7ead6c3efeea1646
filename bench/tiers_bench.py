"""Memory tiers benchmark: quality at an equal slot budget, long-range recall, and ingest overhead.

  stream   independent stories sampled from stories260K itself (temperature 1.0, fixed seed, each story
           sampled within the trained context, 8 stories at a time in one batched engine), concatenated
           BOS-separated. Stories are longer than the small windows compared, so they run across window
           boundaries.
  quality  mean next-token NLL over the whole stream, chunk C = 16, for:
             S=4 W=60 (64 slots, no tiers)           the equal-budget baseline
             S=4 W=28 (32 slots, no tiers)           what the tiers are added to
             S=4 W=28 + tiers (32 tier slots)        for each merge policy and tier shape
             S=4 W=28 + 32x4 mean without +log(n)    ablation of proportional attention
             S=4 W=124 / W=252 (no tiers)            larger windows as reference points
             S=4 W=60 + 48x4,16x4                    tiers at the 128-slot budget
  recall   mean log-probability of the tokens of words that repeat, within the same story, a word whose
           latest earlier occurrence is more than 60 + 16 = 76 tokens back (out of the 64-slot baseline's
           reach even at the end of a chunk): `names` = capitalised words never seen lower-case in the
           stream (Lily, Tom, Max, ...), `words` = every repeated word of 3+ letters.
  overhead ingest rate (C = 64) at equal slot budgets, plain window vs smaller window + tiers, variants
           interleaved round by round, ratio = median of per-round paired ratios (the machine is shared):
           stories260K S=4 W=60 vs W=28 + 24x4,8x4 on the stream, and a random-weight Llama (hidden 512,
           8 layers, vocab 32000) S=4 W=252 vs W=188 + 48x4,16x4 on random ids. Rates per CPU second of
           this process (primary: stable under other load) and per wall second.

  python bench/tiers_bench.py                       # writes bench/results/tiers.{json,md,png} (~10 min)
  python bench/tiers_bench.py --parts overhead      # rerun one part, keep the other from tiers.json
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

from core_bench import random_llama  # noqa: E402  (bench/ is on sys.path when run as a script)

from sinkstream.core.config import StreamConfig, TierSpec  # noqa: E402
from sinkstream.core.generation import Generation  # noqa: E402
from sinkstream.core.sampling import SamplingParams  # noqa: E402
from sinkstream.core.streaming import StreamingInference  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SHARED = Path(os.environ.get("SINKSTREAM_SHARED", ROOT.parent / "shared"))
STORIES = SHARED / "models" / "stories260K"
BOS = 1
QUALITY_CHUNK = 16
BASE_WINDOW = 60
RECALL_GAP = BASE_WINDOW + QUALITY_CHUNK
POLICIES = ("mean", "attention", "heavy-hitters")
TIER_SHAPES = ("24x4,8x4", "32x4")


def load_stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(STORIES, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(STORIES)


# ============================================================================ the stream
def sample_stories(model, n_tokens: int, seed: int, rows: int = 8, max_story: int = 440) -> list[int]:
    """Stories (BOS + tokens sampled to EOS or max_story) from `rows` streams decoded in one batch,
    concatenated in the order they finish until n_tokens."""
    engine = StreamingInference(model, StreamConfig(sink_tokens=4, window=444, chunk=64), max_rows=rows)
    params = SamplingParams(temperature=1.0, max_new_tokens=max_story, stop_on_eos=True)
    stream: list[int] = []
    gens: dict[int, Generation] = {}
    started = 0
    starting = []
    for _ in range(rows):
        starting.append(engine.open_row(seed=seed + started))
        started += 1
    while len(stream) < n_tokens:
        batch = {row: [BOS] for row in starting}
        chosen = {}
        for row, gen in gens.items():
            chosen[row] = gen.choose()
            batch[row] = [chosen[row][0]]
        engine.step(batch)
        for row in starting:
            gens[row] = Generation(engine, row, params)
        starting = []
        for row, (token, logprob) in chosen.items():
            gen = gens[row]
            gen.accept(token, logprob)
            if gen.finished:
                stream += [BOS] + gen.generated
                del gens[row]
                engine.reset_row(row, seed + started)
                started += 1
                starting.append(row)
    return stream[:n_tokens]


def load_stream(model, n_tokens: int, seed: int) -> list[int]:
    path = RESULTS / "tiers_stream.json"
    meta = {"seed": seed, "tokens": n_tokens, "temperature": 1.0}
    if path.exists():
        cached = json.loads(path.read_text())
        if cached["meta"] == meta:
            print(f"stream: reusing {path.relative_to(ROOT)}")
            return cached["ids"]
    t0 = time.perf_counter()
    stream = sample_stories(model, n_tokens, seed)
    print(f"stream: sampled {len(stream)} tokens in {time.perf_counter() - t0:.0f} s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "ids": stream}) + "\n")
    return stream


# ============================================================================ recall targets
def repeated_word_tokens(stream: list[int], tokenizer, gap: int) -> dict[str, list[int]]:
    """Token positions of words repeating, within one story, a word last seen more than `gap` tokens
    earlier: {"names": [...], "words": [...]} (see the module docstring)."""
    pieces = tokenizer.convert_ids_to_tokens(stream)
    words: list[tuple[int, int, str]] = []  # (start, end, text)
    start = None
    for i, piece in enumerate(pieces + ["▁"]):
        continues = start is not None and piece.isalpha()
        if continues:
            continue
        if start is not None:
            text = "".join(pieces[start:i]).lstrip("▁")
            if text.isalpha():
                words.append((start, i, text))
            start = None
        if piece.startswith("▁") and piece[1:].isalpha():
            start = i
    lower_seen = {w for _, _, w in words if w[0].islower()}
    names_tokens, words_tokens = [], []
    story_of = torch.tensor(stream).eq(BOS).cumsum(0).tolist()  # story index of every position
    last_seen: dict[str, int] = {}
    story = 0
    for s, e, w in words:
        if story_of[s] != story:
            last_seen, story = {}, story_of[s]
        previous = last_seen.get(w)
        if previous is not None and s - previous > gap and len(w) >= 3:
            words_tokens += range(s, e)
            if w[0].isupper() and w.lower() not in lower_seen:
                names_tokens += range(s, e)
        last_seen[w] = e
    return {"names": names_tokens, "words": words_tokens}


# ============================================================================ quality
# (window, tier shape, policies) compared at the 64-slot budget, then at 128 slots.
TIERED = ((28, "24x4,8x4", POLICIES), (28, "32x4", POLICIES), (28, "16x2,16x4", ("mean", "attention")),
          (44, "12x4,4x4", ("mean", "attention")), (60, "48x4,16x4", POLICIES))


def variants() -> list[tuple[str, StreamConfig]]:
    out = [(f"S=4 W={w}", StreamConfig(4, w, QUALITY_CHUNK)) for w in (BASE_WINDOW, 28)]
    for window, shape, policies in TIERED[:-1]:
        out += [(f"S=4 W={window} + {shape} {policy}",
                 StreamConfig(4, window, QUALITY_CHUNK, tiers=TierSpec.parse(shape), merge_policy=policy))
                for policy in policies]
    out.append((f"S=4 W=28 + 32x4 mean{NO_LOG_COUNT}",
                StreamConfig(4, 28, QUALITY_CHUNK, tiers=TierSpec.parse("32x4"))))
    out.append(("S=4 W=124", StreamConfig(4, 124, QUALITY_CHUNK)))
    window, shape, policies = TIERED[-1]
    out += [(f"S=4 W={window} + {shape} {policy}",
             StreamConfig(4, window, QUALITY_CHUNK, tiers=TierSpec.parse(shape), merge_policy=policy))
            for policy in policies]
    out.append(("S=4 W=252", StreamConfig(4, 252, QUALITY_CHUNK)))
    return out


NO_LOG_COUNT = " without +log(n)"


def without_proportional_attention(engine: StreamingInference) -> None:
    """Ablation: take the +log(count) back out of the tier slots' logits (merged slots count as one)."""
    cache, begin = engine.cache, engine.cache.begin_step

    def begin_step(rows, ids, lengths):
        position_ids, mask = begin(rows, ids, lengths)
        count = cache.count[rows][:, cache.sink_slots : cache.ring_start]
        bias = torch.where(count > 0, count.clamp(min=1).log(), 0.0)
        mask[..., cache.sink_slots : cache.ring_start] -= bias[:, None, None, :].to(mask.dtype)
        return position_ids, mask

    cache.begin_step = begin_step


def stream_logprobs(model, config: StreamConfig, stream: list[int],
                    proportional: bool = True) -> torch.Tensor:
    engine = StreamingInference(model, config)
    if not proportional:
        without_proportional_attention(engine)
    row = engine.open_row()
    return torch.cat([r.logprobs for r in engine.append(row, stream)])


def run_quality(model, stream: list[int], targets: dict[str, list[int]]) -> list[dict]:
    rows = []
    for name, config in variants():
        t0 = time.perf_counter()
        lp = stream_logprobs(model, config, stream, proportional=not name.endswith(NO_LOG_COUNT))
        scored = lp[1:].double()
        row = {"name": name, "slots": config.cache_slots, "tiers": ",".join(map(str, config.tiers)),
               "policy": config.merge_policy if config.tiers else "", "mean_nll": float(-scored.mean())}
        for kind, positions in targets.items():
            row[f"{kind}_logprob"] = float(lp[torch.tensor(positions)].double().mean())
        rows.append(row)
        print(f"quality: {name:<34} NLL {row['mean_nll']:.4f}  names {row['names_logprob']:.3f}  "
              f"words {row['words_logprob']:.3f}  ({time.perf_counter() - t0:.0f} s)")
    return rows


# ============================================================================ overhead
def ingest_rates(model, config: StreamConfig, ids: list[int]) -> tuple[float, float]:
    """(tokens per CPU second, tokens per wall second) appending `ids` to a stream already evicting."""
    engine = StreamingInference(model, config)
    row = engine.open_row()
    warm = config.cache_slots + 4 * config.chunk
    list(engine.append(row, ids[:warm]))
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in engine.append(row, ids[warm:]):
        pass
    n = len(ids) - warm
    return n / (time.process_time() - cpu), n / (time.perf_counter() - wall)


def run_overhead(name: str, model, ids: list[int], window: int, tiered_window: int, shape: str,
                 rounds: int) -> dict:
    """Equal slot budget, C = 64: plain window vs smaller window + tiers, for each policy."""
    chunk = 64
    configs = {f"S=4 W={window}": StreamConfig(4, window, chunk)}
    for policy in POLICIES:
        configs[f"S=4 W={tiered_window} + {shape} {policy}"] = StreamConfig(
            4, tiered_window, chunk, tiers=TierSpec.parse(shape), merge_policy=policy)
    cpu: dict[str, list[float]] = {n: [] for n in configs}
    wall: dict[str, list[float]] = {n: [] for n in configs}
    for r in range(rounds):
        for variant, config in configs.items():
            c, w = ingest_rates(model, config, ids)
            cpu[variant].append(c)
            wall[variant].append(w)
        print(f"overhead {name} round {r + 1}: " + ", ".join(f"{n}: {v[-1]:,.0f}" for n, v in cpu.items()))
    base = next(iter(configs))

    def slowdown(rates: dict[str, list[float]], variant: str) -> float:
        return statistics.median(b / v for b, v in zip(rates[base], rates[variant], strict=True)) - 1.0

    return {"model": name, "tokens": len(ids), "rows": {
        v: {"cpu_tokens_per_s": statistics.median(cpu[v]), "cpu_slowdown": slowdown(cpu, v),
            "wall_tokens_per_s": statistics.median(wall[v]), "wall_slowdown": slowdown(wall, v)}
        for v in configs}}


# ============================================================================ report
def markdown(data: dict) -> str:
    s = data["stream"]
    lines = [
        "# Memory tiers: quality at an equal slot budget, long-range recall, overhead",
        "",
        f"Stream: {s['tokens']:,} tokens, {s['stories']} stories sampled from stories260K (seed {s['seed']}, "
        f"temperature 1.0), concatenated. Quality chunk C = {QUALITY_CHUNK}. Recall targets: "
        f"{s['names']} name tokens and {s['words']} repeated-word tokens whose word was last seen more than "
        f"{RECALL_GAP} tokens earlier in the same story. Torch threads: {data['threads']}; "
        f"load average at the end: {data['load_average']}.",
        "",
        "| cache | slots (S+T+W) | mean NLL | names: mean log p | repeated words: mean log p |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in data["quality"]:
        lines.append(f"| {r['name']} | {r['slots']} | {r['mean_nll']:.4f} | {r['names_logprob']:.3f} | "
                     f"{r['words_logprob']:.3f} |")
    lines += ["", f"Ingest at C = 64, equal slot budgets, median of {data['rounds']} interleaved rounds; "
              "slowdown = median of per-round paired ratios against the plain window. CPU time (user + "
              "system of this process) is the primary measure: the machine is shared and wall time swings "
              "by 2x between rounds.", "",
              "| model | cache | tokens / CPU s | slowdown (CPU) | tokens / wall s | slowdown (wall) |",
              "|---|---|---:|---:|---:|---:|"]
    for part in data["overhead"]:
        for name, r in part["rows"].items():
            lines.append(f"| {part['model']} | {name} | {r['cpu_tokens_per_s']:,.0f} | "
                         f"{100 * r['cpu_slowdown']:+.1f}% | {r['wall_tokens_per_s']:,.0f} | "
                         f"{100 * r['wall_slowdown']:+.1f}% |")
    return "\n".join(lines) + "\n"


def plot(data: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["quality"]
    names = [r["name"] for r in rows]
    colors = ["tab:blue" if not r["tiers"] else {"mean": "tab:green", "attention": "tab:orange",
                                                  "heavy-hitters": "tab:red"}[r["policy"]] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.5), sharey=True)
    for ax, key, title in zip(axes, ("mean_nll", "names_logprob", "words_logprob"),
                              ("mean NLL (lower is better)",
                               f"names > {RECALL_GAP} tokens back: mean log p (higher is better)",
                               f"repeated words > {RECALL_GAP} back: mean log p (higher is better)"),
                              strict=True):
        values = [r[key] for r in rows]
        ax.barh(range(len(rows)), values, color=colors)
        low, high = min(values), max(values)
        pad = (high - low) * 0.15 or 0.05
        ax.set_xlim(low - pad, high + pad)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.3f}", va="center", fontsize=7)
        ax.set_title(title, fontsize=9)
    axes[0].set_yticks(range(len(rows)), names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("stories260K sampled story stream: sinks + window vs sinks + tiers + window (C = 16)")
    fig.tight_layout()
    fig.savefig(RESULTS / "tiers.png", dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=40_000, help="stream length (default 40000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=5, help="overhead rounds (default 5)")
    p.add_argument("--overhead-tokens", type=int, default=12_000)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable on a shared box)")
    p.add_argument("--parts", default="quality,overhead",
                   help="parts to run (quality, overhead, or none to re-render); others come from tiers.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    saved = RESULTS / "tiers.json"
    data = json.loads(saved.read_text()) if saved.exists() else {}
    model, tokenizer = load_stories()
    stream = load_stream(model, args.tokens, args.seed)
    if "quality" in parts:
        targets = repeated_word_tokens(stream, tokenizer, RECALL_GAP)
        print(f"recall targets: {len(targets['names'])} name tokens, {len(targets['words'])} word tokens")
        data["quality"] = run_quality(model, stream, targets)
        data["stream"] = {"tokens": len(stream), "stories": stream.count(BOS), "seed": args.seed,
                          "names": len(targets["names"]), "words": len(targets["words"])}
    if "overhead" in parts:
        big_ids = torch.randint(3, 32000, (args.overhead_tokens // 2,),
                                generator=torch.Generator().manual_seed(args.seed)).tolist()
        data["overhead"] = [
            run_overhead("stories260K", model, stream[: args.overhead_tokens], BASE_WINDOW, 28, "24x4,8x4",
                         args.rounds),
            run_overhead("random Llama 512x8", random_llama(), big_ids, 252, 188, "48x4,16x4", args.rounds),
        ]
        data["rounds"] = args.rounds
    data["threads"] = torch.get_num_threads()
    data["load_average"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    saved.write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS / "tiers.md").write_text(markdown(data))
    plot(data)
    print(markdown(data))


if __name__ == "__main__":
    main()
