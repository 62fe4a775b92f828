"""Greedy completion through the same streamed modules that training uses."""
from __future__ import annotations

import collections
from typing import Callable, Collection

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
def greedy(cache: ModuleCache, tokens: list[int], max_new_tokens: int, stop_ids: Collection[int] | int | None = None,
           on_token: Callable[[int], None] | None = None) -> list[int]:
    """Up to max_new_tokens argmax tokens after `tokens`; the first stop id ends it and is the last token returned.

    on_token sees each token as soon as it is chosen.
    """
    check_context(cache.args, len(tokens), max_new_tokens)
    stop = {stop_ids} if isinstance(stop_ids, int) else set(stop_ids or ())
    names = module_names(cache.args)
    tied = cache.args.tie_word_embeddings
    out: list[int] = []
    seq = list(tokens)
    for _ in range(max_new_tokens):
        x = torch.tensor([seq], dtype=torch.long, device=cache.device)
        for name in names:
            module = cache.get(name)
            # A tied output layer multiplies by the embedding's matrix, which it does not hold.
            x = module(x, cache.get("tok_embeddings").weight) if tied and name == "output" else module(x)
        nxt = int(x[0, -1].float().argmax())
        out.append(nxt)
        seq.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if nxt in stop:
            break
    return out


class TextStream:
    """The text of tokens generated after a prompt, as it grows.

    Tokens decode in context (decode(prompt + new) less decode(prompt)), so a tokenizer that
    drops a word's leading space at the start of a text still gives it after the prompt.
    """

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tok = tokenizer
        lead = 1 if prompt_ids[:1] == [tokenizer.bos_id] and tokenizer.bos_id is not None else 0
        self.prompt = list(prompt_ids[lead:])
        self.prefix = tokenizer.decode(self.prompt)
        self.new: list[int] = []
        self.shown = ""  # the text more() has handed out

    def add(self, token: int):
        self.new.append(token)

    def text(self, ids: list[int] | None = None) -> str:
        ids = self.new if ids is None else ids
        full = self.tok.decode(self.prompt + ids)
        return full[len(self.prefix):] if full.startswith(self.prefix) else self.tok.decode(ids)

    def more(self, final: bool = False) -> str:
        """Text not handed out yet; held back while it ends inside a multi-byte character (U+FFFD)
        or while a later token rewrites what was handed out."""
        text = self.text()
        if (not final and text.endswith("\ufffd")) or not text.startswith(self.shown):
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece


def complete(cache: ModuleCache, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """The prompt's greedy continuation as text (without the prompt or the stop token)."""
    ids = tokenizer.encode(prompt, bos=True)
    new = greedy(cache, ids, max_new_tokens, tokenizer.stop_ids)
    if new and new[-1] in tokenizer.stop_ids:
        new = new[:-1]
    return TextStream(tokenizer, ids).text(new)
