"""Shared test set-up: never touch a model hub, and find the real images beside the repo."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
MAGNETIC_TILE = SHARED_DATA / "magnetic_tile"


@pytest.fixture(scope="session")
def magnetic_tile() -> Path:
    """The real magnetic-tile images (../shared/data/magnetic_tile); tests need them, never skip."""
    assert MAGNETIC_TILE.is_dir(), f"real images expected at {MAGNETIC_TILE}"
    return MAGNETIC_TILE
