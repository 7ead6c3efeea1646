"""The facts `--profile auto` decides from (core.profiles.HardwareFacts), read from this machine and the
model's files without loading the model: its parameter count from the GGUF or safetensors headers, its
trained context, the memory available (/proc/meminfo MemAvailable), the device. Torch-free."""

from __future__ import annotations

import json
import os
from pathlib import Path

from sinkstream.core.profiles import HardwareFacts

FLOAT32_BYTES = 4


def count_parameters(name_or_path: str | os.PathLike[str]) -> int | None:
    """Parameters of a local `.gguf` file or safetensors folder, from the headers only; None for anything
    else (a hub id, a folder without safetensors)."""
    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        from gguf import GGUFReader  # transformers' GGUF support needs it; memory-maps, reads headers

        return sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is no dict)
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def trained_context(name_or_path: str | os.PathLike[str]) -> int | None:
    """max_position_embeddings of a local safetensors folder's config.json or a `.gguf` file's
    ``*.context_length``; None for anything else."""
    path = Path(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        from gguf import GGUFReader

        for name, field in GGUFReader(str(path)).fields.items():
            if name.endswith(".context_length"):
                return int(field.parts[field.data[0]][0])
        return None
    config = path / "config.json"
    if path.is_dir() and config.is_file():
        value = json.loads(config.read_text()).get("max_position_embeddings")
        return int(value) if value else None
    return None


def available_memory_bytes() -> int:
    """MemAvailable of /proc/meminfo (memory obtainable without swapping); total physical memory where
    /proc/meminfo is absent."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def machine_facts(name_or_path: str, device: str = "cpu") -> HardwareFacts | None:
    """This machine's facts for the model at `name_or_path`; None when its size cannot be read locally."""
    params = count_parameters(name_or_path)
    if params is None:
        return None
    return HardwareFacts(model_bytes=params * FLOAT32_BYTES, free_memory_bytes=available_memory_bytes(),
                         device=device)
