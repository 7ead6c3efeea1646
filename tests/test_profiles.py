"""--profile (core.profiles, clients/cli/profile_options): each profile resolves to the values the README
documents, explicit flags win, no profile keeps every default, auto's choice follows the facts it is given,
and bad input is a clear usage error."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from test_cli_generate import PROMPT, REFERENCE_NEW_TOKENS, run_generate, run_generate_against_server
from test_core_streaming import REFERENCE_CONTINUATION

from sinkstream.clients.cli.main import build_parser
from sinkstream.clients.cli.profile_options import apply_profile
from sinkstream.core.config import ConfigError, StreamConfig, TierSpec
from sinkstream.core.offload.config import OffloadConfig
from sinkstream.core.profiles import DEFAULTS, PROFILES, HardwareFacts, RunSettings, choose_profile, resolve

GIB = 1 << 30
# The README's table of profiles (section "Profiles"), written out independently of core.profiles.
DOCUMENTED = {
    "memory": dict(sink_tokens=4, window=124, chunk=32, tiers="", kv_dtype="int8", weights_dtype="int4",
                   offload="none", speculate=0),
    "balanced": dict(sink_tokens=4, window=252, chunk=64, tiers="", kv_dtype="int8", weights_dtype="int8",
                     offload="none", speculate=0),
    "long-context": dict(sink_tokens=4, window=1020, chunk=64, tiers="64x4,32x16", kv_dtype="int8",
                         weights_dtype="int8", offload="none", speculate=0),
    "throughput": dict(sink_tokens=4, window=252, chunk=128, tiers="", kv_dtype="model", weights_dtype="int4",
                       offload="none", speculate=4, keep_rotated_keys=True),
}


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_each_profile_resolves_to_its_documented_values(name):
    resolution = resolve(name, {})
    assert resolution.settings == RunSettings(**DOCUMENTED[name])
    assert resolution.profile == name
    StreamConfig(sink_tokens=resolution.settings.sink_tokens, window=resolution.settings.window,
                 chunk=resolution.settings.chunk, tiers=TierSpec.parse(resolution.settings.tiers),
                 kv_dtype=resolution.settings.kv_dtype).validate(8192)  # a valid cache for SmolLM2


def test_no_profile_is_every_default_of_before():
    d = StreamConfig()
    assert resolve(None, {}).settings == RunSettings(
        sink_tokens=d.sink_tokens, window=d.window, chunk=d.chunk, tiers="", kv_dtype=d.kv_dtype,
        weights_dtype="float32", offload=OffloadConfig().mode, speculate=0,
        keep_rotated_keys=d.keep_rotated_keys)
    assert resolve(None, {}).settings == DEFAULTS


def test_explicit_values_override_the_profile():
    s = resolve("memory", {"window": 60, "kv_dtype": "float32", "chunk": None}).settings
    assert s == RunSettings(**{**DOCUMENTED["memory"], "window": 60, "kv_dtype": "float32"})


@pytest.mark.parametrize(("facts", "profile", "changes"), [
    (HardwareFacts(model_bytes=538_000_000, free_memory_bytes=20 * GIB), "balanced", {}),  # 2.5%
    (HardwareFacts(model_bytes=1_200_000, free_memory_bytes=20 * GIB), "long-context", {}),
    (HardwareFacts(model_bytes=3 * GIB, free_memory_bytes=4 * GIB), "memory", {}),
    (HardwareFacts(model_bytes=30 * GIB, free_memory_bytes=16 * GIB), "memory",
     {"weights_dtype": "float32", "offload": "disk"}),
    (HardwareFacts(model_bytes=538_000_000, free_memory_bytes=20 * GIB, device="cuda"), "throughput",
     {"weights_dtype": "float32"}),
])
def test_auto_chooses_from_the_facts(facts, profile, changes):
    name, got_changes, reason = choose_profile(facts)
    assert (name, got_changes) == (profile, changes) and reason
    resolution = resolve("auto", {"window": 100}, facts)
    expected = {**DOCUMENTED[profile], **changes, "window": 100}
    assert resolution.profile == profile and resolution.settings == RunSettings(**expected)
    assert resolution.reason == reason


def test_a_profile_window_fits_the_trained_context():
    """stories260K (512 positions): long-context's window drops to 512 - 4 - 96 - 64 = 348, unless given."""
    assert resolve("long-context", {}, max_positions=512).settings.window == 348
    assert resolve("long-context", {}, max_positions=8192).settings.window == 1020
    assert resolve("long-context", {"window": 1020}, max_positions=512).settings.window == 1020
    assert resolve(None, {}, max_positions=64).settings == DEFAULTS  # no profile: nothing changes


