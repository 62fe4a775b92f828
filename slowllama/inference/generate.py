"""Completions through the same streamed modules that training uses: a KV cache, batches of prompts, sampling.

The prompts are prefilled once; then each new token passes one position per sequence
through every module. Modules that fit the device's memory stay there; the rest are
read again for every token, the next one loading in a background thread while the
current one computes, and one read serves every sequence of the batch.
"""
from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Collection

import torch

from ..device import memory_budget
from ..engine.streamer import materialize
from ..errors import ConfigError
from ..formats.meta import expected_shapes
from ..model.transformer import KVCache, ModelArgs, module_names


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the device has its kernels; fp32 on cpu, where it keeps greedy decoding exact."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "mps":
        from ..device import _mps_supports_bf16

        return torch.bfloat16 if _mps_supports_bf16() else torch.float16
    return torch.float32


def module_nbytes(args: ModelArgs, name: str, dtype: torch.dtype) -> int:
    if name == "output" and args.tie_word_embeddings:
        return 0
    return sum(math.prod(s) for s in expected_shapes(args, name).values()) * dtype.itemsize


class ModuleCache:
    """Materialized modules on the device in the compute dtype.

    Modules that fit the budget (in forward order) stay resident; the others are read
    on every use, and `prefetch` starts reading one in a background thread.
    """

    def __init__(self, args: ModelArgs, read_module: Callable[[str], dict[str, torch.Tensor]],
                 device: torch.device, dtype: torch.dtype, budget: int | None = None):
        self.args, self.read, self.device, self.dtype = args, read_module, device, dtype
        self.budget = memory_budget(device) if budget is None else budget
        self.names = module_names(args)
        self._mods: dict[str, torch.nn.Module] = {}
        self._pending: dict[str, Future] = {}
        self._pool: ThreadPoolExecutor | None = None  # made on the first prefetch, gone after close()
        self.reads = 0  # module reads and the bytes they returned, for the costs note
        self.bytes_read = 0
        self.plan()

    def plan(self, reserved: int = 0):
        """Choose the resident modules within budget less `reserved` (the KV cache, the activations)."""
        sizes = {n: module_nbytes(self.args, n, self.dtype) for n in self.names}
        room = self.budget - reserved
        if sum(sizes.values()) > room:  # some will stream: leave room for one in use and one loading
            room -= 2 * max(sizes.values())
        self.resident: set[str] = set()
        for n in self.names:
            if sizes[n] <= room:
                self.resident.add(n)
                room -= sizes[n]
        for n in list(self._mods):
            if n not in self.resident:
                del self._mods[n]

    def loaded(self, name: str) -> bool:
        return name in self._mods

    @property
    def streamed(self) -> list[str]:
        return [n for n in self.names if n not in self.resident]

    def _load(self, name: str) -> dict[str, torch.Tensor]:
        params = self.read(name)
        out = {}
        for k, t in params.items():
            # Cast before the copy when it narrows, so that fewer bytes cross to the device.
            out[k] = t.to(self.dtype).to(self.device) if self.dtype.itemsize < t.dtype.itemsize else \
                t.to(self.device).to(self.dtype)
        return out, sum(t.nbytes for t in params.values())

    def prefetch(self, name: str):
        """Start reading a module that is not resident, unless it is already loading."""
        if name not in self._mods and name not in self._pending:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="slowllama-read")
            self._pending[name] = self._pool.submit(self._load, name)

    def get(self, name: str) -> torch.nn.Module:
        if name in self._mods:
            return self._mods[name]
        future = self._pending.pop(name, None)
        params, nbytes = future.result() if future is not None else self._load(name)
        self.reads, self.bytes_read = self.reads + 1, self.bytes_read + nbytes
        module = materialize(name, self.args, params).eval()  # on this thread: build_module's meta mode
        if name in self.resident:
            self._mods[name] = module
        return module

    def close(self):
        """Stop reading ahead (a read in progress finishes); the resident modules stay, and get() still works."""
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def check_context(args: ModelArgs, n_prompt: int, max_new_tokens: int):
    """Refuse a completion longer than the model's context, before any module is read."""
    if n_prompt + max_new_tokens > args.max_seq_len:
        raise ConfigError(f"{n_prompt} prompt tokens and {max_new_tokens} new tokens exceed the model's context of "
                          f"{args.max_seq_len} tokens (max_seq_len)")


