"""The `sinkstream` command line: its parser and the dispatch of each command. Importing this module never
imports torch: in-process commands load the model code (local_runner, serve) only when they run, so a
client-only install can use --server."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence

from sinkstream.clients.cli import chat
from sinkstream.clients.cli.analysis_files import AnalysisFiles
from sinkstream.clients.cli.errors import RUN_FAILURE, USAGE, CliError, report
from sinkstream.clients.cli.options import (
    add_cache_shape_options,
    add_dtype_option,
    add_kv_dtype_option,
    add_offload_options,
    add_server_option,
    add_speculate_option,
    add_weights_dtype_option,
    check_offload_options,
)
from sinkstream.clients.cli.output import (
    add_output_options,
    check_files,
    check_output_options,
    print_generation,
    write_outputs,
)
from sinkstream.clients.cli.profile_options import add_profile_option, apply_profile
from sinkstream.core.config import ConfigError  # torch-free


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command but `serve`'s options (serve.build_parser, which needs the server)."""
    parser = argparse.ArgumentParser(
        prog="sinkstream", description="Run a language model over text of any length in fixed memory: "
        "analyze a document, chat without end, generate, or serve over gRPC. Client commands take "
        "--server HOST:PORT (default $SINKSTREAM_SERVER); analyze/generate also run in-process with --model.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="continue a prompt (temperature 0 = greedy)")
    gen.add_argument("--model", help="model folder, .gguf file or hub id (in-process mode)")
    add_server_option(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    add_speculate_option(gen, "in-process only; a server's is `serve --speculate`")
    add_cache_shape_options(gen)
    add_kv_dtype_option(gen)
    add_dtype_option(gen)
    add_weights_dtype_option(gen)
    add_profile_option(gen)
    add_offload_options(gen)

    ana = sub.add_parser("analyze", help="stream a text file and summarise per-token NLL / perplexity")
    ana.add_argument("file")
    ana.add_argument("--model", help="model folder, .gguf file or hub id (in-process mode)")
    add_server_option(ana)
    ana.add_argument("--dense", action="store_true", help="plain full-cache baseline for comparison")
    add_output_options(ana)
    add_cache_shape_options(ana)
    add_kv_dtype_option(ana)
    add_dtype_option(ana)
    add_weights_dtype_option(ana)
    add_profile_option(ana)
    add_offload_options(ana)

    chat.add_parser(sub)

    # Options of `serve` need the server's defaults (serve.build_parser); main() hands them over.
    sub.add_parser("serve", help="run the gRPC server (sinkstream serve --help)", add_help=False)
    return parser


def _run_in_process(args: argparse.Namespace, parser: argparse.ArgumentParser,
                    files: AnalysisFiles | None) -> None:
    """analyze (its chunks written to `files`) / generate with the core in this process; raises CliError."""
    if not args.model:
        parser.error(f"{args.command}: give --model PATH (in-process) or --server ADDR")
    try:
        from sinkstream.clients.cli import local_runner
    except ImportError as exc:
        parser.error(f"in-process mode needs the server extra (pip install 'sinkstream[server]'): {exc}")
    try:
        if args.command == "generate":
            print_generation(args.prompt, local_runner.generate_text(args))
        else:
            write_outputs(local_runner.analyze(args, files.add), files, args)
    except local_runner.USAGE_ERRORS as exc:
        raise CliError(str(exc), USAGE) from None
    except local_runner.RUN_ERRORS as exc:
        what = "generation" if args.command == "generate" else "analysis"
        raise CliError(f"{what} failed: {exc}", RUN_FAILURE) from None


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """analyze / generate, in-process or against args.server; raises CliError."""
    if args.command == "analyze":
        check_files(args)
    with AnalysisFiles(args) if args.command == "analyze" else contextlib.nullcontext() as files:
        if args.model or not args.server:
            _run_in_process(args, parser, files)
            return 0
        if args.offload != "none":  # the server's weights are its own: `sinkstream serve --offload`
            parser.error(f"--offload {args.offload} runs the model in-process: give --model PATH, or start "
                         "the server with `sinkstream serve --offload ...`")
        if args.command == "generate" and args.speculate:
            parser.error("--speculate runs in-process: give --model PATH")
        if args.kv_dtype is not None:  # the cache is the server's: `sinkstream serve --kv-dtype`
            parser.error(f"--kv-dtype {args.kv_dtype} sets the cache of an in-process run: give --model "
                         "PATH, or start the server with `sinkstream serve --kv-dtype ...`")
        if args.keep_rotated_keys:  # the cache is the server's: `sinkstream serve --keep-rotated-keys`
            parser.error("--keep-rotated-keys sets the cache of an in-process run: give --model PATH, or "
                         "start the server with `sinkstream serve --keep-rotated-keys on`")
        if args.weights_dtype is not None:  # the weights are the server's: `sinkstream serve --weights-dtype`
            parser.error(f"--weights-dtype {args.weights_dtype} sets the weights of an in-process run: give "
                         "--model PATH, or start the server with `sinkstream serve --weights-dtype ...`")
        from sinkstream.clients.cli import remote_runner

        remote_runner.run(args, files)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command of `argv` (default sys.argv[1:]); returns the exit status: 0, 1 for a failed run,
    2 for a usage error (each failure reported in one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        from sinkstream.clients.cli.serve import serve_main  # needs the server extra; imports torch

        return serve_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "analyze" and (problem := check_output_options(args)):
        parser.error(problem)
    if args.profile is not None and not args.model:
        parser.error(f"--profile {args.profile} configures a model run in this process: give --model PATH, "
                     "or start the server with `sinkstream serve --profile ...`")
    try:
        apply_profile(args)
    except ConfigError as exc:
        return report(exc, USAGE)
    if problem := check_offload_options(args):
        parser.error(problem)
    if args.command == "chat":
        return chat.run(args)
    try:
        return _run(args, parser)
    except CliError as exc:
        return report(exc, exc.code)


if __name__ == "__main__":
    sys.exit(main())
