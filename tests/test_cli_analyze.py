"""`sinkstream analyze` as a user runs it: against a live server (summary, passages, JSON, CSV, PNG) and
in-process, which must agree with it."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from service_support import start_server

from sinkstream.clients.client import SinkStreamClient

CHUNK = 32
SHAPE = ["--sink-tokens", "4", "--window", "60", "--chunk", str(CHUNK)]
PASSAGES = ["--passages", "3", "--passage-tokens", "16"]


def run_cli(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    return subprocess.run([sys.executable, "-m", "sinkstream", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def server(model_dir):
    srv = start_server(model_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def document(sotu_path, tmp_path_factory):
    # Several lines and a non-ASCII character, so byte offsets, columns and line numbers are all exercised.
    text = "Caf\u00e9 notes\n" + sotu_path.read_text(encoding="utf-8")[:5000]
    path = tmp_path_factory.mktemp("doc") / "doc.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def remote_run(server, document, tmp_path_factory):
    out = tmp_path_factory.mktemp("remote")
    proc = run_cli("analyze", str(document), "--server", server.address, *SHAPE, *PASSAGES, "--quiet",
                   "--json", str(out / "r.json"), "--csv", str(out / "r.csv"), "--plot", str(out / "r.png"),
                   "--plot-size", "640x320", tmp_path=out)
    assert proc.returncode == 0, proc.stderr
    return proc, out


def test_remote_summary_counts_match_the_server(remote_run, server, document):
    proc, out = remote_run
    text = document.read_text(encoding="utf-8")
    with SinkStreamClient(server.address, timeout=60) as client:
        want_tokens = len(client.tokenize(text, add_bos=True))
    data = json.loads((out / "r.json").read_text())
    assert data["tokens"] == want_tokens
    assert f"tokens       {want_tokens:,}" in proc.stdout
    assert "perplexity" in proc.stdout and "most surprising passages" in proc.stdout
    assert math.isclose(data["perplexity"], math.exp(data["mean_nll"]), rel_tol=1e-9)
    rows = data["chunk_results"]
    assert len(rows) == math.ceil(want_tokens / CHUNK)
    assert [r["first_token"] for r in rows] == [i * CHUNK for i in range(len(rows))]
    assert sum(r["num_tokens"] for r in rows) == want_tokens == rows[-1]["tokens_seen"]
    assert max(r["cache_used"] for r in rows) == 4 + 60
    assert len(data["token_nll"]) == want_tokens and data["token_nll"][0] is None  # BOS: unscored

    with (out / "r.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    assert [int(r["num_tokens"]) for r in table] == [r["num_tokens"] for r in rows]
    assert math.isclose(float(table[3]["mean_nll"]), rows[3]["mean_nll"], rel_tol=1e-9)


def test_remote_passages_are_the_most_surprising_and_located(remote_run, document):
    _, out = remote_run
    data = json.loads((out / "r.json").read_text())
    nll = [math.nan if x is None else x for x in data["token_nll"]]
    raw = document.read_bytes()
    passages = data["passages"]
    assert len(passages) == 3
    for p in passages:
        window = [x for x in nll[p["token_start"]:p["token_end"]] if not math.isnan(x)]
        assert p["token_end"] - p["token_start"] == 16
        assert math.isclose(p["mean_nll"], sum(window) / len(window), rel_tol=1e-9)
        assert p["mean_nll"] > data["mean_nll"]
        # the located bytes are where the excerpt is, on the reported line and column
        located = raw[p["byte_start"]:p["byte_end"]].decode("utf-8")
        assert " ".join(located.split()) in p["excerpt"]
        line_start = raw.rfind(b"\n", 0, p["byte_start"]) + 1
        assert p["line"] == raw.count(b"\n", 0, p["byte_start"]) + 1
        assert p["column"] == len(raw[line_start:p["byte_start"]].decode("utf-8")) + 1
    assert [p["mean_nll"] for p in passages] == sorted((p["mean_nll"] for p in passages), reverse=True)
    spans = sorted((p["token_start"], p["token_end"]) for p in passages)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_remote_plot_is_a_png_of_the_requested_size(remote_run):
    import matplotlib.image

    _, out = remote_run
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(out / "r.png").shape[:2] == (320, 640)


def test_in_process_analyze_agrees_with_the_server(remote_run, document, model_dir, tmp_path):
    _, out = remote_run
    proc = run_cli("analyze", str(document), "--model", str(model_dir), *SHAPE, *PASSAGES, "--quiet",
                   "--json", str(tmp_path / "l.json"), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    local, remote = json.loads((tmp_path / "l.json").read_text()), json.loads((out / "r.json").read_text())
    assert local["tokens"] == remote["tokens"]
    assert math.isclose(local["mean_nll"], remote["mean_nll"], rel_tol=1e-5)
    strip = ("mean_nll",)
    assert ([{k: v for k, v in p.items() if k not in strip} for p in local["passages"]]
            == [{k: v for k, v in p.items() if k not in strip} for p in remote["passages"]])


def test_plot_size_is_validated_before_any_work(document, tmp_path):
    proc = run_cli("analyze", str(document), "--server", "127.0.0.1:1", "--plot", str(tmp_path / "x.png"),
                   "--plot-size", "big", tmp_path=tmp_path)
    assert proc.returncode == 2 and "--plot-size" in proc.stderr


@pytest.mark.parametrize("where", [["--server", "127.0.0.1:1"], ["--model", "unused"]])
def test_malformed_tiers_are_a_usage_error_in_process_and_remote(where, document, capsys):
    from sinkstream.clients.cli import main

    with pytest.raises(SystemExit) as info:  # argparse's error: usage line, message, exit code 2
        main(["analyze", str(document), *where, "--tiers", "32xfour"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --tiers: expected SLOTSxRATIO like 32x4, got '32xfour'" in err
    assert "Traceback" not in err


def test_serve_rejects_malformed_tiers(capsys):
    from sinkstream.clients.cli import main

    with pytest.raises(SystemExit) as info:
        main(["serve", "--model", "unused", "--tiers", "32xfour"])
    assert info.value.code == 2
    assert "argument --tiers: expected SLOTSxRATIO like 32x4, got '32xfour'" in capsys.readouterr().err
