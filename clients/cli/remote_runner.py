"""`sinkstream analyze --server ADDR` and `sinkstream generate --server ADDR`: the same commands as the
in-process runner (local_runner), through the gRPC client. No torch here."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
from tqdm import tqdm

from sinkstream.clients.analysis import AnalysisSummary
from sinkstream.clients.cli.output import write_outputs
from sinkstream.clients.client import SinkStreamClient
from sinkstream.clients.results import GenerateParams, SessionSettings, SinkStreamError, TierSpec


def session_settings(args: argparse.Namespace, logprobs: bool = False) -> SessionSettings:
    """SessionSettings from the cache-shape options (options.add_cache_shape_options; --tiers parsed)."""
    tiers = tuple(TierSpec(t.slots, t.ratio) for t in args.tiers)
    return SessionSettings(sink_tokens=args.sink_tokens, window=args.window, chunk=args.chunk,
                           tiers=tiers, merge_policy=args.merge_policy, logprobs=logprobs)


def analyze(args: argparse.Namespace) -> AnalysisSummary:
    path = Path(args.file)
    settings = dataclasses.replace(session_settings(args, logprobs=True), token_ids=True)
    shown = {"sink_tokens": args.sink_tokens, "window": args.window, "chunk": args.chunk}
    if settings.tiers:
        shown.update(tiers=",".join(map(str, args.tiers)), merge_policy=args.merge_policy)
    summary = AnalysisSummary(source=str(path), mode=f"streaming via {args.server}", settings=shown)
    with SinkStreamClient(args.server) as client:
        with client.open_session(settings) as session, \
                tqdm(total=path.stat().st_size, unit="B", unit_scale=True, disable=args.quiet,
                     file=sys.stderr, desc="analyze") as bar:
            for chunk in session.stream_file(path, progress=lambda sent, _: bar.update(sent - bar.n)):
                summary.add_chunk(chunk.logprobs, chunk.token_ids, chunk.cache.used if chunk.cache else None)
                bar.set_postfix(tokens=summary.tokens, tok_s=f"{summary.tokens_per_second:,.0f}",
                                refresh=False)
                summary.cache_bytes = chunk.cache.cache_bytes if chunk.cache else None
            session.close()
        summary.find_passages(path, client.tokenize, args.passages, args.passage_tokens)
    return summary


def generate_text(args: argparse.Namespace) -> Iterator[str]:
    params = GenerateParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, seed=args.seed,
                            max_new_tokens=args.max_new_tokens, stop_sequences=tuple(args.stop or ()))
    with SinkStreamClient(args.server) as client, \
            client.open_session(session_settings(args), seed=args.seed) as session:
        session.send_text(args.prompt)
        for token in session.generate_stream(params):
            yield token.text
        session.close()


def unreachable_hint(exc: SinkStreamError, server: str) -> str:
    """A next step for the most common first-run failure: no server at that address."""
    if exc.code != grpc.StatusCode.UNAVAILABLE:
        return ""
    return (f"\n(no sinkstream server answers at {server}: start one with "
            f"`sinkstream serve --model PATH --port {server.rpartition(':')[2]}`)")


def run(args: argparse.Namespace) -> int:
    """Run analyze / generate against args.server; returns the exit status."""
    if getattr(args, "dense", False):
        print("sinkstream: error: --dense is an in-process baseline; use --model", file=sys.stderr)
        return 2
    try:
        if args.command == "generate":
            print(args.prompt, end="", flush=True)
            for delta in generate_text(args):
                print(delta, end="", flush=True)
            print()
        else:
            write_outputs(analyze(args), args)
    except SinkStreamError as exc:
        print(f"sinkstream: error: {exc}{unreachable_hint(exc, args.server)}", file=sys.stderr)
        return 2
    return 0
