"""Greedy completion through the same streamed modules that training uses."""
from __future__ import annotations

import collections
from typing import Callable

import psutil
import torch

from .blackbox import materialize
from .model import ConfigError, ModelArgs, module_names


class ModuleCache:
    """Materialized modules on the device, least recently used dropped first beyond the budget."""

    def __init__(self, args: ModelArgs, read_module: Callable[[str], dict[str, torch.Tensor]],
                 device: torch.device, dtype: torch.dtype, budget: int | None = None):
        self.args, self.read, self.device, self.dtype = args, read_module, device, dtype
        # By default keep modules while they fit in half the RAM that is free now.
        self.budget = psutil.virtual_memory().available // 2 if budget is None else budget
        self._mods: collections.OrderedDict[str, tuple[torch.nn.Module, int]] = collections.OrderedDict()

    def get(self, name: str) -> torch.nn.Module:
        if name in self._mods:
            self._mods.move_to_end(name)
            return self._mods[name][0]
        params = {k: v.to(self.device, self.dtype) for k, v in self.read(name).items()}
        module = materialize(name, self.args, params).eval()
        size = sum(t.nbytes for t in params.values())
        self._mods[name] = (module, size)
        total = sum(s for _, s in self._mods.values())
        while len(self._mods) > 1 and total > self.budget:
            _, (_, s) = self._mods.popitem(last=False)
            total -= s
        return module


def check_context(args: ModelArgs, n_prompt: int, max_new_tokens: int):
    """Refuse a completion longer than the model's context, before any module is read."""
    if n_prompt + max_new_tokens > args.max_seq_len:
        raise ConfigError(f"{n_prompt} prompt tokens and {max_new_tokens} new tokens exceed the model's context of "
                          f"{args.max_seq_len} tokens (max_seq_len)")


@torch.no_grad()
def greedy(cache: ModuleCache, tokens: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
    """Append max_new_tokens argmax tokens to tokens (stopping at eos); returns the new ones."""
    check_context(cache.args, len(tokens), max_new_tokens)
    names = module_names(cache.args)
    out: list[int] = []
    seq = list(tokens)
    for _ in range(max_new_tokens):
        x = torch.tensor([seq], dtype=torch.long, device=cache.device)
        for name in names:
            if name == "output" and cache.args.tie_word_embeddings:
                x = cache.get(name)(x, cache.get(names[0]).weight)  # the output layer is the embedding's matrix
            else:
                x = cache.get(name)(x)
        nxt = int(x[0, -1].float().argmax())
        if eos_id is not None and nxt == eos_id:
            break
        out.append(nxt)
        seq.append(nxt)
    return out


def complete(cache: ModuleCache, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The prompt's greedy continuation as text (without the prompt)."""
    ids = tokenizer.encode(prompt, bos=True)
    new = greedy(cache, ids, max_new_tokens, tokenizer.eos_id)
    full = tokenizer.decode(ids[1:] + new)
    prefix = tokenizer.decode(ids[1:])
    return full[len(prefix):] if full.startswith(prefix) else tokenizer.decode(new)
