"""Preference losses over chosen/rejected pairs, as trl defines them, and the reference pass of DPO and IPO.

A preference micro-batch holds 2k rows: k chosen responses, then the k rejected ones of the same pairs
(data/preference.py lays batches out so). Each row's log-probability is the sum of its response tokens'
log-probabilities. The losses, with pi the policy's and ref the starting model's log-probabilities:
  dpo:  -logsigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))       (trl's DPOTrainer, loss_type "sigmoid")
  ipo:  ((pi_c - pi_r) - (ref_c - ref_r) - 1 / (2 beta))^2, on log-probabilities averaged over the
        response's tokens                                            (trl's loss_type "ipo")
  orpo: NLL of the chosen responses (mean over their tokens) - beta * logsigmoid(log odds ratio), the log
        odds from the length-averaged log-probabilities              (trl's ORPOTrainer)
each averaged over the pairs. The rewards are trl's: beta * (pi - ref) for DPO and IPO, beta * pi (averaged)
for ORPO; rewards/accuracies is the share of pairs whose chosen reward is above the rejected one.

The reference log-probabilities come from one layer-major pass over the untouched store before the
first step: every sequence through the embedding, then every one through block 0, and so on, so
that each module is read once for the whole data set. The activations wait in chunk files of
a bounded number of rows (each tagged with the module it is the input of), so a pass killed
anywhere resumes from the chunks as they stand; the result is one durable file of one number per row.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import device as dev
from .. import faults
from ..blockfile import Block, StoreError, read_block, read_header, write_block
from ..data.windows import IGNORE
from ..errors import ConfigError
from ..paths import remove_stale_tmp
from .journal import batch_hash
from .quant import dequantize_module
from .store import BlockStore
from .streamer import materialize

log = logging.getLogger(__name__)

METHODS = ("dpo", "ipo", "orpo")
NEEDS_REFERENCE = ("dpo", "ipo")
# What a preference step logs, by trl's names (the means over its pairs); the last three are ORPO's alone.
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen")
SIDE, REF = 0, 1  # the columns of a preference batch's per-row values: 0 chosen / 1 rejected, reference logp


@dataclass(frozen=True)
class PreferenceConfig:
    method: str = "dpo"
    beta: float = 0.1

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"--method {self.method!r}: expected one of sft, {', '.join(METHODS)}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"--beta must be a positive number, got {self.beta}")


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each target token, 0 where IGNORE; the mask of trained tokens), both (rows, T)."""
    mask = targets != IGNORE
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's trained tokens, their count), both (rows,)."""
    picked, mask = token_logps(logits, targets)
    return picked.sum(-1), mask.sum(-1)


class PreferenceObjective:
    """The output module's loss in a preference run; it sums the step's rewards as it goes."""

    def __init__(self, cfg: PreferenceConfig):
        self.cfg = cfg
        self.sums: dict[str, float] = {}

    def scale(self, targets: torch.Tensor, extra: torch.Tensor) -> tuple[int, int]:
        """(pairs, chosen response tokens) of the global batch: what its losses are averaged over."""
        chosen = extra[:, SIDE] == 0
        return int((~chosen).sum()), int((targets[chosen] != IGNORE).sum())

    def start(self):
        self.sums = {}

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, extra: torch.Tensor, scale: tuple[int, int]):
        """This micro-batch's share of the step's loss: its pairs' losses summed, over the global pair count."""
        n_pairs, n_chosen = scale
        k = targets.shape[0] // 2
        side = extra[:, SIDE].to(logits.device)
        if targets.shape[0] != 2 * k or (side[:k] != 0).any() or (side[k:] != 1).any():
            raise ConfigError("a preference micro-batch must hold its pairs' chosen rows, then their rejected rows")
        picked, mask = token_logps(logits, targets)
        logps, counts = picked.sum(-1), mask.sum(-1)
        beta, method = self.cfg.beta, self.cfg.method
        stats = {}
        if method == "orpo":
            nll = -picked[:k].sum() / n_chosen  # trl: cross-entropy of the chosen half, mean over its tokens
            logps = logps / counts  # ORPO's odds come from the mean log-probability of the response's tokens
            pc, pr = logps[:k], logps[k:]
            log_odds = (pc - pr) - (torch.log1p(-torch.exp(pc)) - torch.log1p(-torch.exp(pr)))
            ratio = F.logsigmoid(log_odds)
            loss = nll - beta * ratio.sum() / n_pairs
            chosen_r, rejected_r = beta * pc.detach(), beta * pr.detach()
            stats = {"nll_loss": nll.item() * n_pairs, "log_odds_ratio": ratio.sum().item(),
                     "log_odds_chosen": log_odds.sum().item()}
        else:
            ref = extra[:, REF].to(logits.device, torch.float32)
            if method == "ipo":  # trl averages both models' log-probabilities over the response for IPO
                logps, ref = logps / counts, ref / counts
            pc, pr, rc, rr = logps[:k], logps[k:], ref[:k], ref[k:]
            diff = (pc - pr) - (rc - rr)
            losses = -F.logsigmoid(beta * diff) if method == "dpo" else (diff - 1 / (2 * beta)) ** 2
            loss = losses.sum() / n_pairs
            chosen_r, rejected_r = beta * (pc - rc).detach(), beta * (pr - rr).detach()
        stats.update({"rewards/chosen": chosen_r.sum().item(), "rewards/rejected": rejected_r.sum().item(),
                      "rewards/accuracies": (chosen_r > rejected_r).float().sum().item(),
                      "rewards/margins": (chosen_r - rejected_r).sum().item(),
                      "logps/chosen": logps[:k].detach().sum().item(),
                      "logps/rejected": logps[k:].detach().sum().item()})
        for key, v in stats.items():
            self.sums[key] = self.sums.get(key, 0.0) + v
        return loss

    def metrics(self, n_pairs: int) -> dict[str, float]:
        """The step's means over its pairs, as trl logs them."""
        return {k: v / n_pairs for k, v in self.sums.items()}


