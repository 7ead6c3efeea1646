"""The `sinkstream` command line: its parser and the dispatch of each command. Importing this module never
imports torch: in-process commands load the model code (local_runner, serve) only when they run, so a
client-only install can use --server."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sinkstream.clients.cli import chat
from sinkstream.clients.cli.options import (
    add_cache_shape_options,
    add_offload_options,
    add_server_option,
    check_offload_options,
)
from sinkstream.clients.cli.output import add_output_options, check_output_options, write_outputs


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command but `serve`'s options (serve.build_parser, which needs the server)."""
    parser = argparse.ArgumentParser(
        prog="sinkstream", description="Run a language model over text of any length in fixed memory: "
        "analyze a document, chat without end, generate, or serve over gRPC. Client commands take "
        "--server HOST:PORT (default $SINKSTREAM_SERVER); analyze/generate also run in-process with --model.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="continue a prompt (temperature 0 = greedy)")
    gen.add_argument("--model", help="model folder or hub id (in-process mode)")
    add_server_option(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    add_cache_shape_options(gen)
    add_offload_options(gen)

    ana = sub.add_parser("analyze", help="stream a text file and summarise per-token NLL / perplexity")
    ana.add_argument("file")
    ana.add_argument("--model", help="model folder or hub id (in-process mode)")
    add_server_option(ana)
    ana.add_argument("--dense", action="store_true", help="plain full-cache baseline for comparison")
    add_output_options(ana)
    add_cache_shape_options(ana)
    add_offload_options(ana)

    chat.add_parser(sub)

    # Options of `serve` need the server's defaults (serve.build_parser); main() hands them over.
    sub.add_parser("serve", help="run the gRPC server (sinkstream serve --help)", add_help=False)
    return parser


def _need_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if not args.model:
        parser.error(f"{args.command}: give --model PATH (in-process) or --server ADDR")


def _fail(args: argparse.Namespace, exc: Exception, code: int) -> int:
    """Report an in-process failure in one line and return the exit code."""
    if args.command == "generate":
        print(flush=True)  # end the prompt line already printed, so the error stands on its own line
    print(f"sinkstream: error: {exc}", file=sys.stderr)
    return code


def _run_in_process(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """analyze / generate with the core in this process; returns the exit status."""
    _need_model(args, parser)
    try:
        from sinkstream.clients.cli import local_runner
    except ImportError as exc:
        parser.error(f"in-process mode needs the server extra (pip install 'sinkstream[server]'): {exc}")
    try:
        if args.command == "generate":
            print(args.prompt, end="", flush=True)
            for delta in local_runner.generate_text(args):
                print(delta, end="", flush=True)
            print()
        else:
            write_outputs(local_runner.analyze(args), args)
    except local_runner.USAGE_ERRORS as exc:
        return _fail(args, exc, 2)
    except local_runner.RUN_ERRORS as exc:  # a layer failed to load mid-run (storage error or timeout)
        return _fail(args, exc, 1)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command of `argv` (default sys.argv[1:]); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        from sinkstream.clients.cli.serve import serve_main  # needs the server extra; imports torch

        return serve_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "analyze" and (problem := check_output_options(args)):
        parser.error(problem)
    if problem := check_offload_options(args):
        parser.error(problem)
    if args.command == "chat":
        return chat.run(args)
    if args.command in ("generate", "analyze") and (args.model or not args.server):
        return _run_in_process(args, parser)
    if args.offload != "none":  # the server's weights are its own: `sinkstream serve --offload`
        parser.error(f"--offload {args.offload} runs the model in-process: give --model PATH, or start "
                     "the server with `sinkstream serve --offload ...`")
    from sinkstream.clients.cli import remote_runner

    return remote_runner.run(args)


if __name__ == "__main__":
    sys.exit(main())
