"""Helpers for the service tests: a real server on 127.0.0.1 (OS-assigned port) in a background thread,
and in-process references computed with the core directly for the same settings."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from sinkstream.core.config import StreamConfig
from sinkstream.core.generation import generate
from sinkstream.core.model_loading import LoadedModel, load_model
from sinkstream.core.sampling import SamplingParams
from sinkstream.core.streaming import ChunkResult, StreamingInference
from sinkstream.core.text import IncrementalEncoder
from sinkstream.service.server import ServerConfig, ServerThread

_LOADED: dict[Path, LoadedModel] = {}


def stories(model_dir: Path) -> LoadedModel:
    """stories260K, loaded once per test process."""
    if model_dir not in _LOADED:
        _LOADED[model_dir] = load_model(str(model_dir))
    return _LOADED[model_dir]


def start_server(model_dir: Path, **overrides) -> ServerThread:
    config = dataclasses.replace(ServerConfig(model=str(model_dir), port=0, grace_s=0.5), **overrides)
    return ServerThread(config, stories(model_dir))


def pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


@torch.inference_mode()
def reference_chunks(loaded: LoadedModel, config: StreamConfig, text_pieces: Iterable[str], *,
                     top_k: int = 0, embeddings: bool = False) -> list[ChunkResult]:
    """What the server computes for a session fed `text_pieces` then flushed: whole chunks as soon as
    they are complete, the partial last chunk at the flush."""
    engine = StreamingInference(loaded.model, config, tokenizer=loaded.tokenizer)
    row = engine.open_row()
    encoder = IncrementalEncoder(loaded.tokenizer)
    results, pending = [], []
    for piece in text_pieces:
        pending += encoder.push(piece)
        whole = len(pending) - len(pending) % config.chunk
        results += engine.append(row, pending[:whole], top_k=top_k, embeddings=embeddings)
        pending = pending[whole:]
    results += engine.append(row, pending + encoder.flush(), top_k=top_k, embeddings=embeddings)
    return results


@torch.inference_mode()
def reference_chat(loaded: LoadedModel, config: StreamConfig, turns: Sequence[tuple[str, SamplingParams]],
                   seed: int | None = None) -> list[tuple[list[int], str, str]]:
    """Per turn: append the text, generate; returns (token ids, text, stop reason) of each reply."""
    engine = StreamingInference(loaded.model, config, tokenizer=loaded.tokenizer)
    row = engine.open_row(seed)
    encoder = IncrementalEncoder(loaded.tokenizer)
    replies = []
    for text, params in turns:
        for _ in engine.append(row, encoder.push(text) + encoder.flush()):
            pass
        tokens = list(generate(engine, row, params, loaded.tokenizer))
        encoder.push_ids([])
        text = "".join(t.text for t in tokens)
        replies.append(([t.token_id for t in tokens], text, tokens[-1].stop_reason))
    return replies
