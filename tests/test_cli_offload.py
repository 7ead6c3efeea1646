"""`--offload`, `--resident-layers`, `--prefetch-depth` on the command line: same text as a resident run,
clear errors (no tracebacks) for bad values and broken checkpoints."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from sinkstream.clients.cli import main

GENERATE = ["generate", "--prompt", "Once upon a time", "--max-new-tokens", "40"]


def run_cli(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    return subprocess.run([sys.executable, "-m", "sinkstream", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=240)


def test_generate_disk_offloaded_matches_resident(model_dir, tmp_path):
    resident = run_cli(*GENERATE, "--model", str(model_dir), tmp_path=tmp_path)
    offloaded = run_cli(*GENERATE, "--model", str(model_dir), "--offload", "disk", "--resident-layers", "2",
                        "--prefetch-depth", "1", tmp_path=tmp_path)
    assert resident.returncode == 0, resident.stderr
    assert offloaded.returncode == 0, offloaded.stderr
    assert len(resident.stdout) > len("Once upon a time\n")
    assert offloaded.stdout == resident.stdout


IN_PROCESS = ["--model", "unused"]


@pytest.mark.parametrize(("options", "message"), [
    ([*IN_PROCESS, "--resident-layers", "0"], "--resident-layers: must be >= 1"),
    ([*IN_PROCESS, "--prefetch-depth", "-1"], "--prefetch-depth: must be >= 0"),
    ([*IN_PROCESS, "--resident-layers", "2", "--prefetch-depth", "2"],
     "--prefetch-depth: prefetch_depth 2 needs 3"),
    ([*IN_PROCESS, "--offload", "ssd"], "--offload: invalid choice"),
    (["--server", "localhost:1", "--offload", "disk"], "--offload disk runs the model in-process"),
])
def test_bad_offload_options_are_usage_errors(options, message, capsys):
    with pytest.raises(SystemExit) as info:  # argparse's error: usage line, message, exit code 2
        main([*GENERATE, *options])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_serve_rejects_bad_offload_options(capsys):
    from sinkstream.clients.cli.serve import serve_main  # imports torch

    with pytest.raises(SystemExit) as info:
        serve_main(["--model", "unused", "--offload", "disk", "--resident-layers", "1",
                    "--prefetch-depth", "1"])
    assert info.value.code == 2
    assert "--prefetch-depth: prefetch_depth 1 needs 2" in capsys.readouterr().err


def test_checkpoint_error_is_one_line(model_dir, tmp_path, capsys):
    folder = tmp_path / "no_weights"
    folder.mkdir()
    for f in model_dir.glob("*.json"):
        shutil.copy(f, folder)
    assert main([*GENERATE, "--model", str(folder), "--offload", "disk"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sinkstream: error: no safetensors checkpoint")


def test_chat_model_disk_offloaded_replies_as_resident(model_dir, tmp_path):
    def chat(*options: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"),
               "XDG_STATE_HOME": str(tmp_path / "state" / "-".join(options or ("resident",)))}
        return subprocess.run([sys.executable, "-m", "sinkstream", "chat", "--model", str(model_dir),
                               "--temperature", "0", "--max-new-tokens", "24", "--new", *options],
                              input="Once upon a time there was a cat.\n/quit\n", cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=240)

    resident, offloaded = chat(), chat("--offload", "disk", "--resident-layers", "2")
    assert resident.returncode == 0, resident.stderr
    assert offloaded.returncode == 0, offloaded.stderr
    reply = [line for line in resident.stdout.splitlines() if line.startswith("model>")]
    assert reply and len(reply[0]) > len("model> ")
    assert reply == [line for line in offloaded.stdout.splitlines() if line.startswith("model>")]


def test_chat_offload_without_model_is_a_clear_error(tmp_path):
    proc = run_cli("chat", "--server", "127.0.0.1:1", "--offload", "disk", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "--offload disk runs the model in this process" in proc.stderr
    assert "Traceback" not in proc.stderr
