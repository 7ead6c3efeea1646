"""What `sinkstream analyze` and `generate` print and write: the options, their checks before any work, the
generated text, and the end of an analysis (the summary with the most surprising passages, the plot).
Per-chunk and per-token files are streamed while the run goes (analysis_files.AnalysisFiles)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Iterator

from sinkstream.clients.analysis import AnalysisSummary
from sinkstream.clients.cli.analysis_files import AnalysisFiles
from sinkstream.clients.cli.errors import check_readable_file, check_writable_file


def add_output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="OUT", help="write the summary, passages, per-chunk results and "
                   "per-token NLL as JSON")
    g.add_argument("--csv", metavar="OUT", help="write one row per chunk as CSV (streamed)")
    g.add_argument("--tokens-jsonl", metavar="OUT", help="write one JSON line per token as it is scored: "
                   '{"token": offset, "id": id, "nll": nats}')
    g.add_argument("--plot", metavar="OUT.png", help="plot surprisal along the document (needs matplotlib: "
                   "pip install 'sinkstream[plot]')")
    g.add_argument("--plot-size", default="1200x450", metavar="WxH", help="plot size in pixels")
    g.add_argument("--passages", type=int, default=5, help="most surprising passages to show (default 5)")
    g.add_argument("--passage-tokens", type=int, default=32, help="tokens per passage (default 32)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def check_output_options(args: argparse.Namespace) -> str | None:
    """An error message for options that cannot work, before any work is done."""
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        return "--plot needs matplotlib: pip install 'sinkstream[plot]'"
    width, _, height = args.plot_size.lower().partition("x")
    if not (width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        return f"--plot-size must look like 1200x450, not {args.plot_size!r}"
    if args.passages < 0 or args.passage_tokens < 1:
        return "--passages must be >= 0 and --passage-tokens >= 1"
    return None


def check_files(args: argparse.Namespace) -> None:
    """Raise a usage CliError if the document cannot be read or the plot cannot be written."""
    check_readable_file(args.file)
    if args.plot:
        check_writable_file(args.plot)


def new_summary(args: argparse.Namespace, mode: str, settings: dict) -> AnalysisSummary:
    """An empty summary of args.file with the passage options."""
    return AnalysisSummary(source=str(args.file), mode=mode, settings=settings,
                           passage_count=args.passages, passage_tokens=args.passage_tokens)


def write_outputs(summary: AnalysisSummary, files: AnalysisFiles, args: argparse.Namespace) -> None:
    """Print the summary; complete the streamed files and write --plot (each path is reported on stderr)."""
    print(summary.format(), flush=True)
    files.finish(summary)
    for path in files.paths:
        print(f"wrote {path}", file=sys.stderr)
    if args.plot:
        from sinkstream.clients.cli.plot import plot_surprisal

        width, _, height = args.plot_size.lower().partition("x")
        plot_surprisal(summary, args.plot, int(width), int(height))
        print(f"wrote {args.plot}", file=sys.stderr)


def print_generation(prompt: str, deltas: Iterator[str]) -> None:
    """Print the prompt and the generated text as it comes; the line is ended even if generation fails, so
    an error stands on its own line."""
    print(prompt, end="", flush=True)
    try:
        for delta in deltas:
            print(delta, end="", flush=True)
    finally:
        print(flush=True)
