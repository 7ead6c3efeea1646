"""Tiny random-weight causal LMs of every supported family, for fast exactness tests."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=256)


def tiny_config(family: str):
    """A 2-layer config of `family` with GQA where the family has it."""
    if family == "llama":
        return LlamaConfig(**COMMON, num_key_value_heads=2)
    if family == "mistral":
        return MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**COMMON, num_key_value_heads=2)
    if family == "qwen3":
        return Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=8)
    if family == "phi3":
        return Phi3Config(**COMMON, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                           "partial_rotary_factor": 0.5})
    if family == "gpt_neox":
        return GPTNeoXConfig(**COMMON, rotary_pct=0.25, use_parallel_residual=True)
    raise ValueError(family)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox")


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config(family)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
