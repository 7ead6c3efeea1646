"""Summary of a document analysis (tokens, NLL, perplexity, speed), shared by in-process and gRPC runs.

Pure Python: a client install (no torch) builds the same summary from the server's per-chunk results.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class AnalysisSummary:
    """Accumulates per-chunk results; `add_chunk` takes the chunk's per-token log-probs (NaN = unscored)."""

    source: str
    mode: str
    settings: dict[str, Any] = field(default_factory=dict)
    tokens: int = 0
    chunks: int = 0
    nll_sum: float = 0.0
    scored: int = 0
    token_nll: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0
    peak_rss_mib: float | None = None
    cache_bytes: int | None = None

    def add_chunk(self, logprobs: list[float]) -> None:
        self.chunks += 1
        self.tokens += len(logprobs)
        for lp in logprobs:
            nll = -lp
            self.token_nll.append(nll)
            if not math.isnan(nll):
                self.nll_sum += nll
                self.scored += 1
        self.seconds = time.perf_counter() - self.started

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.scored if self.scored else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll) if self.scored else math.nan

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.nan

    def to_dict(self, with_tokens: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.source, "mode": self.mode, "settings": self.settings, "tokens": self.tokens,
            "chunks": self.chunks, "scored_tokens": self.scored, "mean_nll": self.mean_nll,
            "perplexity": self.perplexity, "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second, "peak_rss_mib": self.peak_rss_mib,
            "cache_bytes": self.cache_bytes,
        }
        if with_tokens:
            out["token_nll"] = [None if math.isnan(x) else x for x in self.token_nll]
        return out

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(with_tokens=True)) + "\n")

    def format(self) -> str:
        rows = [
            ("source", self.source), ("mode", self.mode),
            ("settings", ", ".join(f"{k}={v}" for k, v in self.settings.items())),
            ("tokens", f"{self.tokens:,}"), ("mean NLL", f"{self.mean_nll:.4f}"),
            ("perplexity", f"{self.perplexity:.3f}"), ("time", f"{self.seconds:.2f} s"),
            ("tokens/s", f"{self.tokens_per_second:,.0f}"),
        ]
        if self.peak_rss_mib is not None:
            rows.append(("peak RSS", f"{self.peak_rss_mib:,.1f} MiB"))
        if self.cache_bytes is not None:
            rows.append(("cache bytes", f"{self.cache_bytes:,}"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
