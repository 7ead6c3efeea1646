"""Attention-sink bounded KV cache with preallocated storage, shared by up to `max_rows` streams.

Slot layout of each row (a row is one stream; all rows have the same fixed shape):

    [0, S)            sinks: the first S tokens of the stream, in stream order
    [S, S+T)          memory tier slots (filled by core.tiers; absent when T = 0)
    [S+T, S+T+W+C)    a ring holding the window of the W most recent tokens plus the chunk in flight

Keys are stored position-free (RoPE removed), in the format of `config.kv_dtype` (core.kv_quant: the
model's dtype, bfloat16 or int8, de-quantised when read). At each forward pass every kept token is
rotated to its slot position: sinks 0..s-1, then tier slots, then the window in stream order, then the
chunk, numbered contiguously, so positions never exceed S + T + W + C - 1 however long the stream runs
(StreamingLLM's re-numbering). The ring means eviction never moves data: a token leaves by having its
slot count zeroed.

Kept rotated keys (`StreamConfig.keep_rotated_keys`): re-rotating every kept key at every pass is most of a
decoded token's cache work, although only the sinks and tiers change position relative to the window.
With the option, each layer keeps its keys rotated between passes, in a frame per row: every position of
a pass is the re-numbered one plus a drift `shift = anchor mod frame_span` (anchor = window start minus
prefix slots, which grows as tokens leave). A uniform shift changes no attention score (RoPE scores depend
on position differences only), so a pass rotates just the chunk and the sink/tier slots; the window's kept
keys still sit where they belong. When the drift wraps (every `frame_span` evictions), the rows' keys are
all rotated again from the position-free storage, as is done on every tentative pass and after any row
state is loaded. The copy of a slot is always derived from the stored key, so it does not depend on how
the stream was chunked.

Update contract (Hugging Face `Cache`): `begin_step` -> model forward, whose attention layers call
`update(k, v, layer)` with the chunk's rotated keys [b, kv_heads, n, head_dim] and get back the keys and
values of every slot [b, kv_heads, num_slots, head_dim] -> `end_step` commits the chunk and evicts.
A tentative step may commit only a prefix of its chunk; a decode-equivalent one computes for each chunk
token what a one-token pass over it would (speculative decoding verifies drafts with both).

Extension point: one `CacheHooks` object, registered once with `set_hooks`, hears about each forward pass
and about tokens leaving the window (core.tiers registers its TierMemory).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache

from sinkstream.core.config import StreamConfig
from sinkstream.core.kv_quant import KVStorage
from sinkstream.core.rope import RopeTable, apply_rotation, inverse_rotation


@dataclass
class ScratchSlots:
    """Free ring slots of one row that hold shifted copies of its sinks during one decode-equivalent pass
    (see SinkCache.begin_step); `saved` is their storage before, put back when the pass ends."""

    row: int
    slots: torch.Tensor  # [m] ring slots
    saved: list[torch.Tensor]  # per stored tensor [L, H, m, *]


@dataclass
class ForwardStep:
    """Per-forward-pass tensors shared by all layers (built by SinkCache.begin_step)."""

    rows: torch.Tensor  # [b] long
    lengths: list[int]  # real tokens per row (rows shorter than the longest are padded)
    chunk_slots: torch.Tensor  # [b, n] ring slot of each chunk token
    chunk_tokens: torch.Tensor  # [b, n] stream index of each chunk token
    slot_cos: torch.Tensor  # [b, 1, num_slots, rotary_dim]
    slot_sin: torch.Tensor
    chunk_cos: torch.Tensor  # [b, 1, n, rotary_dim]
    chunk_sin: torch.Tensor
    all_rows: bool  # rows == 0..R-1: storage views can be returned without a gather
    backup: list[torch.Tensor] | None = None  # tentative steps: the chunk slots' storage before the pass
    incremental: bool = False  # kept rotated keys: rotate only the chunk and the sink/tier slots
    chunk_index: tuple[torch.Tensor, ...] = ()  # (row, head, slot) of the chunk in a [R, H, N, D] layer
    unrotate: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin taking chunk keys back to raw
    scratch: list[ScratchSlots] = field(default_factory=list)  # decode-equivalent steps: shifted sinks


@dataclass
class CacheRowState:
    """One row's whole cache state (see SinkCache.row_state)."""

    keys: torch.Tensor  # [L, kv_heads, num_slots, head_dim] position-free, stored format
    values: torch.Tensor  # [L, kv_heads, num_slots, head_dim]
    count: torch.Tensor  # [num_slots] float32, tokens each slot stands for
    token_ids: torch.Tensor  # [num_slots] long
    tokens_seen: int
    sink_used: int
    window_used: int
    key_scales: torch.Tensor | None = None  # [L, kv_heads, num_slots, P] float32 (int8/int4 only)
    value_scales: torch.Tensor | None = None


