"""Weight-residency options (`--offload`, `--resident-layers`, `--prefetch-depth`); no torch needed."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from sinkstream.core.config import ConfigError
from sinkstream.core.profiles import GivenOption

OFFLOAD_MODES = ("none", "cpu", "disk")


@dataclass(frozen=True)
class OffloadConfig:
    """Weight residency: `mode` none (all resident), cpu (layers in host memory) or disk (read lazily).

    resident_layers (K): decoder layers materialised on the compute device at most at once.
    prefetch_depth (D): layers loaded ahead of the running one; needs D + 1 <= K slots. 0 = synchronous.
    load_timeout_s: longest wait for one layer before giving up with OffloadError (nothing hangs).
    drop_file_cache: disk mode only; drop each read range from the OS file cache (models larger than RAM).
    """

    mode: str = "none"
    resident_layers: int = 2
    prefetch_depth: int = 1
    load_timeout_s: float = 600.0
    drop_file_cache: bool = False

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def validate(self, num_layers: int | None = None) -> None:
        """Raise ConfigError naming the first invalid field."""
        if self.mode not in OFFLOAD_MODES:
            raise ConfigError("offload", f"unknown mode {self.mode!r}; choose from {OFFLOAD_MODES}")
        if self.resident_layers < 1:
            raise ConfigError("resident_layers", f"must be >= 1, got {self.resident_layers}")
        if self.prefetch_depth < 0:
            raise ConfigError("prefetch_depth", f"must be >= 0, got {self.prefetch_depth}")
        if self.prefetch_depth >= self.resident_layers:
            raise ConfigError(
                "prefetch_depth",
                f"prefetch_depth {self.prefetch_depth} needs {self.prefetch_depth + 1} resident layer slots "
                f"(the running layer plus the ones loading ahead), got "
                f"resident_layers={self.resident_layers}",
            )
        if self.load_timeout_s <= 0:
            raise ConfigError("load_timeout_s", f"must be > 0, got {self.load_timeout_s}")
        if num_layers is not None and self.enabled and self.resident_layers > num_layers:
            raise ConfigError(
                "resident_layers",
                f"{self.resident_layers} exceeds the model's {num_layers} decoder layers; use offload "
                f"'none' to keep every layer resident",
            )


# The command-line option of each OffloadConfig field, so errors name what the user typed.
_OPTION_OF_FIELD = {"offload": "--offload", "resident_layers": "--resident-layers",
                    "prefetch_depth": "--prefetch-depth"}


def add_offload_options(parser: argparse.ArgumentParser) -> None:
    """--offload, --resident-layers and --prefetch-depth (shared by analyze, generate and serve)."""
    d = OffloadConfig()
    g = parser.add_argument_group("weight offloading")
    g.add_argument("--offload", choices=OFFLOAD_MODES, default=d.mode, action=GivenOption,
                   help="keep the decoder layers on disk (read as needed) or in host memory, only "
                        f"--resident-layers of them materialised at once (default {d.mode})")
    g.add_argument("--resident-layers", type=int, default=d.resident_layers, metavar="K",
                   help=f"decoder layers materialised at most at once, >= 1 (default {d.resident_layers})")
    g.add_argument("--prefetch-depth", type=int, default=d.prefetch_depth, metavar="D",
                   help="layers loaded ahead of the running one, 0 = synchronous; needs D < K "
                        f"(default {d.prefetch_depth})")


def offload_from_args(args: argparse.Namespace) -> OffloadConfig:
    """The OffloadConfig of the parsed options of `add_offload_options` (not validated)."""
    return OffloadConfig(mode=args.offload, resident_layers=args.resident_layers,
                         prefetch_depth=args.prefetch_depth)


def check_offload_options(args: argparse.Namespace) -> str | None:
    """A message naming the first invalid offload option, or None (for `parser.error`)."""
    try:
        offload_from_args(args).validate()
    except ConfigError as exc:
        return f"{_OPTION_OF_FIELD.get(exc.field, exc.field)}: {exc.message}"
    return None
