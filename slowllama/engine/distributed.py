"""Data-parallel streamed training over torch.distributed, started by torchrun.

- gloo carries every collective; on CUDA, the gradients' all-reduce goes over a second group
  on NCCL, device to device, and each rank computes on its own GPU (cuda:LOCAL_RANK).
- The global batch of an iteration is the B×N windows one process with --batch-size B×N draws;
  every rank gets the whole of it (so the token count and the journal's batch hash are the
  global ones) and runs its own rows, B per accumulation part, in rank order. Dropout is seeded
  by each micro-batch's GLOBAL index, so with the same --micro-batch the masks are those of
  the one-process run.
- The loss is normalised by the global token count, so the SUM over ranks of each module's
  gradient is the single-process gradient; it is all-reduced before the module's optimizer step,
  and every rank applies the same update. The all-reduce of module i runs while module i - 1
  recomputes its backward; module i steps and is queued at module i - 1's commit (update.py).
  A clipped step's norm-only pass all-reduces too (without overlap), so the norm is that of
  the summed gradients.
- One rank per host (LOCAL_RANK 0, the host's writer) takes the work dir's lock and writes its
  host's store, journal and run.json; global rank 0 (the leader) alone writes logs and exports.
  The other ranks write only their own activation scratch (acts/rankR) and boundary gradients.
  A rank that does not write keeps each module it updates in its RAM cache when the budget
  holds it (its own copy, bit-identical), else drops it and reads its writer's file at the next
  step, which begins with a barrier behind every writer's flush.
- Every rank makes its own boundary gradients durable before each module's all-reduce
  (journal.py), so a step cut short on any rank resumes, under the same number of ranks, from
  where the store stopped. Stores on several hosts can stop apart within a step (each writer's
  queue lags on its own): the hosts behind first copy, from the furthest store, the modules it
  committed and its journal (_catch_up).
- After each step the ranks all-gather an xxh3 digest of every module (or adapter) they
  updated and stop with one line on the first difference.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import xxhash

from ..blockfile import Block, StoreError, read_block
from ..errors import ConfigError
from ..fsutil import tmp_path
from .streamer import Streamer
from .trainer import ActivationCache, StepResult, Trainer

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
    local_rank: int = 0  # on its host (torchrun's LOCAL_RANK)
    grad_group: object = None  # on CUDA, the NCCL group that sums gradients on the device; None: gloo, on the host
    comm_bytes: int = 0  # payload bytes this rank has all-reduced so far
    comm_seconds: float = 0.0

    @property
    def leader(self) -> bool:
        """Global rank 0: the one that logs and exports."""
        return self.rank == 0

    @property
    def writer(self) -> bool:
        """The rank that writes its host's work dir."""
        return self.local_rank == 0

    def _collective(self, what: str, fn):
        try:
            return fn()
        except (RuntimeError, OSError) as e:  # gloo reports a dead or silent peer as either
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RankStopped(f"rank {self.rank}: another rank stopped or stopped answering during {what} "
                              f"({first[:200]}); every rank stops, the store holds rank 0's last commit") from e

    def all_reduce_(self, tensors: list[torch.Tensor], what: str):
        """Sum tensors over the ranks, in place, as one flat message per dtype."""
        self.start_all_reduce(tensors, what)()

    def start_all_reduce(self, tensors: list[torch.Tensor], what: str) -> Callable[[], None]:
        """Start summing tensors over the ranks; the call returned waits for the sums and writes
        them back in place. comm_seconds counts only the time a rank spends in these calls."""
        if self.world == 1 or not tensors:
            return lambda: None
        t0 = time.perf_counter()
        started = []
        pg = comm_group(tensors, self.grad_group)
        for dtype in sorted({t.dtype for t in tensors}, key=str):
            group = [t for t in tensors if t.dtype == dtype]
            # gloo sums host tensors; NCCL (pg set) sums them where they are, on the GPU.
            flat = torch.cat([t.detach().reshape(-1) if pg is not None else t.detach().reshape(-1).cpu()
                              for t in group])
            work = self._collective(what, lambda flat=flat: dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=pg,
                                                                              async_op=True))
            self.comm_bytes += flat.nbytes
            started.append((group, flat, work))
        self.comm_seconds += time.perf_counter() - t0

        def finish():
            t1 = time.perf_counter()
            for group, flat, work in started:
                self._collective(what, work.wait)
                off = 0
                for t in group:
                    t.copy_(flat[off: off + t.numel()].view_as(t))
                    off += t.numel()
            self.comm_seconds += time.perf_counter() - t1
        return finish

    def reduce_grads(self, what: str, tensors: list[torch.Tensor]) -> Callable[[], None]:
        """The update rules' hook: start summing each tensor over the ranks; call the result to
        wait for the sums. With no tensors it is a collective all the same (one zero), which the
        commit protocol uses as a fence."""
        return self.start_all_reduce(tensors or [torch.zeros(1)], f"the all-reduce of {what}")

    def sum(self, x: float, what: str) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        self.all_reduce_([t], what)
        return float(t[0])

    def wait(self, what: str, timeout: datetime.timedelta = WAIT_BETWEEN_STEPS):
        """Every rank reaches this point (the leader's writes before it are done when it calls)."""
        if self.world > 1:
            self._collective(what, lambda: dist.monitored_barrier(timeout=timeout))

    def broadcast(self, data: bytes | None, src: int, what: str) -> bytes:
        """Rank src's bytes, on every rank (a length, then the bytes: no pickling)."""
        n = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64)
        self._collective(what, lambda: dist.broadcast(n, src))
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data is not None else \
            torch.empty(int(n[0]), dtype=torch.uint8)
        self._collective(what, lambda: dist.broadcast(buf, src))
        return buf.numpy().tobytes()

    def gather(self, obj, what: str) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        self._collective(what, lambda: dist.all_gather_object(out, obj))
        return out


