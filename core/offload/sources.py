"""Where an offloaded decoder layer's weights come from: the checkpoint on disk, or a copy in host memory.

A source hands the prefetch worker one layer's tensors as host (CPU) tensors in the compute dtype,
keyed by the parameter's name inside the layer (e.g. ``self_attn.q_proj.weight``).
"""

from __future__ import annotations

from typing import Protocol

import torch

from sinkstream.core.offload.checkpoint import ShardReader, TensorLocation


class LayerSource(Protocol):
    def fetch(self, layer: int, staging: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Host tensors of `layer`; a source that reads may fill and return the `staging` buffers."""
        ...

    def close(self) -> None: ...


class DiskLayerSource:
    """Reads a layer's tensors from the safetensors shards on every fetch (nothing kept in memory).

    Tensors stored in another dtype than the compute dtype go through one reusable scratch buffer and
    are converted into the staging buffer; same-dtype tensors are read into it directly.
    """

    def __init__(self, layers: list[dict[str, TensorLocation]], dtype: torch.dtype,
                 drop_file_cache: bool = False) -> None:
        self.layers = layers
        self.dtype = dtype
        self.reader = ShardReader(drop_file_cache=drop_file_cache)
        converted = [loc.nbytes for layer in layers for loc in layer.values() if loc.dtype != dtype]
        # Only the worker thread touches the scratch buffer, one tensor at a time.
        self._scratch = torch.empty(max(converted, default=0), dtype=torch.uint8)

    def fetch(self, layer: int, staging: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, loc in self.layers[layer].items():
            out = staging[name]
            if loc.dtype == out.dtype:
                self.reader.read_into(loc, out)
            else:
                raw = self._scratch[: loc.nbytes].view(loc.dtype).view(loc.shape)
                self.reader.read_into(loc, raw)
                out.copy_(raw)
        return staging

    def close(self) -> None:
        self.reader.close()


class HostLayerSource:
    """Keeps every offloaded layer in host memory (pinned when copies go to a GPU), read once up front."""

    def __init__(self, layers: list[dict[str, TensorLocation]], dtype: torch.dtype, pin: bool) -> None:
        reader = ShardReader()
        self.layers: list[dict[str, torch.Tensor]] = []
        try:
            for locations in layers:
                tensors = {}
                for name, loc in locations.items():
                    raw = torch.empty(loc.shape, dtype=loc.dtype)
                    reader.read_into(loc, raw)
                    tensor = raw.to(dtype)
                    tensors[name] = tensor.pin_memory() if pin else tensor
                self.layers.append(tensors)
        finally:
            reader.close()

    def fetch(self, layer: int, staging: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.layers[layer]

    def close(self) -> None:
        self.layers = []
