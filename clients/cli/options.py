"""Command-line options shared by several commands: the server address, the bounded cache's shape, and
weight offloading. Each flag is defined once here; the torch-free core modules supply the defaults, the
merge policies and the one parser of tier specs, so every command and both ends agree on them."""

from __future__ import annotations

import argparse
import os

from sinkstream.clients.resume import ResumePolicy
from sinkstream.core.config import (  # torch-free
    KV_DTYPES,
    MERGE_POLICIES,
    WEIGHTS_DTYPES,
    ConfigError,
    StreamConfig,
    TierSpec,
)
from sinkstream.core.offload.config import add_offload_options, check_offload_options  # torch-free
from sinkstream.core.profiles import GivenOption  # torch-free

__all__ = ["CACHE_SHAPE_OPTIONS", "MODEL_DTYPES", "add_cache_shape_options", "add_dtype_option",
           "add_kv_dtype_option", "add_offload_options", "add_server_option", "add_speculate_option",
           "add_weights_dtype_option", "check_offload_options", "connection_options", "count",
           "resume_policy", "tier_specs"]

DEFAULT_SERVER = os.environ.get("SINKSTREAM_SERVER")
CACHE_SHAPE_OPTIONS = ("sink_tokens", "window", "chunk", "tiers", "merge_policy")
MODEL_DTYPES = ("float32", "bfloat16")  # names of torch dtypes (this module stays torch-free)


def add_server_option(p: argparse.ArgumentParser, help_text: str | None = None) -> None:
    """--server HOST:PORT, defaulting to $SINKSTREAM_SERVER, the connection's --token and --tls-*, and
    --resume-timeout."""
    p.add_argument("--server", default=DEFAULT_SERVER, help=help_text or "host:port of a sinkstream server "
                   "(default $SINKSTREAM_SERVER); --model wins if given")
    p.add_argument("--token", default=os.environ.get("SINKSTREAM_TOKEN"),
                   help="bearer token for a server with --auth-tokens (default $SINKSTREAM_TOKEN)")
    p.add_argument("--tls-ca", default=os.environ.get("SINKSTREAM_TLS_CA"), metavar="PEM",
                   help="connect with TLS; the server's certificate must chain to this CA "
                        "(default $SINKSTREAM_TLS_CA)")
    p.add_argument("--tls-cert", default=os.environ.get("SINKSTREAM_TLS_CERT"), metavar="PEM",
                   help="client certificate for a server with --tls-client-ca (default $SINKSTREAM_TLS_CERT)")
    p.add_argument("--tls-key", default=os.environ.get("SINKSTREAM_TLS_KEY"), metavar="PEM",
                   help="key of --tls-cert (default $SINKSTREAM_TLS_KEY)")
    p.add_argument("--resume-timeout", type=seconds, default=60.0, metavar="SECONDS",
                   help="when the server fails mid-session (restart, crash, a proxy losing its backend), "
                   "keep trying this long to resume the session and re-send what it had not acknowledged "
                   "(default 60; 0 = fail at once)")


