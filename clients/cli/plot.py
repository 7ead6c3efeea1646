"""`sinkstream analyze --plot out.png`: surprisal along the document, its rolling mean, and the most
surprising passages shaded, drawn from the summary's bounded bins (clients/surprisal_bins.py: at most 4000
bins of a power-of-two width). matplotlib (the `plot` extra) is imported only here, on demand, with the
non-interactive Agg backend so it works without a display."""

from __future__ import annotations

from pathlib import Path

from sinkstream.clients.analysis import AnalysisSummary


def plot_surprisal(summary: AnalysisSummary, out: str | Path, width_px: int = 1200, height_px: int = 450,
                   dpi: int = 100) -> None:
    """Write a PNG of `width_px` x `height_px` pixels. Needs matplotlib, which the command checks for
    before any work (output.check_output_options)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    bins = summary.bins  # at most MAX_BINS bins of a power-of-two width, aggregated as tokens arrived
    n = bins.tokens
    edges = np.asarray(bins.bin_edges() if n else [0, 0], dtype=np.float64)
    counts = np.asarray(bins.counts if n else [0], dtype=np.float64)
    binned = np.asarray(bins.means() if n else [np.nan], dtype=np.float64)
    bins_count = len(binned)
    x = (edges[:-1] + edges[1:]) / 2
    roll_bins = max(1, bins_count // 50)
    kernel = np.ones(roll_bins) / roll_bins
    # Normalised convolution: bins without scored tokens and the series' ends do not drag the mean down.
    valid = (counts > 0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        rolling = (np.convolve(np.where(valid > 0, binned, 0.0), kernel, mode="same")
                   / np.convolve(valid, kernel, mode="same"))

    fig, ax = plt.subplots(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    label = "surprisal per token" if bins.width == 1 else f"surprisal (mean of {bins.width} tokens)"
    ax.plot(x, binned, lw=0.5, alpha=0.45, color="tab:blue", label=label)
    ax.plot(x, rolling, lw=1.8, color="tab:orange",
            label=f"rolling mean ({roll_bins * bins.width:,} tokens)")
    min_width = n / 250  # keep short passages visible on long documents
    for p in summary.passages:
        middle, half = (p.token_start + p.token_end) / 2, max(p.token_end - p.token_start, min_width) / 2
        ax.axvspan(middle - half, middle + half, color="tab:red", alpha=0.25,
                   label="most surprising passages" if p.rank == 1 else None)
        ax.annotate(str(p.rank), (p.token_start, 1.0), xycoords=("data", "axes fraction"),
                    ha="left", va="top", fontsize=8, color="tab:red")
    ax.set_xlabel("token offset")
    ax.set_ylabel("surprisal (nats/token)")
    ax.set_title(f"{Path(summary.source).name}: {n:,} tokens, perplexity {summary.perplexity:.2f}")
    ax.set_xlim(0, max(n, 1))
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
