"""One training step over streamed modules, and resuming a step that a crash cut short.

A step, for modules 0..M-1 (embedding, blocks, norm, output) and micro-batches:

  forward, layer-major: for each module below the turn, for each micro-batch,
  cache the module's input and the RNG state and run it without grad.
  turn: the top modules (at least the last block, the norm and the output layer; as
  many more blocks as the RAM budget holds, plan.py) are resident together; for each
  micro-batch they run forward with grad and backward at once, so the loss is known
  before anything is written and the turn's modules need no recompute.
  backward, in reverse: each module below the turn recomputes its forward pass
  from its cached input with its RNG state restored, and backpropagates the
  gradient of its output. Every module, from the output layer down, then makes the
  gradient of its input durable, steps the optimizer and is queued for an atomic write.

With --clip-grad-norm, full fine-tuning runs the reverse pass twice: first for the gradient
norms only (nothing updated or written; the cached inputs and the turn's gradients are kept),
then for real, each module's gradients multiplied by the clipping coefficient before its
optimizer step. LoRA keeps every adapter gradient in RAM and clips them all at the step's end.

A tied model's output layer runs on the embedding's weight, read once more at the turn; the
gradient it leaves there waits for the embedding's commit (update.py; journal.py's rule 0).

A preference run (engine/preference.py) swaps the output module's next-token loss for DPO's, IPO's
or ORPO's over each micro-batch's pairs; each row carries its side and reference log-probability
beside its tokens (the extra of train_step), and the schedule is unchanged.

What a step updates and how it commits is its update rule's (update.py: full fine-tuning,
LoRA); the commit order and the journal that a resume reads are journal.py's. When the RAM budget
holds every module (plan.holds_trained_state), --commit-every keeps the updated modules in RAM and
commits them every N steps instead (commits.py says when); a caller that stops between steps without
a crash calls commit() first, or the held steps are lost as a crash loses them.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .. import device as dev
from .. import faults
from ..blockfile import Block, StoreError, read_block, write_block
from ..data.windows import IGNORE
from ..errors import ConfigError
from ..model.lora import ADAPTERS, Adapters, LoraConfig
from .commits import CommitPolicy, interval
from .journal import batch_hash
from .optim import OptimConfig
from .plan import ModuleSize, StepPlan, cached_input_bytes, holds_trained_state, module_sizes, plan_step
from .preference import PreferenceConfig, PreferenceObjective
from .store import BlockStore
from .streamer import Streamer
from .update import FullUpdate, LoraUpdate, NonFiniteError, clip_coefficient, tied_grad_in_ram

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    dropout: float = 0.0
    micro_batch: int | None = None  # None: the whole batch at once
    compute_dtype: torch.dtype = torch.float32
    act_dtype: torch.dtype = torch.float32
    ram_budget: int | None = 0  # bytes of modules and activations kept in RAM; None: no limit
    prefetch: bool = True
    verify: bool = True  # check each module's checksum as it is read
    stop_on_nonfinite_loss: bool = False
    lora: LoraConfig | None = None  # train adapters only; the store is then never written
    # How a 16-bit store rounds updated masters; "nearest" exists only as the control that shows why.
    store_rounding: str = "stochastic"
    optim_state_dtype: torch.dtype = torch.float32  # bfloat16 halves the optimizer state on disk
    lr_at: Callable[[int], float] | None = None  # step -> lr; None: optim.lr throughout
    clip_grad_norm: float = 0.0  # clip the global gradient norm to this, as clip_grad_norm_; 0: off
    # Blocks the turn holds beyond the minimal three (K); None: as many as the RAM budget holds (plan.py).
    # Any K gives the same bits; tests force it to run the same step through each schedule.
    turn_blocks: int | None = None
    # Steps between commits when the budget holds every module (commits.py); None: auto; 1: every step.
    # Any value gives the same bits; with modules that do not fit, every step commits.
    commit_every: int | None = 1
    # A preference loss (engine/preference.py) instead of the next-token loss; None: the next-token loss.
    preference: PreferenceConfig | None = None

    def optim_at(self, step: int) -> OptimConfig:
        """The optimizer settings of a step: a resumed step gets the lr it began with."""
        return self.optim if self.lr_at is None else dataclasses.replace(self.optim, lr=self.lr_at(step))


@dataclass
class StepResult:
    step: int
    loss: float
    tokens: int
    skipped: bool = False
    grad_norm: float | None = None  # with clipping: the global gradient norm before clipping
    metrics: dict | None = None  # a preference step's rewards, as trl logs them


class ActivationCache:
    """Each module's input per micro-batch, with the RNG state before it: in RAM or in scratch files."""

    def __init__(self, directory: Path, in_ram: bool, dtype: torch.dtype):
        self.dir, self.in_ram, self.dtype = directory, in_ram, dtype
        self._ram: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        if not in_ram:
            directory.mkdir(parents=True, exist_ok=True)

    def put(self, i: int, mb: int, x: torch.Tensor, rng: torch.Tensor):
        x = dev.to_host(x.detach(), self.dtype if x.is_floating_point() else None)
        if self.in_ram:
            self._ram[i, mb] = (x, rng.cpu())
        else:
            # Scratch: a crash loses nothing that a resume cannot recompute, so no fsync.
            write_block(self.dir / f"act.{i}.{mb}.blk", Block(0, {"x": x, "rng": rng.cpu()}), f"act.{i}.{mb}",
                        durable=False)

    def get(self, i: int, mb: int, keep: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The input and RNG state put there; removed unless keep (a clipped step reads them twice)."""
        if self.in_ram:
            x, rng = self._ram[i, mb] if keep else self._ram.pop((i, mb))
            return x.detach(), rng.clone()  # a tensor of its own: a gradient left on it would be summed into
        path = self.dir / f"act.{i}.{mb}.blk"
        b = read_block(path, f"act.{i}.{mb}")
        if not keep:
            path.unlink()
        # The RNG setter reads a whole storage: give it one of its own, not a view.
        return b.params["x"], b.params["rng"].clone()


class Trainer:
    """The layer-major schedule of a step; what a step updates and commits is its update rule's."""

    def __init__(self, store: BlockStore, work_dir: str | Path, device: torch.device, cfg: TrainConfig,
                 progress: Callable[..., Iterator] | None = None):
        self.store, self.device, self.cfg = store, device, cfg
        self.work_dir = Path(work_dir)
        self.names = store.trainable
        self.args = store.args
        dev.check_compute_dtype(device, cfg.compute_dtype)
        if not 0.0 <= cfg.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1), got {cfg.dropout}")
        if not (math.isfinite(cfg.clip_grad_norm) and cfg.clip_grad_norm >= 0):
            raise ConfigError(f"--clip-grad-norm must be 0 (off) or positive, got {cfg.clip_grad_norm}")
        # A 16-bit store is widened as it is read, to what the module computes with: the fp32 master,
        # or LoRA's frozen base in the compute dtype.
        self.streamer = Streamer(store, ram_budget=float("inf") if cfg.ram_budget is None else cfg.ram_budget,
                                 prefetch=cfg.prefetch, verify=cfg.verify, device=device,
                                 params_dtype=cfg.compute_dtype if cfg.lora is not None else torch.float32)
        self.progress = progress or (lambda it, **kw: it)
        self.sizes: list[ModuleSize] = module_sizes(store, cfg)
        # On CUDA the turn computes on the device: half of its free memory may hold the extra blocks,
        # the rest stays for the minimal turn, the module computing and the one prefetched.
        self.device_budget = math.inf
        if device.type == "cuda":
            from ..device import memory_budget

            self.device_budget = memory_budget(device) / 2
        self.plan: StepPlan | None = None  # the plan of the step running, from its micro-batches' shape
        self.commits = CommitPolicy(cfg.commit_every)
        self._commit_written: threading.Event | None = None  # set once the interval commit in flight is on disk
        self.objective = PreferenceObjective(cfg.preference) if cfg.preference is not None else None
        try:
            self.update = (LoraUpdate(store, self.streamer, cfg, self.adapters_path, device) if cfg.lora is not None
                           else FullUpdate(store, self.streamer, cfg))
        except BaseException:
            self.streamer.close()
            raise

    @property
    def adapters_path(self) -> Path:
        return self.work_dir / "lora_adapters.blk"

    @property
    def adapters(self) -> Adapters | None:
        return getattr(self.update, "adapters", None)

    def journal(self) -> dict:
        return self.update.state()

    @property
    def step(self) -> int:
        """The next step to run. The journal on disk may lag behind it while writes are queued."""
        return self.update.step

    # ---- a step ----
    def micro_batches(self, inputs: torch.Tensor, targets: torch.Tensor, extra: torch.Tensor | None = None) -> list:
        """(inputs, targets, extra or None) per micro-batch; extra holds a preference batch's per-row values."""
        mb = self.cfg.micro_batch or inputs.shape[0]
        extras = extra.split(mb) if extra is not None else [None] * len(inputs.split(mb))
        return list(zip(inputs.split(mb), targets.split(mb), extras))

    def loss_scale(self, targets: torch.Tensor, extra: torch.Tensor | None):
        """What the step's loss is averaged over: its target tokens, or a preference loss's pairs and tokens."""
        if self.objective is None:
            return int((targets != IGNORE).sum())
        if extra is None:
            raise ConfigError("a preference step needs each row's side and reference log-probability")
        return self.objective.scale(targets, extra)

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, extra: torch.Tensor | None = None) -> StepResult:
        """Run step `self.step` on this batch (B, T) and commit it; returns its loss. A preference step's
        extra (B, 2) holds each row's side and reference log-probability (engine/preference.py)."""
        step, version = self.update.step, self.update.version
        mbs = self.micro_batches(inputs, targets, extra)
        n_tok = int((targets != IGNORE).sum())
        if n_tok == 0:
            raise ConfigError("batch has no target tokens")
        t0 = time.perf_counter()
        scale = self.loss_scale(targets, extra)
        self._use_plan(mbs)
        holding = self.holds_state()
        self.update.hold(holding)
        acts = self._activation_cache(self.plan.acts_in_ram)
        if self.objective is not None:
            self.objective.start()
        loss, done = self._forward(step, mbs, acts, upto=len(self.names), n_tok=scale)
        metrics = self.objective.metrics(scale[0]) if self.objective is not None else None
        if not math.isfinite(loss):
            msg = f"step {step}: loss is {loss}; no module was touched"
            if self.cfg.stop_on_nonfinite_loss:
                raise NonFiniteError(msg)
            log.warning("%s, skipping the step", msg)
            self.update.skip(step)
            self._wait_for_commit()
            self._commit_if_due(holding, t0)
            self.streamer.flush()
            return StepResult(step, loss, n_tok, skipped=True, metrics=metrics)
        if self.cfg.clip_grad_norm and self.cfg.lora is None:
            self.update.set_clip(*self._norm_pass(step, mbs, acts, scale, done))
        self.update.begin(step, loss, n_tok, batch_hash(inputs, targets), metrics=metrics)
        self._backward(step, version, mbs, acts, len(self.names) - 1, scale, done=done)
        self._wait_for_commit()
        self._commit_if_due(holding, t0)
        return StepResult(step, loss, n_tok, grad_norm=self.update.grad_norm, metrics=metrics)

    def holds_state(self) -> bool:
        """Whether this step's modules stay in RAM until an interval commit (--commit-every)."""
        return self.cfg.commit_every != 1 and holds_trained_state(self.cfg, self.plan, self.sizes)

    @property
    def commit_interval(self) -> int:
        """The steps between commits at most (1: every step), by the plan of the last step run."""
        return interval(self.cfg.commit_every) if self.plan is not None and self.holds_state() else 1

    def steps_held(self) -> int:
        """Finished steps that live only in RAM, waiting for the next interval commit (0 when every step commits)."""
        if self.commit_interval == 1:
            return 0
        j = self.update.journal
        return j.step - j.committed[0]

    def _commit_if_due(self, holding: bool, t0: float):
        """After a step: queue the interval commit if it is due. It is written while the next step runs,
        which ends only once it is on disk, so that a crash still loses at most the steps held."""
        if holding and self.commits.due(time.perf_counter() - t0):
            self.commit(wait=False)

    def _wait_for_commit(self):
        """Until the interval commit queued after the last step is on disk."""
        done, self._commit_written = self._commit_written, None
        if done is not None:
            self.streamer.wait(done)

    def commit(self, wait: bool = True):
        """Commit the steps held in RAM to the store (nothing if none), and wait until it and every write
        queued before it are on disk. Called before anything reads the store (an evaluation, an export)
        and before a planned stop. Without wait, the next step (or commit, or close) waits for it."""
        self.update.commit_held()
        self._commit_written = self.streamer.mark()
        self.commits.committed()
        if wait:
            self._wait_for_commit()

    def micro_seed(self, step: int, m: int) -> int:
        """The dropout seed of micro-batch m of a step (distributed.py numbers them globally)."""
        return dev.derive_seed(self.cfg.seed, step, m)

    def step_plan(self, rows: int, mb_rows: int, seq: int) -> StepPlan:
        """The turn and what stays in RAM for a step of rows sequences of seq tokens, mb_rows at a time."""
        return plan_step(self.cfg, self.args, self.sizes, rows, mb_rows, seq, self.device_budget)

    def _use_plan(self, mbs):
        """Plan the step for the micro-batches this process runs; the module cache gets what the plan leaves."""
        rows, mb_rows, seq = sum(x.shape[0] for x, *_ in mbs), max(x.shape[0] for x, *_ in mbs), mbs[0][0].shape[1]
        self.plan = self.step_plan(rows, mb_rows, seq)
        self._rows_seq = (rows, seq)
        self.streamer.set_budget(self.plan.cache_budget)
        self.streamer.write_allowance = 0.0

    def _activation_cache(self, in_ram: bool) -> ActivationCache:
        return ActivationCache(self.work_dir / "acts", in_ram, self.cfg.act_dtype)

    def _compute_module(self, i: int, block: Block, dropout: bool = True):
        dropout = self.cfg.dropout if dropout and self.names[i].startswith("layers.") else 0.0
        return self.update.module(i, block, dropout)

    def _run(self, i: int, module, x: torch.Tensor, target: torch.Tensor | None, n_tok, extra=None):
        """Module i's output; for the output module, its share of the loss (n_tok: what loss_scale gave)."""
        if self.names[i] == "output":
            logits = module(x)
            if self.objective is not None:
                return self.objective.loss(logits, target, extra, n_tok)
            return F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=IGNORE,
                                   reduction="sum") / n_tok
        return module(x)

    def _forward(self, step: int, mbs, acts: ActivationCache, upto: int, n_tok: int):
        """Forward pass over modules [0, upto); a full pass ends with the turn and returns
        (loss, the top modules with their gradients)."""
        names, full = self.names, upto == len(self.names)
        stop = self._top if full else upto
        xs = [x.to(self.device) for x, *_ in mbs]
        rngs = []
        for m in range(len(mbs)):
            dev.seed_device(self.device, self.micro_seed(step, m))
            rngs.append(dev.get_rng_state(self.device))
        self.streamer.prefetch(names[:1])
        for i in self.progress(range(stop), desc="forward", leave=False):
            block = self.streamer.get(names[i])
            self.streamer.prefetch(names[i + 1: i + 2] if i + 1 < upto else [])
            faults.point("forward")
            module, _ = self._compute_module(i, block)
            for m in range(len(mbs)):
                if i >= self.update.lowest:  # the reverse pass recomputes only down to there
                    acts.put(i, m, xs[m], rngs[m])
                dev.set_rng_state(self.device, rngs[m])
                with torch.no_grad():
                    xs[m] = self._run(i, module, xs[m] if i == 0 else xs[m].to(self.cfg.compute_dtype), None, n_tok)
                rngs[m] = dev.get_rng_state(self.device)
            self.streamer.release(names[i])
            del module, block
        return self._turn(mbs, xs, rngs, n_tok) if full else (0.0, [])

    @property
    def _top(self) -> int:
        """The first module of the turn, which ends with the last block, the norm and the output layer."""
        return self.plan.top

    def _turn(self, mbs, xs, rngs, n_tok: int):
        """The turn's modules run forward and backward at once, one micro-batch at a time.

        The loss needs the top three, so they are resident together anyway; each block more
        that the budget holds (plan.py) keeps its graph instead of its input, which spares
        recomputing it and reading it again. The gradients are exactly those of the
        layer-major order: each micro-batch's RNG state goes on through the turn's modules
        as it would have through the layer-major forward, autograd hands each module the
        gradient of its output that the recompute would, and the parameters' gradients
        accumulate in the same micro-batch order. Modules are read as the first micro-batch
        reaches them, so that reading the next overlaps computing this one.
        Returns (loss, [(block, module, master, gradients into the module)] from the top down).
        """
        names, top = self.names, self._top
        blocks, modules = [], []
        grads: list[list[torch.Tensor | None]] = [[] for _ in range(top, len(names))]
        loss = 0.0
        for m, (_, target, extra) in enumerate(mbs):
            dev.set_rng_state(self.device, rngs[m])
            # The embedding's input is token ids: nothing to hand a gradient to.
            h = [xs[m] if top == 0 else xs[m].to(self.cfg.compute_dtype).requires_grad_()]
            for j, i in enumerate(range(top, len(names))):
                if m == 0:
                    self._turn_load(i, blocks, modules)
                module = modules[j][0]
                h.append(self._run(i, module, h[-1], target.to(self.device) if names[i] == "output" else None, n_tok,
                                   extra))
                if names[i] != "output":
                    h[-1].retain_grad()  # the gradient into the module above: made durable at its commit
            h[-1].backward()
            loss += h[-1].item()
            for j in range(len(modules)):
                grads[j].append(h[j].grad)
            del h
        done = [(blocks[j], *modules[j], grads[j]) for j in range(len(modules))]
        return loss, done[::-1]

    def _turn_load(self, i: int, blocks: list, modules: list):
        """Module i of the turn, read and built; the next read is started first."""
        names, top = self.names, self._top
        blocks.append(self.streamer.get(names[i]))
        # Once the output layer is in, the next module needed is the first the backward pass reads.
        nxt = names[i + 1: i + 2] if i + 1 < len(names) else names[top - 1: top] if top > self.update.lowest else []
        if self.args.tie_word_embeddings and nxt == names[-1:]:
            nxt.append(names[0])  # a tied output layer runs on the embedding's weight
        self.streamer.prefetch(nxt)
        faults.point("forward")
        modules.append(self._compute_module(i, blocks[-1]))

    def _backward(self, step: int, version: int, mbs, acts: ActivationCache, start: int, n_tok: int,
                  done: list | None = None, grads_in: list[torch.Tensor] | None = None):
        """Reverse pass from module `start` down to 0, updating and committing each module.

        done holds the top modules whose gradients the turn already computed, from the top down;
        it is emptied as they commit, so that no module outlives its commit. grads_in is the
        gradient into module start + 1 when a resume begins below them.
        """
        names = self.names
        done = done if done is not None else []
        for i in self.progress(range(start, self.update.lowest - 1, -1), desc="backward", leave=False):
            faults.point("backward")
            name = names[i]
            if done:
                block, module, master, grads_in = done.pop(0)
                if not done:
                    # The turn's last module: the extra blocks the turn held (with their gradients and saved
                    # tensors) are gone once it commits, so that RAM may hold the turn's queued writes and
                    # the next read beside them. Otherwise each commit of the turn waited for the write before
                    # it, and the next read for all of them, with nothing left to compute meanwhile.
                    self.streamer.write_allowance = self.plan.turn_bytes
                    if i > self.update.lowest:
                        self.streamer.prefetch(names[i - 1: i])
            else:
                block = self.streamer.get(name)
                if i > self.update.lowest:  # read the next module down while this one computes
                    self.streamer.prefetch(names[i - 1: i])
                module, master = self._compute_module(i, block)
                grads_in = self._recompute_backward(i, module, mbs, acts, grads_in, n_tok)
            self.update.commit(step, version, i, block, module, master, grads_in)
            del module, master, block
        self.update.finish(step, version)

    def _norm_pass(self, step: int, mbs, acts: ActivationCache, n_tok: int, done: list) -> tuple[float, float]:
        """A clipped step's first reverse pass: every module's gradient, for its norm only.

        Nothing is updated or written; the cached inputs stay for the real pass, and so do the
        turn's modules with their gradients (done, from the top down). Returns (global norm,
        clipping coefficient) as clip_grad_norm_ over all trainable parameters gives them.
        """
        names, lowest, top = self.names, self.update.lowest, self._top
        norms = {}
        for j, (_, module, master, _) in enumerate(done):  # the turn's, from the top down
            norms[len(names) - 1 - j] = self.update.grad_norms(len(names) - 1 - j, module, master)
        grads = done[-1][3]  # the gradient into the turn's lowest module: that of module top - 1's output
        for i in self.progress(range(top - 1, lowest - 1, -1), desc="norm", leave=False):
            faults.point("norm")
            block = self.streamer.get(names[i])
            # Next: the module below, or at the bottom the first module the real pass reads.
            self.streamer.prefetch(names[i - 1: i] if i > lowest else names[top - 1: top])
            module, master = self._compute_module(i, block)
            grads = self._recompute_backward(i, module, mbs, acts, grads, n_tok, keep=True)
            norms[i] = self.update.grad_norms(i, module, master)
            self.streamer.release(names[i])
            del module, master, block
        # clip_grad_norm_ stacks the norms in parameter order: the modules' order, bottom up.
        norm, coef = clip_coefficient([n for i in sorted(norms) for n in norms[i]], self.cfg.clip_grad_norm)
        if not math.isfinite(norm):
            raise NonFiniteError(f"step {step}: the gradient norm is {norm}; no module was touched")
        return norm, coef

    def _recompute_backward(self, i: int, module, mbs, acts: ActivationCache, grads_out, n_tok: int,
                            keep: bool = False):
        """Module i's forward again from its cached input and RNG state, then its backward;
        returns the gradient of its input per micro-batch (None for the embedding).
        The output layer never comes here: the turn computes it. keep leaves the input cached."""
        grads_in = []
        for m in range(len(mbs)):
            x, rng = acts.get(i, m, keep)
            x = dev.to_device(x, self.device)
            if i > 0:
                x = x.to(self.cfg.compute_dtype).requires_grad_()
            dev.set_rng_state(self.device, rng)
            y = self._run(i, module, x, None, n_tok)
            y.backward(grads_out[m].to(y.dtype))
            grads_in.append(x.grad if i > 0 else None)
        return grads_in

    def _output_backward(self, out, hs: list[torch.Tensor], mbs, n_tok: int):
        """A tied output layer's forward and backward again on the turn's inputs, in its micro-batch
        order: the gradient it leaves on the embedding's weight is the turn's, bit for bit."""
        i = len(self.names) - 1
        for h, (_, target, extra) in zip(hs, mbs):
            self._run(i, out, dev.to_device(h, self.device), target.to(self.device), n_tok, extra).backward()

    # ---- resume ----
    def recover(self, batch_for_step: Callable[[int], tuple]) -> StepResult | None:
        """Finish a step that was cut short in its backward pass; None when there is none.
        batch_for_step gives (inputs, targets) or, for a preference run, (inputs, targets, extra)."""
        self.update.hold(False)  # a step cut short is finished module by module, as it began
        point = self.update.resume_point()
        if point is None:
            return None
        inputs, targets, *rest = batch_for_step(point.step)
        extra = rest[0] if rest else None
        self.update.journal.check_batch(point, batch_hash(inputs, targets))
        mbs = self.micro_batches(inputs, targets, extra)
        k, n_tok = point.first_updated, self.loss_scale(targets, extra)
        if k == len(self.names):
            log.info("resuming step %d from its start: no module was updated yet", point.step)
            return self.train_step(inputs, targets, extra)
        if (point.clip_coef is not None) != bool(self.cfg.clip_grad_norm):
            raise StoreError(f"{self.update.journal.path}: step {point.step} began "
                             f"{'with' if point.clip_coef is not None else 'without'} gradient clipping; "
                             f"finish it with the --clip-grad-norm it began with")
        self.update.set_clip(point.grad_norm, point.clip_coef)  # the coefficient of the whole step
        if k > 0:
            log.info("resuming step %d at module %s (%d of %d already updated)", point.step, self.names[k - 1],
                     len(self.names) - k, len(self.names))
            grads = self.update.journal.boundary_grads(point, len(mbs), self.device)
            if self.args.tie_word_embeddings:
                self.update.restore_tied(point.version, lambda out, hs: self._output_backward(out, hs, mbs, n_tok))
            # A resume has no turn: it recomputes layer-major from the cached inputs of every module
            # below k, whichever K the step began with (the same bits at every K).
            self._use_plan(mbs)
            need = sum(cached_input_bytes(i, self.args, self.cfg, *self._rows_seq) for i in range(self.update.lowest, k))
            acts = self._activation_cache(need <= self.plan.budget)
            self._forward(point.step, mbs, acts, upto=k, n_tok=n_tok)
            self._backward(point.step, point.version, mbs, acts, k - 1, n_tok, grads_in=grads)
        else:
            self.update.finish(point.step, point.version)
        self.streamer.flush()
        return StepResult(point.step, point.loss, point.tokens, grad_norm=point.grad_norm, metrics=point.metrics)

    def close(self):
        self.streamer.close()


