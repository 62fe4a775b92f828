"""The commit protocol of a streamed full-fine-tuning step, and the journal a resume reads.

A step at update version v commits its modules from the top down. For module i, in order:
  1. `grad_in.i.blk` (i > 0): the gradient module i passes down is durable;
  2. module i's file is replaced by version v + 1;
  3. `grad_in.(i+1).blk`, the gradient module i consumed, is removed.
`journal.json` says "backward" (with the step's loss, token count and a hash of its batch)
before the first commit, and "idle" (step + 1, version v + 1, every module's checksum) after
the last. A crash at any point leaves modules 0..k-1 at v and k.. at v + 1, and by rule 1 the
gradient into module k - 1 on disk: recovery re-runs the forward pass below k on the same
batch (checked against the hash) and goes on down.

A tied model (one matrix for the embedding and the output layer, whose module then has no
tensors) adds rule 0, run once per step after the "backward" journal and before rule 1 of the
output module:
  0. `tied.blk` (tagged with version v) is durable. It holds the output side's gradient for
     the embedding's matrix when that gradient does not fit the RAM budget ("grad"), else the
     output layer's input per micro-batch ("inputs"), while the gradient itself stays in RAM.
The embedding's commit (rule 2 for module 0) adds that gradient to its own and steps once.
A crash before rule 0 leaves every module at v: the step starts again from the top. After
it, recovery reads `tied.blk` back: the gradient as saved, or recomputed from the inputs and
the embedding, which is still at v until its own commit (the same operations on the same
bits, so the same gradient). The output module's empty file is replaced at v + 1 like any
other, so that every module's version follows the rule above. `tied.blk` is removed after
the "idle" journal; a stale one carries an older version tag and is never read.

A clipped step (`--clip-grad-norm`) has run a norm-only reverse pass before its "backward"
journal, which records the global gradient norm and the coefficient every module's gradients
are multiplied by before its optimizer step ("grad_norm", "clip_coef"). Recovery takes the
coefficient from there instead of recomputing a norm over modules of which some are already
updated; a crash before that journal leaves every module at v, and the step starts again.

The order holds because every job goes through one writer that runs them in submission
order: `Journal` takes only a writer that says so (`ORDERED_WRITER`), and has no other way
to write.

Interval commits (--commit-every, commits.py): while the RAM budget holds every module, a step
writes nothing. Its modules are held in RAM at v + 1 (the writer's `hold`), without boundary
gradients, tied.blk or journals, and the journal's step and version move on in RAM only. Every N
steps the held modules, at v + N, are committed as a redo log:
  a. each is written, durably, beside its file (`NAME.commit.blk`);
  b. `journal.json` says "commit" (step and version after the commit, the modules staged and the
     version they replace): the commit point;
  c. each staged file is renamed over its module's;
  d. the journal says "idle" at the new step.
A crash before b leaves the last commit whole (stale staged files are removed on resume); after
it, recovery finishes c and d. Either way a resume starts from a commit and replays the steps
since on the same batches; a crash loses at most the steps held. The commit is written while the
next step runs (Trainer): that step steps each module in place only once its staged write is done,
top module first as the reverse pass wants them; the cache keeps a staged module until c has renamed
it (its own file still holds the version before); the step does not end before d is on disk.

Data parallel (distributed.py): each rank computes the boundary gradients of its own rows,
so rule 1 holds per rank, in rank R's own files (`grad_in.i.rankR.blk`, `tied.rankR.blk`;
rank 0 keeps the plain names). A rank writes them itself, durably, BEFORE it enters the
all-reduce of module i's gradients (`save_boundary`), and no store replaces module i before
that all-reduce has returned, which needs every rank to have entered it: so whenever any
store holds module i at v + 1, every rank's gradient into module i - 1 is on disk. The
writer's queue could not promise that, since one rank's queue cannot see another's. A
tied output, which has no gradient to all-reduce, passes an empty collective instead.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import xxhash

from .. import device as dev
from .. import faults
from ..blockfile import Block, StoreError, read_block, write_block
from ..fsutil import atomic_write_json, fsync_dir
from .store import BlockStore, file_stem

log = logging.getLogger(__name__)


def batch_hash(inputs: torch.Tensor, targets: torch.Tensor) -> str:
    """xxh3 of a step's token ids: a resume must finish a step on the batch that began it."""
    h = xxhash.xxh3_64()
    for t in (inputs, targets):
        t = t.detach().to("cpu", torch.int64).contiguous()
        h.update(json.dumps(list(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@dataclass
class ResumePoint:
    """A step cut short in its backward pass: modules first_updated.. are already at version + 1."""

    step: int
    version: int
    first_updated: int
    loss: float
    tokens: int
    batch: str
    grad_norm: float | None = None  # a clipped step: the norm before clipping, and the coefficient
    clip_coef: float | None = None
    metrics: dict | None = None  # a preference step's rewards, for its log record


class Journal:
    def __init__(self, store: BlockStore, writer):
        if not getattr(writer, "ORDERED_WRITER", False):
            raise TypeError("the commit protocol needs a writer that runs its jobs in submission order")
        self.store, self.writer = store, writer
        self.path = store.root / "journal.json"
        self.reload()
        self._last: dict | None = None  # the log record of the step in its backward pass
        # Interval commits: the current step's modules are held in RAM, not committed (see above).
        self.holding = False
        # Data parallel: this rank, and whether the ranks write their boundaries themselves.
        self.rank, self.ranks = 0, 1

    def read(self) -> dict:
        return self.store.journal()

    def reload(self):
        """Where the journal on disk stands (after another host's journal was adopted, distributed.py)."""
        j = self.read()
        self.step, self.version = j["step"], j["version"]
        self.checksums: dict[str, int] = dict(j.get("checksums") or self.store.initial_checksums)
        self.committed = (self.step, self.version)  # where the store stands; step and version run ahead when holding

    def adopt(self, j: dict):
        """Queue another store's journal as this one's: a host catching up with the furthest store."""
        self.writer.run_in_order(lambda: atomic_write_json(self.path, j))

    @property
    def _own(self) -> str:
        return f".rank{self.rank}" if self.rank else ""

    def grad_path(self, i: int) -> Path:
        return self.store.root / f"grad_in.{i}{self._own}.blk"

    @property
    def tied_path(self) -> Path:
        return self.store.root / f"tied{self._own}.blk"

    # ---- writing, always through the ordered writer ----
    def _write(self, j: dict):
        if j["phase"] == "backward":
            self._last = {"iter": j["step"], "loss": j["loss"], "tokens": j["tokens"],
                          **({"grad_norm": j["grad_norm"]} if "grad_norm" in j else {}), **j.get("metrics", {})}
        elif self._last and self._last["iter"] == j["step"] - 1:
            j = {**j, "last": self._last}  # the finished step's loss: a resume logs it if the log lost it
        if j["phase"] == "idle":
            self.step, self.version = j["step"], j["version"]
            self.committed = (self.step, self.version)
        # The checksums are taken when the journal is written, after the commits queued before it.
        self.writer.run_in_order(lambda: atomic_write_json(self.path, {**j, "checksums": dict(self.checksums)}))

    def begin(self, step: int, version: int, loss: float, tokens: int, batch: str, clip: dict | None = None,
              metrics: dict | None = None):
        """The "backward" journal; clip holds a clipped step's "grad_norm" and "clip_coef", metrics a
        preference step's rewards (logged, never read back into the math)."""
        if self.holding:  # nothing goes to disk: a crash replays the step from the last commit
            self._last = {"iter": step, "loss": loss, "tokens": tokens,
                          **({"grad_norm": clip["grad_norm"]} if clip else {}), **(metrics or {})}
            return
        self._write({"step": step, "version": version, "phase": "backward", "loss": loss, "tokens": tokens,
                     "batch": batch, **(clip or {}), **({"metrics": metrics} if metrics else {})})

    def skip(self, step: int, version: int):
        """A step with a non-finite loss: counted as done, with no update."""
        if self.holding:
            self.step = step + 1
            return
        self._write({"step": step + 1, "version": version, "phase": "idle"})

    def commit(self, i: int, name: str, version: int, new: Block, grads_in: list[torch.Tensor] | None):
        """Rules 1-3 for module i, whose new version is `new` and which passes grads_in down; when holding,
        only kept in RAM until the next interval commit."""
        if self.holding:
            self.writer.hold(name, new)
            return
        if i > 0 and self.ranks == 1:  # with ranks, save_boundary has made it durable already
            self.writer.run_in_order(self._boundary_write(i, version, grads_in))
        self.writer.put(name, new, on_commit=lambda c: self.checksums.__setitem__(name, c))
        stale = self.grad_path(i + 1)
        self.writer.run_in_order(lambda: stale.unlink(missing_ok=True))

    def save_boundary(self, i: int, version: int, grads_in: list[torch.Tensor] | None):
        """Data parallel, before module i's all-reduce: this rank's rule 1, durable when it returns."""
        if i > 0:
            self._boundary_write(i, version, grads_in)()

    def _boundary_write(self, i: int, version: int, grads_in: list[torch.Tensor]) -> Callable[[], None]:
        """Rule 1's write: the gradient module i passes down, copied to the host now, written when called."""
        path = self.grad_path(i)
        g = Block(version, {f"g{m}": dev.to_host(t.detach()) for m, t in enumerate(grads_in)})
        return lambda: write_block(path, g, path.stem, model=self.store.model_id)

    def save_tied(self, version: int, kind: str, tensors: dict[str, torch.Tensor]) -> threading.Event:
        """Rule 0: queue `tied.blk` of update `version`; the event is set once it is durable.
        With ranks, each writes its own now, before the collective that stands for the output's."""
        if kind not in TIED_KINDS:
            raise ValueError(f"tied.blk holds one of {TIED_KINDS}, not {kind!r}")
        block = Block(version, {k: dev.to_host(t.detach()) for k, t in tensors.items()}, meta={"kind": kind})
        path, done = self.tied_path, threading.Event()

        def write():
            write_block(path, block, path.stem, model=self.store.model_id)
            done.set()
        if self.ranks > 1:
            write()
        else:
            self.writer.run_in_order(write)
        return done

    def remove_own_boundaries(self):
        """A rank that does not write the store: its boundary files of a step every store has finished."""
        mine = re.compile(rf"grad_in\.\d+{re.escape(self._own)}\.blk")
        for path in self.store.root.iterdir():
            if mine.fullmatch(path.name):
                path.unlink(missing_ok=True)
        self.tied_path.unlink(missing_ok=True)

    def finish(self, step: int, version: int):
        if self.holding:
            self.step, self.version = step + 1, version + 1
            return
        self._write({"step": step + 1, "version": version + 1, "phase": "idle"})
        for stale in (self.grad_path(1), self.tied_path):
            self.writer.run_in_order(lambda stale=stale: stale.unlink(missing_ok=True))

    # ---- interval commits ----
    def staged_path(self, name: str) -> Path:
        return self.store.root / f"{file_stem(name)}.commit.blk"

    def commit_held(self):
        """Queue the interval commit (a-d above) of the steps held since the last one; nothing if none."""
        if (self.step, self.version) == self.committed:
            return
        held = self.writer.held()
        # Top module first: the next step's reverse pass steps them in that order, each once its own write is
        # done (Streamer.wait_written), so the commit is written while that step runs.
        names = [n for n in reversed(self.store.trainable) if n in held]
        for name in names:
            self.writer.put(name, held[name], on_commit=lambda c, name=name: self.checksums.__setitem__(name, c),
                            path=self.staged_path(name))
        self._write({"step": self.step, "version": self.version, "phase": "commit", "staged": names,
                     "from_version": self.committed[1]})
        self.writer.run_in_order(lambda: self._install(names))
        self._write({"step": self.step, "version": self.version, "phase": "idle"})
        self.committed = (self.step, self.version)

    def _install(self, names: list[str]):
        """Rule c: each staged file over its module's (already done for those whose staged file is gone)."""
        for name in names:
            staged, path = self.staged_path(name), self.store.path(name)
            if staged.exists():
                faults.point("before_rename")
                os.replace(staged, path)
                faults.point("after_rename")
        fsync_dir(self.store.root)
        self.writer.installed(names)

    def _settle_commit(self, names: list[str]):
        """On resume: finish an interval commit cut short after its commit point; remove staged files of
        one cut short before it (the last commit stands)."""
        j = self.read()
        if j["phase"] == "commit":
            log.info("finishing the commit of step %d that a crash cut short", j["step"])
            self.writer.run_in_order(lambda: self._install(j["staged"]))
            self._write({"step": j["step"], "version": j["version"], "phase": "idle",
                         **({"last": j["last"]} if "last" in j else {})})
        else:
            stale = [self.staged_path(n) for n in names]
            self.writer.run_in_order(lambda: [p.unlink(missing_ok=True) for p in stale])
        self.writer.flush()

    # ---- recovery ----
    def resume_point(self, names: list[str]) -> ResumePoint | None:
        """Where a step cut short stands; None when the last step finished. Stops on a store
        whose module versions fit no crash of this protocol."""
        self._settle_commit(names)
        j = self.read()
        step, version = j["step"], j["version"]
        have = [self.store.step_of(n) for n in names]
        if j["phase"] == "idle":
            bad = [(n, v) for n, v in zip(names, have) if v != version]
            if bad:
                raise StoreError(f"{self.store.path(bad[0][0])}: module {bad[0][0]} is at version {bad[0][1]} but "
                                 f"the journal says {version}: the file was replaced, the store is inconsistent")
            return None
        k = next((i for i, v in enumerate(have) if v == version + 1), len(have))
        if any(v != version for v in have[:k]) or any(v != version + 1 for v in have[k:]):
            raise StoreError(f"{self.store.root}: module versions {have} do not fit a cut-short update {version}")
        self._last = {"iter": step, "loss": j["loss"], "tokens": j["tokens"],
                      **({"grad_norm": j["grad_norm"]} if "grad_norm" in j else {}), **j.get("metrics", {})}
        return ResumePoint(step, version, k, j["loss"], j["tokens"], j.get("batch", ""), j.get("grad_norm"),
                           j.get("clip_coef"), j.get("metrics"))

    def check_batch(self, point: ResumePoint, batch: str):
        if point.batch and point.batch != batch:
            raise StoreError(f"{self.path}: step {point.step} began on another batch than the data now gives; "
                             f"the data or the options changed since, and the step cannot be finished exactly")

    def boundary_grads(self, point: ResumePoint, n_micro: int, device: torch.device) -> list[torch.Tensor]:
        """The gradient into the highest module not yet updated, as made durable by rule 1."""
        path = self.grad_path(point.first_updated)
        g = read_block(path, path.stem, model=self.store.model_id)
        if g.step != point.version:
            raise StoreError(f"{path}: gradient of update {g.step}, expected {point.version}")
        return [dev.to_device(g.params[f"g{m}"], device) for m in range(n_micro)]

    def load_tied(self, version: int) -> Block:
        """`tied.blk` as rule 0 made it durable for update `version`."""
        path = self.tied_path
        b = read_block(path, path.stem, model=self.store.model_id)
        if b.step != version or b.meta.get("kind") not in TIED_KINDS:
            raise StoreError(f"{path}: {b.meta.get('kind')!r} of update {b.step}, expected one of update {version}")
        return b


TIED_KINDS = ("grad", "inputs")  # what tied.blk holds: the gradient, or what recomputes it
