"""The update rules a streamed step applies module by module: full fine-tuning and LoRA.

Each rule owns what differs between the two kinds of run: how a stored module becomes a
module to compute with, what a module's gradients update and how that is committed, what
marks a step done, and what a resume finds. `Trainer` keeps only the layer-major schedule.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import torch

from .. import device as dev
from ..blockfile import Block, write_block
from ..errors import ConfigError
from ..model.lora import ADAPTERS, Adapters, LoraConfig
from .journal import Journal, ResumePoint
from .optim import step_module, stochastic_round, stochastic_round_
from .quant import dequantize_module
from .store import BlockStore
from .streamer import Streamer, materialize


class NonFiniteError(RuntimeError):
    """A NaN or Inf loss or gradient; the message says which modules were already written."""


def check_gradients(names: list[str], step: int, i: int, params: dict, grads_in, consequence: str,
                    every_param: bool = False):
    """Stop before anything of module i is committed if a gradient holds NaN or Inf
    (or, with every_param, is missing)."""
    bad = [k for k, p in params.items()
           if (p.grad is None and every_param) or (p.grad is not None and not dev.all_finite(p.grad))]
    if i > 0 and any(not dev.all_finite(g) for g in grads_in):
        bad.append("input gradient")
    if bad:
        raise NonFiniteError(f"step {step}: non-finite gradient in module {names[i]} ({', '.join(bad)}); "
                             f"{consequence}")


def param_norms(grads) -> list[torch.Tensor]:
    """Each gradient's 2-norm, in its own dtype: the first half of clip_grad_norm_ (foreach=False)."""
    return [torch.linalg.vector_norm(g, 2.0) for g in grads]


def clip_coefficient(norms: list[torch.Tensor], max_norm: float) -> tuple[float, float]:
    """(total norm, clamped coefficient) from the per-parameter norms in parameter order, with
    torch.nn.utils.clip_grad_norm_'s operations, so that the coefficient is its float32 value."""
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2.0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return total.item(), coef.item()


def scale_grads(params, coef: float):
    """Multiply each gradient by the coefficient, as clip_grad_norm_ does (a float32 scalar tensor)."""
    for p in params:
        if p.grad is not None:
            p.grad.mul_(torch.tensor(coef, dtype=torch.float32, device=p.grad.device))


def tied_grad_in_ram(cfg, args) -> bool:
    """Whether a tied model keeps the output side's gradient for the embedding in RAM through
    the reverse pass (else it goes to disk): it is one fp32 (vocab_size, dim) matrix."""
    return cfg.ram_budget is None or args.vocab_size * args.dim * 4 <= cfg.ram_budget


class BoundOutput:
    """A tied model's output layer bound to the embedding's weight: called like a module on h.

    With keep_inputs, each input it runs on with grad is kept (the turn's, one per
    micro-batch), for the journal's rule 0.
    """

    def __init__(self, module: torch.nn.Module, weight: torch.Tensor, keep_inputs: bool = False):
        self.module, self.weight, self.keep_inputs = module, weight, keep_inputs
        self.inputs: list[torch.Tensor] = []

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.keep_inputs and torch.is_grad_enabled():
            self.inputs.append(h.detach())
        return self.module(h, self.weight)


def bind_output(update, keep_inputs: bool = False) -> BoundOutput:
    """The output layer of a tied model, on the embedding's weight as the update computes with
    it (in full fine-tuning a leaf whose gradient is the output side's share)."""
    emb = update.names[0]
    embedding, _ = update.module(0, update.streamer.get(emb), 0.0)
    update.streamer.release(emb)
    return BoundOutput(materialize("output", update.args, {}), embedding.weight, keep_inputs)