def test_bad_profiles_are_refused():
    with pytest.raises(ConfigError, match="unknown profile 'fast'"):
        resolve("fast", {})
    with pytest.raises(ConfigError, match="auto needs the hardware facts"):
        resolve("auto", {})
    with pytest.raises(ConfigError, match="unknown settings"):
        resolve("memory", {"windows": 3})
    assert set(PROFILES) == {*DOCUMENTED, "auto"}


def parse(*argv: str):
    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "x", *argv])
    apply_profile(args)
    return args


def test_cli_options_take_the_profile_and_explicit_flags_win():
    plain = parse()
    assert (plain.window, plain.chunk, plain.tiers, plain.kv_dtype, plain.weights_dtype, plain.offload,
            plain.speculate) == (252, 64, (), None, None, "none", 0)
    args = parse("--profile", "long-context", "--chunk", "64", "--window", "500", "--weights-dtype", "int4")
    assert (args.window, args.chunk, args.tiers, args.kv_dtype, args.weights_dtype, args.speculate) == (
        500, 64, TierSpec.parse("64x4,32x16"), "int8", "int4", 0)
    args = parse("--profile", "throughput", "--speculate", "0", "--kv-dtype", "bfloat16")
    assert (args.chunk, args.speculate, args.kv_dtype, args.weights_dtype) == (128, 0, "bfloat16", "int4")
    assert args.keep_rotated_keys is True and plain.keep_rotated_keys is False
    assert parse("--profile", "throughput", "--keep-rotated-keys", "off").keep_rotated_keys is False
    assert parse("--keep-rotated-keys", "on").keep_rotated_keys is True
    # a flag given with its default value still wins
    assert parse("--profile", "memory", "--window", "252", "--offload", "none").window == 252


def test_serve_profile_sets_the_session_defaults():
    from sinkstream.clients.cli.serve import build_parser as serve_parser
    from sinkstream.clients.cli.serve import config_from_args

    args = serve_parser().parse_args(["--model", "m", "--profile", "long-context", "--sink-tokens", "8"])
    apply_profile(args)
    d = config_from_args(args).defaults
    tiers = TierSpec.parse("64x4,32x16")
    assert (d.sink_tokens, d.window, d.chunk, d.tiers, d.kv_dtype) == (8, 1020, 64, tiers, "int8")
    assert args.weights_dtype == "int8"
    args = serve_parser().parse_args(["--model", "m", "--profile", "throughput"])
    apply_profile(args)
    assert config_from_args(args).defaults.keep_rotated_keys is True


def test_serve_and_chat_take_speculate_from_the_profile_and_the_flag_wins():
    from sinkstream.clients.cli.serve import build_parser as serve_parser
    from sinkstream.clients.cli.serve import config_from_args

    def serve(*argv: str) -> int:
        args = serve_parser().parse_args(["--model", "m", *argv])
        apply_profile(args)
        return config_from_args(args).speculate

    def chat(*argv: str) -> int:
        args = build_parser().parse_args(["chat", "--model", "m", *argv])
        apply_profile(args)
        return args.speculate

    for command in (serve, chat):
        assert (command(), command("--speculate", "3"), command("--profile", "throughput"),
                command("--profile", "throughput", "--speculate", "0"), command("--profile", "memory")) == (
            0, 3, 4, 0, 0), command.__name__


def test_generate_with_profiles(model_dir, tmp_path):
    """balanced (int8 weights and cache) prints the published continuation; auto says what it chose."""
    proc = run_generate(model_dir, PROMPT, REFERENCE_NEW_TOKENS, tmp_path, "--profile", "balanced")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == REFERENCE_CONTINUATION + "\n"
    proc = run_generate(model_dir, PROMPT, 8, tmp_path, "--profile", "auto")
    assert proc.returncode == 0, proc.stderr
    assert "--profile auto chose long-context: model 0.00 GiB float32" in proc.stderr  # 1.2 MB model
    assert "window 348, tiers 64x4,32x16" in proc.stderr  # fitted to its 512 trained positions
    assert proc.stdout.startswith("Once upon a time, there was a little girl")


def test_cli_refuses_bad_profile_uses(model_dir, tmp_path):
    proc = run_generate(model_dir, PROMPT, 4, tmp_path, "--profile", "fast")
    assert proc.returncode == 2 and "invalid choice: 'fast'" in proc.stderr
    remote = run_generate_against_server("--profile", "memory")
    assert remote.returncode == 2 and "configures a model run in this process" in remote.stderr
    hub = subprocess.run([sys.executable, "-m", "sinkstream", "generate", "--model", "nobody/nothing",
                          "--prompt", "x", "--profile", "auto"], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120)
    assert hub.returncode == 2 and "auto needs a local .gguf file or safetensors folder" in hub.stderr