class CacheHooks:
    """What a SinkCache tells the one object registered with `SinkCache.set_hooks`; every hook is a no-op
    here, so a subclass overrides only what it needs."""

    def step_started(self, step: ForwardStep) -> None:
        """A forward pass over `step` begins (called at the end of begin_step, before the model runs)."""

    def step_ending(self, step: ForwardStep) -> None:
        """The forward pass over `step` succeeded; called before the chunk is committed and eviction runs."""

    def step_aborted(self) -> None:
        """The forward pass failed; the cache forgets it."""

    def evictions_kept_in_place(self, row: int) -> int | None:
        """How many more tokens evicted from `row`'s window (beyond the free sink slots) the hooks keep
        visible exactly where they were (same position, count 1) before rearranging anything; None: the
        hooks drop evicted tokens (this default). begin_step(decode_equivalent=True) relies on it."""
        return None

    def evicted(self, row: int, slots: torch.Tensor) -> None:
        """Tokens leave the window of `row` and the sinks do not take them: ring slots [e], stream order.

        The slots still hold the tokens' keys/values/ids during the call; afterwards they are emptied, so
        without a hook that keeps them the tokens are dropped.
        """


class SinkCache(Cache):
    """Fixed-size KV cache: sinks + memory tiers + a window, for `max_rows` independent streams."""

    def __init__(
        self,
        config: StreamConfig,
        *,
        num_layers: int,
        max_rows: int,
        kv_heads: int,
        head_dim: int,
        rope: RopeTable,
        dtype: torch.dtype,
        device: torch.device,
        frame_span: int = 0,
    ) -> None:
        """`frame_span`: how far the frame of kept rotated keys may drift (module docstring); `rope` must
        cover config.max_positions + frame_span positions."""
        super().__init__(layers=[])
        self.config = config
        self.rope = rope
        self.sink_slots = config.sink_tokens
        self.ring_start = config.sink_tokens + config.tier_slots
        self.ring_size = config.window + config.chunk
        self.num_slots = self.ring_start + self.ring_size
        shape = (num_layers, max_rows, kv_heads, self.num_slots, head_dim)
        self.storage = KVStorage(shape, config.kv_dtype, dtype, device)  # position-free keys
        # Tokens each slot stands for (1 for a plain token, n for a merged tier slot, 0 = empty).
        self.count = torch.zeros(max_rows, self.num_slots, dtype=torch.float32, device=device)
        # Token id held by each slot (sinks and ring), used for repetition penalties and snapshots.
        self.token_ids = torch.zeros(max_rows, self.num_slots, dtype=torch.long, device=device)
        # Keys rotated to their slot positions. By default a workspace: each layer's attention consumes
        # them before the next layer's update, so one buffer serves every layer of every step. With
        # keep_rotated_keys, one copy per layer kept between passes (module docstring).
        self.keep_rotated = config.keep_rotated_keys
        self.frame_span = frame_span
        self.rotated_keys = torch.empty(shape if self.keep_rotated else shape[1:], dtype=dtype, device=device)
        self._frame: list[int | None] = [None] * max_rows  # base of each row's kept rotated keys
        self.tokens_seen = [0] * max_rows
        self.sink_used = [0] * max_rows
        self.window_used = [0] * max_rows
        self.hooks = CacheHooks()
        self._step: ForwardStep | None = None

    @property
    def keys(self) -> torch.Tensor:
        """Stored position-free keys [L, R, kv_heads, num_slots, head_dim] (int8 data for int8 storage)."""
        return self.storage.keys

    @property
    def values(self) -> torch.Tensor:
        """Stored values [L, R, kv_heads, num_slots, head_dim]."""
        return self.storage.values

    def set_hooks(self, hooks: CacheHooks) -> None:
        """Register the cache's one hooks object (see CacheHooks); a second registration is an error."""
        if type(self.hooks) is not CacheHooks:
            raise RuntimeError("SinkCache hooks are already registered")
        self.hooks = hooks

    # ----------------------------------------------------------------- the forward-pass protocol
    def begin_step(
        self, rows: list[int], input_ids: torch.Tensor, lengths: list[int], *, tentative: bool = False,
        decode_equivalent: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepare a forward pass of input_ids [b, n] (row i has lengths[i] real tokens).

        `tentative`: `end_step(keep=...)` may commit only a prefix of each row's chunk; the storage of the
        chunk slots is saved first so the rest can be put back as it was (see end_step).

        `decode_equivalent`: chunk token i attends as it would if the chunk were fed one token per pass
        (so the window would already have evicted max(0, window_used + i - W) tokens): an eviction that
        keeps the token in place (a free sink slot, the tiers' pending area) changes nothing; one that
        drops it hides that slot from query i, and query i then sees the sinks (with the tokens still on
        their way to the sink slots) d_i positions further away, d_i = tokens dropped before it. Those
        sinks are read from shifted copies written into free ring slots for this pass only, one copy per
        distinct d > 0 (their storage is put back by end_step/abort_step). Raises ValueError, changing
        nothing, for a chunk longer than `decode_equivalent_room`.

        Returns position_ids [b, n] and the additive attention mask [b, 1, n, num_slots]: a chunk token
        sees every kept slot (with +log(count) for merged slots) and the chunk tokens up to itself.
        """
        device = self.count.device
        b, n = input_ids.shape
        if decode_equivalent:
            for row, length in zip(rows, lengths, strict=True):
                if length > self.decode_equivalent_room(row, n):
                    raise ValueError(f"row {row}: {length} tokens in a {n}-token pass do not fit a "
                                     f"decode-equivalent pass (room {self.decode_equivalent_room(row, n)})")
        rows_t = torch.tensor(rows, dtype=torch.long, device=device)
        seen = torch.tensor([self.tokens_seen[r] for r in rows], device=device)
        window_start = seen - torch.tensor([self.window_used[r] for r in rows], device=device)

        count = self.count.index_select(0, rows_t)  # [b, N]
        prefix_valid = count[:, : self.ring_start] > 0
        prefix_len = prefix_valid.sum(1, keepdim=True)  # [b, 1]
        chunk_tokens = seen[:, None] + torch.arange(n, device=device)  # [b, n]
        chunk_slots = self.ring_start + chunk_tokens % self.ring_size
        # Stream index of every ring slot: stale slots get garbage positions but are masked out.
        ring_tokens = self._ring_token_index(seen)  # [b, ring]
        ring_tokens.scatter_(1, chunk_slots - self.ring_start, chunk_tokens)
        max_pos = self.rope.cos.shape[0] - 1
        shift, incremental = self._frames(rows, window_start[:, None] - prefix_len, tentative)
        slot_pos = torch.cat(
            (prefix_valid.cumsum(1) - 1, prefix_len + ring_tokens - window_start[:, None]), dim=1
        ).add_(shift)  # clamped below, once decode-equivalent passes have placed their sink copies
        position_ids = prefix_len + chunk_tokens - window_start[:, None] + shift

        is_chunk = torch.zeros(b, self.num_slots, dtype=torch.bool, device=device)
        is_chunk.scatter_(1, chunk_slots, True)
        slot_tokens = torch.cat((torch.full_like(prefix_len.expand(b, self.ring_start), -1),
                                 ring_tokens), dim=1)
        sees_chunk = is_chunk[:, None, :] & (slot_tokens[:, None, :] <= chunk_tokens[:, :, None])
        dtype = self.rotated_keys.dtype
        neg = torch.finfo(dtype).min
        kept = torch.where(count > 0, count.clamp(min=1).log(), neg)  # [b, N]
        mask = torch.where(sees_chunk, 0.0, kept[:, None, :]).to(dtype)[:, None]  # [b, 1, n, N]

        scratch = []
        if decode_equivalent:
            for i, row in enumerate(rows):
                window_index = slot_tokens[i] - window_start[i]  # [N] (< 0: sink, tier or stale slot)
                copies = self._follow_decoding(i, row, n, lengths[i], window_index, slot_pos, mask[i, 0])
                if copies is not None:
                    scratch.append(copies)
        slot_cos, slot_sin = self.rope.gather(slot_pos.clamp_(0, max_pos))
        chunk_cos, chunk_sin = self.rope.gather(position_ids)
        all_rows = rows == list(range(self.keys.shape[1]))
        heads = torch.arange(self.keys.shape[2], device=device)
        chunk_index = (rows_t[:, None, None], heads[None, :, None], chunk_slots[:, None, :])
        backup = None
        if tentative:  # [L, b, H, n, *] per stored tensor: a few slots, not the cache
            backup = [t[:, chunk_index[0], chunk_index[1], chunk_index[2]].clone()
                      for t in self.storage.tensors()]
        self._step = ForwardStep(rows_t, lengths, chunk_slots, chunk_tokens, slot_cos, slot_sin,
                                 chunk_cos, chunk_sin, all_rows, backup, incremental, chunk_index,
                                 inverse_rotation(chunk_cos, chunk_sin, self.rope.inv_scale2), scratch)
        self._step_ids = input_ids
        self.hooks.step_started(self._step)
        return position_ids, mask

    def _frames(self, rows: list[int], anchor: torch.Tensor, tentative: bool) -> tuple[torch.Tensor, bool]:
        """For a pass over `rows` whose re-numbering anchors are anchor [b, 1] (window start minus prefix
        slots): the drift of each row's frame [b, 1] (zeros without kept rotated keys), and whether the
        kept copy can be updated incrementally (every row's frame unchanged since its last pass)."""
        if not self.keep_rotated:
            return torch.zeros_like(anchor), False
        shift = anchor % self.frame_span if self.frame_span else torch.zeros_like(anchor)
        bases = (anchor - shift)[:, 0].tolist()
        incremental = not tentative and all(
            self._frame[r] == base for r, base in zip(rows, bases, strict=True))
        for r, base in zip(rows, bases, strict=True):
            self._frame[r] = base
        return shift, incremental

    def decode_equivalent_room(self, row: int, width: int | None = None) -> int:
        """Most tokens (1..chunk) one decode-equivalent pass (begin_step(decode_equivalent=True)) may feed
        `row` now, in a pass `width` tokens wide (default: as many as it feeds).

        A pass of n tokens evicts max(0, u + n - 1 - W) of the u window tokens before its last token
        (u = window_used). All of them must be old window tokens (n - 1 <= W). Those that a free sink slot
        or the hooks keep in place (`CacheHooks.evictions_kept_in_place`) cost nothing; with hooks that
        keep tokens (tiers) nothing else may happen before the last token (a tier merge is not
        reproducible in one pass). Hooks that drop tokens allow any number of drops, each distinct drop
        count needing one shifted copy of the S sinks in the ring slots the window and the pass leave
        free: S * drops + width <= ring - u.
        """
        window, u = self.config.window, self.window_used[row]
        kept = self.hooks.evictions_kept_in_place(row)
        in_place = window - u + self.sink_slots - self.sink_used[row] + (kept or 0) + 1  # n with no drop
        limit = min(self.config.chunk, window + 1)
        if kept is not None or self.sink_slots == 0:
            return min(limit, in_place) if kept is not None else limit
        if width is not None:  # drops = n - in_place for n > in_place
            fits = in_place + (self.ring_size - u - width) // self.sink_slots
        else:  # width = n: S * (n - in_place) + n <= ring - u
            fits = (self.ring_size - u + self.sink_slots * in_place) // (self.sink_slots + 1)
        return min(limit, max(in_place, fits))

    def _follow_decoding(self, i: int, row: int, n: int, length: int, window_index: torch.Tensor,
                         slot_pos: torch.Tensor, mask: torch.Tensor) -> ScratchSlots | None:
        """Make batch row i of a begun pass (n tokens wide, `length` real) decode-equivalent (see
        begin_step): window_index [N] is each slot's index in the old window; slot_pos [b, N] and the
        row's mask [n, N] are edited in place. Returns the scratch slots written, None if none were."""
        device = mask.device
        u, sink_room = self.window_used[row], self.sink_slots - self.sink_used[row]
        if self.hooks.evictions_kept_in_place(row) is not None:
            return None  # decode_equivalent_room allowed no eviction that is not kept in place
        query = torch.arange(n, device=device).clamp_(max=length - 1)  # padding queries copy the last
        evicted = (u + query - self.config.window).clamp_(min=0)  # before each query, one by one
        drops = (evicted - sink_room).clamp_(min=0)  # [n]
        shifts = int(drops[-1])
        if shifts == 0:
            return None
        # The sinks: the sink slots, then the oldest window tokens that will move into the free ones.
        seen = self.tokens_seen[row]
        on_the_way = seen - u + torch.arange(min(sink_room, u), device=device)
        anchors = torch.cat((torch.arange(self.sink_used[row], device=device),
                             self.ring_start + on_the_way % self.ring_size))  # [A]
        a = anchors.numel()
        free = self.ring_start + (seen + n + torch.arange(a * shifts, device=device)) % self.ring_size
        shift = torch.arange(1, shifts + 1, device=device).repeat_interleave(a)  # [A * shifts]
        source = anchors.repeat(shifts)
        saved = [t[:, row, :, free].clone() for t in self.storage.tensors()]
        self.storage.move(row, free, source)
        slot_pos[i, free] = slot_pos[i, source] + shift
        neg = torch.finfo(mask.dtype).min
        dropped = drops[:, None] > 0
        gone = (window_index[None, :] >= 0) & (window_index[None, :] < (drops + sink_room)[:, None])
        hidden = dropped & gone  # [n, N]: the sinks on their way and the dropped window tokens
        hidden[:, anchors] = dropped
        mask.masked_fill_(hidden, neg)
        mask[:, free] = torch.where(drops[:, None] == shift[None, :], 0.0, neg).to(mask.dtype)
        return ScratchSlots(row, free, saved)

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the chunk's keys/values [b, kv_heads, n, head_dim] (keys arrive rotated) and return
        all slots' keys (rotated to their slot positions) and values, [b, kv_heads, num_slots, head_dim]."""
        st = self._step
        if st is None:
            raise RuntimeError("SinkCache.update called outside begin_step/end_step")
        b = key_states.shape[0]
        raw = apply_rotation(key_states, *st.unrotate)  # position-free
        self.storage.put(layer_idx, st.chunk_index, raw, value_states)
        keys, values = self.storage.read(layer_idx, None if st.all_rows else st.rows)
        if not self.keep_rotated:
            return apply_rotation(keys, st.slot_cos, st.slot_sin, out=self.rotated_keys[:b]), values
        return self._update_kept(self.rotated_keys[layer_idx], keys, raw, st), values

    def _update_kept(self, kept: torch.Tensor, keys: torch.Tensor, raw: torch.Tensor,
                     st: ForwardStep) -> torch.Tensor:
        """Bring one layer's kept rotated keys kept [R, H, N, D] up to date for this pass from its stored
        keys [b, H, N, D] (compute dtype; raw [b, H, n, D] the chunk's, as put) and return the rows'
        rotated keys [b, H, N, D]."""
        b = keys.shape[0]
        if not st.incremental:  # every slot, from storage
            rotated = apply_rotation(keys, st.slot_cos, st.slot_sin, out=kept[:b] if st.all_rows else None)
            if not st.all_rows:
                kept.index_copy_(0, st.rows, rotated)
            return rotated
        p = self.ring_start
        if p:  # sinks and tiers move relative to the window: rotate them to this pass's positions
            prefix = apply_rotation(keys[:, :, :p], st.slot_cos[:, :, :p], st.slot_sin[:, :, :p],
                                    out=kept[:b, :, :p] if st.all_rows else None)
            if not st.all_rows:
                kept[:, :, :p].index_copy_(0, st.rows, prefix)
        if self.storage.converts:  # rotate what was stored (de-quantised), as a full rotation would
            raw = keys[(torch.arange(b, device=keys.device)[:, None, None], *st.chunk_index[1:])]
        kept.index_put_(st.chunk_index, apply_rotation(raw, st.chunk_cos, st.chunk_sin))
        return kept[:b] if st.all_rows else kept.index_select(0, st.rows)

    def end_step(self, keep: list[int] | None = None) -> None:
        """Commit the real chunk tokens into the window and evict what no longer fits.

        keep (tentative steps only): commit just the first keep[i] (1..lengths[i]) tokens of row i; the
        storage of the other chunk slots is restored, so the cache is as if only those tokens had been fed.
        """
        st = self._step
        if st is None:
            raise RuntimeError("end_step without begin_step")
        self._restore_scratch(st)
        if keep is not None:
            if st.backup is None:
                raise RuntimeError("end_step(keep=...) needs a tentative step")
            if not all(1 <= k <= n for k, n in zip(keep, st.lengths, strict=True)):
                raise ValueError(f"keep {keep} must be within 1..lengths {st.lengths}")
            self._restore_rejected(st, keep)
            st.lengths = list(keep)
        self.hooks.step_ending(st)
        for i, row in enumerate(st.rows.tolist()):
            n = st.lengths[i]
            slots = st.chunk_slots[i, :n]
            self.count[row, slots] = 1.0
            self.token_ids[row, slots] = self._step_ids[i, :n].to(self.token_ids.device)
            self.tokens_seen[row] += n
            self.window_used[row] += n
            overflow = self.window_used[row] - self.config.window
            if overflow > 0:
                self._evict_oldest(row, overflow)
        self._step = None

    def abort_step(self) -> None:
        """Forget a forward pass that failed: chunk slots were never counted, so nothing else changes
        (a tentative step also gets its chunk slots' storage back)."""
        st = self._step
        if st is not None:
            self._restore_scratch(st)
        if st is not None and st.backup is not None:
            self._restore_rejected(st, [0] * len(st.lengths))
        if st is not None:  # a failed pass may have left kept rotated keys half updated
            for row in st.rows.tolist():
                self._frame[row] = None
        self.hooks.step_aborted()
        self._step = None

    def _restore_rejected(self, st: ForwardStep, keep: list[int]) -> None:
        """Put back the saved storage of each row's chunk slots from keep[i] on."""
        heads = torch.arange(self.keys.shape[2], device=st.rows.device)
        for i, row in enumerate(st.rows.tolist()):
            k = keep[i]
            slots = st.chunk_slots[i, k:]
            for stored, saved in zip(self.storage.tensors(), st.backup, strict=True):
                stored[:, row, heads[:, None], slots[None, :]] = saved[:, i, :, k:]

    def _restore_scratch(self, st: ForwardStep) -> None:
        """Put back the storage of the ring slots that held shifted sinks during the pass."""
        for copies in st.scratch:
            for stored, saved in zip(self.storage.tensors(), copies.saved, strict=True):
                stored[:, copies.row, :, copies.slots] = saved
        st.scratch = []

    # ----------------------------------------------------------------- eviction
    def _evict_oldest(self, row: int, e: int) -> None:
        start = self.tokens_seen[row] - self.window_used[row]
        stream_index = torch.arange(start, start + e, device=self.count.device)
        slots = self.ring_start + stream_index % self.ring_size
        to_sinks = min(self.sink_slots - self.sink_used[row], e)
        if to_sinks > 0:
            dst = slice(self.sink_used[row], self.sink_used[row] + to_sinks)
            src = slots[:to_sinks]
            self.storage.move(row, dst, src)
            self.token_ids[row, dst] = self.token_ids[row, src]
            self.count[row, dst] = 1.0
            self.sink_used[row] += to_sinks
        if e > to_sinks:
            self.hooks.evicted(row, slots[to_sinks:])
        self.count[row, slots] = 0.0
        self.window_used[row] -= e

    def _ring_token_index(self, seen: torch.Tensor) -> torch.Tensor:
        """Stream index held by each ring slot [b, ring], for slots of the current window."""
        ring = torch.arange(self.ring_size, device=seen.device)
        # The newest token t-1 sits at slot (t-1) % ring; slot s holds the latest index <= t-1 with that
        # residue. Slots outside the window get indices < window_start and are masked by count == 0.
        last = seen[:, None] - 1
        return last - (last - ring[None, :]) % self.ring_size

    # ----------------------------------------------------------------- rows and bookkeeping
    def reset_row(self, row: int) -> None:
        """Empty one row (a new stream); other rows are untouched."""
        self.count[row] = 0.0
        self.token_ids[row] = 0
        self.tokens_seen[row] = self.sink_used[row] = self.window_used[row] = 0
        self._frame[row] = None

    def row_state(self, row: int) -> CacheRowState:
        """The row's state; its tensors are views of the cache's storage (clone them to keep them)."""
        st = self.storage
        scales = (st.key_scales[:, row], st.value_scales[:, row]) if st.quantized else (None, None)
        return CacheRowState(self.keys[:, row], self.values[:, row], self.count[row], self.token_ids[row],
                             self.tokens_seen[row], self.sink_used[row], self.window_used[row], *scales)

    def load_row_state(self, row: int, state: CacheRowState) -> None:
        """Overwrite the row with `state` (shapes and dtypes as `row_state` gives them)."""
        self.keys[:, row].copy_(state.keys)
        self.values[:, row].copy_(state.values)
        if self.storage.quantized:
            self.storage.key_scales[:, row].copy_(state.key_scales)
            self.storage.value_scales[:, row].copy_(state.value_scales)
        self.count[row].copy_(state.count)
        self.token_ids[row].copy_(state.token_ids)
        self.tokens_seen[row], self.sink_used[row] = state.tokens_seen, state.sink_used
        self.window_used[row] = state.window_used
        self._frame[row] = None  # kept rotated keys are rebuilt from the loaded storage

    def context_token_ids(self, row: int) -> torch.Tensor:
        """Ids of the plain tokens currently kept for `row` (sinks and window) [k], in slot order."""
        kept = self.count[row] == 1.0
        kept[self.sink_slots : self.ring_start] = False
        return self.token_ids[row, kept]

    def recent_token_ids(self, row: int, n: int) -> list[int]:
        """The last (up to) n ids of the stream on `row`, oldest first (stream order, unlike slot order
        once the ring wraps)."""
        seen, kept = self.tokens_seen[row], min(n, self.window_used[row])
        stream_index = torch.arange(seen - kept, seen, device=self.token_ids.device)
        return self.token_ids[row, self.ring_start + stream_index % self.ring_size].tolist()

    def used_slots(self, row: int) -> int:
        return int((self.count[row] > 0).sum())

    @property
    def nbytes(self) -> int:
        """Bytes of all preallocated storage; constant for the cache's lifetime."""
        bookkeeping = (self.rotated_keys, self.count, self.token_ids)
        return self.storage.nbytes + sum(t.nbytes for t in bookkeeping)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.used_slots(0)

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.num_slots