class FullUpdate:
    """Every module's fp32 master takes an optimizer step; commits follow the journal's protocol."""

    lowest = 0  # the embedding trains too, so the reverse pass goes all the way down
    # (what, tensors) -> wait: starts summing each tensor over the ranks (distributed.py); wait()
    # finishes the sums in place. With no tensors it is still a collective, which no rank leaves
    # before every rank has entered it.
    reduce_grads: Callable[[str, list[torch.Tensor]], Callable[[], None]] | None = None

    def __init__(self, store: BlockStore, streamer: Streamer, cfg):
        self.store, self.streamer, self.cfg = store, streamer, cfg
        self.names, self.args = store.trainable, store.args
        self.journal = Journal(store, streamer)
        # A tied model: the output side's gradient for the embedding, from the turn to the
        # embedding's commit, in RAM (_partial) or on disk (tied.blk, durable once _saved is set).
        self.tied = self.args.tie_word_embeddings
        self.tied_in_ram = tied_grad_in_ram(cfg, self.args)
        self._partial: torch.Tensor | None = None
        self._saved: threading.Event | None = None
        # A clipped step: {"grad_norm", "clip_coef"} from the norm-only pass, or as the journal
        # recorded them on resume; every module's gradients are scaled by clip_coef.
        self.clip: dict | None = None
        self.grad_norm: float | None = None  # of the last clipped step, before clipping
        self._norm_partial: torch.Tensor | None = None  # the tied output's gradient, during the norm pass
        # Data parallel: the rest of the last module's commit, run once its gradient's sum has
        # travelled while the next module down computed (commit, finish).
        self._rest: Callable[[], None] | None = None

    @property
    def step(self) -> int:
        return self.journal.step

    @property
    def version(self) -> int:
        return self.journal.version

    def state(self) -> dict:
        return self.journal.read()

    def module(self, i: int, block: Block, dropout: float):
        """(module, master): with fp32 compute the module's parameters are the fp32 master
        itself and master is None; otherwise the module holds a cast copy and master
        holds the fp32 parameters that the optimizer updates."""
        name, cdt = self.names[i], self.cfg.compute_dtype
        if self.tied and name == "output":
            return bind_output(self, keep_inputs=self.tied_in_ram), None
        master = self.streamer.to_device(block, torch.float32)
        if cdt == torch.float32:
            return materialize(name, self.args, master, dropout), None
        module = materialize(name, self.args, {k: v.to(cdt) for k, v in master.items()}, dropout)
        return module, {k: torch.nn.Parameter(v) for k, v in master.items()}

    def begin(self, step: int, loss: float, tokens: int, batch: str, metrics: dict | None = None):
        self.journal.begin(step, self.version, loss, tokens, batch, clip=self.clip, metrics=metrics)

    def skip(self, step: int):
        self.journal.skip(step, self.version)

    def grad_norms(self, i: int, module, master) -> list[torch.Tensor]:
        """Module i's parameter gradient norms, in parameter order, as its commit will see the
        gradients (fp32; a tied embedding's counted once, as the sum of both uses). Called from
        the top down in the norm-only pass of a clipped step; nothing is kept but the tied output's."""
        if self.tied and self.names[i] == "output":
            self._norm_partial = module.weight.grad
            return []
        grads = {k: p.grad.float() for k, p in module.named_parameters() if p.grad is not None}
        if self.tied and i == 0:
            grads["weight"] = grads["weight"] + self._norm_partial.float()
            self._norm_partial = None
        if self.reduce_grads is not None:  # data parallel: the norm of the summed gradient, as one process has it
            grads = {k: g.clone() for k, g in grads.items()}  # the turn's modules keep theirs for the real pass
            self.reduce_grads(f"{self.names[i]}'s gradient for its norm", list(grads.values()))()
        return param_norms(grads.values())

    def set_clip(self, grad_norm: float | None, clip_coef: float | None):
        """The clipping of the step about to begin or resume (None: unclipped)."""
        self.grad_norm = grad_norm
        self.clip = None if clip_coef is None else {"grad_norm": grad_norm, "clip_coef": clip_coef}

    def commit(self, step: int, version: int, i: int, block: Block, module, master, grads_in):
        name = self.names[i]
        done = ", ".join(self.names[i + 1:]) or "none"
        consequence = f"not written. Already updated this step: {done}"
        if self.tied and name == "output":
            self._commit_tied_output(step, version, i, module, grads_in, consequence)
            return
        compute = dict(module.named_parameters())
        params = compute if master is None else master
        if master is not None:
            for k, p in master.items():
                if compute[k].grad is not None:
                    p.grad = compute[k].grad.float()
        if self.tied and i == 0:
            # The embedding's own gradient plus the output side's: one update, as autograd sums both uses.
            params["weight"].grad = params["weight"].grad + self._take_partial(version)
        if self.reduce_grads is not None:  # data parallel: every rank steps on the sum over all ranks
            self.journal.save_boundary(i, version, grads_in)  # first: journal.py says why
            summed = self.reduce_grads(f"{name}'s gradient", [p.grad for p in params.values() if p.grad is not None])
            # The module above steps and is queued now, below this one's boundary and before its put,
            # and this one's sum travels while the trainer computes the next module down.
            self.settle()
            self._rest = lambda: (summed(), self._step(step, version, i, block, params, grads_in, consequence))
            return
        self._step(step, version, i, block, params, grads_in, consequence)

    def settle(self):
        """Finish the commit that waits for its gradient's sum, if any."""
        rest, self._rest = self._rest, None
        if rest is not None:
            rest()

    def _step(self, step: int, version: int, i: int, block: Block, params: dict, grads_in, consequence: str):
        """Module i's optimizer step on its (summed) gradients, and its commit."""
        name = self.names[i]
        store_dtype = self.store.dtype
        rounded = store_dtype == torch.bfloat16 and self.cfg.store_rounding == "stochastic"
        # Unrounded, the parameters' own gradients need no check here: a NaN or Inf in one makes its
        # parameter non-finite after any step SGD or AdamW takes (0 x Inf is NaN), which the check of each
        # result below finds, naming the gradients. That is one pass over the module's gradients fewer
        # (0.055 s a step of bench_step's 209M-parameter model on this 2-core VM, against 3.1 s). Stochastic
        # rounding adds noise to the bits, which can carry a NaN of any payload into a finite number.
        if rounded or (i > 0 and not all(dev.all_finite(g) for g in grads_in)):
            check_gradients(self.names, step, i, params, grads_in, consequence)
        if self.clip is not None:  # the gradient handed down (grads_in) stays as it is
            scale_grads(params.values(), self.clip["clip_coef"])
        # The step below changes the module's tensors in place (on cpu they are its last version's,
        # which the writer may still have queued from the previous step): wait until that is on disk.
        self.streamer.wait_written(name)
        new_state = step_module(self.cfg.optim_at(step), params, block.optim)
        seeds = {k: dev.derive_seed(self.cfg.seed, step, i, j, 0x5217) for j, k in enumerate(params)} if rounded else {}
        # The fp32 masters are rounded in place. On cpu they stay fp32 (the cache keeps 16-bit modules widened):
        # no bf16 copy now and no widened one for the next pass; the writer narrows them, exactly. From a
        # device they come back cast to bf16, also exact.
        in_place = [k for k, p in params.items() if k in seeds and p.dtype == torch.float32 and p.is_contiguous()]
        stochastic_round_([(params[k].detach(), seeds[k]) for k in in_place])
        wide = {k for k in in_place if params[k].device.type == "cpu"}
        new_params = {}
        for k, p in params.items():
            t = p.detach()
            if k in seeds and t.dtype == torch.float32 and k not in in_place:
                t = stochastic_round(t, store_dtype, seeds[k])
            if k not in wide:
                t = dev.to_host(t, store_dtype)
            if not dev.all_finite(t):  # checked as stored: rounding could overflow a huge finite value
                check_gradients(self.names, step, i, params, [], consequence)  # raises if a gradient is the cause
                raise NonFiniteError(f"step {step}: update made module {name}.{k} non-finite; not written")
            new_params[k] = t
        sdt = self.cfg.optim_state_dtype
        states = {k: {s: dev.to_host(v.detach(), sdt if v.ndim else None) for s, v in st.items()}
                  for k, st in new_state.items()}
        for k, st in states.items():
            # A finite gradient beyond 6e20 (at beta2 0.999) squares to Inf in AdamW's second moment, dividing the
            # update to 0: the parameter stays finite and only the state shows it (a first moment or a
            # momentum buffer that overflows makes its parameter non-finite, found above).
            if "exp_avg_sq" in st and not dev.all_finite(st["exp_avg_sq"]):
                raise NonFiniteError(f"step {step}: update made the second moment of {name}.{k} non-finite (a "
                                     f"gradient's square overflowed); not written")
        new = Block(version + 1, new_params, states, narrow=store_dtype if wide else None)
        self.journal.commit(i, name, version, new, grads_in)

    def _commit_tied_output(self, step: int, version: int, i: int, out: BoundOutput, grads_in, consequence: str):
        """A tied output has nothing to update: keep the gradient it left on the embedding's
        weight (rule 0), then commit its empty module so that its version follows the step."""
        check_gradients(self.names, step, i, {"weight (the output side of tok_embeddings)": out.weight}, grads_in,
                        consequence)
        grad = out.weight.grad.float()
        if self.journal.holding:  # nothing to make durable: a crash replays the step from the last commit
            self._partial, self._saved = dev.to_host(grad), None
        elif self.tied_in_ram:
            self._partial = dev.to_host(grad)  # host RAM: the device holds one module at a time
            self._saved = self.journal.save_tied(version, "inputs", {f"h{m}": h for m, h in enumerate(out.inputs)})
        else:
            self._partial = None
            self._saved = self.journal.save_tied(version, "grad", {"grad": grad})
        out.inputs.clear()
        if self.reduce_grads is not None:  # data parallel: nothing to sum, but the same fence as any module's
            self.journal.save_boundary(i, version, grads_in)
            self.reduce_grads("the tied output's commit", [])()
        self.journal.commit(i, "output", version, Block(version + 1, {}), grads_in)

    def _take_partial(self, version: int) -> torch.Tensor:
        """The output side's gradient for the embedding, from RAM or from tied.blk."""
        grad, self._partial = self._partial, None
        if grad is None:
            if self._saved is not None and not self._saved.is_set():
                self.streamer.flush()  # rule 0's write is queued far ahead; this rarely waits
            grad = self.journal.load_tied(version).params["grad"]
        self._saved = None
        return dev.to_device(grad, self.streamer.device)

    def restore_tied(self, version: int, recompute: Callable[[BoundOutput, list[torch.Tensor]], None]):
        """On resume, before the reverse pass goes on: the output side's gradient as rule 0 left it.
        Saved inputs are run again through the output layer by recompute(output, inputs)."""
        b = self.journal.load_tied(version)
        self._saved = None
        if b.meta["kind"] == "grad":
            self._partial = None  # read at the embedding's commit, as in an uninterrupted step
            return
        out = bind_output(self)
        recompute(out, [b.params[f"h{m}"] for m in range(len(b.params))])
        self._partial = dev.to_host(out.weight.grad.float())

    def finish(self, step: int, version: int):
        self.settle()
        self.journal.finish(step, version)
        self.clip = None

    def hold(self, on: bool):
        """Hold the next step's modules in RAM (interval commits, journal.py) or commit each as it is done."""
        if not on:
            self.commit_held()  # what is held goes to the store before a step that commits module by module
        self.journal.holding = on

    def commit_held(self):
        """Queue the interval commit of the steps held since the last one (journal.py)."""
        self.journal.commit_held()

    def resume_point(self) -> ResumePoint | None:
        return self.journal.resume_point(self.names)

    def tuned(self, name: str, params: dict) -> dict:
        return params


