"""Training data to token batches, sampled reproducibly from (seed, step).

Plain text becomes windows of one long token stream; records (JSONL, JSON, Parquet or
CSV, read by records.py) become one example each, padded on the right so that, under
the causal mask, no real token ever attends to padding, and with prompt tokens masked out of the loss.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..formats.tokenizer import Tokenizer
from .chat import encode_chat
from .records import SUFFIXES, Records, strip_bom


def read_text(path: str | Path) -> str:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read data file ({e.strerror})") from e
    raw, skipped = strip_bom(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (invalid byte at offset {skipped + e.start})") from e
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
        self.seq_len, self.source = seq_len, source
        self.n_windows = len(tokens) - seq_len

    @classmethod
    def from_file(cls, path: str | Path, tokenizer: Tokenizer, seq_len: int) -> TokenWindows:
        return cls(tokenizer.encode(read_text(path), bos=True, eos=False), seq_len, str(path))

    @property
    def summary(self) -> str:
        return f"plain text, {len(self.tokens)} tokens from {self.source}"

    def max_id(self) -> int:
        return int(self.tokens.max())

    def batch(self, step: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, self.n_windows, size=batch_size)
        w = torch.stack([self.tokens[s: s + self.seq_len + 1] for s in starts])
        return w[:, :-1], w[:, 1:]

    def split(self, fraction: float) -> tuple[TokenWindows, TokenWindows]:
        """(train, validation): the last `fraction` of the tokens is held out."""
        n = len(self.tokens)
        cut = n - max(self.seq_len + 1, int(n * fraction))
        if cut < self.seq_len + 1:
            raise ConfigError(f"--val-fraction {fraction}: too little text for two parts of --seq-len + 1 tokens")
        head, tail = self.tokens[:cut].tolist(), self.tokens[cut:].tolist()
        return TokenWindows(head, self.seq_len), TokenWindows(tail, self.seq_len)

    def fixed_batches(self, batch_size: int, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Evenly spaced windows for validation: the same every time."""
        starts = np.linspace(0, self.n_windows - 1, num=min(self.n_windows, batch_size * n)).astype(int)
        w = torch.stack([self.tokens[s: s + self.seq_len + 1] for s in starts])
        return list(zip(w[:, :-1].split(batch_size), w[:, 1:].split(batch_size)))


IGNORE = -100  # a target id the loss skips: masked prompt tokens and padding


class Examples:
    """Instruction, chat or document records, one example per sequence.

    {"text": ...} trains on every token; {"prompt": ..., "completion": ...} trains
    only on the completion, each BOS + tokens + EOS; {"messages": [...]} (and Alpaca and
    ShareGPT records, made messages by records.py) is rendered with the model's chat
    template and trains only on the assistant turns. With
    train_on_prompt every token is trained on. Examples are cut to seq_len + 1 tokens
    and padded on the right; padded and untrained targets are IGNORE.
    """

    def __init__(self, examples: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int,
                 source: str = "data"):
        if not examples:
            raise ConfigError(f"{source}: no records")
        self.seq_len, self.source = seq_len, source
        self.summary = f"{len(examples)} records from {source}"
        rows, masks = [], []
        for ids, trained in examples:
            ids, trained = ids[: seq_len + 1], torch.tensor(trained[: seq_len + 1], dtype=torch.bool)
            row = ids + [pad_id] * (seq_len + 1 - len(ids))
            target = torch.tensor(row[1:])
            target[len(ids) - 1:] = IGNORE
            target[: len(ids) - 1][~trained[1:]] = IGNORE  # target t is token t+1
            rows.append(torch.tensor(row[:-1]))
            masks.append(target)
        self.inputs, self.targets = torch.stack(rows), torch.stack(masks)
        if not (self.targets != IGNORE).any():
            raise ConfigError(f"{source}: no example has a completion token within --seq-len {seq_len}")

    @classmethod
    def from_records(cls, path: str | Path, tokenizer: Tokenizer, seq_len: int,
                     train_on_prompt: bool = False) -> Examples:
        """The records of a JSONL, JSON, Parquet or CSV file (records.py), encoded one by one as they are read."""
        records = Records(path)
        examples, any_text = [], False
        for rec, where in records:
            examples.append(encode_record(tokenizer, rec, train_on_prompt, str(where)))
            any_text = any_text or not _blank(rec)
        if examples and not any_text:  # a blanked column: every example would teach BOS -> EOS alone
            raise ConfigError(f"{path}: every record's text (or completion) is empty; is it the right file?")
        ex = cls(examples, seq_len, tokenizer.pad_id, str(path))
        ex.summary = records.summary
        return ex

    def __len__(self) -> int:
        return len(self.inputs)

    def max_id(self) -> int:
        """The largest token id in any input or target (padding included; IGNORE is negative)."""
        return max(int(self.inputs.max()), int(self.targets.max()))

    def batch(self, step: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(np.random.default_rng([seed, step]).integers(0, len(self), size=batch_size))
        return self.inputs[idx], self.targets[idx]

    def _subset(self, idx) -> Examples:
        new = object.__new__(Examples)
        new.seq_len, new.source, new.summary = self.seq_len, self.source, self.summary
        new.inputs, new.targets = self.inputs[idx], self.targets[idx]
        return new

    def split(self, fraction: float) -> tuple[Examples, Examples]:
        n_val = max(1, int(len(self) * fraction))
        if n_val >= len(self):
            raise ConfigError(f"--val-fraction {fraction}: {self.source} has too few records to hold some out")
        return self._subset(slice(0, len(self) - n_val)), self._subset(slice(len(self) - n_val, None))

    def fixed_batches(self, batch_size: int, n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
        k = min(len(self), batch_size * n)
        return list(zip(self.inputs[:k].split(batch_size), self.targets[:k].split(batch_size)))


def _blank(record) -> bool:
    """A text record with no text, or a prompt/completion pair with no completion (messages are checked by
    encode_chat)."""
    if isinstance(record, str):
        return not record.strip()
    return isinstance(record, tuple) and not record[1].strip()


def encode_record(tokenizer: Tokenizer, record, train_on_prompt: bool, where: str) -> tuple[list[int], list[bool]]:
    """Token ids and which are trained on: all of a text; a completion (BOS + prompt, completion + EOS);
    the assistant turns of messages, rendered with the model's chat template."""
    if isinstance(record, str):
        ids = tokenizer.encode(record, bos=True, eos=True)
        return ids, [True] * len(ids)
    if isinstance(record, tuple):
        prompt = tokenizer.encode(record[0], bos=True, eos=False)
        completion = tokenizer.encode(record[1], bos=False, eos=True)
        return prompt + completion, [train_on_prompt] * len(prompt) + [True] * len(completion)
    return encode_chat(tokenizer, record, train_on_prompt=train_on_prompt, where=where)


def load_data(path: str | Path, tokenizer: Tokenizer, seq_len: int, train_on_prompt: bool = False):
    """TokenWindows for plain text, Examples for records (train_on_prompt: prompts and non-assistant turns too).
    Either's `summary` says what was read, for the up-front lines."""
    if seq_len < 1:
        raise ConfigError(f"--seq-len must be positive, got {seq_len}")
    if Path(path).suffix.lower() in SUFFIXES:
        return Examples.from_records(path, tokenizer, seq_len, train_on_prompt)
    return TokenWindows.from_file(path, tokenizer, seq_len)
