"""The files `sinkstream analyze` writes, streamed as chunk results arrive so memory stays flat whatever
the document's length:

- --csv: one row per chunk (columns analysis.CSV_FIELDS), written as each chunk arrives;
- --tokens-jsonl: one JSON object per token, {"token": offset, "id": id or null, "nll": nats or null};
- --json: the summary and passages, then `chunk_results` (one object per chunk) and `token_nll` (per-token
  NLL, null = unscored), the same document as before; the two long arrays are spooled to temporary files
  beside it while the run goes and joined to the summary at the end.
Every file is opened before any work, so a path that cannot be written is a usage error up front."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import IO

from sinkstream.clients.analysis import CSV_FIELDS, AnalysisSummary, ChunkRow, none_if_nan
from sinkstream.clients.cli.errors import USAGE, CliError

ChunkSink = Callable[[ChunkRow, Sequence[float], Sequence[int] | None], None]  # row, logprobs [n], ids [n]


def _open_for_writing(path: str, stack: contextlib.ExitStack, **kwargs) -> IO:
    try:
        return stack.enter_context(open(path, "w", encoding="utf-8", **kwargs))
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror}", USAGE) from None


class AnalysisFiles:
    """The per-chunk and per-token outputs of one analyze run (a context manager: files closed, spools
    removed on exit). `add` takes each chunk as it arrives; `finish` completes --json."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._stack = contextlib.ExitStack()
        self.paths = [p for p in (args.json, args.csv, args.tokens_jsonl) if p]
        try:
            self._csv = self._tokens = self._json = None
            if args.csv:
                self._csv = csv.DictWriter(_open_for_writing(args.csv, self._stack, newline=""),
                                           fieldnames=CSV_FIELDS)
                self._csv.writeheader()
            if args.tokens_jsonl:
                self._tokens = _open_for_writing(args.tokens_jsonl, self._stack)
            if args.json:
                self._json = _open_for_writing(args.json, self._stack)
                folder = Path(args.json).resolve().parent  # spools beside the output: same disk, not /tmp
                # closed (and so removed) by the ExitStack
                self._rows_spool = self._stack.enter_context(tempfile.TemporaryFile("w+", dir=folder))  # noqa: SIM115
                self._nll_spool = self._stack.enter_context(tempfile.TemporaryFile("w+", dir=folder))  # noqa: SIM115
        except BaseException:
            self._stack.close()
            raise

    def __enter__(self) -> AnalysisFiles:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def add(self, row: ChunkRow, logprobs: Sequence[float], token_ids: Sequence[int] | None) -> None:
        """Write one chunk: its row, and its tokens' NLL (logprobs [n]; token_ids [n] or None)."""
        if self._csv is not None:
            self._csv.writerow({k: "" if v is None else v for k, v in asdict(row).items()})
        if self._tokens is not None:
            ids = token_ids if token_ids else [None] * len(logprobs)
            self._tokens.write("".join(
                json.dumps({"token": row.first_token + i, "id": t, "nll": none_if_nan(-lp)}) + "\n"
                for i, (t, lp) in enumerate(zip(ids, logprobs, strict=True))))
        if self._json is not None:
            sep = ", " if row.index else ""
            self._rows_spool.write(sep + json.dumps(asdict(row)))
            nll = ", ".join(json.dumps(none_if_nan(-lp)) for lp in logprobs)
            if nll:
                self._nll_spool.write((", " if row.first_token else "") + nll)

    def finish(self, summary: AnalysisSummary) -> None:
        """Complete --json with the summary (the other files are complete already)."""
        if self._json is None:
            return
        head = json.dumps(summary.to_dict())
        self._json.write(head[:-1] + ', "chunk_results": [')
        for spool, tail in ((self._rows_spool, '], "token_nll": ['), (self._nll_spool, "]}\n")):
            spool.seek(0)
            shutil.copyfileobj(spool, self._json)
            self._json.write(tail)
        self._json.flush()