class LoraUpdate:
    """Adapters train, in RAM; the base store is never written. The adapter file is the whole
    journal: it is written when a step ends, and a step cut short is simply run again, since
    nothing of it was made durable."""

    lowest = 1  # the embedding has no adapters: nothing below the first block needs a gradient
    reduce_grads: Callable[[str, list[torch.Tensor]], None] | None = None  # as FullUpdate's

    def __init__(self, store: BlockStore, streamer: Streamer, cfg, path: Path, device: torch.device):
        self.store, self.streamer, self.cfg, self.path = store, streamer, cfg, path
        self.names, self.args = store.trainable, store.args
        if store.journal()["version"] != 0:
            raise ConfigError(f"{store.root}: LoRA needs the base weights as prepared, this store was trained")
        lora: LoraConfig = cfg.lora
        if path.exists():
            ad = Adapters.load(path)
            if ad.cfg != lora:
                raise ConfigError(f"{path}: adapters of rank {ad.cfg.rank}, alpha {ad.cfg.alpha}, targets "
                                  f"{','.join(ad.cfg.targets)} do not match the LoRA options")
            ad.check_args(self.args, path)
        else:
            ad = Adapters.init(self.args, lora, dev.derive_seed(cfg.seed, 0x10A))
        self.adapters = ad.to(device)
        self._last: dict | None = None
        self.grad_norm: float | None = None  # of the last clipped step, before clipping

    @property
    def step(self) -> int:
        return self.adapters.step

    @property
    def version(self) -> int:
        return self.adapters.version

    def state(self) -> dict:
        return {"step": self.step, "version": self.version, "phase": "idle", "last": self._last}

    def module(self, i: int, block: Block, dropout: float):
        name = self.names[i]
        if name == "output" and self.args.tie_word_embeddings:
            return bind_output(self), None  # the base's embedding, frozen: no adapters there
        if self.store.base_quant:  # the parts go to the device as stored and are dequantized there
            params = dequantize_module(self.streamer.to_device(block), self.cfg.compute_dtype)
        else:
            params = self.streamer.to_device(block, self.cfg.compute_dtype)
        module = materialize(name, self.args, params, dropout)
        module.requires_grad_(False)
        self.adapters.attach(module, name)
        return module, None

    def begin(self, step: int, loss: float, tokens: int, batch: str, metrics: dict | None = None):
        self._last = {"iter": step, "loss": loss, "tokens": tokens, **(metrics or {})}
        self.grad_norm = None

    def skip(self, step: int):
        self._save(step + 1, self.version)

    def commit(self, step: int, version: int, i: int, block: Block, module, master, grads_in):
        name = self.names[i]
        params = self.adapters.named(name)
        if self.reduce_grads is not None and params:
            self.reduce_grads(f"{name}'s adapter gradient", [p.grad for p in params.values() if p.grad is not None])()
        check_gradients(self.names, step, i, params, grads_in, "adapters not saved", every_param=True)
        if params and not self.cfg.clip_grad_norm:  # clipped: every module steps at finish, once the norm is known
            self._step(step, name)

    def _step(self, step: int, name: str):
        params = self.adapters.named(name)
        self.adapters.optim[name] = step_module(self.cfg.optim_at(step), params, self.adapters.optim.get(name, {}))
        for p in params.values():
            p.grad = None

    def finish(self, step: int, version: int):
        if self.cfg.clip_grad_norm:
            # The adapters' gradients are all in RAM by now: clip them as clip_grad_norm_ would,
            # in the adapters' order, then step every module. Nothing was saved, so a crash
            # anywhere in here reruns the whole step.
            params = [p for m in self.adapters.params for p in self.adapters.named(m).values()]
            norm, coef = clip_coefficient(param_norms(p.grad for p in params if p.grad is not None),
                                          self.cfg.clip_grad_norm)
            scale_grads(params, coef)
            for m in self.adapters.params:
                self._step(step, m)
            self.grad_norm = norm
            self._last = {**(self._last or {}), "grad_norm": norm}
        self._save(step + 1, version + 1)

    def _save(self, step: int, version: int):
        self.adapters.step, self.adapters.version = step, version
        block, path = self.adapters.to_block(), self.path
        self.streamer.run_in_order(lambda: write_block(path, block, ADAPTERS))

    def resume_point(self) -> None:
        return None

    def hold(self, on: bool):
        """The adapter file is the whole journal, written every step: nothing is held."""

    def commit_held(self):
        pass

    def tuned(self, name: str, params: dict) -> dict:
        return self.adapters.merge(name, params)
