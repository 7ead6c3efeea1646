"""Hierarchical memory tiers: tokens evicted from the window merge into fixed-size, coarser and coarser tiers.

`TierMemory` owns the tier region [S, S+T) of a SinkCache row and is registered as the cache's hooks
(`SinkCache.set_hooks`): evicted tokens arrive through `evicted`.
Region layout (position order = age order, so the cache's cumsum positions read "sinks, tiers oldest
first, window"):

    [ tier K | ... | tier 2 | tier 1 merged | tier 1 pending ]  then the ring (window + chunk)

Each tier keeps its slots left-aligned in age order inside its sub-region; unused slots have count 0, so
they take no position and no attention. Tier 1 ends with a pending area of ``block_tokens - 1`` slots that
holds evicted tokens not yet numerous enough to form a block: they stay visible to attention at full
resolution (count 1) until a block of them merges. Promotion is a pure function of the number of tokens
evicted, not of how they were chunked: tier k keeps at most its capacity of merged slots, and when it
would exceed it, its oldest slots leave `r_{k+1}` at a time and each such group becomes one slot of tier
k+1. The last tier drops its oldest slots.

Merging works on position-free keys and on values. A merged slot's count is the sum of the counts it
merges; SinkCache.begin_step adds +log(count) to its logits (proportional attention), so a slot that
merges n identical tokens receives exactly the attention those n tokens would.

Policies (StreamConfig.merge_policy):
- ``mean``: weights = counts (a uniform mean of every token a slot stands for).
- ``attention``: weights = the attention each token/slot has received so far (see `install_observer`).
- ``heavy-hitters``: a block of ``r1 * HEAVY_BLOCK_SLOTS`` evicted tokens becomes HEAVY_BLOCK_SLOTS slots:
  its HEAVY_KEEP most-attended tokens stay as individual slots, the rest merge (uniformly) into the other
  slots; same compression ratio as ``mean``, coarser tiers merge as ``mean``.
"""

from __future__ import annotations

import math
import sys
import threading
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from sinkstream.core.config import ConfigError, StreamConfig
from sinkstream.core.sink_cache import CacheHooks, ForwardStep, SinkCache
from sinkstream.core.snapshot import SnapshotError

HEAVY_BLOCK_SLOTS = 2  # heavy-hitters: slots a block of evicted tokens becomes (2 had lower NLL than 4)
HEAVY_KEEP = 1  # heavy-hitters: of which individual most-attended tokens
OBSERVED_QUERIES = 8  # attention accounting: last queries of each chunk whose attention is recorded
ATTENTION_FLOOR = 1e-6  # per-token weight floor so a never-attended group still has a defined mean
ATTENTION_POLICIES = ("attention", "heavy-hitters")


@dataclass
class _Observed:
    """Attention logits recorded during one forward pass (see TierMemory.observe)."""

    index: torch.Tensor  # [b, seen] observed query of each row
    valid: torch.Tensor | None  # [b, seen], None when every index is a real query
    bias: torch.Tensor  # [b, 1, 1, seen, N] the mask at those queries
    logits: list[torch.Tensor]  # per layer [b, kv_heads, group * seen, N]


@dataclass
class TierState:
    """One row's tier bookkeeping, as a snapshot holds it (see TierMemory.state / check_state)."""

    merged: list[int]  # merged slots used per tier, finest first
    pending: int  # tier 1 tokens not merged yet
    received: int  # tokens handed to the tiers
    dropped: int  # tokens dropped from the last tier
    attention: torch.Tensor  # [slots] attention each slot has received


@dataclass
class Units:
    """A run of slots in age order: keys/values [L, H, n, D] (float32), count and attention [n]."""

    keys: torch.Tensor
    values: torch.Tensor
    count: torch.Tensor
    attention: torch.Tensor

    def __len__(self) -> int:
        return self.count.shape[0]

    def cut(self, start: int, stop: int) -> Units:
        return Units(self.keys[:, :, start:stop], self.values[:, :, start:stop], self.count[start:stop],
                     self.attention[start:stop])

    def then(self, later: Units) -> Units:
        """These units followed by `later` ones."""
        return Units(torch.cat((self.keys, later.keys), 2), torch.cat((self.values, later.values), 2),
                     torch.cat((self.count, later.count)), torch.cat((self.attention, later.attention)))


