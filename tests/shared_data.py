"""Where the shared real mini datasets live (``../shared/data`` beside the repo, or $RFCLIP_SHARED_DATA)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared_data_dir() -> Path:
    """The shared data folder; skips the calling test (with the reason) when it is absent."""
    env = os.environ.get("RFCLIP_SHARED_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (path / "voc2012-mini").is_dir():
        pytest.skip(f"shared mini datasets not found at {path} (set RFCLIP_SHARED_DATA)")
    return path
