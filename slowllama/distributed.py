"""Data-parallel streamed training over torch.distributed (gloo), started by torchrun.

The design, for ranks on one host sharing one work dir:
- The global batch of an iteration is the B×N windows one process with --batch-size B×N draws;
  every rank gets the whole of it (so the token count and the journal's batch hash are the
  global ones) and runs its own rows, B per accumulation part, in rank order.
- The loss is normalised by the global token count, so the SUM over ranks of each module's
  gradient is the single-process gradient; it is all-reduced before the module's optimizer step,
  and every rank applies the same update.
- Rank 0 (the leader) takes the locks and writes everything: store, journal, boundary
  gradients, logs, exports. The other ranks (followers) write only their own activation
  scratch (acts/rankR). A follower keeps each module it updates in its RAM cache when the
  budget holds it (its own copy, bit-identical to the leader's), else drops it and reads the
  leader's file at the next step, which begins with a barrier behind the leader's flush.
- After each step the ranks all-gather an xxh3 digest of every module (or adapter) they
  updated and stop with one line on the first difference.
- A step cut short in its backward pass is not resumed across ranks (the boundary gradients
  on disk are the leader's rows only): such a resume is refused by name.
"""
from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import xxhash

from .blackbox import Streamer
from .model import ConfigError
from .store import Block, StoreError
from .trainer import StepResult, Trainer, ActivationCache

log = logging.getLogger(__name__)

TIMEOUT_ENV = "SLOWLLAMA_DIST_TIMEOUT"  # seconds a collective waits for a silent peer
DEFAULT_TIMEOUT = 300.0
WAIT_BETWEEN_STEPS = datetime.timedelta(hours=6)  # the leader may be exporting a large model meanwhile


class RankStopped(ConnectionError):
    """Another rank died or stopped answering; this one stops too (an OSError: one line at the CLI)."""


class RankDivergence(StoreError):
    """Two ranks hold different versions of a module after the same step."""


@dataclass
class Ranks:
    """This process's place among the ranks; with world 1 every collective is a no-op."""

    rank: int = 0
    world: int = 1
    comm_bytes: int = 0  # payload bytes this rank has all-reduced so far
    comm_seconds: float = 0.0

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def _collective(self, what: str, fn):
        try:
            return fn()
        except (RuntimeError, OSError) as e:  # gloo reports a dead or silent peer as either
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RankStopped(f"rank {self.rank}: another rank stopped or stopped answering during {what} "
                              f"({first[:200]}); every rank stops, the store holds rank 0's last commit") from e

    def all_reduce_(self, tensors: list[torch.Tensor], what: str):
        """Sum tensors over the ranks, in place, as one flat message per dtype."""
        if self.world == 1 or not tensors:
            return
        t0 = time.perf_counter()
        for dtype in sorted({t.dtype for t in tensors}, key=str):
            group = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.detach().reshape(-1).cpu() for t in group])  # gloo: host tensors
            self._collective(what, lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM))
            self.comm_bytes += flat.nbytes
            off = 0
            for t in group:
                t.copy_(flat[off: off + t.numel()].view_as(t))
                off += t.numel()
        self.comm_seconds += time.perf_counter() - t0

    def reduce_grads(self, name: str, params: dict):
        """The update rules' hook: each parameter's gradient becomes its sum over the ranks."""
        self.all_reduce_([p.grad for p in params.values() if p.grad is not None], f"the all-reduce of {name}'s "
                         f"gradient")

    def sum(self, x: float, what: str) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        self.all_reduce_([t], what)
        return float(t[0])

    def wait(self, what: str, timeout: datetime.timedelta = WAIT_BETWEEN_STEPS):
        """Every rank reaches this point (the leader's writes before it are done when it calls)."""
        if self.world > 1:
            self._collective(what, lambda: dist.monitored_barrier(timeout=timeout))

    def gather(self, obj, what: str) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        self._collective(what, lambda: dist.all_gather_object(out, obj))
        return out


