"""Plain in-memory PyTorch: the whole model as one nn.Module, autograd and torch.optim."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from slowllama.device import derive_seed
from slowllama.engine.trainer import IGNORE
from slowllama.formats import open_checkpoint
from slowllama.formats.meta import EXTRAS
from slowllama.model.transformer import Transformer, module_names


def reference_model(model_dir, dropout: float = 0.0, dtype=torch.float32) -> Transformer:
    """The whole model in memory, its weights read from a Meta or Hugging Face folder."""
    ckpt = open_checkpoint(model_dir)
    model = Transformer(ckpt.args, dropout=dropout)
    sd = {f"{m}.{p}": t.to(dtype) for m in module_names(ckpt.args) for p, t in ckpt.read_module(m).items()}
    model.load_state_dict(sd, strict=True)
    return model


def reference_backward(model, inputs, targets, *, seed: int, step: int, micro_batch: int | None = None) -> float:
    """A step's gradients, with the trainer's RNG convention: each micro-batch's forward starts from seed
    (seed, step, mb); returns the loss."""
    n_tok = int((targets != IGNORE).sum())
    mb = micro_batch or inputs.shape[0]
    device = next(model.parameters()).device  # the batch goes where the model is (cpu, cuda or mps)
    inputs, targets = inputs.to(device), targets.to(device)
    loss = 0.0
    for m, (x, y) in enumerate(zip(inputs.split(mb), targets.split(mb))):
        torch.manual_seed(derive_seed(seed, step, m))
        logits = model(x)
        part = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum") / n_tok
        part.backward()
        loss += part.item()
    return loss


def reference_step(model, opt, inputs, targets, *, seed: int, step: int, micro_batch: int | None = None) -> float:
    """One optimizer step over reference_backward's gradients; returns the loss."""
    loss = reference_backward(model, inputs, targets, seed=seed, step=step, micro_batch=micro_batch)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def whole_store(store) -> dict:
    """Everything a store holds that a resume must reproduce: the journal, each module's version,
    parameters and optimizer state."""
    out = {"journal": {k: v for k, v in store.journal().items() if k != "last"}}
    for m in store.trainable:
        b = store.read(m)
        out[m] = (b.step, b.params, b.optim)
    return out


def lora_reference(model_dir, start: dict, targets, scale: float, dropout: float = 0.0, model=None):
    """The in-memory model (the checkpoint's, or `model`) with adapters added by plain forward hooks (not
    slowllama's own attach), starting from `start` ({module: {"wq.A": A, "wq.B": B, ...}}); returns
    (model, {module: {name: leaf tensor}})."""
    from slowllama.model.lora import TARGETS

    model = (model or reference_model(model_dir, dropout=dropout)).requires_grad_(False)
    ref = {m: {k: t.clone().requires_grad_() for k, t in s.items()} for m, s in start.items()}
    for m, s in ref.items():
        for t in targets:
            a, b = s[f"{t}.A"], s[f"{t}.B"]
            model.get_submodule(m).get_submodule(TARGETS[t]).register_forward_hook(
                lambda mod, inp, out, a=a, b=b: out + inp[0] @ a.t() @ b.t() * scale)
    return model, ref


def random_batch(vocab: int, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    return toks[:, :-1], toks[:, 1:].clone()


def stored_params(store) -> dict[str, torch.Tensor]:
    out = {}
    for m in store.trainable:
        for p, t in store.read(m).params.items():
            out[f"{m}.{p}"] = t
    return out


__all__ = ["reference_model", "reference_backward", "reference_step", "whole_store", "lora_reference", "random_batch", "stored_params", "EXTRAS"]
