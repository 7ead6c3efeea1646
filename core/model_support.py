"""Whether the core can stream a model: the families and RoPE variants it handles, checked on a config."""

from __future__ import annotations

from transformers import PretrainedConfig

from sinkstream.core.rope import SUPPORTED_ROPE_TYPES

# Families whose attention applies RoPE before `past_key_values.update` and accepts a 4-D mask.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox")


class UnsupportedModelError(ValueError):
    """The model or its config cannot be streamed by the core; the message names what is unsupported."""


def position_limit(config: PretrainedConfig) -> int:
    """Positions a stream may use without leaving the model's trained context (longrope: the context
    before it switches frequencies)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") == "longrope":
        original = getattr(config, "original_max_position_embeddings", None) or rope.get(
            "original_max_position_embeddings")
        if original is not None:
            return int(original)
    return int(config.max_position_embeddings)


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
