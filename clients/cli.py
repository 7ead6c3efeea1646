"""The `sinkstream` command. Importing this module never imports torch: in-process subcommands load
the model code (service.local_runner) only when they run, so a client-only install can use --server."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from sinkstream.clients import chat
from sinkstream.clients.analysis_report import add_output_options, check_output_options, write_outputs
from sinkstream.core.offload.config import add_offload_options, check_offload_options  # torch-free

DEFAULT_SERVER = os.environ.get("SINKSTREAM_SERVER")
SERVER_HELP = "host:port of a sinkstream server (default $SINKSTREAM_SERVER); --model wins if given"


def add_stream_options(p: argparse.ArgumentParser) -> None:
    """Options shaping the bounded cache, shared by analyze, generate and serve."""
    g = p.add_argument_group("bounded cache")
    g.add_argument("--sink-tokens", type=int, default=4, help="attention-sink tokens kept (default 4)")
    g.add_argument("--window", type=int, default=252, help="recent tokens kept (default 252)")
    g.add_argument("--chunk", type=int, default=64, help="tokens per forward pass (default 64)")
    g.add_argument("--tiers", default="", help="memory tiers, e.g. 32x4,16x4 (default: none)")
    g.add_argument("--merge-policy", default="mean", choices=("mean", "attention", "heavy-hitters"),
                   help="how evicted tokens merge into tiers (default mean)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sinkstream", description="Run a language model over text of any length in fixed memory: "
        "analyze a document, chat without end, generate, or serve over gRPC. Client commands take "
        "--server HOST:PORT (default $SINKSTREAM_SERVER); analyze/generate also run in-process with --model.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="continue a prompt (temperature 0 = greedy)")
    gen.add_argument("--model", help="model folder or hub id (in-process mode)")
    gen.add_argument("--server", default=DEFAULT_SERVER, help=SERVER_HELP)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    add_stream_options(gen)
    add_offload_options(gen)

    ana = sub.add_parser("analyze", help="stream a text file and summarise per-token NLL / perplexity")
    ana.add_argument("file")
    ana.add_argument("--model", help="model folder or hub id (in-process mode)")
    ana.add_argument("--server", default=DEFAULT_SERVER, help=SERVER_HELP)
    ana.add_argument("--dense", action="store_true", help="plain full-cache baseline for comparison")
    add_output_options(ana)
    add_stream_options(ana)
    add_offload_options(ana)

    chat.add_parser(sub)

    # Options of `serve` live with the server (service.server.build_parser); main() hands them over.
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        from sinkstream.service.server import serve_main  # needs the server extra; imports torch

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
        _need_model(args, parser)
        try:
            from sinkstream.service import local_runner
        except ImportError as exc:
            parser.error(f"in-process mode needs the server extra (pip install 'sinkstream[server]'): {exc}")
        from sinkstream.core.config import ConfigError
        from sinkstream.core.model_support import UnsupportedModelError
        from sinkstream.core.offload.checkpoint import CheckpointError
        from sinkstream.core.offload.prefetch import OffloadError
        from sinkstream.core.sampling import SamplingError

        try:
            if args.command == "generate":
                print(args.prompt, end="", flush=True)
                for delta in local_runner.generate_text(args):
                    print(delta, end="", flush=True)
                print()
            else:
                write_outputs(local_runner.analyze(args), args)
        except (ConfigError, SamplingError, UnsupportedModelError, CheckpointError) as exc:
            return _fail(args, exc, 2)
        except OffloadError as exc:  # a layer failed to load mid-run (storage error or timeout)
            return _fail(args, exc, 1)
        return 0
    if args.offload != "none":  # the server's weights are its own: `sinkstream serve --offload`
        parser.error(f"--offload {args.offload} runs the model in-process: give --model PATH, or start "
                     "the server with `sinkstream serve --offload ...`")
    from sinkstream.clients import remote_runner

    return remote_runner.run(args)


if __name__ == "__main__":
    sys.exit(main())
