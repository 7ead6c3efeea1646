"""Feeding several streams through one engine in shared passes (test helper)."""

from __future__ import annotations

import torch

from sinkstream.core.streaming import StreamingInference


def feed_batched(engine: StreamingInference, rows: list[int], streams: list[list[int]],
                 sizes: list[int]) -> list[torch.Tensor]:
    """Feed streams[i] to rows[i], sizes[i] tokens per pass, every unfinished stream in each pass (uneven
    sizes exercise the padding path); each stream's log-probs [len(stream)]."""
    got: list[list[torch.Tensor]] = [[] for _ in streams]
    offsets = [0] * len(streams)
    while any(o < len(s) for o, s in zip(offsets, streams, strict=True)):
        batch = {}
        for i, (row, s) in enumerate(zip(rows, streams, strict=True)):
            if offsets[i] < len(s):
                batch[row] = s[offsets[i] : offsets[i] + sizes[i]]
                offsets[i] += len(batch[row])
        for row, result in engine.step(batch).items():
            got[rows.index(row)].append(result.logprobs)
    return [torch.cat(g) for g in got]