# ---- choosing the next token -------------------------------------------------------
# Each rule follows the definition of transformers' logits processor of the same name.

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """RepetitionPenaltyLogitsProcessor: the logits of seen ids (bs, n) divided by penalty, or multiplied where negative."""
    score = logits.gather(1, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, seen, score)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """TopKLogitsWarper: all but the k largest logits to -inf (ties with the k-th kept)."""
    k = min(max(k, 1), logits.shape[-1])
    kth = torch.topk(logits, k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """TopPLogitsWarper: keep the most likely ids whose probabilities reach p; the most likely is always kept."""
    sorted_logits, order = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= 1 - p  # the least likely ids, while their total stays within 1 - p
    drop[..., -1:] = False
    return logits.masked_fill(drop.scatter(1, order, drop), -math.inf)


@dataclass
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1 filter nothing; repetition_penalty 1 changes nothing."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self):
        bad = [f"--temperature {self.temperature}: must be 0 (greedy) or more"] if not self.temperature >= 0 else []
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            bad.append(f"--top-k {self.top_k}: must be 0 (off) or a positive integer")
        if not 0 < self.top_p <= 1:
            bad.append(f"--top-p {self.top_p}: must be in (0, 1]")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            bad.append(f"--repetition-penalty {self.repetition_penalty}: must be a positive number")
        if not math.isfinite(self.temperature):
            bad.append(f"--temperature {self.temperature}: must be finite")
        if bad:
            raise ConfigError(bad[0])


class Sampler:
    """Picks the next token of each sequence: the rules in transformers' order (repetition penalty,
    temperature, top-k, top-p), then argmax or a draw from a generator seeded once."""

    def __init__(self, s: Sampling | None = None):
        self.s = s or Sampling()
        self.gen = torch.Generator().manual_seed(self.s.seed)

    def scores(self, logits: torch.Tensor, seen: list[list[int]]) -> torch.Tensor:
        s, logits = self.s, logits.float().cpu()
        if s.repetition_penalty != 1.0:
            logits = torch.cat([apply_repetition_penalty(row[None], torch.tensor([ids]), s.repetition_penalty)
                                for row, ids in zip(logits, seen)])
        if s.temperature == 0:
            return logits
        logits = logits / s.temperature
        if s.top_k:
            logits = apply_top_k(logits, s.top_k)
        if s.top_p < 1.0:
            logits = apply_top_p(logits, s.top_p)
        return logits

    def pick(self, logits: torch.Tensor, seen: list[list[int]]) -> list[int]:
        """logits (bs, vocab); seen: each sequence's ids so far, prompt included."""
        scores = self.scores(logits, seen)
        if self.s.temperature == 0:
            return scores.argmax(-1).tolist()
        return torch.multinomial(scores.softmax(-1), 1, generator=self.gen)[:, 0].tolist()


# ---- the decoding loop -------------------------------------------------------------

def _forward(cache: ModuleCache, x: torch.Tensor, kv: KVCache | None) -> torch.Tensor:
    """Logits (bs, seqlen, vocab) of tokens x through every module, reading ahead the next one not resident.

    With a KV cache only the last position's logits are computed (bs, 1, vocab): the others are never used.
    """
    names, tied = cache.names, cache.args.tie_word_embeddings
    # The modules in the order of use; a tied output layer needs the embedding again.
    order = names + ["tok_embeddings"] if tied else names

    def get(j: int) -> torch.nn.Module:
        module = cache.get(order[j])
        # Start reading the next module not on the device: the next resident one during the first token,
        # then the next streamed one (cyclically: the last reads ahead for the next token).
        ahead = next((n for n in order[j + 1:] + order[:j + 1] if not cache.loaded(n)), None)
        if ahead is not None:
            cache.prefetch(ahead)
        return module

    for i, name in enumerate(names):
        module = get(i)
        if name.startswith("layers."):
            x = module(x, kv, i - 1) if kv is not None else module(x)
            if kv is not None and i == cache.args.n_layers:
                x = x[:, -1:]
        elif name == "output" and tied:
            # A tied output layer multiplies by the embedding's matrix, which it does not hold.
            x = module(x, get(len(names)).weight)
        else:
            x = module(x)
    return x


@torch.no_grad()
def generate_tokens(cache: ModuleCache, prompts: list[list[int]], max_new_tokens: int,
                    stop_ids: Collection[int] | int | None = None, sampler: Sampler | None = None,
                    on_token: Callable[[int, int], None] | None = None, use_kv: bool = True) -> list[list[int]]:
    """Up to max_new_tokens new tokens for each prompt, generated together; a sequence ends at its first stop id,
    which is its last token. on_token(sequence index, token) sees each token as soon as it is chosen.

    use_kv=False recomputes each whole sequence per token, one sequence at a time (the reference path).
    """
    if not prompts or any(not p for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    check_context(cache.args, longest, max_new_tokens)
    stop = {stop_ids} if isinstance(stop_ids, int) else set(stop_ids or ())
    sampler = sampler or Sampler()
    if not use_kv:
        try:
            return [_generate_uncached(cache, i, p, max_new_tokens, stop, sampler, on_token)
                    for i, p in enumerate(prompts)]
        finally:
            cache.close()
    bs, dev = len(prompts), cache.device
    kv = KVCache(cache.args, bs, longest + max_new_tokens, dev, cache.dtype)
    # Modules go resident only after the KV cache and the largest activations (the prefill's logits) have room.
    act = bs * (cache.args.vocab_size + 8 * longest * cache.args.dim) * 4
    cache.plan(reserved=KVCache.nbytes(cache.args, bs, longest + max_new_tokens, cache.dtype) + act)
    x = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], dtype=torch.long, device=dev)
    valid = torch.tensor([[False] * (longest - len(p)) + [True] * len(p) for p in prompts], device=dev)
    seen = [list(p) for p in prompts]
    outs: list[list[int]] = [[] for _ in prompts]
    done = [False] * bs
    try:
        _decode(cache, kv, x, valid, max_new_tokens, stop, sampler, on_token, seen, outs, done)
    finally:
        cache.close()
    return outs


