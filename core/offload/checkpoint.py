"""Where each tensor of a safetensors checkpoint lives on disk, and reading one straight into a buffer.

The `safetensors` library validates every shard when it is indexed and loads the few resident tensors
(embeddings, final norm, LM head). Decoder-layer tensors are instead read with `os.preadv` at the byte
ranges the shard header gives: the read lands directly in a preallocated slot (no temporary copy, no
memory map whose touched pages would count as resident memory) and releases the GIL, so a background
thread can read layer i+1 while the main thread computes layer i.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Header lengths beyond this are corruption, not a real checkpoint (the format caps headers at 100 MB).
MAX_HEADER_BYTES = 100_000_000

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointError(ValueError):
    """A checkpoint shard is missing, unreadable or corrupt; the message names the file and tensor."""


@dataclass(frozen=True)
class TensorLocation:
    """One tensor's bytes in a shard: `nbytes` bytes at absolute file offset `offset`."""

    name: str
    shard: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_shard_header(shard: Path) -> dict[str, TensorLocation]:
    """Parse and check one shard's header; raise CheckpointError naming the shard when it is corrupt."""
    if not shard.is_file():
        raise CheckpointError(f"checkpoint shard {shard} is missing")
    size = shard.stat().st_size
    try:  # the library's own validation first (overlaps, alignment, dtype names)
        with safe_open(str(shard), framework="pt") as handle:
            handle.keys()
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"checkpoint shard {shard} is corrupt or unreadable: {exc}") from exc
    with shard.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"checkpoint shard {shard} has a corrupt header length {header_len}")
        header = json.loads(f.read(header_len))
    data_start = 8 + header_len
    locations = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{shard}: tensor {name} has unsupported dtype {entry['dtype']}")
        shape = tuple(int(d) for d in entry["shape"])
        nbytes = end - begin
        if nbytes != math.prod(shape) * dtype.itemsize or data_start + end > size:
            raise CheckpointError(
                f"{shard}: tensor {name} is truncated or inconsistent (bytes {begin}..{end} of the data "
                f"section, file holds {size - data_start})"
            )
        locations[name] = TensorLocation(name, shard, dtype, shape, data_start + begin, nbytes)
    return locations


def index_checkpoint(checkpoint_dir: str | Path) -> dict[str, TensorLocation]:
    """Map every tensor name of a (possibly sharded) safetensors checkpoint to its location."""
    folder = Path(checkpoint_dir)
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"{index_path} is not a valid safetensors index: {exc}") from exc
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(
                f"checkpoint shard(s) {', '.join(missing)} listed in {index_path} are missing")
        locations: dict[str, TensorLocation] = {}
        for shard in shards:
            locations.update(read_shard_header(folder / shard))
        absent = [name for name in weight_map if name not in locations]
        if absent:
            raise CheckpointError(f"tensors {absent[:3]} listed in {index_path} are absent from their shards")
        return locations
    if (folder / SINGLE_FILE).is_file():
        return read_shard_header(folder / SINGLE_FILE)
    raise CheckpointError(f"no safetensors checkpoint in {folder} (expected {SINGLE_FILE} or {INDEX_FILE})")


def load_tensors(locations: list[TensorLocation]) -> dict[str, torch.Tensor]:
    """Load whole tensors with the safetensors library (for the few resident ones), grouped by shard."""
    tensors = {}
    for shard in sorted({loc.shard for loc in locations}):
        try:
            with safe_open(str(shard), framework="pt") as handle:
                for loc in locations:
                    if loc.shard == shard:
                        tensors[loc.name] = handle.get_tensor(loc.name)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"reading checkpoint shard {shard} failed: {exc}") from exc
    return tensors


class ShardReader:
    """Reads tensors from shards into caller-provided contiguous CPU tensors; one fd per shard, reused.

    `drop_file_cache=True` advises the kernel to drop each range from the file cache after reading it, so
    the next pass reads from the device again (a model larger than RAM; cold-cache benchmarks).
    """

    def __init__(self, drop_file_cache: bool = False) -> None:
        self.drop_file_cache = drop_file_cache
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _fd(self, shard: Path) -> int:
        with self._lock:
            fd = self._fds.get(shard)
            if fd is None:
                try:
                    fd = os.open(shard, os.O_RDONLY)
                except OSError as exc:
                    raise CheckpointError(f"cannot open checkpoint shard {shard}: {exc}") from exc
                self._fds[shard] = fd
            return fd

    def read_into(self, loc: TensorLocation, out: torch.Tensor) -> None:
        """Fill `out` (contiguous, on CPU, exactly `loc.nbytes` bytes) with the tensor's raw bytes."""
        if out.nbytes != loc.nbytes or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"buffer for {loc.name} must be a contiguous CPU tensor of {loc.nbytes} bytes")
        fd = self._fd(loc.shard)
        target = memoryview(out.view(-1).view(torch.uint8).numpy())
        done = 0
        try:
            while done < loc.nbytes:
                got = os.preadv(fd, [target[done:]], loc.offset + done)
                if got == 0:
                    raise CheckpointError(
                        f"{loc.shard}: tensor {loc.name} is truncated (file ends {loc.nbytes - done} bytes "
                        f"short of its data)"
                    )
                done += got
            if self.drop_file_cache:
                os.posix_fadvise(fd, loc.offset, loc.nbytes, os.POSIX_FADV_DONTNEED)
        except OSError as exc:
            raise CheckpointError(f"{loc.shard}: reading tensor {loc.name} failed: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
