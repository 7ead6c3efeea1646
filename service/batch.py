"""One batched forward pass whose failure stays with the row that caused it.

A pass that fails without changing the engine (StreamingInference.step commits nothing until every row's
result is computed) is run again one row at a time, so the healthy rows still get their results and only
a row that fails on its own reports an error.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from sinkstream.core.streaming import ChunkResult, StreamingInference

log = logging.getLogger("sinkstream.scheduler")


def run_rows(engine: StreamingInference, inputs: Mapping[int, list[int]], top_k: int,
             embeddings: bool) -> dict[int, ChunkResult | Exception]:
    """Run `inputs` (row -> ids) as one pass; each row's ChunkResult, or the exception its row raised
    alone. Call from the compute thread, under torch.inference_mode()."""
    if not inputs:
        return {}
    before = {row: engine.cache.tokens_seen[row] for row in inputs}
    try:
        return dict(engine.step(inputs, top_k=top_k, embeddings=embeddings))
    except Exception as exc:
        committed = any(engine.cache.tokens_seen[row] != seen for row, seen in before.items())
        if len(inputs) == 1 or committed:  # nothing to isolate, or a retry would apply input twice
            return {row: exc for row in inputs}
        log.warning("a batched forward pass of %d rows failed (%r); running them one by one",
                    len(inputs), exc)
    outcome: dict[int, ChunkResult | Exception] = {}
    for row, ids in inputs.items():
        outcome.update(run_rows(engine, {row: ids}, top_k, embeddings))
    return outcome
