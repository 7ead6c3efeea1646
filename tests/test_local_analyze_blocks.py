"""In-process `sinkstream analyze` reads files in blocks; block cuts must be invisible to tokenization.
Per-token results are read from the streamed --tokens-jsonl file (the summary keeps no per-token arrays)."""

from __future__ import annotations

import json
import math

import pytest

from sinkstream.clients.cli import build_parser, local_runner
from sinkstream.clients.cli.analysis_files import AnalysisFiles
from sinkstream.core.config import StreamConfig
from sinkstream.core.model_loading import load_model
from sinkstream.core.streaming import StreamingInference


@pytest.mark.parametrize("block_bytes", [997, 65536])
def test_file_read_in_blocks_gives_the_whole_texts_tokens_and_logprobs(model_dir, sotu_path, tmp_path,
                                                                        monkeypatch, block_bytes):
    # Several blocks of real text with multi-byte characters, some straddling the cuts.
    text = sotu_path.read_text(encoding="utf-8")[:12_000].replace("the ", "thé ").replace("and", "and 😀 ")
    doc = tmp_path / "doc.txt"
    doc.write_text(text, encoding="utf-8")
    monkeypatch.setattr(local_runner, "BLOCK_BYTES", block_bytes)
    out = tmp_path / "tokens.jsonl"
    args = build_parser().parse_args(["analyze", str(doc), "--model", str(model_dir), "--window", "60",
                                      "--chunk", "16", "--quiet", "--tokens-jsonl", str(out)])
    with AnalysisFiles(args) as files:
        local_runner.analyze(args, files.add)
    tokens = [json.loads(line) for line in out.read_text().splitlines()]
    assert [t["token"] for t in tokens] == list(range(len(tokens)))

    loaded = load_model(model_dir)
    ids = loaded.tokenizer(text)["input_ids"]
    assert [t["id"] for t in tokens] == ids
    engine = StreamingInference(loaded.model, StreamConfig(sink_tokens=4, window=60, chunk=16))
    row = engine.open_row()
    expected = [-lp for r in engine.append(row, ids) for lp in r.logprobs.tolist()]
    got = [math.nan if t["nll"] is None else t["nll"] for t in tokens]
    assert len(got) == len(expected)
    assert all(a == b or (math.isnan(a) and math.isnan(b)) for a, b in zip(got, expected, strict=True))
