"""Summary of a document analysis (tokens, NLL, perplexity, speed, most surprising passages, per-chunk rows),
shared by in-process and gRPC runs.

Pure Python: a client install (no torch) builds the same summary from the server's per-chunk results.
"""

from __future__ import annotations

import csv
import json
import math
import time
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sinkstream.clients.passages import Passage, Tokenize, find_passages, locate


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


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else x


@dataclass
class AnalysisSummary:
    """Accumulates per-chunk results; `add_chunk` takes the chunk's per-token log-probs (NaN = unscored).
    Per-token NLL (and ids, when given) are kept in compact arrays (8 + 4 bytes per token)."""

    source: str
    mode: str
    settings: dict[str, Any] = field(default_factory=dict)
    tokens: int = 0
    chunks: int = 0
    nll_sum: float = 0.0
    scored: int = 0
    token_nll: array = field(default_factory=lambda: array("d"))
    token_ids: array = field(default_factory=lambda: array("I"))
    rows: list[ChunkRow] = field(default_factory=list)
    passages: list[Passage] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0
    peak_rss_mib: float | None = None
    cache_bytes: int | None = None

    def add_chunk(self, logprobs: list[float], token_ids: list[int] | None = None,
                  cache_used: int | None = None) -> ChunkRow:
        """Record one chunk. logprobs: [num_tokens]; token_ids: [num_tokens] (needed to locate passages)."""
        first = self.tokens
        nll = [-lp for lp in logprobs]
        scored = [x for x in nll if not math.isnan(x)]
        self.token_nll.extend(nll)
        if token_ids is not None:
            self.token_ids.extend(token_ids)
        self.nll_sum += sum(scored)
        self.scored += len(scored)
        self.chunks += 1
        self.tokens += len(nll)
        self.seconds = time.perf_counter() - self.started
        row = ChunkRow(index=self.chunks - 1, first_token=first, num_tokens=len(nll),
                       mean_nll=sum(scored) / len(scored) if scored else None,
                       max_nll=max(scored) if scored else None, tokens_seen=self.tokens,
                       running_perplexity=_none_if_nan(self.perplexity), cache_used=cache_used)
        self.rows.append(row)
        return row

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.scored if self.scored else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll) if self.scored else math.nan

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.nan

    def find_passages(self, path: str | Path | None = None, tokenize: Tokenize | None = None,
                      count: int = 5, span: int = 32) -> list[Passage]:
        """The `count` most surprising `span`-token passages; located in the file at `path` when the
        token ids were recorded and a tokenizer (text -> ids, no BOS) is given."""
        self.passages = find_passages(self.token_nll, count, span)
        if path is not None and tokenize is not None and len(self.token_ids) == self.tokens:
            locate(self.passages, path, self.token_ids, tokenize)
        return self.passages

    def to_dict(self, with_tokens: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": self.source, "mode": self.mode, "settings": self.settings, "tokens": self.tokens,
            "chunks": self.chunks, "scored_tokens": self.scored, "mean_nll": _none_if_nan(self.mean_nll),
            "perplexity": _none_if_nan(self.perplexity), "seconds": self.seconds,
            "tokens_per_second": _none_if_nan(self.tokens_per_second), "peak_rss_mib": self.peak_rss_mib,
            "cache_bytes": self.cache_bytes, "passages": [p.to_dict() for p in self.passages],
        }
        if with_tokens:
            out["chunk_results"] = [asdict(r) for r in self.rows]
            out["token_nll"] = [_none_if_nan(x) for x in self.token_nll]
        return out

    def write_json(self, path: str | Path) -> None:
        """Summary, passages, one object per chunk (`chunk_results`) and per-token NLL (`token_nll`)."""
        Path(path).write_text(json.dumps(self.to_dict(with_tokens=True)) + "\n")

    def write_csv(self, path: str | Path) -> None:
        """One row per chunk (columns CSV_FIELDS; empty cells for unknown values)."""
        with Path(path).open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: "" if v is None else v for k, v in asdict(row).items()})

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
