"""Loading a Hugging Face causal LM (local folder, hub id or GGUF file), after checking that the core can
stream it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from sinkstream.core.config import ConfigError
from sinkstream.core.fused_decoder import fuse_projections
from sinkstream.core.gguf_loading import GgufCheckpoint, gguf_checkpoint, is_gguf
from sinkstream.core.model_support import UnsupportedModelError, check_supported
from sinkstream.core.offload.config import OffloadConfig
from sinkstream.core.offload.loading import load_model_offloaded
from sinkstream.core.weight_quant import check_weights_dtype, quantize_linears


@dataclass
class LoadedModel:
    """A model ready for StreamingInference, with its tokenizer (None when the folder has none). `gguf` says
    which cache entry a GGUF file was loaded from (None for a folder or hub id)."""

    model: torch.nn.Module
    tokenizer: Any
    name: str
    gguf: GgufCheckpoint | None = None


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    offload: OffloadConfig | None = None,
    weights_dtype: str | None = None,
) -> LoadedModel:
    """Load model + tokenizer from a local folder, a hub id or a `.gguf` file, after checking the config is
    supported.

    A GGUF file's weights are de-quantised to `dtype` and cached as a safetensors folder (core.gguf_loading),
    which is then loaded like any local folder; its tokenizer and chat template come from the file.
    `offload` (mode cpu/disk) keeps the decoder layers out of memory and streams them through
    `offload.resident_layers` slots (core.offload.prefetch); it needs a local safetensors folder.
    `weights_dtype` (core.weight_quant: bfloat16, int8, int4) replaces the Linear layers by quantised ones
    after loading; None or float32 keeps them as loaded. It cannot be combined with offloading (offloaded
    layers are streamed from the checkpoint as stored): ConfigError, raised before anything is loaded.
    """
    hf_logging.disable_progress_bar()  # our own progress output is the one users read
    check_weights_dtype(weights_dtype)
    quantized = weights_dtype not in (None, "float32")
    if quantized and offload is not None and offload.enabled:
        raise ConfigError("weights_dtype", f"--weights-dtype {weights_dtype} cannot be combined with "
                          f"--offload {offload.mode}: offloaded layers are streamed from the checkpoint as "
                          "stored; use one or the other")
    name = str(name_or_path)
    gguf = None
    if is_gguf(name):
        gguf = gguf_checkpoint(name, dtype)
        name_or_path = str(gguf.folder)
    config = AutoConfig.from_pretrained(name_or_path)
    check_supported(config)
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
    if quantize_linears(model, weights_dtype):
        fuse_projections(model)  # one matmul for q/k/v and one for gate/up (core.fused_decoder)
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError):
        tokenizer = None
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, gguf=gguf)
