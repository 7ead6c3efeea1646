"""Building a causal LM whose decoder layers stay on disk or in host memory (see core.offload.prefetch).

`load_model_offloaded` never materialises the whole model: it builds it on the meta device, loads only
the resident tensors (embeddings, final norm, LM head, rotary tables) and hands the decoder layers to a
LayerOffloader. `enable_layer_offload` does the same for a model already in memory and frees its layers.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from sinkstream.core.config import ConfigError
from sinkstream.core.offload.checkpoint import CheckpointError, TensorLocation, index_checkpoint, load_tensors
from sinkstream.core.offload.config import OffloadConfig
from sinkstream.core.offload.prefetch import LayerOffloader, decoder_layers
from sinkstream.core.offload.sources import DiskLayerSource, HostLayerSource


def layer_locations(model: nn.Module, index: dict[str, TensorLocation]) -> list[dict[str, TensorLocation]]:
    """For each decoder layer, its tensors' checkpoint locations keyed by name inside the layer."""
    prefix, layers = decoder_layers(model)
    per_layer = []
    for i, layer in enumerate(layers):
        found = {}
        for name, tensor in layer.state_dict(keep_vars=True).items():
            key = f"{prefix}.{i}.{name}"
            loc = index.get(key)
            if loc is None:
                raise CheckpointError(f"checkpoint has no tensor {key}")
            if loc.shape != tuple(tensor.shape):
                raise CheckpointError(f"{loc.shard}: tensor {key} has shape {list(loc.shape)}, the model "
                                      f"expects {list(tensor.shape)}")
            found[name] = loc
        per_layer.append(found)
    return per_layer


def enable_layer_offload(model: nn.Module, checkpoint_dir: str | Path, config: OffloadConfig,
                         device: torch.device | str | None = None) -> LayerOffloader:
    """Offload `model`'s decoder layers: their weights are freed and from now on come from the checkpoint.

    The checkpoint in `checkpoint_dir` must hold the same weights as the model (it is read lazily in
    "disk" mode, copied to host memory once in "cpu" mode). Returns the offloader (also stored as
    `model.sinkstream_offloader`); its `stats` count loads and the peak number of materialised layers.
    """
    _, layers = decoder_layers(model)
    config.validate(len(layers))
    if not config.enabled:
        raise ConfigError("offload", "mode 'none' keeps every layer resident; there is nothing to offload")
    if device is None:
        device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    device = torch.device(device)
    locations = layer_locations(model, index_checkpoint(checkpoint_dir))
    dtype = next(iter(layers[0].parameters())).dtype
    if config.mode == "disk":
        source = DiskLayerSource(locations, dtype, drop_file_cache=config.drop_file_cache)
    else:
        source = HostLayerSource(locations, dtype, pin=device.type == "cuda")
    offloader = LayerOffloader(model, source, config, device)
    model.sinkstream_offloader = offloader
    return offloader


def load_model_offloaded(path: str | Path, config: OffloadConfig, *, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu",
                         attn_implementation: str = "sdpa") -> tuple[nn.Module, LayerOffloader]:
    """Load a local safetensors checkpoint with only the non-layer tensors resident on `device`.

    Floating-point tensors are cast to `dtype` (as `from_pretrained(dtype=...)` does). Returns the model
    (eval mode) and its LayerOffloader.
    """
    device = torch.device(device)
    hf_config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    prefix, _ = decoder_layers(model)
    index = index_checkpoint(path)

    def resident(name: str) -> bool:
        return not name.startswith(prefix + ".")

    names = [n for n in model.state_dict(keep_vars=True) if resident(n) and n in index]
    loaded = load_tensors([index[n] for n in names])
    state = {n: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
             for n, t in loaded.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    _init_rotary_buffers(model, device, resident)
    named = [*model.named_parameters(), *model.named_buffers()]
    still_meta = [n for n, t in named if resident(n) and t.is_meta]
    if still_meta:
        raise CheckpointError(f"checkpoint {path} lacks tensor(s) {still_meta[:3]}")
    # Without generation_config.json keep the one derived from the model config.
    with contextlib.suppress(OSError):
        model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()
    return model, enable_layer_offload(model, path, config, device)


def _init_rotary_buffers(model: nn.Module, device: torch.device, resident) -> None:
    """Recompute non-persistent buffers left on meta (rotary frequency tables), as transformers does."""
    for module_name, module in model.named_modules():
        meta = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        if not meta or not resident(module_name):
            continue
        if "RotaryEmbedding" not in type(module).__name__:
            raise ValueError(f"cannot rebuild buffer(s) {meta} of {module_name} ({type(module).__name__})")
        for name in meta:
            module._buffers[name] = torch.empty_like(module._buffers[name], device=device)
        model._init_weights(module)