def merge_units(units: Units, group: torch.Tensor, num_groups: int, weights: torch.Tensor) -> Units:
    """Weighted average of units by group: group [n] (0..num_groups-1), weights [n] > 0.

    Keys and values become the weighted mean of their group; counts and attention add up.
    """
    member = torch.zeros(num_groups, group.shape[0], dtype=weights.dtype, device=weights.device)
    member[group, torch.arange(group.shape[0], device=group.device)] = 1.0  # [groups, n]
    share = member * weights
    share = share / share.sum(1, keepdim=True)
    # One small matmul per tensor: faster on CPU than scatter-adds along the slot dim.
    return Units(share @ units.keys, share @ units.values, member @ units.count, member @ units.attention)


def merge_runs(units: Units, run: int, weights: torch.Tensor) -> Units:
    """`merge_units` for consecutive groups of `run` units (n divisible by run): reshapes, no scatter."""
    layers, heads, n, d = units.keys.shape
    groups = n // run
    share = weights.view(groups, run)
    share = (share / share.sum(1, keepdim=True))[:, :, None]  # [groups, run, 1]
    keys = (units.keys.view(layers, heads, groups, run, d) * share).sum(3)
    values = (units.values.view(layers, heads, groups, run, d) * share).sum(3)
    return Units(keys, values, units.count.view(groups, run).sum(1), units.attention.view(groups, run).sum(1))


