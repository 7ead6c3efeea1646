"""Loading a Hugging Face causal LM (local folder or hub id) and checking that the core can stream it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.utils import logging as hf_logging

from sinkstream.core.offload.config import OffloadConfig
from sinkstream.core.offload.loading import load_model_offloaded
from sinkstream.core.rope import SUPPORTED_ROPE_TYPES

# Families whose attention applies RoPE before `past_key_values.update` and accepts a 4-D mask.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox")


class UnsupportedModelError(ValueError):
    """The model or its config cannot be streamed by the core; the message names what is unsupported."""


@dataclass
class LoadedModel:
    """A model ready for StreamingInference, with its tokenizer (None when the folder has none)."""

    model: torch.nn.Module
    tokenizer: Any
    name: str


def check_supported(config: PretrainedConfig, max_positions: int | None = None) -> None:
    """Raise UnsupportedModelError unless `config` describes a RoPE decoder the core handles.

    `max_positions` is the largest position the stream will use (StreamConfig.max_positions).
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported: sinkstream needs a causal LM with rotary "
            f"position embeddings, one of {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})"
        )
    if rope_type == "longrope" and max_positions is not None:
        original = getattr(config, "original_max_position_embeddings", None) or rope.get(
            "original_max_position_embeddings"
        )
        if original is not None and max_positions > original:
            raise UnsupportedModelError(
                f"longrope switches frequencies past {original} positions; keep sink_tokens + tiers + "
                f"window + chunk <= {original} (got {max_positions})"
            )
    if getattr(config, "max_position_embeddings", None) is None:
        raise UnsupportedModelError("config has no max_position_embeddings (trained context)")


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    offload: OffloadConfig | None = None,
) -> LoadedModel:
    """Load model + tokenizer from a local folder or a hub id, after checking the config is supported.

    `offload` (mode cpu/disk) keeps the decoder layers out of memory and streams them through
    `offload.resident_layers` slots (core.offload.prefetch); it needs a local safetensors folder.
    """
    config = AutoConfig.from_pretrained(name_or_path)
    check_supported(config)
    hf_logging.disable_progress_bar()  # our own progress output is the one users read
    if offload is not None and offload.enabled:
        if not Path(name_or_path).is_dir():
            raise UnsupportedModelError(
                f"weight offloading needs a local checkpoint folder, got {name_or_path!r}")
        model, _ = load_model_offloaded(name_or_path, offload, dtype=dtype, device=device,
                                        attn_implementation=attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, attn_implementation=attn_implementation
        ).to(device)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError):
        tokenizer = None
    return LoadedModel(model=model, tokenizer=tokenizer, name=str(name_or_path))
