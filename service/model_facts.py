"""What ModelInfo reports about the served model and server, as plain values."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from sinkstream.core.chat import has_chat_template
from sinkstream.core.config import StreamConfig
from sinkstream.core.generation import eos_token_ids
from sinkstream.service.options import Limits


@dataclass(frozen=True)
class ModelFacts:
    name: str
    model_type: str
    vocab_size: int
    max_position_embeddings: int
    hidden_size: int
    num_layers: int
    eos_token_ids: list[int]
    bos_token_id: int | None
    default_settings: StreamConfig
    limits: Limits
    server_version: str
    has_chat_template: bool = False


def server_version() -> str:
    try:
        return importlib.metadata.version("sinkstream")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def public_model_name(name_or_path: str) -> str:
    """The name ModelInfo shows for a model loaded from `name_or_path`: a local folder's or file's name
    without its suffix (never the path: where the server keeps its files is not the clients' business),
    a Hugging Face hub id as it is."""
    path = Path(name_or_path)
    if not path.exists():
        return name_or_path  # a hub id such as "HuggingFaceTB/SmolLM2-135M"
    return path.stem if path.is_file() else path.resolve().name


def describe_model(name: str, model, tokenizer, defaults: StreamConfig, limits: Limits) -> ModelFacts:
    """The facts of a loaded model (a transformers causal LM and its tokenizer, which may be None)."""
    cfg = model.config
    eos = eos_token_ids(cfg, tokenizer, getattr(model, "generation_config", None))
    return ModelFacts(
        name=public_model_name(name), model_type=cfg.model_type,
        vocab_size=model.get_output_embeddings().out_features,
        max_position_embeddings=cfg.max_position_embeddings, hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers, eos_token_ids=sorted(eos),
        bos_token_id=getattr(tokenizer, "bos_token_id", None), default_settings=defaults, limits=limits,
        server_version=server_version(),
        has_chat_template=tokenizer is not None and has_chat_template(tokenizer))
