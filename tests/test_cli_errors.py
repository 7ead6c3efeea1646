"""The CLI fails cleanly (issue 12, finding 5): every user error is one line on stderr starting
`sinkstream: error:` and a non-zero exit code (2 for usage errors, 1 for run failures), for analyze,
generate and chat, in-process and with --server; a failed generation exits non-zero."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from service_support import start_server

from sinkstream.clients.cli import main
from sinkstream.core.sampling import Sampler

UNREACHABLE = "127.0.0.1:1"


def run_cli(*args: str, tmp_path, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "XDG_STATE_HOME": str(tmp_path / "state")}
    env.pop("SINKSTREAM_SERVER", None)
    return subprocess.run([sys.executable, "-m", "sinkstream", *args], cwd=REPO_ROOT, env=env, input=stdin,
                          capture_output=True, text=True, timeout=240)


def assert_one_line_error(stderr: str, *fragments: str) -> str:
    """stderr is exactly one line, `sinkstream: error: ...` holding every fragment; returns it."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("sinkstream: error: "), stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr
    return lines[0]


@pytest.fixture(scope="module")
def server(model_dir):
    srv = start_server(model_dir)
    yield srv
    srv.stop()


@pytest.fixture
def document(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("Once upon a time there was a little dog.\n" * 20, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------- missing file
@pytest.mark.parametrize("mode", ["model", "server"])
def test_missing_file_is_one_line_and_exit_2(mode, model_dir, tmp_path):
    where = ["--model", str(model_dir)] if mode == "model" else ["--server", UNREACHABLE]
    missing = tmp_path / "no-such.txt"
    proc = run_cli("analyze", str(missing), *where, "--quiet", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, f"cannot read {missing}", "No such file or directory")


def test_a_folder_is_not_a_readable_file(model_dir, tmp_path):
    proc = run_cli("analyze", str(tmp_path), "--model", str(model_dir), "--quiet", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, f"cannot read {tmp_path}", "is a directory")


def test_unwritable_output_is_refused_before_any_work(model_dir, document, tmp_path):
    out = tmp_path / "no-such-dir" / "out.json"
    proc = run_cli("analyze", str(document), "--model", str(model_dir), "--quiet", "--json", str(out),
                   tmp_path=tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, f"cannot write {out}")
    assert proc.stdout == ""  # refused before any analysis was printed


# ---------------------------------------------------------------------------------------- non-UTF-8 input
@pytest.mark.parametrize("mode", ["model", "server"])
def test_non_utf8_bytes_are_analyzed_as_replacement_characters_with_a_warning(mode, model_dir, server,
                                                                              tmp_path):
    # Decision: analyze accepts any bytes; invalid UTF-8 is read as U+FFFD, and a warning says how much.
    good = "Once upon a time there was a little dog.\n" * 10
    raw = good.encode() + b"\xff\xfe bad \xc3(" + good.encode()
    path = tmp_path / "latin.txt"
    path.write_bytes(raw)
    replaced = tmp_path / "replaced.txt"
    replaced.write_text(raw.decode("utf-8", errors="replace"), encoding="utf-8")
    where = ["--model", str(model_dir)] if mode == "model" else ["--server", server.address]
    proc = run_cli("analyze", str(path), *where, "--quiet", "--json", str(tmp_path / "a.json"),
                   tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if line.startswith("sinkstream: warning:")]
    assert warning == [f"sinkstream: warning: {path} is not valid UTF-8: 3 invalid byte sequences "
                       f"(first at byte {len(good.encode())}) were read as U+FFFD"], proc.stderr
    same = run_cli("analyze", str(replaced), *where, "--quiet", "--json", str(tmp_path / "b.json"),
                   tmp_path=tmp_path)
    assert same.returncode == 0, same.stderr
    import json

    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert (a["tokens"], a["mean_nll"]) == (b["tokens"], b["mean_nll"])


# ---------------------------------------------------------------------------------------- model path
@pytest.mark.parametrize("command", [["analyze", "DOC"], ["generate", "--prompt", "Once"], ["chat"]])
def test_missing_model_path_says_model_not_found(command, document, tmp_path):
    missing = tmp_path / "models" / "nope"
    args = [str(document) if a == "DOC" else a for a in command]
    proc = run_cli(*args, "--model", str(missing), tmp_path=tmp_path, stdin="hello\n")
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, f"model not found: {missing} (no such folder or file; give a local "
                                       "model folder or a hub id)")
    assert "Repo id" not in proc.stderr


# ---------------------------------------------------------------------------------------- unreachable server
@pytest.mark.parametrize("command", [["analyze", "DOC"], ["generate", "--prompt", "Once"], ["chat"]])
def test_unreachable_server_is_one_line_and_exit_1(command, document, tmp_path):
    args = [str(document) if a == "DOC" else a for a in command]
    proc = run_cli(*args, "--server", UNREACHABLE, tmp_path=tmp_path, stdin="hello\n")
    assert proc.returncode == 1
    assert_one_line_error(proc.stderr, "UNAVAILABLE", f"no sinkstream server answers at {UNREACHABLE}")


def test_usage_errors_from_the_server_exit_2(server, document, tmp_path):
    proc = run_cli("analyze", str(document), "--server", server.address, "--window", "0", "--quiet",
                   tmp_path=tmp_path)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "INVALID_ARGUMENT", "window")


@pytest.mark.parametrize("where", [["--server", UNREACHABLE], ["--model", "unused"]])
def test_negative_cache_sizes_are_refused_by_the_parser(where, document, tmp_path):
    # Before: the client library failed to put -5 in the unsigned wire field, with a traceback.
    proc = run_cli("analyze", str(document), *where, "--window", "-5", tmp_path=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "sinkstream analyze: error: argument --window: expected a whole number >= 0, got -5"


# ---------------------------------------------------------------------------------------- failed generation
@pytest.fixture
def failing_sampler(monkeypatch):
    """Every sampling step fails, as a sampler fault would (in-process and in a ServerThread alike)."""
    def fail(self, logprobs, context_ids=None):
        raise RuntimeError("test: the sampler failed")

    monkeypatch.setattr(Sampler, "sample", fail)


def test_failed_generation_in_process_exits_1_without_traceback(failing_sampler, model_dir, capsys):
    code = main(["generate", "--model", str(model_dir), "--prompt", "Once", "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert code == 1
    assert_one_line_error(captured.err, "generation failed", "test: the sampler failed")
    assert captured.out == "Once\n"


def test_failed_generation_over_grpc_exits_1_not_0(failing_sampler, server, capsys):
    code = main(["generate", "--server", server.address, "--prompt", "Once", "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert code == 1
    assert_one_line_error(captured.err, "generation failed", "test: the sampler failed")


def test_failed_chat_reply_makes_chat_exit_1(failing_sampler, server, monkeypatch, tmp_path, capsys):
    import io

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    code = main(["chat", "--server", server.address, "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert code == 1
    assert_one_line_error(captured.err, "reply failed", "test: the sampler failed")
