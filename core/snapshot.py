"""Snapshot and restore of one stream's whole bounded state as safetensors + JSON metadata (no pickle).

A snapshot holds the row's cache storage, slot counts and ids, next-token distribution, RNG state and
counters; restoring it into any free row of an engine with the same model and StreamConfig continues the
stream exactly as the original would have. It goes through public state accessors only: the engine's
`row_state`/`load_row_state` and the tier memory's `state`/`check_state`/`load_state`. The engine's
`snapshot`/`restore` forward here, so this module imports the engine for type checking only.

On disk (save_snapshot/load_snapshot) a snapshot carries a sha256 over its tensors and its metadata JSON;
any mismatch, truncation or unparsable content is a SnapshotError, never a state that loads with NaNs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load, load_file, safe_open, save, save_file

from sinkstream.core.config import StreamConfig, TierSpec

if TYPE_CHECKING:
    from sinkstream.core.streaming import RowState, StreamingInference
    from sinkstream.core.tiers import TierState

FORMAT = "sinkstream.snapshot.v1"


class SnapshotError(ValueError):
    """A snapshot cannot be restored here (corrupt, or made with another model or config)."""


def _fingerprint(engine: StreamingInference) -> dict[str, Any]:
    keys = engine.cache.keys
    return {"layers": keys.shape[0], "kv_heads": keys.shape[2], "head_dim": keys.shape[4],
            "vocab": engine.vocab_size, "dtype": str(keys.dtype)}


def _tensors(state: RowState) -> dict[str, torch.Tensor]:
    """A row state's tensors under their snapshot names: keys/values [L, kv_heads, slots, D],
    key_scales/value_scales [L, kv_heads, slots, P] (int8/int4 storage only), count/token_ids [slots],
    next_logprobs [vocab], rng_state [bytes]."""
    cache = state.cache
    scales = ({"key_scales": cache.key_scales, "value_scales": cache.value_scales}
              if cache.key_scales is not None else {})
    return {"keys": cache.keys, "values": cache.values, **scales, "count": cache.count,
            "token_ids": cache.token_ids, "next_logprobs": state.next_logprobs, "rng_state": state.rng_state}


def snapshot_row(engine: StreamingInference, row: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Copy one stream's state out of the engine: (tensors, json-able metadata)."""
    state = engine.row_state(row)
    tensors = {name: t.clone() for name, t in _tensors(state).items()}
    meta: dict[str, Any] = {
        "format": FORMAT, "config": asdict(engine.config), "model": _fingerprint(engine),
        "tokens_seen": state.cache.tokens_seen, "sink_used": state.cache.sink_used,
        "window_used": state.cache.window_used, "has_next": state.has_next,
        "nll_sum": state.nll_sum, "scored": state.scored,
    }
    if engine.tier_memory is not None:
        tier_tensors, tier_meta = engine.tier_memory.state(row)
        tensors.update({f"tiers.{k}": v for k, v in tier_tensors.items()})
        meta["tiers"] = tier_meta
    return tensors, meta


def _integer(meta: dict[str, Any], key: str, low: int, high: int | float) -> int:
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SnapshotError(f"snapshot {key} = {value!r} is not an integer in {low}..{high}")
    return value


