"""Named profiles (`--profile`): window, tiers, KV dtype, weights dtype, chunk, offloading and speculation set
together, explicit flags winning over the profile's values; ``auto`` picks a profile from hardware facts.

Torch-free (the command line imports it to parse its options). `resolve` and `choose_profile` are pure
functions of their arguments; the facts of this machine come from core.hardware_facts.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace

from sinkstream.core.config import ConfigError, TierSpec

GIVEN_OPTIONS = "given_options"  # attribute of a parsed Namespace: the dests the user gave (GivenOption)
PROFILES = ("memory", "balanced", "long-context", "throughput", "auto")
GIB = 1 << 30


@dataclass(frozen=True)
class RunSettings:
    """What a profile sets. `tiers` is a spec like ``"32x4,16x4"`` ("" = none); `kv_dtype` ``model`` = the
    model's dtype; `weights_dtype` ``float32`` = weights as loaded; `offload` none/cpu/disk; `speculate` =
    draft tokens verified per pass with `generate` (0 = off); `keep_rotated_keys` keeps the keys rotated
    between passes (StreamConfig.keep_rotated_keys)."""

    sink_tokens: int
    window: int
    chunk: int
    tiers: str
    kv_dtype: str
    weights_dtype: str
    offload: str
    speculate: int
    keep_rotated_keys: bool = False


SETTING_NAMES = tuple(f.name for f in fields(RunSettings))

# No profile: the defaults every command had before profiles existed.
DEFAULTS = RunSettings(sink_tokens=4, window=252, chunk=64, tiers="", kv_dtype="model",
                       weights_dtype="float32", offload="none", speculate=0)

PROFILE_SETTINGS = {
    # Least memory per session and per model: a short window, int8 cache, int4 weights.
    "memory": RunSettings(sink_tokens=4, window=124, chunk=32, tiers="", kv_dtype="int8",
                          weights_dtype="int4", offload="none", speculate=0),
    # Today's cache shape with an int8 cache and int8 weights (NLL within 0.1% of float32's).
    "balanced": RunSettings(sink_tokens=4, window=252, chunk=64, tiers="", kv_dtype="int8",
                            weights_dtype="int8", offload="none", speculate=0),
    # A 4x window plus two tiers of merged older tokens, in about the KV bytes of a float32 default window.
    "long-context": RunSettings(sink_tokens=4, window=1020, chunk=64, tiers="64x4,32x16", kv_dtype="int8",
                                weights_dtype="int8", offload="none", speculate=0),
    # Fastest tokens: the model's own KV dtype (no de-quantisation), int4 weights (least bandwidth per
    # decoded token), larger prefill chunks, prompt-lookup speculation, keys kept rotated between passes.
    "throughput": RunSettings(sink_tokens=4, window=252, chunk=128, tiers="", kv_dtype="model",
                              weights_dtype="int4", offload="none", speculate=4, keep_rotated_keys=True),
}


@dataclass(frozen=True)
class HardwareFacts:
    """What `auto` decides from: the model's float32 weight bytes (parameters x 4), the memory available
    to this process, the device the model runs on ("cpu", "cuda", ...)."""

    model_bytes: int
    free_memory_bytes: int
    device: str = "cpu"


@dataclass(frozen=True)
class Resolution:
    """The settings a run uses, the profile they came from (None: no profile) and, for auto, why."""

    settings: RunSettings
    profile: str | None
    reason: str = ""


def choose_profile(facts: HardwareFacts) -> tuple[str, dict[str, object], str]:
    """auto's choice: (profile, settings it changes on top of the profile, reason).

    - not a CPU: throughput with float32 weights (the packed int8/int4 kernels are CPU kernels);
    - the float32 model exceeds free memory: memory with disk offloading and weights as loaded (offloaded
      layers stream from the checkpoint as stored, so they cannot be quantised);
    - the float32 model takes more than a quarter of free memory: memory (int4 weights take ~1/7);
    - it takes less than 2%: long-context (memory to spare for a 4x window and tiers);
    - otherwise: balanced.
    """
    share = facts.model_bytes / max(facts.free_memory_bytes, 1)
    sizes = f"model {facts.model_bytes / GIB:.2f} GiB float32, {facts.free_memory_bytes / GIB:.2f} GiB free"
    if facts.device != "cpu":
        return "throughput", {"weights_dtype": "float32"}, (
            f"device {facts.device}: throughput, weights float32 (the int8/int4 kernels are CPU kernels)")
    if share > 1:
        return "memory", {"weights_dtype": "float32", "offload": "disk"}, (
            f"{sizes}: the model does not fit, so memory with its layers offloaded to disk")
    if share > 0.25:
        return "memory", {}, f"{sizes} ({share:.0%} of it): memory, int4 weights"
    if share < 0.02:
        return "long-context", {}, f"{sizes} ({share:.1%} of it): memory to spare, long-context"
    return "balanced", {}, f"{sizes} ({share:.0%} of it): balanced"


def fit_window(settings: RunSettings, max_positions: int) -> RunSettings:
    """`settings` with the window lowered so that sinks + tier slots + window + chunk fit a model trained
    on `max_positions` positions (unchanged if they already fit or nothing would be left of the window)."""
    tier_slots = sum(t.slots for t in TierSpec.parse(settings.tiers))
    room = max_positions - settings.sink_tokens - tier_slots - settings.chunk
    return replace(settings, window=room) if 0 < room < settings.window else settings


def resolve(profile: str | None, explicit: dict[str, object], facts: HardwareFacts | None = None,
            max_positions: int | None = None) -> Resolution:
    """The settings of `profile` (None: DEFAULTS) with `explicit` values (setting name -> value the user
    gave; None values are ignored) on top. ``auto`` needs `facts`. With `max_positions` (the model's
    trained context) a profile's window is lowered to fit it (fit_window) unless the window was given.
    Raises ConfigError for an unknown profile or setting name."""
    unknown = set(explicit) - set(SETTING_NAMES)
    if unknown:
        raise ConfigError("profile", f"unknown settings {sorted(unknown)}; a profile sets {SETTING_NAMES}")
    reason = ""
    if profile is None:
        settings = DEFAULTS
    elif profile == "auto":
        if facts is None:
            raise ConfigError("profile", "auto needs the hardware facts (model size, free memory, device)")
        profile, changes, reason = choose_profile(facts)
        settings = replace(PROFILE_SETTINGS[profile], **changes)
    elif profile in PROFILE_SETTINGS:
        settings = PROFILE_SETTINGS[profile]
    else:
        raise ConfigError("profile", f"unknown profile {profile!r}; choose from {PROFILES}")
    given = {k: v for k, v in explicit.items() if v is not None}
    settings = replace(settings, **given)
    if profile is not None and max_positions is not None and "window" not in given:
        settings = fit_window(settings, max_positions)
    return Resolution(settings=settings, profile=profile, reason=reason)


class GivenOption(argparse.Action):
    """argparse action storing the value like "store" and recording its dest in the namespace's
    GIVEN_OPTIONS set, so a profile can tell a flag the user gave from a default (explicit flags win)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        setattr(namespace, GIVEN_OPTIONS, {*getattr(namespace, GIVEN_OPTIONS, ()), self.dest})
