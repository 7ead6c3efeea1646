"""--profile memory|balanced|long-context|throughput|auto (core.profiles) on the commands that run a model in
this process: the profile's settings are written into the parsed options, each flag the user gave winning.
Without --profile the options keep their defaults, as before profiles existed. Torch-free."""

from __future__ import annotations

import argparse
import sys

from sinkstream.core.config import ConfigError, TierSpec
from sinkstream.core.hardware_facts import machine_facts, trained_context
from sinkstream.core.profiles import GIVEN_OPTIONS, PROFILES, SETTING_NAMES, Resolution, RunSettings, resolve

PROFILE_SETTINGS_ATTR = "profile_settings"  # the resolved RunSettings, for settings a command has no flag of


def add_profile_option(p: argparse.ArgumentParser) -> None:
    """--profile NAME (default: none, every option at its own default)."""
    p.add_argument("--profile", choices=PROFILES, default=None,
                   help="set window, tiers, KV dtype, weights dtype, chunk, offloading and speculation "
                        "together (README: Profiles); auto picks one from the model size and free memory; "
                        "flags given explicitly win (with --model / serve only)")


def _explicit(args: argparse.Namespace) -> dict[str, object]:
    """Settings the user gave on the command line, in RunSettings' terms."""
    given = getattr(args, GIVEN_OPTIONS, set())
    explicit = {name: getattr(args, name) for name in SETTING_NAMES if name in given}
    if "tiers" in explicit:
        explicit["tiers"] = ",".join(map(str, explicit["tiers"]))
    return explicit


def _write(args: argparse.Namespace, settings: RunSettings) -> None:
    """Set every option of `args` a profile governs to its value in `settings` (options the command lacks
    are read from args.profile_settings)."""
    values = {name: getattr(settings, name) for name in SETTING_NAMES}
    values["tiers"] = TierSpec.parse(settings.tiers)
    values["kv_dtype"] = None if settings.kv_dtype == "model" else settings.kv_dtype
    for name, value in values.items():
        if hasattr(args, name):
            setattr(args, name, value)
    setattr(args, PROFILE_SETTINGS_ATTR, settings)


def apply_profile(args: argparse.Namespace) -> Resolution | None:
    """Apply args.profile to `args` (nothing without one); a profile's window is lowered to fit the trained
    context of a local model (core.profiles.fit_window). `auto` sizes args.model from its files and this
    machine's free memory and prints its choice and why on stderr. Raises ConfigError when auto cannot size
    the model."""
    if args.profile is None:
        return None
    facts = None
    if args.profile == "auto":
        facts = machine_facts(args.model)
        if facts is None:
            raise ConfigError("profile", f"auto needs a local .gguf file or safetensors folder to size the "
                                         f"model, got {args.model!r}; name a profile instead")
    resolution = resolve(args.profile, _explicit(args), facts, max_positions=trained_context(args.model))
    _write(args, resolution.settings)
    if args.profile == "auto":
        s = resolution.settings
        print(f"sinkstream: --profile auto chose {resolution.profile}: {resolution.reason}; "
              f"window {s.window}, tiers {s.tiers or 'none'}, chunk {s.chunk}, kv {s.kv_dtype}, "
              f"weights {s.weights_dtype}, offload {s.offload}, speculate {s.speculate}",
              file=sys.stderr, flush=True)
    return resolution
