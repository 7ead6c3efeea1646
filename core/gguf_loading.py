"""A GGUF file as a local Hugging Face checkpoint folder: weights de-quantised to a dtype and cached on disk.

transformers reads GGUF (`gguf_file=`), but de-quantising takes seconds to tens of seconds and a model it
loaded that way cannot be saved as is. `gguf_checkpoint` does it once per (file content, dtype): the weights
go into a plain model built from the config, saved as safetensors beside the tokenizer (with its chat
template) read from the same file, under `<cache>/<sha256 of the file>-<dtype>/`. Every later start is a
plain local-folder `from_pretrained` of that entry. An entry is written in a temporary folder and renamed
into place, and it is trusted only when its manifest (written last) matches the files it lists, so a crash
or a damaged file means a rebuild, never a half-read model.

Two transformers 5.23 traps are handled here: a file whose metadata says "no padding token" with
2^32-1 (llama2.c's stories260K.gguf) breaks both its config (an out-of-vocabulary `pad_token_id`) and its
tokenizer loader (IndexError); both treat such an id as absent here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.integrations.gguf import convert_gguf_tokenizer
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING
from transformers.integrations.gguf.reader import read_gguf_metadata

GGUF_SUFFIX = ".gguf"
MANIFEST = "sinkstream-gguf.json"  # written last: an entry without a matching one is not trusted
CACHE_ENV = "SINKSTREAM_CACHE_DIR"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The special tokens a GGUF names by id (tokenizer.ggml.<key>), as the tokenizer's keyword arguments.
_SPECIAL_TOKEN_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                      "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


class GgufCacheError(OSError):
    """The cache directory cannot hold the de-quantised checkpoint (not writable, disk full...)."""


class GgufFileError(ValueError):
    """The file is not a GGUF model that transformers can read (bad magic, unknown architecture...)."""


@dataclass(frozen=True)
class GgufCheckpoint:
    """Where a GGUF file's de-quantised checkpoint is, and whether this call found it already built."""

    folder: Path
    sha256: str
    dtype: torch.dtype
    cache_hit: bool


def is_gguf(name_or_path: str | os.PathLike[str]) -> bool:
    """Whether `--model` names a GGUF file (by its suffix; the file need not exist yet)."""
    return Path(name_or_path).suffix.lower() == GGUF_SUFFIX


def cache_root() -> Path:
    """The cache of de-quantised GGUF checkpoints: $SINKSTREAM_CACHE_DIR, else
    $XDG_CACHE_HOME/sinkstream/gguf, else ~/.cache/sinkstream/gguf (as the XDG base directory spec says,
    an empty or relative XDG_CACHE_HOME is ignored)."""
    if explicit := os.environ.get(CACHE_ENV):
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "sinkstream" / "gguf"


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's content, read streaming (about 0.1 s for a 98 MB GGUF here)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    """"float32" / "bfloat16" for a dtype of DTYPES; ValueError for any other."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"GGUF weights de-quantise to {' or '.join(DTYPES)}, not {dtype}")


def gguf_checkpoint(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> GgufCheckpoint:
    """The cache entry of GGUF file `path` de-quantised to `dtype`, built now if it is missing or damaged.

    Raises FileNotFoundError for a missing file, GgufFileError for a file that is not a GGUF transformers
    can read, GgufCacheError when the entry cannot be written.
    """
    path = Path(path)
    suffix = dtype_name(dtype)
    digest = file_sha256(path)
    root = cache_root()
    entry = root / f"{digest}-{suffix}"
    if _entry_is_complete(entry, digest, suffix):
        return GgufCheckpoint(entry, digest, dtype, cache_hit=True)
    try:
        root.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}-{suffix}-", dir=root))
    except OSError as exc:
        raise GgufCacheError(f"cannot write the GGUF cache {root}: {exc}") from exc
    try:
        try:
            _write_checkpoint(path, dtype, building)
        except (ValueError, KeyError, IndexError) as exc:
            raise GgufFileError(f"cannot read {path} as a GGUF model: {exc}") from exc
        _write_manifest(building, digest, suffix, source=path)
        _move_into_place(building, entry, digest, suffix)
    except OSError as exc:
        raise GgufCacheError(f"cannot write the GGUF cache entry {entry}: {exc}") from exc
    finally:
        shutil.rmtree(building, ignore_errors=True)  # gone already when it was renamed into place
    return GgufCheckpoint(entry, digest, dtype, cache_hit=False)


