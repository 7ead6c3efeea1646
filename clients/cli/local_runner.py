"""In-process `sinkstream analyze` and `sinkstream generate`: the core driven directly, no server.
Imports torch (the server extra); the command line imports this module only when such a command runs."""

from __future__ import annotations

import argparse
import resource
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from sinkstream.clients.analysis import AnalysisSummary
from sinkstream.core.config import ConfigError, StreamConfig
from sinkstream.core.dense import DenseInference
from sinkstream.core.generation import generate
from sinkstream.core.model_loading import LoadedModel, load_model
from sinkstream.core.model_support import UnsupportedModelError
from sinkstream.core.offload.checkpoint import CheckpointError
from sinkstream.core.offload.config import offload_from_args
from sinkstream.core.offload.prefetch import OffloadError
from sinkstream.core.sampling import SamplingError, SamplingParams
from sinkstream.core.streaming import StreamingInference
from sinkstream.core.text import IncrementalEncoder
from sinkstream.service.allocator import keep_freed_memory

# Failures of a run, as the command reports them: bad settings or model (exit 2), or a layer that failed to
# load mid-run (exit 1).
USAGE_ERRORS = (ConfigError, SamplingError, UnsupportedModelError, CheckpointError)
RUN_ERRORS = (OffloadError,)
BLOCK_CHARS = 1 << 16  # characters read from a file at a time (text mode)


def stream_config(args: argparse.Namespace) -> StreamConfig:
    """StreamConfig from the cache-shape options (options.add_cache_shape_options; --tiers already parsed)."""
    return StreamConfig(sink_tokens=args.sink_tokens, window=args.window, chunk=args.chunk,
                        tiers=args.tiers, merge_policy=args.merge_policy)


def load(args: argparse.Namespace) -> LoadedModel:
    """The model of args.model, its decoder layers offloaded as --offload/--resident-layers ask."""
    keep_freed_memory()  # passes reuse their temporaries instead of page-faulting them in each time
    return load_model(args.model, offload=offload_from_args(args))


def read_blocks(path: Path, progress: tqdm | None) -> Iterator[str]:
    """A file as text blocks; the incremental encoder makes block cuts invisible to tokenization."""
    with path.open("r", encoding="utf-8", errors="strict", newline="") as f:
        while block := f.read(BLOCK_CHARS):
            if progress is not None:
                progress.update(len(block.encode("utf-8")))
            yield block


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def analyze(args: argparse.Namespace) -> AnalysisSummary:
    """Stream a text file through the core (or the dense baseline) and summarise it."""
    loaded = load(args)
    config = stream_config(args)
    path = Path(args.file)
    if args.dense:
        runner = DenseInference(loaded.model, chunk=config.chunk)
        settings = {"chunk": config.chunk}
        append = runner.append
    else:
        engine = StreamingInference(loaded.model, config, tokenizer=loaded.tokenizer)
        row = engine.open_row()
        settings = {"sink_tokens": config.sink_tokens, "window": config.window, "chunk": config.chunk}
        if config.tiers:
            settings.update(tiers=",".join(map(str, config.tiers)), merge_policy=config.merge_policy)

        def append(ids: list[int]) -> Iterator:
            return engine.append(row, ids)

    summary = AnalysisSummary(source=str(path), mode="dense" if args.dense else "streaming",
                              settings=settings)
    encoder = IncrementalEncoder(loaded.tokenizer)
    with tqdm(total=path.stat().st_size, unit="B", unit_scale=True, disable=args.quiet,
              file=sys.stderr, desc="analyze") as bar:
        pending: list[int] = []
        for block in read_blocks(path, bar):
            pending += encoder.push(block)
            # Only whole chunks go through now, so chunk boundaries do not depend on the block size.
            whole = len(pending) - len(pending) % config.chunk
            for result in append(pending[:whole]):
                summary.add_chunk(result.logprobs.tolist(), result.token_ids)
            pending = pending[whole:]
            bar.set_postfix(tokens=summary.tokens, tok_s=f"{summary.tokens_per_second:,.0f}")
        for result in append(pending + encoder.flush()):
            summary.add_chunk(result.logprobs.tolist(), result.token_ids)
    summary.find_passages(path, lambda text: loaded.tokenizer(text, add_special_tokens=False)["input_ids"],
                          args.passages, args.passage_tokens)
    summary.peak_rss_mib = peak_rss_mib()
    summary.cache_bytes = runner.cache_bytes if args.dense else engine.cache_bytes
    return summary


def generate_text(args: argparse.Namespace) -> Iterator[str]:
    """Yield the continuation of args.prompt as text deltas."""
    loaded = load(args)
    engine = StreamingInference(loaded.model, stream_config(args), tokenizer=loaded.tokenizer)
    row = engine.open_row(seed=args.seed)
    encoder = IncrementalEncoder(loaded.tokenizer)
    ids = encoder.push(args.prompt) + encoder.flush()
    with torch.inference_mode():
        for _ in engine.append(row, ids):
            pass
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                repetition_penalty=args.repetition_penalty, seed=args.seed,
                                max_new_tokens=args.max_new_tokens,
                                stop_sequences=tuple(args.stop or ()))
        for token in generate(engine, row, params, loaded.tokenizer):
            yield token.text
