"""In-process `sinkstream analyze` and `sinkstream generate`: the core driven directly, no server.
Imports torch (the server extra); the command line imports this module only when such a command runs."""

from __future__ import annotations

import argparse
import re
import resource
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from sinkstream.clients.analysis import AnalysisSummary
from sinkstream.clients.cli.analysis_files import ChunkSink
from sinkstream.clients.cli.errors import warn
from sinkstream.clients.cli.output import new_summary
from sinkstream.clients.cli.text_file import TextBlocks
from sinkstream.core.config import ConfigError, StreamConfig
from sinkstream.core.dense import DenseInference
from sinkstream.core.gguf_loading import GgufFileError, is_gguf
from sinkstream.core.model_loading import LoadedModel, load_model
from sinkstream.core.model_support import UnsupportedModelError
from sinkstream.core.offload.checkpoint import CheckpointError
from sinkstream.core.offload.config import offload_from_args
from sinkstream.core.offload.prefetch import OffloadError
from sinkstream.core.sampling import SamplingError, SamplingParams
from sinkstream.core.speculative import generate_speculative
from sinkstream.core.streaming import StreamingInference
from sinkstream.core.text import IncrementalEncoder
from sinkstream.service.allocator import keep_freed_memory


class ModelNotFoundError(Exception):
    """--model names neither an existing folder or file nor a model the hub has."""


# Failures of a run, as the command reports them: bad settings or model (exit 2), or a fault mid-run: a
# layer that failed to load, a computation that failed (torch raises RuntimeError), an I/O error (exit 1).
USAGE_ERRORS = (ConfigError, SamplingError, UnsupportedModelError, CheckpointError, ModelNotFoundError,
                GgufFileError)
RUN_ERRORS = (OffloadError, RuntimeError, OSError)
BLOCK_BYTES = 1 << 16  # bytes read from the file at a time
HUB_ID = re.compile(r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?(?:/[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?)?")


def stream_config(args: argparse.Namespace) -> StreamConfig:
    """StreamConfig from the cache-shape options (options.add_cache_shape_options; --tiers already parsed)."""
    return StreamConfig(sink_tokens=args.sink_tokens, window=args.window, chunk=args.chunk,
                        tiers=args.tiers, merge_policy=args.merge_policy,
                        kv_dtype=args.kv_dtype or "model", keep_rotated_keys=args.keep_rotated_keys)


def load(args: argparse.Namespace) -> LoadedModel:
    """The model of args.model, its decoder layers offloaded as --offload/--resident-layers ask. Raises
    ModelNotFoundError when args.model is neither a path nor a model the hub has."""
    name = args.model
    not_found = f"model not found: {name} (no such folder or file; give a local model folder or a hub id)"
    local = Path(name).exists()
    if not local and (is_gguf(name) or not HUB_ID.fullmatch(name)):
        raise ModelNotFoundError(not_found)
    keep_freed_memory()  # passes reuse their temporaries instead of page-faulting them in each time
    try:
        return load_model(name, dtype=getattr(torch, args.dtype), offload=offload_from_args(args),
                          weights_dtype=args.weights_dtype)
    except OSError as exc:  # transformers reports a missing hub repo (or no network) as OSError
        if local:
            raise
        raise ModelNotFoundError(f"{not_found}; the hub says: {str(exc).splitlines()[0]}") from None


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def analyze(args: argparse.Namespace, sink: ChunkSink) -> AnalysisSummary:
    """Stream a text file through the core (or the dense baseline) and summarise it; each chunk goes to
    `sink` as it is computed. Memory does not grow with the file (the dense baseline's cache excepted)."""
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
        if config.kv_dtype != "model":
            settings["kv_dtype"] = config.kv_dtype
        if config.keep_rotated_keys:
            settings["keep_rotated_keys"] = True

        def append(ids: list[int]) -> Iterator:
            return engine.append(row, ids)

    summary = new_summary(args, "dense" if args.dense else "streaming", settings)

    def record(results: Iterator) -> None:
        for result in results:
            logprobs, ids = result.logprobs.tolist(), result.token_ids
            sink(summary.add_chunk(logprobs, ids), logprobs, ids)

    encoder = IncrementalEncoder(loaded.tokenizer)
    blocks = TextBlocks(path, BLOCK_BYTES)
    with tqdm(total=path.stat().st_size, unit="B", unit_scale=True, disable=args.quiet,
              file=sys.stderr, desc="analyze") as bar:
        pending: list[int] = []
        for block in blocks:
            bar.update(blocks.bytes_read - bar.n)
            pending += encoder.push(block)
            # Only whole chunks go through now, so chunk boundaries do not depend on the block size.
            whole = len(pending) - len(pending) % config.chunk
            record(append(pending[:whole]))
            pending = pending[whole:]
            bar.set_postfix(tokens=summary.tokens, tok_s=f"{summary.tokens_per_second:,.0f}")
        record(append(pending + encoder.flush()))
    if warning := blocks.warning():
        warn(warning)
    summary.find_passages(path, lambda text: loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
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
        for token in generate_speculative(engine, row, params, loaded.tokenizer, k=args.speculate):
            yield token.text