def load_gguf_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """The tokenizer (with its chat template, if the file has one) described by a GGUF file's metadata.

    transformers' own loader (`AutoTokenizer.from_pretrained(..., gguf_file=)`) indexes the vocabulary with
    each special-token id it finds; llama.cpp writes 2^32-1 for "none", so it fails with IndexError. This
    groups the same metadata the same way (transformers' GGUF_TOKENIZER_MAPPING and converters) but treats
    an id outside the vocabulary as absent.
    """
    metadata, _ = read_gguf_metadata(str(path), ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    grouped = {group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items()
                       if f"tokenizer.{key}" in metadata}
               for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    vocabulary, settings = grouped["tokenizer"], grouped["tokenizer_config"]
    if "tokens" not in vocabulary:
        raise ValueError(f"{path} holds no tokenizer (no tokenizer.ggml.tokens)")
    tokens = vocabulary["tokens"]
    if vocabulary.get("tokenizer_type") == "llama":
        settings.setdefault("add_bos_token", True)  # llama.cpp's default for a sentencepiece vocabulary
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        settings[name] = tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None
    backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], vocabulary)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **settings, **extra)


def _write_checkpoint(path: Path, dtype: torch.dtype, folder: Path) -> None:
    """De-quantise `path` into `folder`: config.json, model.safetensors, tokenizer files."""
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        token_id = getattr(config, key, None)
        if isinstance(token_id, int) and not 0 <= token_id < config.vocab_size:
            setattr(config, key, None)  # 2^32-1 = "none" in llama.cpp's metadata
    quantised = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config,
                                                     dtype=dtype)
    # transformers refuses to save a model it marks as GGUF-quantised: copy the weights into a plain one.
    plain_config = quantised.config
    if hasattr(plain_config, "quantization_config"):
        del plain_config.quantization_config
    plain = AutoModelForCausalLM.from_config(plain_config, dtype=dtype)
    plain.load_state_dict(quantised.state_dict())
    plain.save_pretrained(folder)
    load_gguf_tokenizer(path).save_pretrained(folder)


def _file_record(file: Path) -> dict[str, Any]:
    return {"bytes": file.stat().st_size, "sha256": file_sha256(file)}


def _write_manifest(folder: Path, digest: str, suffix: str, *, source: Path) -> None:
    files = {p.name: _file_record(p) for p in sorted(folder.iterdir()) if p.is_file()}
    manifest = {"gguf_sha256": digest, "dtype": suffix, "source": str(source), "files": files}
    with open(folder / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _entry_is_complete(entry: Path, digest: str, suffix: str) -> bool:
    """Whether `entry` holds a finished build of (digest, dtype) whose files match its manifest byte for byte.
    Hashing the files (about 0.5 s for 538 MB) is what makes a damaged entry a rebuild, not a wrong model."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        if manifest.get("gguf_sha256") != digest or manifest.get("dtype") != suffix:
            return False
        files = manifest["files"]
        return bool(files) and all(_file_record(entry / name) == record for name, record in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _move_into_place(building: Path, entry: Path, digest: str, suffix: str) -> None:
    """Rename the finished `building` to `entry`; a damaged entry there is replaced, and one that another
    process finished meanwhile is kept (ours is then discarded by the caller)."""
    if entry.exists():
        if _entry_is_complete(entry, digest, suffix):
            return
        stale = Path(tempfile.mkdtemp(prefix=f".stale-{digest[:16]}-", dir=entry.parent))
        os.replace(entry, stale / "entry")  # out of the way in one rename, then deleted
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(building, entry)
    except OSError:
        if not _entry_is_complete(entry, digest, suffix):  # not a concurrent builder that won the race
            raise
