"""`sinkstream generate --model` as a user runs it (in-process): greedy output on stories260K is the
continuation published with the checkpoint (../shared/models/README.md), printed exactly."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO_ROOT
from test_core_streaming import REFERENCE_CONTINUATION

PROMPT = "Once upon a time"
REFERENCE_NEW_TOKENS = 57  # tokens of REFERENCE_CONTINUATION after the prompt's 5 (BOS included)


def run_generate(model_dir, prompt: str, max_new_tokens: int, tmp_path,
                 *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    env.pop("SINKSTREAM_SERVER", None)  # --model wins anyway; keep the run independent of the caller's env
    args = ["generate", "--model", str(model_dir), "--prompt", prompt,
            "--max-new-tokens", str(max_new_tokens), *extra]
    return subprocess.run([sys.executable, "-m", "sinkstream", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=240)


def run_generate_against_server(*extra: str) -> subprocess.CompletedProcess:
    """`generate --server` at a closed port with `extra` options (for options refused before connecting)."""
    return subprocess.run([sys.executable, "-m", "sinkstream", "generate", "--server", "127.0.0.1:9",
                           "--prompt", "x", *extra], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)


def test_greedy_prints_the_published_continuation(model_dir, tmp_path):
    proc = run_generate(model_dir, PROMPT, REFERENCE_NEW_TOKENS, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == REFERENCE_CONTINUATION + "\n"


def test_prompt_ending_in_a_word_keeps_the_next_words_space(model_dir, tmp_path):
    proc = run_generate(model_dir, "Once upon a time, there", 9, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Once upon a time, there was a little girl named Lily.\n"


def test_speculative_and_int8_cache_runs_print_the_published_continuation(model_dir, tmp_path):
    """--speculate 4 (prompt-lookup drafts verified per pass) gives plain greedy's output; so does an
    int8 KV cache on this short continuation."""
    for extra in (("--speculate", "4"), ("--speculate", "4", "--kv-dtype", "int8")):
        proc = run_generate(model_dir, PROMPT, REFERENCE_NEW_TOKENS, tmp_path, *extra)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == REFERENCE_CONTINUATION + "\n", extra


def test_kept_rotated_keys_print_what_rotating_every_pass_prints(model_dir, tmp_path):
    """--keep-rotated-keys on: the published continuation with the default window, and the same text as
    without it when a 24-token window slides (and its frame wraps) many times over a long continuation."""
    proc = run_generate(model_dir, PROMPT, REFERENCE_NEW_TOKENS, tmp_path, "--keep-rotated-keys", "on")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == REFERENCE_CONTINUATION + "\n"
    small = ("--window", "24", "--chunk", "8")
    plain = run_generate(model_dir, PROMPT, 150, tmp_path, *small)
    kept = run_generate(model_dir, PROMPT, 150, tmp_path, *small, "--keep-rotated-keys", "on")
    assert plain.returncode == kept.returncode == 0, kept.stderr
    assert kept.stdout == plain.stdout and len(plain.stdout) > 300
    bad = run_generate(model_dir, PROMPT, 5, tmp_path, "--keep-rotated-keys", "yes")
    assert bad.returncode == 2 and "expected on or off" in bad.stderr
