"""`sinkstream analyze --server ADDR` and `sinkstream generate --server ADDR`: the same commands as the
in-process runner (local_runner), through the gRPC client. No torch here."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from sinkstream.clients.analysis import AnalysisSummary
from sinkstream.clients.cli.analysis_files import AnalysisFiles, ChunkSink
from sinkstream.clients.cli.errors import RUN_FAILURE, USAGE, CliError, server_error, warn
from sinkstream.clients.cli.options import connection_options, resume_policy
from sinkstream.clients.cli.output import new_summary, print_generation, write_outputs
from sinkstream.clients.cli.text_file import TextBlocks
from sinkstream.clients.client import SinkStreamClient
from sinkstream.clients.results import GenerateParams, SessionSettings, SinkStreamError, TierSpec


def session_settings(args: argparse.Namespace, logprobs: bool = False) -> SessionSettings:
    """SessionSettings from the cache-shape options (options.add_cache_shape_options; --tiers parsed)."""
    tiers = tuple(TierSpec(t.slots, t.ratio) for t in args.tiers)
    return SessionSettings(sink_tokens=args.sink_tokens, window=args.window, chunk=args.chunk,
                           tiers=tiers, merge_policy=args.merge_policy, logprobs=logprobs)


def analyze(args: argparse.Namespace, sink: ChunkSink) -> AnalysisSummary:
    """Stream a text file through a session on args.server and summarise it; each chunk goes to `sink` as
    it arrives. Memory does not grow with the file."""
    path = Path(args.file)
    settings = dataclasses.replace(session_settings(args, logprobs=True), token_ids=True)
    shown = {"sink_tokens": args.sink_tokens, "window": args.window, "chunk": args.chunk}
    if settings.tiers:
        shown.update(tiers=",".join(map(str, args.tiers)), merge_policy=args.merge_policy)
    summary = new_summary(args, f"streaming via {args.server}", shown)
    blocks = TextBlocks(path)
    with SinkStreamClient(args.server, resume=resume_policy(args), **connection_options(args)) as client:
        with client.open_session(settings) as session, \
                tqdm(total=path.stat().st_size, unit="B", unit_scale=True, disable=args.quiet,
                     file=sys.stderr, desc="analyze") as bar:
            for chunk in session.stream_text(blocks, lambda *_: bar.update(blocks.bytes_read - bar.n)):
                used = chunk.cache.used if chunk.cache else None
                row = summary.add_chunk(chunk.logprobs, chunk.token_ids, used)
                sink(row, chunk.logprobs, chunk.token_ids)
                bar.set_postfix(tokens=summary.tokens, tok_s=f"{summary.tokens_per_second:,.0f}",
                                refresh=False)
                summary.cache_bytes = chunk.cache.cache_bytes if chunk.cache else None
            session.close()
        if warning := blocks.warning():
            warn(warning)
        summary.find_passages(path, client.tokenize)
    return summary


def generate_text(args: argparse.Namespace) -> Iterator[str]:
    """Yield the continuation of args.prompt as text deltas; raises CliError if the generation failed."""
    params = GenerateParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, seed=args.seed,
                            max_new_tokens=args.max_new_tokens, stop_sequences=tuple(args.stop or ()))
    with SinkStreamClient(args.server, resume=resume_policy(args), **connection_options(args)) as client, \
            client.open_session(session_settings(args), seed=args.seed) as session:
        session.send_text(args.prompt)
        for token in session.generate_stream(params):
            yield token.text
        if (result := session.last_generation).stop_reason == "ERROR":
            raise CliError(f"generation failed: {result.error_message}", RUN_FAILURE)
        session.close()


def run(args: argparse.Namespace, files: AnalysisFiles | None = None) -> None:
    """Run analyze (its chunks written to `files`) / generate against args.server; raises CliError."""
    if getattr(args, "dense", False):
        raise CliError("--dense is an in-process baseline; use --model", USAGE)
    try:
        if args.command == "generate":
            print_generation(args.prompt, generate_text(args))
        else:
            write_outputs(analyze(args, files.add), files, args)
    except SinkStreamError as exc:
        raise server_error(exc, args.server) from None
