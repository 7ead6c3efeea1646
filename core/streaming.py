"""StreamingInference: push unbounded token streams through a causal LM in fixed memory.

One request's path: `append(row, ids)` cuts ids into chunks -> `step({row: chunk})` -> SinkCache.begin_step
gives positions and the mask -> the model's own decoder layers run, calling SinkCache.update per layer ->
the LM head scores every chunk token -> SinkCache.end_step commits the chunk and evicts -> ChunkResult.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sinkstream.core.config import StreamConfig
from sinkstream.core.fused_decoder import FusedDecoder
from sinkstream.core.model_support import check_supported, position_limit
from sinkstream.core.rope import RopeTable
from sinkstream.core.sink_cache import CacheRowState, SinkCache
from sinkstream.core.snapshot import restore_row, snapshot_row
from sinkstream.core.tiers import TierMemory


class NoFreeRowError(RuntimeError):
    """Every row of the engine's cache is taken by an open stream."""


@dataclass
class ChunkResult:
    """What one processed chunk of a stream yields.

    logprobs[i] is log p(token_ids[i] | all earlier tokens of the stream), NaN for the stream's first token
    (nothing predicts it). topk_* describe the predictive distribution at each token's position.
    """

    row: int
    token_ids: list[int]
    logprobs: torch.Tensor  # [n] float32
    topk_ids: torch.Tensor | None  # [n, k]
    topk_logprobs: torch.Tensor | None  # [n, k]
    embedding: torch.Tensor | None  # [hidden] mean of the chunk's final hidden states
    tokens_seen: int
    mean_nll: float
    perplexity: float


@dataclass
class RowStats:
    """Counters and cache occupancy of one stream."""

    tokens_seen: int
    scored_tokens: int
    mean_nll: float
    perplexity: float
    cache_used: int
    cache_capacity: int
    sink_used: int  # attention-sink tokens held: min(sink_tokens, tokens_seen), in sink slots or the ring
    window_used: int  # the other tokens of the window
    tier_used: list[int]
    cache_bytes: int


@dataclass
class RowState:
    """One stream's engine state apart from its memory tiers (see StreamingInference.row_state)."""

    cache: CacheRowState
    next_logprobs: torch.Tensor  # [vocab] float32, meaningful when has_next
    rng_state: torch.Tensor  # the row's sampling generator state (uint8)
    has_next: bool
    nll_sum: float  # summed negative log-likelihood of the scored tokens
    scored: int  # tokens with a logprob (all but the stream's first)


