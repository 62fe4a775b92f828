"""Training text to token windows, sampled reproducibly from (seed, step)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .model import ConfigError
from .tokenizer import Tokenizer


def read_text(path: str | Path) -> str:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read data file ({e.strerror})") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from e
    if not text.strip():
        raise ConfigError(f"{path}: data file is empty")
    return text


class TokenWindows:
    """All windows of seq_len+1 consecutive tokens of one encoded text (BOS first, no EOS).

    Inputs are a window's first seq_len tokens and targets its last seq_len. Batch
    `step` depends only on (seed, step), so a resumed run draws the same batches.
    """

    def __init__(self, tokens: list[int], seq_len: int, source: str = "data"):
        if seq_len < 1:
            raise ConfigError(f"--seq-len must be positive, got {seq_len}")
        if len(tokens) < seq_len + 1:
            raise ConfigError(f"{source}: encodes to {len(tokens)} tokens, fewer than --seq-len + 1 = {seq_len + 1}")
        self.tokens = torch.tensor(tokens, dtype=torch.long)
        self.seq_len = seq_len
        self.n_windows = len(tokens) - seq_len

    @classmethod
    def from_file(cls, path: str | Path, tokenizer: Tokenizer, seq_len: int) -> "TokenWindows":
        return cls(tokenizer.encode(read_text(path), bos=True, eos=False), seq_len, str(path))

    def batch(self, step: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, self.n_windows, size=batch_size)
        w = torch.stack([self.tokens[s: s + self.seq_len + 1] for s in starts])
        return w[:, :-1], w[:, 1:]
