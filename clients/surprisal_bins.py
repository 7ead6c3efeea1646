"""Per-token surprisal aggregated on the fly into a bounded number of equal bins, for the analyze plot.

The stream's length is not known in advance, so the bin width starts at one token and doubles whenever
the bins are full (neighbours merge pairwise): a stream of n tokens ends with between max_bins/2 and
max_bins bins (all of them when n <= max_bins, one token each) of a power-of-two width; the last bin may
be partial. Pure Python, no torch."""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence

MAX_BINS = 4000


class SurprisalBins:
    """Sums and counts of scored NLL per bin of `width` tokens; at most `max_bins` bins (even)."""

    def __init__(self, max_bins: int = MAX_BINS) -> None:
        if max_bins < 2 or max_bins % 2:
            raise ValueError(f"max_bins must be an even number >= 2, got {max_bins}")
        self.max_bins = max_bins
        self.width = 1
        self.tokens = 0
        self.sums = array("d")  # [bins] summed NLL of the scored tokens
        self.counts = array("q")  # [bins] scored tokens (NaN = unscored is left out)

    def add(self, nll: Sequence[float]) -> None:
        """Append tokens' NLL: [n] floats, NaN = unscored."""
        for x in nll:
            index = self.tokens // self.width
            if index == self.max_bins:
                self._halve()
                index = self.tokens // self.width
            if index == len(self.sums):
                self.sums.append(0.0)
                self.counts.append(0)
            if not math.isnan(x):
                self.sums[index] += x
                self.counts[index] += 1
            self.tokens += 1

    def _halve(self) -> None:
        """Merge neighbouring bins pairwise; the width doubles."""
        self.sums = array("d", (self.sums[i] + self.sums[i + 1] for i in range(0, len(self.sums), 2)))
        self.counts = array("q", (self.counts[i] + self.counts[i + 1] for i in range(0, len(self.counts), 2)))
        self.width *= 2

    def bin_edges(self) -> list[int]:
        """Token offsets of the bins' edges: [bins + 1], the last one the stream's length."""
        return [min(i * self.width, self.tokens) for i in range(len(self.sums))] + [self.tokens]

    def means(self) -> list[float]:
        """Mean NLL of each bin's scored tokens: [bins], NaN for a bin without any."""
        return [s / c if c else math.nan for s, c in zip(self.sums, self.counts, strict=True)]
