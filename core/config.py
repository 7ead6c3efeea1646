"""Configuration of a stream's bounded state, validated before any memory is allocated."""

from __future__ import annotations

from dataclasses import dataclass, field

MERGE_POLICIES = ("mean", "attention", "heavy-hitters")
# How the cache stores keys and values (core.kv_quant): "model" is the model's own dtype.
KV_DTYPES = ("model", "float32", "bfloat16", "int8", "int4")
# How the Linear layers' weights are stored (core.weight_quant); "float32" leaves them as loaded.
WEIGHTS_DTYPES = ("float32", "bfloat16", "int8", "int4")


class ConfigError(ValueError):
    """A configuration value is invalid; `field` names the offending setting."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class TierSpec:
    """One memory tier: `slots` cache slots, each filled by merging `ratio` slots of the tier below."""

    slots: int
    ratio: int

    @staticmethod
    def parse(text: str) -> tuple[TierSpec, ...]:
        """Parse ``"32x4,16x4"`` into tiers (finest first). An empty string means no tiers."""
        tiers = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            slots, sep, ratio = part.lower().partition("x")
            if not sep or not slots.isdigit() or not ratio.isdigit():
                raise ConfigError("tiers", f"expected SLOTSxRATIO like 32x4, got {part!r}")
            tiers.append(TierSpec(int(slots), int(ratio)))
        return tuple(tiers)

    def __str__(self) -> str:
        return f"{self.slots}x{self.ratio}"


@dataclass(frozen=True)
class StreamConfig:
    """Shape of one stream's bounded cache.

    Slots, in position order: ``sink_tokens`` sinks, the tier slots (coarsest first), a window of the
    ``window`` most recent tokens, and room for one chunk of up to ``chunk`` new tokens per forward pass.
    ``kv_dtype`` is how keys and values are stored (see core.kv_quant). ``keep_rotated_keys`` keeps a
    second copy of the keys rotated to their positions between passes, so a pass rotates only the new and
    the sink/tier keys instead of every kept key (faster decode for one more key copy of memory; see
    core.sink_cache).
    """

    sink_tokens: int = 4
    window: int = 252
    chunk: int = 64
    tiers: tuple[TierSpec, ...] = field(default_factory=tuple)
    merge_policy: str = "mean"
    kv_dtype: str = "model"
    keep_rotated_keys: bool = False

    @property
    def tier_slots(self) -> int:
        return sum(t.slots for t in self.tiers)

    @property
    def cache_slots(self) -> int:
        """Slots that persist between forward passes: sinks + tiers + window."""
        return self.sink_tokens + self.tier_slots + self.window

    @property
    def max_positions(self) -> int:
        """Largest position id used plus one: every slot plus one chunk."""
        return self.cache_slots + self.chunk

    def validate(self, max_position_embeddings: int | None = None, *,
                 chunk_within_window: bool = False) -> None:
        """Raise ConfigError naming the first invalid field; return None when the config is usable.
        `chunk_within_window`: also require chunk <= window (the wire contract's rule; the engine itself
        runs a chunk larger than the window)."""
        if self.sink_tokens < 0:
            raise ConfigError("sink_tokens", f"must be >= 0, got {self.sink_tokens}")
        if self.window <= 0:
            raise ConfigError("window", f"must be > 0, got {self.window}")
        if self.chunk <= 0:
            raise ConfigError("chunk", f"must be > 0, got {self.chunk}")
        if chunk_within_window and self.chunk > self.window:
            raise ConfigError("chunk", f"must be at most window ({self.window}), got {self.chunk}")
        for i, tier in enumerate(self.tiers):
            if tier.slots <= 0:
                raise ConfigError("tiers", f"tier {i + 1} needs at least one slot, got {tier.slots}")
            if tier.ratio < 2:
                raise ConfigError("tiers", f"tier {i + 1} must merge >= 2 slots, got {tier.ratio}")
        if self.merge_policy not in MERGE_POLICIES:
            raise ConfigError(
                "merge_policy", f"unknown policy {self.merge_policy!r}; choose from {MERGE_POLICIES}"
            )
        if self.kv_dtype not in KV_DTYPES:
            raise ConfigError("kv_dtype", f"unknown KV dtype {self.kv_dtype!r}; choose from {KV_DTYPES}")
        if max_position_embeddings is not None and self.max_positions > max_position_embeddings:
            raise self._too_many_positions(max_position_embeddings)

    def _too_many_positions(self, limit: int) -> ConfigError:
        """The error for S + T + W + C > limit: names the largest part (lowering it is the likeliest fix;
        on a tie the window, then the chunk) and says how far window or chunk alone would have to drop."""
        parts = {"window": self.window, "chunk": self.chunk, "tiers": self.tier_slots,
                 "sink_tokens": self.sink_tokens}
        field = max(parts, key=parts.__getitem__)
        excess = self.max_positions - limit
        knobs = ("chunk", "window") if field == "chunk" else ("window", "chunk")
        fixes = [f"{name} to <= {parts[name] - excess}" for name in knobs if parts[name] > excess]
        return ConfigError(
            field,
            f"sink_tokens + tier slots + window + chunk = {self.sink_tokens} + {self.tier_slots} + "
            f"{self.window} + {self.chunk} = {self.max_positions} exceeds the model's trained "
            f"context (max_position_embeddings = {limit}) by {excess}"
            + (f": lower {' or '.join(fixes)}" if fixes else ""),
        )
