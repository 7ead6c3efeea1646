"""Snapshot and restore of one stream's whole bounded state as safetensors + JSON metadata (no pickle).

A snapshot holds the row's cache storage, slot counts and ids, next-token distribution, RNG state and
counters; restoring it into any free row of an engine with the same model and StreamConfig continues the
stream exactly as the original would have.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, safe_open, save_file

from core.config import StreamConfig, TierSpec

if TYPE_CHECKING:
    from core.streaming import StreamingInference

FORMAT = "sinkstream.snapshot.v1"


class SnapshotError(ValueError):
    """A snapshot cannot be restored here (corrupt, or made with another model or config)."""


def _fingerprint(engine: StreamingInference) -> dict[str, Any]:
    keys = engine.cache.keys
    return {"layers": keys.shape[0], "kv_heads": keys.shape[2], "head_dim": keys.shape[4],
            "vocab": engine.vocab_size, "dtype": str(keys.dtype)}


def snapshot_row(engine: StreamingInference, row: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Copy one stream's state out of the engine: (tensors, json-able metadata)."""
    engine._check_row(row)
    cache = engine.cache
    tensors = {
        "keys": cache.keys[:, row].clone(), "values": cache.values[:, row].clone(),
        "count": cache.count[row].clone(), "token_ids": cache.token_ids[row].clone(),
        "next_logprobs": engine._next_logprobs[row].clone(),
        "rng_state": engine.generators[row].get_state(),
    }
    meta: dict[str, Any] = {
        "format": FORMAT, "config": asdict(engine.config), "model": _fingerprint(engine),
        "tokens_seen": cache.tokens_seen[row], "sink_used": cache.sink_used[row],
        "window_used": cache.window_used[row], "has_next": engine._has_next[row],
        "nll_sum": engine._nll_sum[row], "scored": engine._scored[row],
    }
    if engine.tier_memory is not None:
        tier_tensors, tier_meta = engine.tier_memory.state(row)
        tensors.update({f"tiers.{k}": v for k, v in tier_tensors.items()})
        meta["tiers"] = tier_meta
    return tensors, meta


def restore_row(engine: StreamingInference, row: int, tensors: dict[str, torch.Tensor],
                meta: dict[str, Any]) -> None:
    """Load a snapshot into an open row, after checking it was made with the same model and config."""
    engine._check_row(row)
    if meta.get("format") != FORMAT:
        raise SnapshotError(f"not a sinkstream snapshot (format {meta.get('format')!r})")
    config = dict(meta["config"])
    config["tiers"] = tuple(TierSpec(**t) for t in config["tiers"])
    if StreamConfig(**config) != engine.config:
        raise SnapshotError(f"snapshot was made with {config}, this engine runs {asdict(engine.config)}")
    if meta["model"] != _fingerprint(engine):
        raise SnapshotError(f"snapshot model {meta['model']} does not match {_fingerprint(engine)}")
    cache = engine.cache
    try:
        cache.keys[:, row].copy_(tensors["keys"])
        cache.values[:, row].copy_(tensors["values"])
        cache.count[row].copy_(tensors["count"])
        cache.token_ids[row].copy_(tensors["token_ids"])
        engine._next_logprobs[row].copy_(tensors["next_logprobs"])
        engine.generators[row].set_state(tensors["rng_state"])
    except (KeyError, RuntimeError) as exc:
        engine.reset_row(row)
        raise SnapshotError(f"snapshot tensors are missing or malformed: {exc}") from exc
    cache.tokens_seen[row] = int(meta["tokens_seen"])
    cache.sink_used[row] = int(meta["sink_used"])
    cache.window_used[row] = int(meta["window_used"])
    engine._has_next[row] = bool(meta["has_next"])
    engine._nll_sum[row] = float(meta["nll_sum"])
    engine._scored[row] = int(meta["scored"])
    if engine.tier_memory is not None:
        prefix = "tiers."
        engine.tier_memory.load_state(
            row, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, meta["tiers"])


def save_snapshot(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write never leaves a truncated snapshot under `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"sinkstream": json.dumps(meta)})
    os.replace(tmp, path)


def load_snapshot(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a snapshot written by save_snapshot."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["sinkstream"])
        return load_file(str(path)), meta
    except (KeyError, ValueError, OSError) as exc:
        raise SnapshotError(f"cannot read snapshot {path}: {exc}") from exc
