"""Checkpoint formats, each mapped onto Meta's names and layout (the names model.py uses)."""
from __future__ import annotations

import re
from pathlib import Path

from ..model import ConfigError

# The files an export of each format may hold (regular expressions over names): what slowllama
# may replace in an output folder it made.
META_NAMES = [r"params\.json", r"consolidated\.\d+\.pth", r"tokenizer\.model"]


def _hf_names() -> list[str]:
    from .hf import INDEX_FILE, SIDE_FILES, SINGLE_FILE

    return [re.escape(n) for n in ("config.json", SINGLE_FILE, INDEX_FILE, *SIDE_FILES)] + [
        r"model-\d+-of-\d+\.safetensors", r"adapter_config\.json", r"adapter_model\.safetensors"]


EXPORT_NAMES = META_NAMES + _hf_names()


def open_checkpoint(folder: str | Path):
    """A MetaCheckpoint for a folder with params.json, an HFCheckpoint for one with config.json."""
    folder = Path(folder)
    if (folder / "params.json").is_file():
        from ..checkpoint import MetaCheckpoint

        return MetaCheckpoint(folder)
    if (folder / "config.json").is_file():
        from .hf import HFCheckpoint

        return HFCheckpoint(folder)
    raise ConfigError(f"{folder}: neither params.json (Meta) nor config.json (Hugging Face) found")