def connection_options(args: argparse.Namespace) -> dict[str, str | None]:
    """The keyword arguments of SinkStreamClient that --token and the --tls-* options give."""
    return {"token": args.token, "tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}


def resume_policy(args: argparse.Namespace) -> ResumePolicy:
    """How the command's sessions resume after a server failure (--resume-timeout)."""
    return ResumePolicy(resume_timeout_s=args.resume_timeout)


def seconds(text: str) -> float:
    """argparse type of a duration that cannot be negative."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text}")
    return value


def add_dtype_option(p: argparse.ArgumentParser) -> None:
    """--dtype: the dtype the model's weights are loaded (a GGUF file's de-quantised) in (--model only)."""
    p.add_argument("--dtype", choices=MODEL_DTYPES, default=MODEL_DTYPES[0],
                   help="weights dtype with --model; a .gguf file is de-quantised to it "
                        f"(default {MODEL_DTYPES[0]})")


def on_off(text: str) -> bool:
    """argparse type of an on|off option."""
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def add_kv_dtype_option(p: argparse.ArgumentParser) -> None:
    """--kv-dtype: how the KV cache stores keys and values (core.kv_quant); None = the model's dtype.
    --keep-rotated-keys: keep a rotated copy of the keys between passes (StreamConfig.keep_rotated_keys)."""
    p.add_argument("--kv-dtype", choices=KV_DTYPES[1:], default=None, action=GivenOption,
                   help="KV cache storage: float32, bfloat16, int8 (per-token scales) or int4 (scale and "
                        "minimum per 32 values), de-quantised for attention; default: the model's dtype "
                        "(in-process and serve only)")
    p.add_argument("--keep-rotated-keys", type=on_off, default=False, action=GivenOption, metavar="on|off",
                   help="keep the keys rotated between passes, so decoding rotates only new keys: faster "
                        "tokens for one more copy of the keys in memory (default off; in-process and serve "
                        "only)")


def add_weights_dtype_option(p: argparse.ArgumentParser) -> None:
    """--weights-dtype: how the Linear layers' weights are stored (core.weight_quant); None = as loaded."""
    p.add_argument("--weights-dtype", choices=WEIGHTS_DTYPES, default=None, action=GivenOption,
                   help="Linear weights: float32 (as loaded), bfloat16, int8 (per-channel) or int4 (groups "
                        "of 32), run by torch's packed CPU kernels (with --model / serve only)")


def add_speculate_option(p: argparse.ArgumentParser, where: str) -> None:
    """--speculate N: speculative decoding (core.speculative), `where` it applies (for the help)."""
    p.add_argument("--speculate", type=count, default=0, metavar="N", action=GivenOption,
                   help="speculative decoding: verify up to N prompt-lookup draft tokens per forward pass, "
                        f"same greedy output (0 = off; {where})")


def tier_specs(text: str) -> tuple[TierSpec, ...]:
    """argparse type of --tiers: ``"32x4,16x4"`` -> tiers, finest first ("" = none). A malformed spec is a
    usage error (exit 2) whether the cache is built in this process, by `serve` or by a remote server."""
    try:
        return TierSpec.parse(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def count(text: str) -> int:
    """argparse type of a size that cannot be negative (the wire carries it unsigned)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value}")
    return value


def add_cache_shape_options(p: argparse.ArgumentParser, title: str = "bounded cache",
                            names: tuple[str, ...] = CACHE_SHAPE_OPTIONS,
                            server_default: bool = False) -> None:
    """The bounded cache's shape: --sink-tokens, --window, --chunk, --tiers, --merge-policy (the subset
    `names` of CACHE_SHAPE_OPTIONS). server_default: leave unset options to the server (value None)."""
    d = StreamConfig()

    def default(value: object) -> object:
        return None if server_default else value

    def note(value: object) -> str:
        return "default: server's" if server_default else f"default {value}"

    options = {
        "sink_tokens": ("--sink-tokens", dict(type=count, default=default(d.sink_tokens),
                                              help=f"attention-sink tokens kept ({note(d.sink_tokens)})")),
        "window": ("--window", dict(type=count, default=default(d.window),
                                    help=f"recent tokens kept ({note(d.window)})")),
        "chunk": ("--chunk", dict(type=count, default=default(d.chunk),
                                  help=f"tokens per forward pass ({note(d.chunk)})")),
        "tiers": ("--tiers", dict(type=tier_specs, default=default(""),
                                  help=f"memory tiers, e.g. 32x4,16x4 ({note('none')})")),
        "merge_policy": ("--merge-policy", dict(default=default(d.merge_policy), choices=MERGE_POLICIES,
                                                help=f"how evicted tokens merge into tiers "
                                                     f"({note(d.merge_policy)})")),
    }
    group = p.add_argument_group(title)
    for name in names:
        flag, kwargs = options[name]
        group.add_argument(flag, action=GivenOption, **kwargs)  # recorded: it overrides a --profile
