"""Shared fixtures: where the shared models and data live (../shared, or $SINKSTREAM_SHARED)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_path() -> Path:
    return Path(os.environ.get("SINKSTREAM_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = shared_path()
    if not path.is_dir():
        pytest.skip(f"shared folder not found at {path} (set SINKSTREAM_SHARED)")
    return path


@pytest.fixture(scope="session")
def model_dir(shared_dir: Path) -> Path:
    path = shared_dir / "models" / "stories260K"
    if not (path / "config.json").is_file():
        pytest.skip(f"stories260K checkpoint not found at {path}")
    return path


@pytest.fixture(scope="session")
def sotu_path(shared_dir: Path) -> Path:
    path = shared_dir / "data" / "sotu.txt"
    if not path.is_file():
        pytest.skip(f"sotu.txt not found at {path}")
    return path
