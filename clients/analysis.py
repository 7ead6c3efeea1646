"""Summary of a document analysis (tokens, NLL, perplexity, speed, most surprising passages, surprisal
bins for the plot), shared by in-process and gRPC runs, in memory independent of the document's length:
running sums, a bounded passage finder and bounded bins. Per-chunk rows are returned to the caller (the CLI
streams them to its files), not kept.

Pure Python: a client install (no torch) builds the same summary from the server's per-chunk results.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sinkstream.clients.passages import Passage, PassageFinder, Tokenize, locate_needles
from sinkstream.clients.surprisal_bins import SurprisalBins


@dataclass
class ChunkRow:
    """One processed chunk: tokens [first_token, first_token + num_tokens) of the stream."""

    index: int
    first_token: int
    num_tokens: int
    mean_nll: float | None  # over the chunk's scored tokens
    max_nll: float | None
    tokens_seen: int
    running_perplexity: float | None
    cache_used: int | None = None


CSV_FIELDS = [f.name for f in ChunkRow.__dataclass_fields__.values()]


def none_if_nan(x: float) -> float | None:
    """JSON has no NaN: None instead."""
    return None if math.isnan(x) else x


@dataclass
class AnalysisSummary:
    """Accumulates per-chunk results; `add_chunk` takes the chunk's per-token log-probs (NaN = unscored).
    Keeps running sums, the `passage_count` best `passage_tokens`-token windows (PassageFinder) and the plot's
    bins (SurprisalBins): nothing that grows with the document."""

    source: str
    mode: str
    settings: dict[str, Any] = field(default_factory=dict)
    passage_count: int = 5
    passage_tokens: int = 32
    tokens: int = 0
    chunks: int = 0
    nll_sum: float = 0.0
    scored: int = 0
    passages: list[Passage] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0
    peak_rss_mib: float | None = None
    cache_bytes: int | None = None
    bins: SurprisalBins = field(default_factory=SurprisalBins, repr=False)
    finder: PassageFinder = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.finder = PassageFinder(self.passage_count, self.passage_tokens)

    def add_chunk(self, logprobs: list[float], token_ids: list[int] | None = None,
                  cache_used: int | None = None) -> ChunkRow:
        """Record one chunk. logprobs: [num_tokens]; token_ids: [num_tokens] (needed to locate passages).
        Returns the chunk's row (not kept)."""
        first = self.tokens
        nll = [-lp for lp in logprobs]
        scored = [x for x in nll if not math.isnan(x)]
        self.finder.add(nll, token_ids)
        self.bins.add(nll)
        self.nll_sum += sum(scored)
        self.scored += len(scored)
        self.chunks += 1
        self.tokens += len(nll)
        self.seconds = time.perf_counter() - self.started
        return ChunkRow(index=self.chunks - 1, first_token=first, num_tokens=len(nll),
                        mean_nll=sum(scored) / len(scored) if scored else None,
                        max_nll=max(scored) if scored else None, tokens_seen=self.tokens,
                        running_perplexity=none_if_nan(self.perplexity), cache_used=cache_used)

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.scored if self.scored else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll) if self.scored else math.nan

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.nan

    def find_passages(self, path: str | Path | None = None,
                      tokenize: Tokenize | None = None) -> list[Passage]:
        """The `passage_count` most surprising `passage_tokens`-token passages; located in the file at `path`
        when token ids were given with every chunk and a tokenizer (text -> ids, no BOS) is given."""
        self.passages, needles = self.finder.passages()
        if path is not None and tokenize is not None:
            locate_needles(self.passages, needles, self.tokens, path, tokenize)
        return self.passages

    def to_dict(self) -> dict[str, Any]:
        """The summary and passages (per-chunk and per-token results are streamed by the caller)."""
        return {
            "source": self.source, "mode": self.mode, "settings": self.settings, "tokens": self.tokens,
            "chunks": self.chunks, "scored_tokens": self.scored, "mean_nll": none_if_nan(self.mean_nll),
            "perplexity": none_if_nan(self.perplexity), "seconds": self.seconds,
            "tokens_per_second": none_if_nan(self.tokens_per_second), "peak_rss_mib": self.peak_rss_mib,
            "cache_bytes": self.cache_bytes, "passages": [p.to_dict() for p in self.passages],
        }

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
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        if self.passages:
            span = self.passages[0].token_end - self.passages[0].token_start
            lines.append(f"most surprising passages (mean NLL over {span} tokens):")
            for p in self.passages:
                lines.append(f"  {p.rank}. {p.mean_nll:6.3f}  tokens {p.token_start:,}-{p.token_end:,}  "
                             f"{p.location()}" + (f"  \"{p.excerpt}\"" if p.excerpt else ""))
        return "\n".join(lines)
