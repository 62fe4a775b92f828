"""Preference pairs: {"prompt", "chosen", "rejected"} records to chosen and rejected token rows.

A record is either all strings, or messages-style: "prompt" a list of {"role", "content"} messages and
"chosen"/"rejected" each an assistant message or a list of messages (trl's conversational format).
Messages are rendered with the model's chat template (chat.py), and so are strings when the model has
one (the prompt a user turn, the response an assistant turn); without a template, strings are joined as
prompt/completion records are (BOS + prompt, response + EOS). Only the response's tokens are trained on.

Both responses of a pair travel in the same micro-batch: pair_rows lays a batch out as groups of
micro-batch size, each group's chosen rows first and its rejected rows after them (as trl's
concatenated forward does), which is what engine/preference.py's loss reads.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..formats.tokenizer import Tokenizer
from .chat import check_messages, encode_chat
from .records import KINDS, SUFFIXES, Where, _json_array, _jsonl
from .windows import IGNORE, Examples

KEYS = ("prompt", "chosen", "rejected")
EXPECTED = '{"prompt", "chosen", "rejected"} records (strings, or a list of messages and assistant messages)'


def _response(value, name: str, where: Where) -> list[dict]:
    """A messages-style response: one assistant message, or a list of messages with an assistant one."""
    turns = [value] if isinstance(value, dict) else value
    if not isinstance(turns, list) or not turns:
        raise ConfigError(f"{where}: expected an assistant message or a list of messages for {name!r}")
    check_messages(turns, f"{where}: {name!r}")
    if not any(m["role"] == "assistant" for m in turns):
        raise ConfigError(f"{where}: {name!r} holds no assistant message, so nothing would be trained on")
    return turns


def encode_pair(tokenizer: Tokenizer, rec, where: Where) -> tuple[tuple[list[int], list[bool]], ...]:
    """((ids, trained) of prompt + chosen, the same of prompt + rejected)."""
    if not isinstance(rec, dict) or set(rec) != set(KEYS):
        kind = next((k for k in KINDS if isinstance(rec, dict) and k.fits(rec)), None)
        if kind is not None:
            raise ConfigError(f"{where}: preference tuning needs {EXPECTED}; this is a {kind.name} record "
                              f"(train on it with --method sft)")
        keys = ", ".join(map(repr, rec)) if isinstance(rec, dict) else type(rec).__name__
        raise ConfigError(f"{where}: expected {EXPECTED}, got {keys}")
    prompt = rec["prompt"]
    if all(isinstance(rec[k], str) for k in KEYS):
        if tokenizer.chat_template is None:
            p = tokenizer.encode(prompt, bos=True, eos=False)
            out = []
            for k in KEYS[1:]:
                r = tokenizer.encode(rec[k], bos=False, eos=True)
                out.append((p + r, [False] * len(p) + [True] * len(r)))
            return tuple(out)
        prompt = [{"role": "user", "content": prompt}]
        responses = [[{"role": "assistant", "content": rec[k]}] for k in KEYS[1:]]
    elif isinstance(prompt, list):
        check_messages(prompt, f"{where}: 'prompt'")
        responses = [_response(rec[k], k, where) for k in KEYS[1:]]
    else:
        raise ConfigError(f"{where}: expected strings for 'prompt', 'chosen' and 'rejected', or a list of messages "
                          f"for 'prompt' and assistant messages for the others")
    return tuple(encode_chat(tokenizer, prompt + r, where=str(where), train_from=len(prompt)) for r in responses)


class Pairs:
    """Every pair's chosen and rejected rows: inputs and targets of shape (2, N, seq_len), side 0 chosen,
    side 1 rejected; targets are IGNORE but on the response."""

    def __init__(self, encoded: list[tuple], wheres: list[Where], seq_len: int, pad_id: int, source: str):
        if not encoded:
            raise ConfigError(f"{source}: no records")
        sides = [Examples([e[s] for e in encoded], seq_len, pad_id, source) for s in (0, 1)]
        self.inputs = torch.stack([x.inputs for x in sides])
        self.targets = torch.stack([x.targets for x in sides])
        empty = ((self.targets != IGNORE).sum(-1) == 0).any(0).nonzero()
        if len(empty):
            n = int(empty[0])
            side = KEYS[1 + int(((self.targets[:, n] != IGNORE).sum(-1) == 0).nonzero()[0])]
            raise ConfigError(f"{wheres[n]}: the {side} response has no token within --seq-len {seq_len}")
        self.seq_len, self.source = seq_len, source
        self.summary = f"{len(encoded)} preference pair{'s' if len(encoded) != 1 else ''} from {source}"

    def __len__(self) -> int:
        return self.inputs.shape[1]

    def max_id(self) -> int:
        return max(int(self.inputs.max()), int(self.targets.max()))

    def indices(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """The pairs of batch `step`, drawn from (seed, step) as Examples.batch draws its records."""
        return torch.from_numpy(np.random.default_rng([seed, step]).integers(0, len(self), size=batch_size))

    def rows(self, pairs: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, targets, side, pair) of the rows of these pairs, laid out by pair_rows."""
        side, pair = pair_rows(pairs, group)
        return self.inputs[side, pair], self.targets[side, pair], side, pair


def pair_rows(pairs: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(side, pair) per row: the pairs in groups of `group`, each group its chosen rows, then its rejected."""
    side, pair = [], []
    for g in pairs.split(group):
        side += [0] * len(g) + [1] * len(g)
        pair += [g, g]
    return torch.tensor(side), torch.cat(pair)


def load_pairs(path: str | Path, tokenizer: Tokenizer, seq_len: int, method: str) -> Pairs:
    """The preference records of a .jsonl or .json file, encoded as they are read."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json"):
        what = "plain text" if suffix not in SUFFIXES else f"a {suffix} file"
        raise ConfigError(f"--data {path}: --method {method} needs {EXPECTED} in .jsonl or .json, not {what}")
    rows = _json_array(path) if suffix == ".json" else _jsonl(path)
    encoded, wheres = [], []
    for rec, where in rows:
        encoded.append(encode_pair(tokenizer, rec, where))
        wheres.append(where)
    return Pairs(encoded, wheres, seq_len, tokenizer.pad_id, str(path))