def model_dims(config) -> tuple[int, int, int]:
    """(num_layers, kv_heads, head_dim) of a Hugging Face decoder config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


class StreamingInference:
    """Bounded-memory streaming over `max_rows` independent streams sharing one model and one cache."""

    def __init__(self, model: nn.Module, config: StreamConfig, max_rows: int = 1, tokenizer=None) -> None:
        model_config = model.config
        check_supported(model_config, config.max_positions)  # first: other models may lack the fields below
        config.validate(model_config.max_position_embeddings)
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.max_rows = max_rows
        self.base = model.base_model
        self.lm_head = model.get_output_embeddings()
        self.vocab_size = self.lm_head.out_features
        param = next(p for p in model.parameters() if p.device.type != "meta")
        # The residual stream's dtype (a quantised LM head has no float weight: core.weight_quant).
        self.device, self.dtype = param.device, model.get_input_embeddings().weight.dtype
        num_layers, kv_heads, head_dim = model_dims(model_config)
        # Kept rotated keys live in a frame that drifts by up to `frame_span` positions before the copy is
        # re-rotated (SinkCache); the drift must stay inside the trained context.
        frame_span = (min(config.window, position_limit(model_config) - config.max_positions)
                      if config.keep_rotated_keys else 0)
        rope = RopeTable(self.base.rotary_emb, config.max_positions + frame_span, self.dtype, self.device)
        self.cache = SinkCache(config, num_layers=num_layers, max_rows=max_rows, kv_heads=kv_heads,
                               head_dim=head_dim, rope=rope, dtype=self.dtype, device=self.device,
                               frame_span=frame_span)
        # Distribution over the next token of each row, from the last forward pass.
        self._next_logprobs = torch.zeros(max_rows, self.vocab_size, dtype=torch.float32)
        self._has_next = [False] * max_rows
        self._nll_sum = [0.0] * max_rows
        self._scored = [0] * max_rows
        self.generators = [torch.Generator() for _ in range(max_rows)]
        self._free = list(range(max_rows - 1, -1, -1))
        self.tier_memory = TierMemory(self.cache, config, model) if config.tiers else None
        # Stacked q/k/v and gate/up layers (load_model with quantised weights) run through one function.
        self.fused = FusedDecoder(model) if FusedDecoder.applies(model) else None

    # ----------------------------------------------------------------- rows
    def open_row(self, seed: int | None = None) -> int:
        """Claim an empty row for a new stream; `seed` seeds its sampling RNG."""
        if not self._free:
            raise NoFreeRowError(f"all {self.max_rows} stream rows are in use")
        row = self._free.pop()
        self.reset_row(row, seed)
        return row

    def close_row(self, row: int) -> None:
        self._check_row(row)
        self._free.append(row)

    def reset_row(self, row: int, seed: int | None = None) -> None:
        self.cache.reset_row(row)
        if self.tier_memory is not None:
            self.tier_memory.reset_row(row)
        self._has_next[row] = False
        self._nll_sum[row] = 0.0
        self._scored[row] = 0
        if seed is None:
            self.generators[row].seed()  # fresh entropy, without reseeding torch's global generator
        else:
            self.generators[row].manual_seed(seed)

    def _check_row(self, row: int) -> None:
        if not 0 <= row < self.max_rows or row in self._free:
            raise KeyError(f"row {row} is not an open stream")

    # ----------------------------------------------------------------- forward passes
    @torch.inference_mode()
    def step(self, inputs: Mapping[int, Sequence[int]], *, top_k: int = 0,
             embeddings: bool = False) -> dict[int, ChunkResult]:
        """One forward pass over 1..chunk new tokens for each given row (rows are batched together)."""
        if not inputs:
            return {}
        rows, lengths, ids = self._input_ids(inputs)
        if top_k < 0 or top_k > self.vocab_size:
            raise ValueError(f"top_k must be in 0..{self.vocab_size}, got {top_k}")

        position_ids, mask = self.cache.begin_step(rows, ids, lengths)
        try:  # everything that can fail runs before the commit, so a failed pass changes no row
            hidden, logprobs = self._forward(ids, position_ids, mask)
            scored = [self._score(row, ids[i, : lengths[i]].cpu(), logprobs[i, : lengths[i]],
                                  hidden[i, : lengths[i]], top_k, embeddings)
                      for i, row in enumerate(rows)]
        except BaseException:
            self.cache.abort_step()
            raise
        self.cache.end_step()
        return {row: self._commit(row, result, logprobs[i, lengths[i] - 1])
                for i, (row, result) in enumerate(zip(rows, scored, strict=True))}

    @torch.inference_mode()
    def step_prefix(self, row: int, token_ids: Sequence[int],
                    keep: Callable[[torch.Tensor], int]) -> ChunkResult:
        """One forward pass over token_ids [n] (1..decode_equivalent_room) of one row that computes what
        feeding them one token per pass would, and commits only a prefix of them.

        keep(logprobs) gets the pass's log-probabilities [n, vocab] (row i: the distribution after token
        i, as a one-token pass over token i would give it: SinkCache.begin_step(decode_equivalent=True))
        and returns how many tokens to keep, 1..n. The row then is exactly as if only those tokens had
        been fed one by one: the others leave no count, no token id, no counter change, and their slots'
        storage is put back (speculative decoding verifies a draft this way). Not with an attention merge
        policy, whose record would hear the dropped tokens' queries.
        """
        if self.tier_memory is not None and self.tier_memory.observes:
            raise ValueError(f"step_prefix does not support merge policy {self.config.merge_policy!r}")
        _, lengths, ids = self._input_ids({row: token_ids})
        position_ids, mask = self.cache.begin_step([row], ids, lengths, tentative=True,
                                                   decode_equivalent=True)
        try:
            hidden, logprobs = self._forward(ids, position_ids, mask)
            kept = keep(logprobs[0])
            if not 1 <= kept <= lengths[0]:
                raise ValueError(f"keep must return 1..{lengths[0]}, got {kept}")
            result = self._score(row, ids[0, :kept].cpu(), logprobs[0, :kept], hidden[0, :kept], 0, False)
        except BaseException:
            self.cache.abort_step()
            raise
        self.cache.end_step(keep=[kept])
        return self._commit(row, result, logprobs[0, kept - 1])

    def decode_equivalent_room(self, row: int) -> int:
        """Most tokens `step_prefix` may feed `row` now (1..chunk; see SinkCache.decode_equivalent_room)."""
        self._check_row(row)
        return self.cache.decode_equivalent_room(row)

    def _input_ids(self, inputs: Mapping[int, Sequence[int]]) -> tuple[list[int], list[int], torch.Tensor]:
        """Validated (rows, lengths, ids [b, n] on the device, zero-padded) of a step's inputs."""
        rows = list(inputs)
        lengths = [len(inputs[r]) for r in rows]
        for row, n in zip(rows, lengths, strict=True):
            self._check_row(row)
            if not 1 <= n <= self.config.chunk:
                raise ValueError(f"row {row}: a step takes 1..{self.config.chunk} tokens, got {n}")
        ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : lengths[i]] = torch.as_tensor(inputs[row], dtype=torch.long)
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token ids must be in 0..{self.vocab_size - 1}")
        return rows, lengths, ids.to(self.device)

    def _forward(self, ids: torch.Tensor, position_ids: torch.Tensor,
                 mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model over ids [b, n] inside a begun cache step: (final hidden states [b, n, hidden],
        log-probabilities [b, n, V] float32 on the CPU)."""
        if self.fused is not None:
            hidden = self.fused(ids, position_ids, mask, self.cache)
        else:
            hidden = self.base(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                               past_key_values=self.cache, use_cache=True).last_hidden_state
        return hidden, torch.log_softmax(self.lm_head(hidden).float(), dim=-1).cpu()

    def _score(self, row: int, ids: torch.Tensor, logprobs: torch.Tensor, hidden: torch.Tensor,
               top_k: int, embeddings: bool) -> ChunkResult:
        """Score each token with the distribution that predicted it (changes nothing; see _commit)."""
        first = self._next_logprobs[row] if self._has_next[row] else torch.full_like(logprobs[0], math.nan)
        predictive = torch.cat((first[None], logprobs[:-1]))  # [n, V]
        token_lp = predictive.gather(1, ids[:, None])[:, 0]
        topk_ids = topk_lp = None
        if top_k:
            topk_lp, topk_ids = predictive.topk(top_k, dim=-1)
        return ChunkResult(
            row=row, token_ids=ids.tolist(), logprobs=token_lp, topk_ids=topk_ids, topk_logprobs=topk_lp,
            embedding=hidden.float().mean(0).cpu() if embeddings else None,
            tokens_seen=0, mean_nll=math.nan, perplexity=math.nan,  # set by _commit
        )

    def _commit(self, row: int, result: ChunkResult, next_logprobs: torch.Tensor) -> ChunkResult:
        """Count a scored chunk into the row's totals and remember its next-token distribution [V]."""
        scored = result.logprobs[~result.logprobs.isnan()]
        self._nll_sum[row] -= float(scored.double().sum())
        self._scored[row] += scored.numel()
        self._next_logprobs[row] = next_logprobs
        self._has_next[row] = True
        result.tokens_seen = self.cache.tokens_seen[row]
        result.mean_nll = self._nll_sum[row] / max(self._scored[row], 1)
        result.perplexity = math.exp(result.mean_nll)
        return result

    def append(self, row: int, token_ids: Sequence[int], *, top_k: int = 0,
               embeddings: bool = False) -> Iterator[ChunkResult]:
        """Feed any number of tokens to one stream, `config.chunk` per forward pass."""
        c = self.config.chunk
        for start in range(0, len(token_ids), c):
            yield self.step({row: token_ids[start : start + c]}, top_k=top_k, embeddings=embeddings)[row]

    def next_logprobs(self, row: int) -> torch.Tensor | None:
        """Log-probabilities [vocab] of the token after everything appended, None before any token."""
        self._check_row(row)
        return self._next_logprobs[row] if self._has_next[row] else None

    # ----------------------------------------------------------------- persistence
    def row_state(self, row: int) -> RowState:
        """An open row's state; its tensors are views of the engine's storage (rng_state is a copy)."""
        self._check_row(row)
        return RowState(self.cache.row_state(row), self._next_logprobs[row], self.generators[row].get_state(),
                        self._has_next[row], self._nll_sum[row], self._scored[row])

    def load_row_state(self, row: int, state: RowState) -> None:
        """Overwrite an open row with `state` (shapes and dtypes as `row_state` gives them); the row's tiers
        are the tier memory's (TierMemory.load_state)."""
        self._check_row(row)
        self.cache.load_row_state(row, state.cache)
        self._next_logprobs[row].copy_(state.next_logprobs)
        self.generators[row].set_state(state.rng_state)
        self._has_next[row], self._nll_sum[row] = state.has_next, state.nll_sum
        self._scored[row] = state.scored

    def snapshot(self, row: int) -> tuple[dict[str, torch.Tensor], dict]:
        """The row's whole state as (tensors, metadata); see core.snapshot."""
        return snapshot_row(self, row)

    def restore(self, row: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Replace an open row's state with a snapshot's."""
        restore_row(self, row, tensors, meta)

    # ----------------------------------------------------------------- introspection
    def stats(self, row: int) -> RowStats:
        self._check_row(row)
        mean_nll = self._nll_sum[row] / max(self._scored[row], 1)
        tiers = self.tier_memory.used(row) if self.tier_memory is not None else []
        # The stream's first sink_tokens tokens are its attention sinks from the start; until the window
        # first overflows they sit in the ring and move to the sink slots as they are evicted. Count them
        # as sinks wherever they are, so sink_used + window_used + sum(tiers) == cache_used.
        sinks = min(self.config.sink_tokens, self.cache.tokens_seen[row])
        window = self.cache.sink_used[row] + self.cache.window_used[row] - sinks
        return RowStats(
            tokens_seen=self.cache.tokens_seen[row], scored_tokens=self._scored[row], mean_nll=mean_nll,
            perplexity=math.exp(mean_nll), cache_used=self.cache.used_slots(row),
            cache_capacity=self.config.cache_slots, sink_used=sinks, window_used=window, tier_used=tiers,
            cache_bytes=self.cache_bytes,
        )

    @property
    def cache_bytes(self) -> int:
        """Bytes of the preallocated per-stream state (KV storage, tiers and bookkeeping), all rows."""
        tiers = self.tier_memory.nbytes if self.tier_memory is not None else 0
        return self.cache.nbytes + self._next_logprobs.nbytes + tiers