def comm_group(tensors: list[torch.Tensor], grad_group):
    """The group that sums these tensors: NCCL's when there is one and they all live on a GPU,
    else the default gloo group (None), which takes host copies."""
    return grad_group if grad_group is not None and all(t.is_cuda for t in tensors) else None


def rank_device(device: torch.device, local_rank: int, n_gpus: int) -> torch.device:
    """The device of a rank: on CUDA each rank of a host takes its own GPU, cuda:LOCAL_RANK, as
    torchrun expects (a device named with its index is used as given)."""
    if device.type != "cuda" or device.index is not None:
        return device
    if local_rank >= n_gpus:
        raise ConfigError(f"LOCAL_RANK {local_rank} but this host has {n_gpus} GPU(s): start at most {n_gpus} "
                          f"process(es) per host (torchrun --nproc-per-node), or name one with --device cuda:N")
    return torch.device("cuda", local_rank)


def setup(device: torch.device = torch.device("cpu"), timeout_s: float | None = None) -> tuple[Ranks, torch.device]:
    """Join the ranks that torchrun started (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); a plain run
    is rank 0 of 1. Returns the ranks and this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(), device
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
    rank = dist.get_rank()
    try:
        local = int(os.environ.get("LOCAL_RANK", rank))  # without it, one host holds every rank
    except ValueError as e:
        raise ConfigError(f"LOCAL_RANK={os.environ['LOCAL_RANK']!r}: expected an integer") from e
    grad_group = None
    if device.type == "cuda":
        device = rank_device(device, local, torch.cuda.device_count())
        torch.cuda.set_device(device)
        if dist.is_nccl_available():
            # Barriers, objects and bytes stay on gloo (its monitored barrier names a dead peer); the
            # gradients, the bulk of the traffic, go GPU to GPU. Every rank creates the group, in order.
            grad_group = dist.new_group(backend="nccl", timeout=datetime.timedelta(seconds=timeout_s))
    return Ranks(rank, dist.get_world_size(), local, grad_group=grad_group), device


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
    """A Streamer that records a digest of each module put; a rank that does not write keeps its
    writes in RAM.

    Such a rank's put keeps the new version in its cache while the budget holds it, else drops it:
    nothing reads a module again in the step that updated it, and the next step begins after its
    writer's flush (DataParallelTrainer.settle). Its ordered calls (journal, adapter file, rule 3's
    removals) are its host's writer's to run, and are dropped; its boundary gradients it writes
    itself (journal.save_boundary).
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
        self.streamer.writes, self.streamer.digests = ranks.writer, {}
        self.update.reduce_grads = ranks.reduce_grads
        self._journal = getattr(self.update, "journal", None)  # full fine-tuning's; LoRA's is its adapter file
        if self._journal is not None:
            self._journal.rank, self._journal.ranks = ranks.rank, ranks.world
            # The journal's batch hash names the layout, which a resume must repeat.
            begin, check = self.update.begin, self._journal.check_batch
            self.update.begin = lambda step, loss, tokens, batch, **kw: begin(step, loss, tokens, self._layout(batch),
                                                                              **kw)
            self._journal.check_batch = lambda point, batch: check(point, self._layout(batch))

    def holds_state(self) -> bool:
        """Data parallel runs commit every step: an interval commit would have to agree across hosts' stores."""
        return False

    def _layout(self, batch: str) -> str:
        return f"{batch}/ranks{self.ranks.world}"

    def rows_of(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows: in each accumulation part of B×N rows, rows [rank·B, (rank+1)·B)."""
        n, per = t.shape[0], self.rows * self.ranks.world
        if n % per:
            raise ConfigError(f"a global batch of {n} rows does not split into {self.ranks.world} ranks of "
                              f"--batch-size {self.rows}")
        return t.reshape(n // per, self.ranks.world, self.rows, *t.shape[1:])[:, self.ranks.rank].flatten(0, 1)

    def micro_batches(self, inputs, targets, extra=None):
        return super().micro_batches(self.rows_of(inputs), self.rows_of(targets),
                                     self.rows_of(extra) if extra is not None else None)

    def micro_seed(self, step: int, m: int) -> int:
        """Seeded by the global index of micro-batch m, whose first local row l is global row
        (l // B)·B·N + rank·B + l % B: the index one process with --batch-size B×N gives it when
        --micro-batch divides B; otherwise, the global row (distinct, though no layout matches)."""
        mb = self.cfg.micro_batch or self.rows  # None: one micro-batch, m = 0
        first = m * mb
        row = (first // self.rows) * self.rows * self.ranks.world + self.ranks.rank * self.rows + first % self.rows
        return super().micro_seed(step, row // mb if self.rows % mb == 0 else row)

    def _activation_cache(self, in_ram: bool) -> ActivationCache:
        # The step's plan is this rank's: made from its own rows (micro_batches).
        return ActivationCache(self.work_dir / "acts" / f"rank{self.ranks.rank}", in_ram, self.cfg.act_dtype)

    def _forward(self, step, mbs, acts, upto, n_tok):
        loss, done = super()._forward(step, mbs, acts, upto, n_tok)
        if upto == len(self.names):  # each rank's loss is its rows' share of the global mean
            loss = self.ranks.sum(loss, f"the sum of step {step}'s loss")
            if self.objective is not None and self.objective.sums:  # and its pairs' share of the rewards
                keys = sorted(self.objective.sums)
                t = torch.tensor([self.objective.sums[k] for k in keys], dtype=torch.float64)
                self.ranks.all_reduce_([t], f"the sum of step {step}'s rewards")
                self.objective.sums = dict(zip(keys, t.tolist()))
        return loss, done

    def settle(self, what: str):
        """Every writer's queued writes are on disk; then the boundary files of a rank that does
        not write, which no resume can need any more, go."""
        self.streamer.flush()
        self.ranks.wait(what)
        if self._journal is not None and not self.ranks.writer:
            self._journal.remove_own_boundaries()

    def train_step(self, inputs, targets, extra=None) -> StepResult:
        """Step self.step on the global batch (B×N, T): this rank's rows, the summed gradients, the digests compared."""
        self.settle(f"the start of step {self.step}")
        self.streamer.digests.clear()
        res = super().train_step(inputs, targets, extra)
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
        """As Trainer.recover, from the point every rank's store agrees on. The point is read once,
        before any rank writes: a writer that finished the step first would move it for the others."""
        point = self.update.resume_point()
        # How far each store went: (journal step, modules of that step committed).
        every = self.ranks.gather((self.update.step, 0 if point is None else len(self.names) - point.first_updated),
                                  "the comparison of the stores' resume points")
        if any(stand != every[0] for stand in every):
            point = self._catch_up(every)
        self.update.resume_point = lambda: point
        try:
            return super().recover(batch_for_step)
        finally:
            del self.update.resume_point  # the method again

    def _catch_up(self, every: list[tuple[int, int]]):
        """Stores on several hosts that stopped apart in one step: each writer behind takes, top
        down, the modules the furthest store committed (every rank computed the same update, so
        they are what it would have written; each rank's boundary gradients are on disk, journal.py),
        then that store's journal. Returns the resume point they all share now."""
        ahead = max(every)
        src = every.index(ahead)
        for r, (step, done) in enumerate(every):
            if self._journal is None and step != ahead[0]:
                raise RankDivergence(f"--resume: rank {r}'s adapters are at step {step}, rank {src}'s at step "
                                     f"{ahead[0]}: LoRA adapter files are not copied between hosts; copy "
                                     f"{self.update.path.name} from rank {src}'s work dir to rank {r}'s to continue")
            if not (step == ahead[0] or step == ahead[0] - 1 and ahead[1] == 0):
                raise RankDivergence(f"--resume: rank {r}'s store is at step {step} ({done} module(s) of it "
                                     f"committed), rank {src}'s at step {ahead[0]} ({ahead[1]}): the hosts' "
                                     f"stores stopped too far apart to catch up")
        j = json.loads(self.ranks.broadcast(json.dumps(self._journal.read()).encode() if self.ranks.rank == src
                                            else None, src, "the furthest store's journal"))
        names = self.names
        moved = names if j["phase"] == "idle" else names[len(names) - ahead[1]:]
        if j["phase"] != "idle" and self.ranks.writer:
            self._journal.adopt(j)  # a "backward" journal first: then each module copied is a commit of it
        for name in reversed(moved):
            path = self.store.path(name)
            data = self.ranks.broadcast(path.read_bytes() if self.ranks.rank == src else None, src,
                                        f"the furthest store's {name}")
            if not self.ranks.writer or self.store.step_of(name) == j["version"] + (j["phase"] != "idle"):
                continue  # this host's store has it already
            tmp = tmp_path(path)
            tmp.write_bytes(data)
            try:
                block = read_block(tmp, name)  # checksummed; the header names the other store, this one rewrites it
            finally:
                tmp.unlink()
            self.streamer.put(name, block, on_commit=lambda c, name=name: self._journal.checksums.__setitem__(name, c))
        if j["phase"] == "idle" and self.ranks.writer:
            self._journal.adopt(j)
        self.streamer.flush()
        self.ranks.wait("the stores catching up")  # not settle(): the boundary files are about to be read
        self._journal.reload()
        log.info("rank %d: the stores caught up with rank %d's, at step %d", self.ranks.rank, src, j["step"])
        return self.update.resume_point()


def make_trainer(store, work_dir, device, cfg, progress=None, *, ranks: Ranks, rows_per_rank: int) -> Trainer:
    """A plain Trainer for one process, a DataParallelTrainer under torchrun."""
    if ranks.world == 1:
        return Trainer(store, work_dir, device, cfg, progress=progress)
    return DataParallelTrainer(store, work_dir, device, cfg, progress=progress, ranks=ranks,
                               rows_per_rank=rows_per_rank)