def _decode(cache, kv, x, valid, max_new_tokens, stop, sampler, on_token, seen, outs, done):
    bs, dev = len(outs), cache.device
    columns, seen_valid = x, valid  # every column so far, for a LongRoPE switch (KVCache.stale)
    for step in range(max_new_tokens):
        if step and kv.stale(x.shape[1]):
            kv.reset()
            x, valid = columns, seen_valid
        kv.advance(valid)
        logits = _forward(cache, x, kv)[:, -1]
        picks = sampler.pick(logits, seen)
        for i, t in enumerate(picks):
            if done[i]:
                continue
            outs[i].append(t)
            seen[i].append(t)
            if on_token is not None:
                on_token(i, t)
            done[i] = t in stop
        if all(done):
            break
        x = torch.tensor(picks, dtype=torch.long, device=dev)[:, None]
        valid = torch.ones(bs, 1, dtype=torch.bool, device=dev)
        columns, seen_valid = torch.cat((columns, x), 1), torch.cat((seen_valid, valid), 1)


def _generate_uncached(cache, index, tokens, max_new_tokens, stop, sampler, on_token) -> list[int]:
    out: list[int] = []
    seq = list(tokens)
    for _ in range(max_new_tokens):
        logits = _forward(cache, torch.tensor([seq], dtype=torch.long, device=cache.device), None)
        nxt = sampler.pick(logits[:, -1], [seq])[0]
        out.append(nxt)
        seq.append(nxt)
        if on_token is not None:
            on_token(index, nxt)
        if nxt in stop:
            break
    return out


def greedy(cache: ModuleCache, tokens: list[int], max_new_tokens: int, stop_ids: Collection[int] | int | None = None,
           on_token: Callable[[int], None] | None = None, use_kv: bool = True) -> list[int]:
    """Up to max_new_tokens argmax tokens after `tokens`; the first stop id ends it and is the last token returned."""
    hook = (lambda _, t: on_token(t)) if on_token is not None else None
    return generate_tokens(cache, [tokens], max_new_tokens, stop_ids, None, hook, use_kv)[0]


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