def block_groups(attention: torch.Tensor, slots: int, heavy: int) -> torch.Tensor:
    """Slot index (0..slots-1, in age order) of each token of blocks of B tokens, attention [nb, B].

    The `heavy` most-attended tokens of each block get a slot each; the others are split into
    `slots - heavy` runs of consecutive tokens. Slots are ordered by their first token. Returns [nb, B].
    """
    nb, b = attention.shape
    if heavy == 0:
        return (torch.arange(b, device=attention.device) * slots // b).expand(nb, b)
    is_heavy = torch.zeros_like(attention, dtype=torch.bool)
    is_heavy.scatter_(1, attention.topk(heavy, dim=1).indices, True)
    light = slots - heavy
    rank = (~is_heavy).cumsum(1) - 1  # rank of each light token among the block's light tokens
    run = rank * light // (b - heavy)
    first_of_run = (rank == 0) | (run != (rank - 1).clamp(min=0) * light // (b - heavy))
    starts = is_heavy | (~is_heavy & first_of_run)
    order = starts.long().cumsum(1) - 1  # slot index of each token that starts a slot
    run_slot = torch.zeros(nb, light, dtype=torch.long, device=attention.device)
    light_starts = starts & ~is_heavy
    run_slot[light_starts.nonzero(as_tuple=True)[0], run[light_starts]] = order[light_starts]
    return torch.where(is_heavy, order, run_slot.gather(1, run.clamp(0, light - 1)))


def validate_tiers(config: StreamConfig) -> None:
    """Raise ConfigError if a tier cannot hold what it must (tier 1 also holds the pending block)."""
    pending = block_tokens(config) - 1
    for k, tier in enumerate(config.tiers):
        room = tier.slots - (pending if k == 0 else 0)
        nxt = config.tiers[k + 1].ratio if k + 1 < len(config.tiers) else 1
        if room < max(nxt - 1, 1):
            need = max(nxt - 1, 1) + (pending if k == 0 else 0)
            raise ConfigError("tiers", f"tier {k + 1} ({tier}) needs at least {need} slots with policy "
                                       f"{config.merge_policy!r} and the next tier's ratio {nxt}")


def block_tokens(config: StreamConfig) -> int:
    """Evicted tokens that merge together into tier 1 at once."""
    r1 = config.tiers[0].ratio
    return r1 * HEAVY_BLOCK_SLOTS if config.merge_policy == "heavy-hitters" else r1


class TierMemory(CacheHooks):
    """The memory tiers of every row of one SinkCache (see the module docstring for the layout).

    As the cache's hooks it takes the tokens the window evicts and, with an attention policy, records the
    attention of each forward pass (see `install_observer`) and adds it up before the pass's eviction.
    """

    def __init__(self, cache: SinkCache, config: StreamConfig, model: nn.Module | None = None) -> None:
        if not config.tiers:
            raise ConfigError("tiers", "TierMemory needs at least one tier")
        validate_tiers(config)
        self.cache, self.config, self.policy = cache, config, config.merge_policy
        self.capacity = [t.slots for t in config.tiers]
        self.ratios = [t.ratio for t in config.tiers]
        heavy_policy = self.policy == "heavy-hitters"
        self.block_tokens = block_tokens(config)
        self.block_slots = HEAVY_BLOCK_SLOTS if heavy_policy else 1
        self.heavy = HEAVY_KEEP if heavy_policy else 0
        self.pending_capacity = self.block_tokens - 1
        self.merged_capacity = [self.capacity[0] - self.pending_capacity, *self.capacity[1:]]
        # Coarsest tier first, right after the sinks; tier 1 (then its pending area) right before the ring.
        self.base = [0] * len(self.capacity)
        start = cache.sink_slots
        for k in reversed(range(len(self.capacity))):
            self.base[k] = start
            start += self.capacity[k]
        self.pending_base = self.base[0] + self.merged_capacity[0]
        assert start == cache.ring_start, "tier region does not match the cache layout"
        rows = cache.count.shape[0]
        self._merged = [[0] * len(self.capacity) for _ in range(rows)]  # merged slots used per tier
        self._pending = [0] * rows
        self.received = [0] * rows  # tokens handed to the tiers
        self.dropped = [0] * rows  # tokens dropped from the last tier
        # Attention each slot has received (summed over observed queries, heads and layers).
        self.attention = torch.zeros(rows, cache.num_slots, dtype=torch.float32, device=cache.count.device)
        self._observed: _Observed | None = None
        self._step: ForwardStep | None = None  # the cache's forward pass in progress
        self.observes = self.policy in ATTENTION_POLICIES
        if self.observes:
            if model is None:
                raise ValueError(f"merge policy {self.policy!r} needs the model to observe attention")
            install_observer(model, self.policy)
        cache.set_hooks(self)

    # ----------------------------------------------------------------- the cache's hooks
    def step_started(self, step: ForwardStep) -> None:
        """Observe this thread's attention (attention policies) until the pass ends."""
        self._step = step
        if self.observes:
            _ACTIVE.memory = self

    def step_ending(self, step: ForwardStep) -> None:
        """Turn the recorded logits into attention, before the cache evicts."""
        if self.observes:
            _ACTIVE.memory = None
            self.account()
        self._step = None

    def step_aborted(self) -> None:
        if self.observes:
            _ACTIVE.memory = None
            self._observed = None
        self._step = None

    # ----------------------------------------------------------------- eviction into the tiers
    def evictions_kept_in_place(self, row: int) -> int:
        """Evicted tokens tier 1's pending area still takes before a block merges: each sits, count 1, at
        the position it had as the oldest window token (the pending area ends right before the ring)."""
        return self.pending_capacity - self._pending[row]

    def evicted(self, row: int, slots: torch.Tensor) -> None:
        """Take the tokens leaving the window of `row` (ring slots [e], stream order) into tier 1."""
        device = slots.device
        pending = torch.arange(self.pending_base, self.pending_base + self._pending[row], device=device)
        arrivals = self._read(row, torch.cat((pending, slots)))
        self.received[row] += slots.numel()
        blocks = len(arrivals) // self.block_tokens
        whole = blocks * self.block_tokens
        leftover = arrivals.cut(whole, len(arrivals))
        self._write(row, self.pending_base, leftover, self.pending_capacity)
        self._pending[row] = len(leftover)
        if blocks == 0:
            return
        incoming: Units | None = self._form_blocks(arrivals.cut(0, whole), blocks)
        for k in range(len(self.capacity)):
            if incoming is None:
                break
            incoming = self._push(row, k, incoming)

    def _form_blocks(self, tokens: Units, blocks: int) -> Units:
        """Merge `blocks` blocks of block_tokens tokens into block_slots slots each."""
        if self.heavy == 0 and self.block_slots == 1:
            return merge_runs(tokens, self.block_tokens, self._weights(tokens))
        attention = tokens.attention.view(blocks, self.block_tokens)
        within = block_groups(attention, self.block_slots, self.heavy)
        offset = torch.arange(blocks, device=within.device)[:, None] * self.block_slots
        group = (within + offset).flatten()
        return merge_units(tokens, group, blocks * self.block_slots, self._weights(tokens))

    def _weights(self, units: Units) -> torch.Tensor:
        if self.policy == "attention":
            return units.attention + ATTENTION_FLOOR * units.count
        return units.count  # mean; heavy-hitters merges its light tokens uniformly

    def _push(self, row: int, k: int, incoming: Units) -> Units | None:
        """Append slots to tier k; return what leaves it merged for tier k+1 (None if nothing does)."""
        used, room, base = self._merged[row][k], self.merged_capacity[k], self.base[k]
        total = used + len(incoming)
        if total <= room:
            self._write(row, base + used, incoming)
            self._merged[row][k] = total
            return None
        last = k + 1 == len(self.capacity)
        ratio = 1 if last else self.ratios[k + 1]
        leaving_n = ratio * math.ceil((total - room) / ratio)
        device = self.cache.count.device
        tier = self._read(row, torch.arange(base, base + used, device=device)).then(incoming)
        self._write(row, base, tier.cut(leaving_n, total), room)
        self._merged[row][k] = total - leaving_n
        leaving = tier.cut(0, leaving_n)
        if last:
            self.dropped[row] += int(leaving.count.sum())
            return None
        return merge_runs(leaving, ratio, self._weights(leaving))

    # ----------------------------------------------------------------- storage access
    def _read(self, row: int, slots: torch.Tensor) -> Units:
        c = self.cache
        keys, values = c.storage.gather(row, slots)
        return Units(keys, values, c.count[row].index_select(0, slots),
                     self.attention[row].index_select(0, slots))

    def _write(self, row: int, start: int, units: Units, clear_to: int | None = None) -> None:
        """Store units at slots [start, start+n); with clear_to, empty the slots after them up to
        start + clear_to. Emptied slots are zeroed too, so an empty tier slot's storage does not depend on
        how the evictions were batched (a multi-token pass evicts several tokens at once)."""
        c, n = self.cache, len(units)
        c.storage.assign(row, start, units.keys, units.values)
        c.count[row, start : start + n] = units.count
        self.attention[row, start : start + n] = units.attention
        if clear_to is not None and clear_to > n:
            emptied = slice(start + n, start + clear_to)
            c.storage.clear(row, emptied)
            c.count[row, emptied] = 0.0
            self.attention[row, emptied] = 0.0

    # ----------------------------------------------------------------- attention accounting
    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
                scaling: float | None) -> None:
        """Record the logits of the last OBSERVED_QUERIES queries of each row over every slot.

        query [b, heads, n, D] (rotated), key [b, kv_heads, N, D] (every slot, rotated), mask
        [b, 1, n, N] additive (SinkCache.begin_step's). `account` turns them into attention at the end of
        the forward pass, for all layers at once (fewer, larger ops than per layer).
        """
        st = self._step
        if st is None or mask is None:
            return
        b, heads, n, d = query.shape
        kv_heads, slots = key.shape[1], key.shape[2]
        if layer == 0 or self._observed is None:
            seen = min(OBSERVED_QUERIES, n)
            lengths = torch.tensor(st.lengths, device=query.device)
            index = lengths[:, None] - seen + torch.arange(seen, device=query.device)  # [b, seen]
            valid = index >= 0
            index = index.clamp(min=0)
            bias = mask.gather(2, index[:, None, :, None].expand(b, 1, seen, slots))[:, :, None]
            self._observed = _Observed(index, None if bool(valid.all()) else valid, bias, [])
        obs = self._observed
        seen = obs.index.shape[1]
        q = query.gather(2, obs.index[:, None, :, None].expand(b, heads, seen, d))
        q = q.view(b, kv_heads, heads // kv_heads * seen, d) * (scaling or d ** -0.5)
        obs.logits.append(q @ key.transpose(2, 3))  # [b, kv_heads, group * seen, N]

    def account(self) -> None:
        """Add the attention recorded in this forward pass to each slot's total (call before eviction)."""
        obs, self._observed = self._observed, None
        st = self._step
        if obs is None or not obs.logits or st is None:
            return
        layers = torch.stack(obs.logits)  # [layers, b, kv_heads, group * seen, N]
        l_, b, kv_heads, _, slots = layers.shape
        seen = obs.index.shape[1]
        logits = layers.view(l_, b, kv_heads, -1, seen, slots) + obs.bias
        probs = logits.float().softmax(-1)
        if obs.valid is not None:
            probs = probs * obs.valid[:, None, None, :, None]
        received = probs.sum((0, 2, 3, 4))  # [b, N]
        # The chunk's slots now hold new tokens: forget what their previous owners received.
        self.attention[st.rows[:, None], st.chunk_slots] = 0.0
        if st.all_rows:
            self.attention += received
        else:
            self.attention.index_put_((st.rows,), received, accumulate=True)

    # ----------------------------------------------------------------- rows, stats, snapshots
    def reset_row(self, row: int) -> None:
        """Forget a row's tiers (SinkCache.reset_row already zeroed its counts; their storage is zeroed
        here, see _write)."""
        self.cache.storage.clear(row, slice(self.cache.sink_slots, self.cache.ring_start))
        self._merged[row] = [0] * len(self.capacity)
        self._pending[row] = self.received[row] = self.dropped[row] = 0
        self.attention[row] = 0.0

    def used(self, row: int) -> list[int]:
        """Slots in use per tier, finest first (tier 1 includes its pending tokens)."""
        used = list(self._merged[row])
        used[0] += self._pending[row]
        return used

    @property
    def nbytes(self) -> int:
        """Bytes of the tiers' own preallocated tensors (the attention record [rows, slots]); their slots'
        keys and values are the cache's. Constant for the memory's lifetime."""
        return self.attention.nbytes

    def represented(self, row: int) -> int:
        """Tokens the row's tier slots stand for."""
        return int(self.cache.count[row, self.cache.sink_slots : self.cache.ring_start].sum())

    def state(self, row: int) -> tuple[dict[str, torch.Tensor], dict]:
        """What a snapshot needs beyond the cache storage: (tensors, json-able metadata)."""
        meta = {"merged": list(self._merged[row]), "pending": self._pending[row],
                "received": self.received[row], "dropped": self.dropped[row]}
        return {"attention": self.attention[row].clone()}, meta

    def check_state(self, tensors: dict[str, torch.Tensor], meta: dict, count: torch.Tensor,
                    evicted: int) -> TierState:
        """Validate what `state` returned against the snapshot's slot counts `count` [slots] and the
        `evicted` tokens the cache handed to the tiers; raises SnapshotError when the tier state is
        missing, does not fit these tiers or disagrees with the slots. Changes nothing."""
        try:
            merged = [int(x) for x in meta["merged"]]
            pending, received, dropped = int(meta["pending"]), int(meta["received"]), int(meta["dropped"])
            attention = tensors["attention"]
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"snapshot tier state is missing or malformed: {exc!r}") from exc
        if len(merged) != len(self.capacity) or any(
                not 0 <= m <= cap for m, cap in zip(merged, self.merged_capacity, strict=True)):
            raise SnapshotError(f"tier snapshot {merged} does not fit tiers {self.merged_capacity}")
        if not 0 <= pending <= self.pending_capacity:
            raise SnapshotError(f"tier snapshot has {pending} pending tokens, "
                                f"at most {self.pending_capacity}")
        like = self.attention[0]
        if not isinstance(attention, torch.Tensor) or attention.shape != like.shape \
                or attention.dtype != like.dtype:
            raise SnapshotError(f"tier attention {getattr(attention, 'shape', attention)} is not "
                                f"{like.dtype} {tuple(like.shape)}")
        if received < 0 or dropped < 0:
            raise SnapshotError(f"tier snapshot counters received={received} dropped={dropped} are negative")
        if received != evicted:
            raise SnapshotError(f"tier snapshot received {received} tokens, the cache evicted {evicted}")
        self._check_slots(count, merged, pending, received - dropped)
        return TierState(merged, pending, received, dropped, attention)

    def _check_slots(self, count: torch.Tensor, merged: list[int], pending: int, represented: int) -> None:
        """The tier region of `count` [slots] must hold exactly the recorded slots: each tier's first
        merged[k] slots in use, `pending` count-1 slots, nothing else, standing for `represented` tokens."""
        first = self.cache.sink_slots
        region = count[first : self.cache.ring_start].cpu().double()
        used = torch.zeros_like(region, dtype=torch.bool)
        for base, m in zip(self.base, merged, strict=True):
            used[base - first : base - first + m] = True
        in_pending = slice(self.pending_base - first, self.pending_base - first + pending)
        used[in_pending] = True
        if not (bool(region.isfinite().all()) and torch.equal(region > 0, used)
                and bool((region[~used] == 0).all()) and bool((region[in_pending] == 1).all())
                and float(region.sum()) == represented):
            usage = [merged[0] + pending, *merged[1:]]
            raise SnapshotError(f"tier slot counts do not match the recorded usage {usage} of "
                                f"{represented} tokens")

    def load_state(self, row: int, state: TierState) -> None:
        """Inverse of `state`, for a state `check_state` accepted."""
        self.attention[row].copy_(state.attention)
        self._merged[row], self._pending[row] = list(state.merged), state.pending
        self.received[row], self.dropped[row] = state.received, state.dropped


# --------------------------------------------------------------------- the attention observer
_ACTIVE = threading.local()  # the TierMemory whose cache is in a forward pass on this thread


def _base_attention(base_name: str, module: nn.Module):
    """The attention function `base_name` names; "eager" is each model family's own function."""
    if base_name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base_name]


def _observed(base_name: str):
    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        out = _base_attention(base_name, module)(module, query, key, value, attention_mask, *args, **kwargs)
        memory = getattr(_ACTIVE, "memory", None)
        if memory is not None:
            memory.observe(module.layer_idx, query, key, attention_mask, kwargs.get("scaling"))
        return out

    return attention


def install_observer(model: nn.Module, policy: str) -> None:
    """Make `model` run its attention through a wrapper that also reports attention to the TierMemory
    active on the current thread (the one whose cache is inside a forward pass, see
    TierMemory.step_started); `policy` names the merge policy that needs it, for the error message.

    The wrapper computes exactly what the model's own attention function computes (it calls it), so
    streams without tiers and the dense path on the same model are unaffected.
    """
    current = model.config._attn_implementation
    base_name = current.removeprefix("sinkstream_observed_")
    if base_name != "eager" and base_name not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"merge policy {policy!r} cannot observe attention implementation "
                         f"{current!r}; load the model with sdpa or eager attention")
    name = f"sinkstream_observed_{base_name}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _observed(base_name))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_name])
    if current != name:
        model.set_attn_implementation(name)
