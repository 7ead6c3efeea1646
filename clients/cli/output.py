"""What `sinkstream analyze` prints and writes once a document is processed (in-process or via a server):
the summary with the most surprising passages, per-chunk JSON / CSV, and the surprisal plot."""

from __future__ import annotations

import argparse
import importlib.util
import sys

from sinkstream.clients.analysis import AnalysisSummary


def add_output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="OUT", help="write the summary, passages, per-chunk results and "
                   "per-token NLL as JSON")
    g.add_argument("--csv", metavar="OUT", help="write one row per chunk as CSV")
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


def write_outputs(summary: AnalysisSummary, args: argparse.Namespace) -> None:
    """Print the summary; write --json / --csv / --plot (each path is reported on stderr)."""
    print(summary.format(), flush=True)
    if args.json:
        summary.write_json(args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.csv:
        summary.write_csv(args.csv)
        print(f"wrote {args.csv}", file=sys.stderr)
    if args.plot:
        from sinkstream.clients.cli.plot import plot_surprisal

        width, _, height = args.plot_size.lower().partition("x")
        plot_surprisal(summary, args.plot, int(width), int(height))
        print(f"wrote {args.plot}", file=sys.stderr)