def setup(timeout_s: float | None = None) -> Ranks:
    """Join the ranks that torchrun started (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start data-parallel runs with "
                          f"torchrun --nproc-per-node N finetune.py ...")
    if timeout_s is None:
        try:
            timeout_s = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
        except ValueError as e:
            raise ConfigError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r}: expected seconds") from e
    if not dist.is_initialized():
        # gloo on every device: gradients travel through host RAM, which the streamed step uses anyway.
        dist.init_process_group("gloo", init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    return Ranks(dist.get_rank(), dist.get_world_size())


def teardown(ranks: Ranks):
    if ranks.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def digest(block: Block) -> str:
    """xxh3 of a block's parameters and optimizer state, by key: what ranks compare after a step."""
    h = xxhash.xxh3_64()
    tensors = sorted(block.params.items()) + sorted((f"{k}#{s}", t) for k, st in block.optim.items()
                                                   for s, t in st.items())
    for k, t in tensors:
        h.update(k.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RankStreamer(Streamer):
    """A Streamer that records a digest of each module put; a follower's writes stay in RAM.

    A follower's put keeps the new version in its cache while the budget holds it, else drops it:
    nothing reads a module again in the step that updated it, and the next step begins after the
    leader's flush (DataParallelTrainer.train_step). Its ordered calls (journal, boundary
    gradients, adapter file) are the leader's to run, and are dropped.
    """

    writes: bool = True
    digests: dict[str, str]

    def put(self, name: str, block: Block, on_commit=None):
        self.digests[name] = digest(block)
        if self.writes:
            return super().put(name, block, on_commit)
        with self._lock:
            stale = self._reads.pop(name, None)
            self._cache[name] = block
            self._cache.move_to_end(name)
            self._evict(keep_newest=False)
        if stale is not None:
            stale.cancel()

    def run_in_order(self, fn):
        if self.writes:
            return super().run_in_order(fn)
        self._raise_write_error()


class DataParallelTrainer(Trainer):
    """A Trainer for one rank: it is handed the global batch and computes its own rows of it."""

    def __init__(self, *args, ranks: Ranks, rows_per_rank: int, **kw):
        super().__init__(*args, **kw)
        self.ranks, self.rows = ranks, rows_per_rank
        # The Trainer builds a plain Streamer; give it the rank's put and ordered calls. Update
        # rule and journal hold this same object, so they all see the change.
        self.streamer.__class__ = RankStreamer
        self.streamer.writes, self.streamer.digests = ranks.leader, {}
        if not ranks.leader and hasattr(self.update, "tied_in_ram"):
            self.update.tied_in_ram = True  # a tied.blk on disk would be the leader's rows, not this rank's
        self.update.reduce_grads = ranks.reduce_grads
        begin = self.update.begin
        # The journal's batch hash names the layout: a one-process resume of a step this run cut
        # short would read the leader's boundary gradient, for its rows only, and is refused.
        self.update.begin = lambda step, loss, tokens, batch: begin(step, loss, tokens, f"{batch}/ranks{ranks.world}")

    def rows_of(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows: in each accumulation part of B×N rows, rows [rank·B, (rank+1)·B)."""
        n, per = t.shape[0], self.rows * self.ranks.world
        if n % per:
            raise ConfigError(f"a global batch of {n} rows does not split into {self.ranks.world} ranks of "
                              f"--batch-size {self.rows}")
        return t.reshape(n // per, self.ranks.world, self.rows, *t.shape[1:])[:, self.ranks.rank].flatten(0, 1)

    def micro_batches(self, inputs, targets):
        return super().micro_batches(self.rows_of(inputs), self.rows_of(targets))

    def _activation_cache(self, in_ram: bool) -> ActivationCache:
        # The step's plan is this rank's: made from its own rows (micro_batches).
        return ActivationCache(self.work_dir / "acts" / f"rank{self.ranks.rank}", in_ram, self.cfg.act_dtype)

    def _forward(self, step, mbs, acts, upto, n_tok):
        loss, done = super()._forward(step, mbs, acts, upto, n_tok)
        if upto == len(self.names):  # each rank's loss is its rows' share of the global mean
            loss = self.ranks.sum(loss, f"the sum of step {step}'s loss")
        return loss, done

    def train_step(self, inputs, targets) -> StepResult:
        """Step self.step on the global batch (B×N, T): this rank's rows, the summed gradients, the digests compared."""
        self.streamer.flush()  # the leader's writes of the last step are on disk before any rank reads
        self.ranks.wait(f"the start of step {self.step}")
        self.streamer.digests.clear()
        res = super().train_step(inputs, targets)
        self.compare(res.step)
        return res

    def compare(self, step: int):
        """Stop on the first module whose new version differs between ranks."""
        mine = dict(self.streamer.digests)
        if self.adapters is not None:
            mine = {m: digest(Block(0, self.adapters.named(m))) for m in self.adapters.params}
        every = self.ranks.gather(mine, f"the comparison of step {step}'s modules")
        for r, theirs in enumerate(every):
            bad = sorted(n for n in set(theirs) | set(every[0]) if theirs.get(n) != every[0].get(n))
            if bad:
                raise RankDivergence(f"rank {r}'s {bad[0]} after step {step} differs from rank 0's "
                                     f"({len(bad)} module(s) differ): the ranks no longer train the same model")

    def recover(self, batch_for_step):
        point = self.update.resume_point()
        if point is not None and self.ranks.world > 1:
            raise ConfigError(f"--resume: step {point.step} was cut short in its backward pass under torchrun; "
                              f"finishing it needs every rank's boundary gradient, which only rank 0 kept. "
                              f"Start again in a new --work-dir")
        return super().recover(batch_for_step)


def make_trainer(store, work_dir, device, cfg, progress=None, *, ranks: Ranks, rows_per_rank: int) -> Trainer:
    """A plain Trainer for one process, a DataParallelTrainer under torchrun."""
    if ranks.world == 1:
        return Trainer(store, work_dir, device, cfg, progress=progress)
    return DataParallelTrainer(store, work_dir, device, cfg, progress=progress, ranks=ranks,
                               rows_per_rank=rows_per_rank)
