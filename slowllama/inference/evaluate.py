"""Next-token loss over a whole data file, layer-major: each module is read once and every batch
passes through it before the next module is read."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ..data.windows import IGNORE, Examples, TokenWindows
from ..device import memory_budget
from ..model.transformer import ModelArgs
from .generate import ModuleCache

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs (bs, seq_len) and targets (bs, seq_len), IGNORE where untrained


def eval_batches(data: TokenWindows | Examples, batch_size: int) -> list[Batch]:
    """Every target token once, in batches: plain text in consecutive windows of seq_len + 1 tokens
    (the last one ends at the text's end, its targets already counted ignored); JSONL examples as they are."""
    if isinstance(data, Examples):
        return list(zip(data.inputs.split(batch_size), data.targets.split(batch_size)))
    t, s = data.tokens, data.seq_len
    starts = list(range(0, len(t) - s, s))
    covered = starts[-1] + s  # the last token position that is some window's target
    rows = [t[a: a + s + 1] for a in starts]
    targets = [r[1:].clone() for r in rows]
    if covered < len(t) - 1:
        a = len(t) - s - 1
        rows.append(t[a:])
        tail = t[a + 1:].clone()
        tail[: covered - a] = IGNORE  # positions a+1 .. covered were counted
        targets.append(tail)
    x, y = torch.stack([r[:-1] for r in rows]), torch.stack(targets)
    return list(zip(x.split(batch_size), y.split(batch_size)))


@torch.no_grad()
def evaluate(read_module: Callable[[str], dict[str, torch.Tensor]], args: ModelArgs, batches: list[Batch],
             device: torch.device, dtype: torch.dtype = torch.float32,
             offload: bool | None = None) -> tuple[float, int]:
    """(summed next-token loss, number of target tokens) over the batches; one read of each module,
    the next one read ahead while every batch passes through the current one.

    offload keeps the activations in host RAM between modules (None: when those of every batch
    would take more than half the device's free memory).
    """
    cache = ModuleCache(args, read_module, device, dtype, budget=0)  # nothing resident: each module read once
    if offload is None:
        acts = sum(x.numel() for x, _ in batches) * args.dim * dtype.itemsize
        offload = device.type != "cpu" and acts > memory_budget(device) // 2
    home = torch.device("cpu") if offload else device
    xs = [x.to(home) for x, _ in batches]
    n_tokens = sum(int((y != IGNORE).sum()) for _, y in batches)
    names = cache.names
    loss_sum = 0.0
    embedding = None
    try:
        for i, name in enumerate(names):
            module = cache.get(name)
            if i + 1 < len(names):
                cache.prefetch(names[i + 1])
            if name == "tok_embeddings" and args.tie_word_embeddings:
                embedding = module.weight  # the tied output layer multiplies by it again
            for m, (_, y) in enumerate(batches):
                x = xs[m].to(device, non_blocking=True)
                if name != "output":
                    xs[m] = module(x).to(home)
                    continue
                logits = module(x, embedding) if embedding is not None else module(x)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=IGNORE,
                                       reduction="sum")
                loss_sum += float(loss)
                xs[m] = None  # the batch is done: free its activations
    finally:
        cache.close()
    return loss_sum, n_tokens


def perplexity(loss_sum: float, n_tokens: int) -> tuple[float, float]:
    """(mean loss, its exponential)."""
    loss = loss_sum / n_tokens
    return loss, math.exp(loss) if loss < 700 else math.inf
