"""`sinkstream analyze` in flat memory (issue 12, finding 8): the summary, passages and plot bins come from
bounded state, and give exactly what a straightforward computation over the full per-token arrays gives."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from sinkstream.clients.analysis import AnalysisSummary
from sinkstream.clients.passages import PassageFinder
from sinkstream.clients.surprisal_bins import SurprisalBins


def reference_passages(nll: list[float], count: int, span: int) -> list[tuple[int, int, float]]:
    """Every window (every span//4 tokens, and the one ending at the last token), scored by the mean of
    its scored tokens; the best non-overlapping ones, greedily: (start, end, mean)."""
    n = len(nll)
    if n == 0 or count <= 0:
        return []
    span = min(span, n)
    stride = max(1, span // 4)
    starts = sorted(set(range(0, n - span + 1, stride)) | {n - span})
    windows = []
    for s in starts:
        scored = [x for x in nll[s:s + span] if not math.isnan(x)]
        if scored:
            windows.append((sum(scored) / len(scored), s))
    chosen: list[tuple[float, int]] = []
    for mean, s in sorted(windows, reverse=True):
        if all(abs(s - o) >= span for _, o in chosen):
            chosen.append((mean, s))
            if len(chosen) == count:
                break
    return [(s, s + span, m) for m, s in chosen]


def synthetic_nll(n: int, seed: int) -> list[float]:
    """Noisy NLL with unscored tokens, planted peaks and exact ties (the greedy choice must match there)."""
    rng = random.Random(seed)
    nll = [round(rng.uniform(0.5, 3.0), 1) for _ in range(n)]  # rounded: many equal window means
    nll[0] = math.nan
    for i in rng.sample(range(n), n // 50):
        nll[i] = math.nan
    for _ in range(6):
        at = rng.randrange(n)
        nll[at:at + rng.randrange(3, 40)] = [rng.uniform(6.0, 9.0)] * 40
    return nll[:n]


@pytest.mark.parametrize(("n", "count", "span"), [(1, 5, 32), (20, 5, 32), (1000, 5, 32), (5000, 3, 16),
                                                  (5000, 10, 7), (3001, 2, 1), (7777, 50, 5), (4096, 5, 32)])
@pytest.mark.parametrize("seed", [1, 2])
def test_streamed_passages_are_exactly_the_reference(n, count, span, seed):
    nll = synthetic_nll(n, seed)
    finder = PassageFinder(count, span)
    rng = random.Random(seed)
    at = 0
    while at < n:  # chunks of uneven sizes, as results arrive
        step = rng.randrange(1, 300)
        finder.add(nll[at:at + step])
        at += step
    passages, _ = finder.passages()
    want = reference_passages(nll, count, span)
    assert [(p.token_start, p.token_end, p.mean_nll) for p in passages] == want
    assert [p.rank for p in passages] == list(range(1, len(passages) + 1))


def test_summary_numbers_and_bins_match_the_full_arrays():
    nll = synthetic_nll(20_000, 3)
    summary = AnalysisSummary(source="x", mode="streaming", passage_count=4, passage_tokens=24)
    for start in range(0, len(nll), 64):
        part = nll[start:start + 64]
        summary.add_chunk([-x for x in part], list(range(start, start + len(part))))
    scored = [x for x in nll if not math.isnan(x)]
    assert (summary.tokens, summary.scored) == (len(nll), len(scored))
    assert summary.chunks == math.ceil(len(nll) / 64)
    assert math.isclose(summary.mean_nll, sum(scored) / len(scored), rel_tol=1e-12)
    assert math.isclose(summary.perplexity, math.exp(sum(scored) / len(scored)), rel_tol=1e-12)
    passages = summary.find_passages()
    assert [(p.token_start, p.token_end, p.mean_nll) for p in passages] == reference_passages(nll, 4, 24)
    # plot bins: equal power-of-two widths, each the mean of its tokens
    bins = summary.bins
    edges = bins.bin_edges()
    assert bins.width == 8 and len(edges) - 1 == math.ceil(len(nll) / 8) <= bins.max_bins
    for i, mean in enumerate(bins.means()):
        window = [x for x in nll[edges[i]:edges[i + 1]] if not math.isnan(x)]
        assert (math.isnan(mean) and not window) or math.isclose(mean, sum(window) / len(window),
                                                                 rel_tol=1e-12)


def test_retained_state_does_not_grow_with_the_document():
    sizes = []
    for n in (50_000, 400_000):
        summary = AnalysisSummary(source="x", mode="streaming", passage_count=5, passage_tokens=32)
        nll = [1.0 + (i * 7919 % 101) / 100 for i in range(n)]
        for start in range(0, n, 512):
            summary.add_chunk([-x for x in nll[start:start + 512]], [0] * len(nll[start:start + 512]))
        sizes.append((summary.finder.retained(), len(summary.bins.sums), len(summary.bins.counts)))
    finder = summary.finder
    assert sizes[0][0] == sizes[1][0] == 2 * 32 + finder.keep  # window values + ids + best windows
    assert all(bins <= SurprisalBins().max_bins for _, bins, _ in sizes)
    assert finder.keep == 5 * (2 * 4 + 1)  # count * (2*ceil(span/stride) + 1), whatever the length


def test_bins_stay_bounded_and_halve():
    bins = SurprisalBins(max_bins=8)
    bins.add([1.0] * 8)
    assert (bins.width, len(bins.sums)) == (1, 8)
    bins.add([3.0])
    assert (bins.width, len(bins.sums), bins.means()) == (2, 5, [1.0, 1.0, 1.0, 1.0, 3.0])
    bins.add([math.nan] * 100)
    assert len(bins.sums) <= 8 and bins.tokens == 109 and bins.bin_edges()[-1] == 109


def test_analyze_outputs_are_the_reference_over_its_per_token_file(model_dir, sotu_path, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("Caf\u00e9 notes\n" + sotu_path.read_text(encoding="utf-8")[:8000], encoding="utf-8")
    out = tmp_path / "a.json"
    tokens_out, csv_out = tmp_path / "t.jsonl", tmp_path / "c.csv"
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    proc = subprocess.run([sys.executable, "-m", "sinkstream", "analyze", str(doc), "--model", str(model_dir),
                           "--window", "60", "--chunk", "32", "--passages", "4", "--passage-tokens", "16",
                           "--quiet", "--json", str(out), "--tokens-jsonl", str(tokens_out),
                           "--csv", str(csv_out)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    lines = [json.loads(line) for line in tokens_out.read_text().splitlines()]
    nll = [math.nan if t["nll"] is None else t["nll"] for t in lines]
    assert [t["token"] for t in lines] == list(range(len(lines))) and len(lines) == data["tokens"]
    assert data["token_nll"] == [t["nll"] for t in lines]  # --json keeps its per-token array
    scored = [x for x in nll if not math.isnan(x)]
    assert data["scored_tokens"] == len(scored)
    assert math.isclose(data["mean_nll"], sum(scored) / len(scored), rel_tol=1e-12)
    got = [(p["token_start"], p["token_end"], p["mean_nll"]) for p in data["passages"]]
    assert got == reference_passages(nll, 4, 16)
    assert all(p["line"] is not None for p in data["passages"])  # located from their needles
    rows = data["chunk_results"]
    assert len(rows) == math.ceil(len(lines) / 32) == len(csv_out.read_text().splitlines()) - 1