# ---- the reference pass ----

REFERENCE_DIR = "reference"
LOGPS_FILE = "logps.blk"


def reference_path(work_dir: Path) -> Path:
    return Path(work_dir) / REFERENCE_DIR / LOGPS_FILE


def load_reference(work_dir: Path, rows: str) -> torch.Tensor | None:
    """The saved reference log-probabilities of the rows whose batch_hash is `rows`; None if the pass has
    not finished, or if it was another data set's (an earlier run's in this work dir)."""
    path = reference_path(work_dir)
    if not path.exists():
        return None
    b = read_block(path, "reference")
    return b.params["logps"] if b.meta.get("rows") == rows else None


def _chunk_path(folder: Path, c: int) -> Path:
    return folder / f"chunk.{c:05d}.blk"


def _level(path: Path, rows: str) -> int:
    """The module a chunk's saved activations are the input of; 0 (the token ids) when it has none of these rows."""
    if not path.exists():
        return 0
    header = read_header(path, "reference")
    return header["step"] if header.get("meta", {}).get("rows") == rows else 0


def _module(store: BlockStore, name: str, device: torch.device, dtype: torch.dtype):
    """Module `name` of the untouched store, as step 0 computes with it, without adapters or dropout."""
    block = store.read(name)
    params = dequantize_module(dev_params(block, device), dtype) if store.base_quant else \
        {k: v.to(dtype) for k, v in dev_params(block, device).items()}
    return materialize(name, store.args, params, 0.0), params


def dev_params(block: Block, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: dev.to_device(t, device) for k, t in block.params.items()}


@torch.no_grad()
def reference_logps(store: BlockStore, work_dir: Path, inputs: torch.Tensor, targets: torch.Tensor,
                    device: torch.device, dtype: torch.dtype = torch.float32, chunk_rows: int = 8,
                    progress: Callable[..., Iterator] = lambda it, **kw: it) -> torch.Tensor:
    """Each row's summed response log-probability under the store as it stands (rows,), float32, from one
    layer-major pass; saved in WORK/reference/logps.blk and read back from there when it exists."""
    rows = batch_hash(inputs, targets)  # tags the result and every chunk: another data set's are not reused
    done = load_reference(work_dir, rows)
    folder = Path(work_dir) / REFERENCE_DIR
    if done is not None:
        _remove_chunks(folder)  # a pass killed after its result was durable, before its chunks went
        return done
    if store.journal()["version"] != 0:
        raise StoreError(f"{store.root}: trained already, so its log-probabilities are no reference; the "
                         f"reference pass runs on the store as prepared (start the run anew)")
    folder.mkdir(parents=True, exist_ok=True)
    names, args = store.trainable, store.args
    xs, ys = inputs.split(chunk_rows), targets.split(chunk_rows)
    for target in [reference_path(work_dir), *(_chunk_path(folder, c) for c in range(len(xs)))]:
        remove_stale_tmp(target)  # what a pass killed mid-write left
    # Where each chunk stands: the index of the module its saved activations are the input of (0: the ids).
    level = [_level(_chunk_path(folder, c), rows) for c in range(len(xs))]
    results = {}
    embedding = None
    for i in progress(range(min(level), len(names)), desc="reference", leave=False):
        todo = [c for c in range(len(xs)) if level[c] == i]
        if not todo and not (args.tie_word_embeddings and i == 0):
            continue
        faults.point("reference")
        module, params = _module(store, names[i], device, dtype)
        if i == 0 and args.tie_word_embeddings:
            embedding = params["weight"]  # the tied output layer multiplies by it again: kept, not read twice
        if names[i] == "output" and args.tie_word_embeddings and embedding is None:
            embedding = _module(store, names[0], device, dtype)[1]["weight"]  # a resumed pass lost it
        for c in todo:
            path = _chunk_path(folder, c)
            x = xs[c].to(device) if i == 0 else dev.to_device(read_block(path, "reference").params["x"], device)
            if names[i] == "output":
                logits = module(x, embedding) if args.tie_word_embeddings else module(x)
                logps, _ = sequence_logps(logits, ys[c].to(device))
                results[c] = dev.to_host(logps)
                write_block(path, Block(i + 1, {"logps": results[c]}, meta={"rows": rows}), "reference")
            else:
                write_block(path, Block(i + 1, {"x": dev.to_host(module(x.to(dtype) if i else x))}, meta={"rows": rows}),
                            "reference")
            level[c] = i + 1
            faults.point("reference_chunk")
        del module, params
    for c in range(len(xs)):
        if c not in results:  # finished before a kill: read back from its chunk
            results[c] = read_block(_chunk_path(folder, c), "reference").params["logps"]
    logps = torch.cat([results[c] for c in range(len(xs))]).float()
    write_block(reference_path(work_dir), Block(0, {"logps": logps}, meta={"rows": rows}), "reference")
    faults.point("reference_done")
    _remove_chunks(folder)
    return logps


def _remove_chunks(folder: Path):
    """The chunk files of a pass (this one's, or an earlier data set's beyond this one's count)."""
    for path in folder.iterdir() if folder.is_dir() else []:
        if re.fullmatch(r"chunk\.\d{5}\.blk", path.name):
            path.unlink(missing_ok=True)