def estimate_io(store: BlockStore, cfg: TrainConfig, batch_shape: tuple[int, int]) -> dict:
    """Disk bytes one steady-state step reads and writes, by replaying the streamer's cache policy under
    the step's plan (plan.py; the micro-batches as Trainer.micro_batches cuts them)."""
    b, t = batch_shape
    names = store.trainable
    lora = cfg.lora is not None
    sizes = module_sizes(store, cfg)
    mb = cfg.micro_batch or b
    plan = plan_step(cfg, store.args, sizes, b, min(mb, b), t)
    file = {n: s.file for n, s in zip(names, sizes)}  # what a read moves
    ram = {n: s.ram for n, s in zip(names, sizes)}  # what the cache counts: a 16-bit store's modules widened
    budget = plan.cache_budget
    cache: dict[str, int] = {}  # the streamer's LRU cache, replayed

    def evict(keep: int):
        while len(cache) > keep and sum(cache.values()) > budget:
            cache.pop(next(iter(cache)))

    def get(n) -> int:
        hit = cache.pop(n, None) is not None
        cache[n] = ram[n]
        evict(keep=1)
        return 0 if hit else file[n]

    def release(n) -> int:
        if ram[n] > budget:
            cache.pop(n, None)
        return 0

    def commit(n) -> int:
        if not lora:
            cache.pop(n, None)
            cache[n] = ram[n]
            evict(keep=0)
        return 0

    top = plan.top  # the turn's modules are read once per step
    below = list(reversed(names[plan.lowest: top]))
    tied = store.args.tie_word_embeddings
    clip = bool(cfg.clip_grad_norm) and not lora  # LoRA clips in RAM, at no cost in bytes
    reads = turn_read = norm_read = 0
    for _ in range(2):  # the second step is the steady state
        reads = sum(get(n) + release(n) for n in names[:top]) + sum(get(n) for n in names[top:])
        if tied:  # the output layer runs on the embedding's weight: read it once more at the turn
            turn_read = get(names[0]) + release(names[0])
            reads += turn_read
        if clip:  # the norm-only pass reads every module below the turn that the cache does not hold
            norm_read = sum(get(n) + release(n) for n in below)
            reads += norm_read
        reads += sum(commit(n) for n in reversed(names[top:])) + sum(get(n) + commit(n) for n in below)
    n_mb = -(-b // mb)
    overhead = n_mb * (5056 + 384)  # per file: the cpu RNG state, header and padding
    # Cached: the inputs of the modules below the turn (in LoRA, but the embedding's);
    # the embedding's input is token ids, the blocks' hidden states.
    act_bytes = 0 if plan.acts_in_ram else sum(cached_input_bytes(i, store.args, cfg, b, t) + overhead
                                               for i in range(plan.lowest, top))
    if lora:
        grad_bytes = 0
        module_bytes = _adapter_file_bytes(store.args, cfg)
    else:
        grad_bytes = (len(names) - 1) * (b * t * store.args.dim * cfg.compute_dtype.itemsize + n_mb * 64 + 384)
        module_bytes = sum(file.values())
    # A tied model's rule 0 (journal.py): the output side's gradient for the embedding, written and
    # read back when it does not fit in RAM; else the output layer's inputs, written only.
    tied_written = tied_read = 0
    if tied and not lora:
        if tied_grad_in_ram(cfg, store.args):
            tied_written = b * t * store.args.dim * cfg.compute_dtype.itemsize + n_mb * 64 + 384
        else:
            tied_written = tied_read = store.args.vocab_size * store.args.dim * 4 + 384
    grad_bytes += tied_written
    journal = 0 if lora else 2 * 400  # two journal writes a step; a LoRA run's journal is its adapter file
    # Interval commits (--commit-every): nothing is written between commits, and a commit writes every
    # module and two journals once per `every` steps (when auto's time bound is not reached first).
    every = interval(cfg.commit_every) if cfg.commit_every != 1 and holds_trained_state(cfg, plan, sizes) else 1
    if every > 1:
        grad_bytes = tied_written = tied_read = 0
        module_bytes, journal = module_bytes // every, journal // every
    written = module_bytes + act_bytes + grad_bytes + journal
    # Clipping reads the cached activations twice: once per reverse pass.
    clip_read = norm_read + (act_bytes if clip else 0)
    # Files made durable per step (each an fsync of the file and of its folder): the modules and the
    # boundary gradients, tied.blk and the journal's two writes; a LoRA step, its adapter file.
    durable = 1 if lora else len(names) + (len(names) - 1) + (1 if tied else 0) + 2
    if every > 1:
        durable = (len(names) + 2) / every
    return {"read": reads + act_bytes + tied_read + (act_bytes if clip else 0), "written": written,
            "durable_files": durable, "commit_every": every,
            "store": sum(file.values()), "activations": act_bytes, "gradients": grad_bytes,
            "tied": turn_read + tied_written + tied_read,  # what tying adds to a step (in read and written)
            "clip": clip_read,  # what exact clipping adds to a step's reads (it writes nothing more)
            "plan": plan}


def _adapter_file_bytes(args, cfg: TrainConfig) -> int:
    """Size of the adapter file after a step: encode one with zeroed optimizer state."""
    from ..blockfile import encode_block

    ad = Adapters.init(args, cfg.lora, 0)
    keys = {"sgd": ["momentum_buffer"] if cfg.optim.momentum else [], "adamw": ["exp_avg", "exp_avg_sq"]}
    for m in ad.params:
        state = {}
        for k, t in ad.named(m).items():
            state[k] = {s: torch.zeros_like(t) for s in keys[cfg.optim.name]}
            if cfg.optim.name == "adamw":
                state[k]["step"] = torch.zeros(())
        ad.optim[m] = state
    chunks, _ = encode_block(ad.to_block(), ADAPTERS)
    return sum(len(memoryview(c).cast("B")) for c in chunks)
