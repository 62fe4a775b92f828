"""Checkpoint formats, each mapped onto Meta's names and layout (the names model.py uses)."""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError


def open_checkpoint(folder: str | Path):
    """A MetaCheckpoint for a folder with params.json, an HFCheckpoint for one with config.json."""
    folder = Path(folder)
    if (folder / "params.json").is_file():
        from .meta import MetaCheckpoint

        return MetaCheckpoint(folder)
    if (folder / "config.json").is_file():
        from .hf import HFCheckpoint

        return HFCheckpoint(folder)
    raise ConfigError(f"{folder}: neither params.json (Meta) nor config.json (Hugging Face) found")