def _check(engine: StreamingInference, current: RowState, tensors: dict[str, torch.Tensor],
           meta: dict[str, Any]) -> tuple[RowState, TierState | None]:
    """Everything restore_row will write, validated against the row's `current` state (for shapes and
    dtypes): the snapshot's row state and tier state. Raises SnapshotError and touches nothing."""
    if meta.get("format") != FORMAT:
        raise SnapshotError(f"not a sinkstream snapshot (format {meta.get('format')!r})")
    config = dict(meta["config"])
    config["tiers"] = tuple(TierSpec(**t) for t in config["tiers"])
    if StreamConfig(**config) != engine.config:
        raise SnapshotError(f"snapshot was made with {config}, this engine runs {asdict(engine.config)}")
    if meta["model"] != _fingerprint(engine):
        raise SnapshotError(f"snapshot model {meta['model']} does not match {_fingerprint(engine)}")

    checked: dict[str, torch.Tensor] = {}
    for name, like in _tensors(current).items():
        t = tensors.get(name)
        if not isinstance(t, torch.Tensor) or t.shape != like.shape or t.dtype != like.dtype:
            got = "missing" if not isinstance(t, torch.Tensor) else f"{t.dtype} {tuple(t.shape)}"
            raise SnapshotError(f"snapshot tensor {name!r} is {got}, "
                                f"expected {like.dtype} {tuple(like.shape)}")
        checked[name] = t
    try:  # a scratch generator: the row's own must not see a state it may refuse
        torch.Generator().set_state(checked["rng_state"])
    except RuntimeError as exc:
        raise SnapshotError(f"snapshot rng_state is invalid: {exc}") from exc
    ids = checked["token_ids"]
    if int(ids.min()) < 0 or int(ids.max()) >= engine.vocab_size:
        raise SnapshotError(f"snapshot token ids outside 0..{engine.vocab_size - 1}")

    cfg, cache = engine.config, engine.cache
    tokens_seen = _integer(meta, "tokens_seen", 0, math.inf)
    # Both follow from tokens_seen: the window keeps the last W tokens, the sinks take the first evicted.
    window_used = _integer(meta, "window_used", min(cfg.window, tokens_seen), min(cfg.window, tokens_seen))
    evicted = tokens_seen - window_used
    sink_used = _integer(meta, "sink_used", min(cfg.sink_tokens, evicted), min(cfg.sink_tokens, evicted))
    scored = _integer(meta, "scored", 0, tokens_seen)
    has_next, nll_sum = meta["has_next"], meta["nll_sum"]
    if not isinstance(has_next, bool):
        raise SnapshotError(f"snapshot has_next = {has_next!r} is not a boolean")
    if isinstance(nll_sum, bool) or not isinstance(nll_sum, int | float) or not math.isfinite(nll_sum):
        raise SnapshotError(f"snapshot nll_sum = {nll_sum!r} is not a finite number")

    # The sink and window slot counts must say what the counters say (1 = a kept token, 0 = empty).
    count = checked["count"]
    expected_sinks = (torch.arange(cache.sink_slots) < sink_used).float()
    ring = torch.zeros(cache.ring_size)
    ring[torch.arange(tokens_seen - window_used, tokens_seen) % cache.ring_size] = 1.0
    if not (torch.equal(count[: cache.sink_slots].cpu(), expected_sinks)
            and torch.equal(count[cache.ring_start :].cpu(), ring)):
        raise SnapshotError(f"snapshot slot counts do not hold {sink_used} sinks and a window of "
                            f"{window_used}")

    tiers = None
    if engine.tier_memory is not None:
        prefix = "tiers."
        tiers = engine.tier_memory.check_state(
            {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, meta["tiers"],
            count, evicted - sink_used)
    cache_state = replace(current.cache, keys=checked["keys"], values=checked["values"],
                          key_scales=checked.get("key_scales"), value_scales=checked.get("value_scales"),
                          count=count,
                          token_ids=ids, tokens_seen=tokens_seen, sink_used=sink_used,
                          window_used=window_used)
    state = replace(current, cache=cache_state, next_logprobs=checked["next_logprobs"],
                    rng_state=checked["rng_state"], has_next=has_next, nll_sum=float(nll_sum), scored=scored)
    return state, tiers


def restore_row(engine: StreamingInference, row: int, tensors: dict[str, torch.Tensor],
                meta: dict[str, Any]) -> None:
    """Load a snapshot into an open row, after checking it was made with the same model and config and
    that its state is whole and consistent. A refused snapshot (SnapshotError) changes nothing."""
    current = engine.row_state(row)
    try:
        state, tiers = _check(engine, current, tensors, meta)
    except SnapshotError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a missing or mistyped entry
        raise SnapshotError(f"snapshot state is missing or malformed: {exc!r}") from exc
    # Nothing below can fail: every value was checked above.
    engine.load_row_state(row, state)
    if tiers is not None:
        engine.tier_memory.load_state(row, tiers)


CHECKSUM_KEY = "sinkstream.sha256"


def snapshot_checksum(tensors: dict[str, torch.Tensor], meta_json: str) -> str:
    """sha256 (hex) over the metadata JSON exactly as stored and every tensor's name, dtype, shape and
    bytes, in name order."""
    digest = hashlib.sha256(meta_json.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not directory:  # some file systems refuse fsync on a directory: nothing more can be done there
            raise
    finally:
        os.close(fd)


def save_snapshot(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                  keep_previous: str | os.PathLike | None = None) -> None:
    """Write atomically and durably, with a checksum over the tensors and the metadata: a crash mid-write
    never leaves a truncated snapshot under `path` (temp file, fsync, rename, fsync of the directory), and
    damage after the write is found by load_snapshot. `keep_previous`: move the snapshot being replaced
    there first."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta_json = json.dumps(meta)
    try:
        save_file(tensors, str(tmp), metadata={"sinkstream": meta_json,
                                               CHECKSUM_KEY: snapshot_checksum(tensors, meta_json)})
        _fsync_path(tmp)
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
        _fsync_path(path.parent, directory=True)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (disk full) leaves nothing behind
        raise


def load_snapshot(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a snapshot written by save_snapshot. SnapshotError if the file is missing, truncated or
    unparsable, has no checksum, or its tensors or metadata do not match the checksum."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        meta_json, stored = header["sinkstream"], header[CHECKSUM_KEY]
        tensors = load_file(str(path))
        if snapshot_checksum(tensors, meta_json) != stored:
            raise SnapshotError(f"snapshot {path} is damaged: its tensors or metadata do not match the "
                                "checksum")
        meta = json.loads(meta_json)
    except SnapshotError:
        raise
    except MemoryError:  # says nothing about the file
        raise
    except KeyError as exc:
        raise SnapshotError(f"snapshot {path} has no {exc} entry (damaged, or not a sinkstream snapshot)"
                            ) from exc
    except Exception as exc:  # OSError, JSON errors, safetensors' own error for a damaged file
        raise SnapshotError(f"cannot read snapshot {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(meta, dict):
        raise SnapshotError(f"snapshot {path} metadata is not an object")
    return tensors, meta


def snapshot_to_bytes(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """A snapshot as the bytes save_snapshot would write to a file (safetensors with the metadata JSON and
    its checksum in the header), for stores that keep values rather than files."""
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta_json = json.dumps(meta)
    return save(tensors, metadata={"sinkstream": meta_json,
                                   CHECKSUM_KEY: snapshot_checksum(tensors, meta_json)})


HEADER_LENGTH_BYTES = 8  # safetensors: u64 little endian header length, then the JSON header


def snapshot_from_bytes(data: bytes, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read snapshot_to_bytes' output (`name` says where it came from in errors). SnapshotError as
    load_snapshot: truncated, unparsable, no checksum, or tensors or metadata not matching it."""
    try:
        header_len = int.from_bytes(data[:HEADER_LENGTH_BYTES], "little")
        header = json.loads(data[HEADER_LENGTH_BYTES:HEADER_LENGTH_BYTES + header_len])["__metadata__"]
        meta_json, stored = header["sinkstream"], header[CHECKSUM_KEY]
        tensors = load(data)
        if snapshot_checksum(tensors, meta_json) != stored:
            raise SnapshotError(f"snapshot {name} is damaged: its tensors or metadata do not match the "
                                "checksum")
        meta = json.loads(meta_json)
    except SnapshotError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # a short value, JSON errors, safetensors' own error, a missing entry
        raise SnapshotError(f"cannot read snapshot {name}: {type(exc).__name__}: {exc!r}") from exc
    if not isinstance(meta, dict):
        raise SnapshotError(f"snapshot {name} metadata is not an object")
    return tensors, meta
