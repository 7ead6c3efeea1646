"""The plain full-cache baseline: a growing Hugging Face DynamicCache, positions counting up forever.

Used by `sinkstream analyze --dense` and the benchmarks to show what the bounded cache avoids: memory that
grows with the stream and quality that collapses past the trained context.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from transformers import DynamicCache

from sinkstream.core.streaming import ChunkResult


class DenseInference:
    """One stream through an unbounded dense cache, `chunk` tokens per forward pass."""

    def __init__(self, model: nn.Module, chunk: int = 64) -> None:
        self.model, self.chunk = model, chunk
        self.cache = DynamicCache(config=model.config)
        self.tokens_seen = 0
        self._next: torch.Tensor | None = None
        self._nll_sum, self._scored = 0.0, 0

    @torch.inference_mode()
    def append(self, token_ids: Sequence[int], *, embeddings: bool = False) -> Iterator[ChunkResult]:
        """Score token_ids [n] chunk by chunk, as StreamingInference.append does."""
        for start in range(0, len(token_ids), self.chunk):
            ids = torch.as_tensor(token_ids[start : start + self.chunk], dtype=torch.long)
            out = self.model(input_ids=ids[None], past_key_values=self.cache, use_cache=True,
                             output_hidden_states=embeddings)
            logprobs = torch.log_softmax(out.logits[0].float(), -1)
            first = self._next if self._next is not None else torch.full_like(logprobs[0], math.nan)
            token_lp = torch.cat((first[None], logprobs[:-1])).gather(1, ids[:, None])[:, 0]
            scored = token_lp[~token_lp.isnan()]
            self._nll_sum -= float(scored.double().sum())
            self._scored += scored.numel()
            self._next = logprobs[-1]
            self.tokens_seen += len(ids)
            mean = self._nll_sum / max(self._scored, 1)
            yield ChunkResult(row=0, token_ids=ids.tolist(), logprobs=token_lp, topk_ids=None,
                              topk_logprobs=None,
                              embedding=out.hidden_states[-1][0].mean(0) if embeddings else None,
                              tokens_seen=self.tokens_seen, mean_nll=mean, perplexity=math.exp(mean))

    @property
    def cache_bytes(self) -> int:
        """Bytes the growing cache holds now."""
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers
                   if getattr(layer, "keys", None) is not None)
