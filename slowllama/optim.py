"""Per-module optimizers whose state is stored in the block file beside the module.

Each module gets a fresh torch.optim instance per step with its state loaded from
the store, so the math is torch's own: a streamed step equals torch.optim on the
whole model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import ConfigError

OPTIMIZERS = ("sgd", "adamw")


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 1e-4
    momentum: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"--optimizer {self.name!r}: expected one of {', '.join(OPTIMIZERS)}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")

    def make(self, params) -> torch.optim.Optimizer:
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                                   foreach=False)
        return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, eps=self.eps,
                                 weight_decay=self.weight_decay, foreach=False)


def step_module(cfg: OptimConfig, params: dict[str, torch.nn.Parameter],
                state: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Apply one optimizer step to params (whose .grad is set); returns the new state."""
    named = [(n, p) for n, p in params.items() if p.grad is not None]
    opt = cfg.make([p for _, p in named])
    for n, p in named:
        if n in state:
            # Moments may be stored in 16 bits; the update itself always runs in the parameter's dtype.
            opt.state[p] = {k: v.to(p.device, p.dtype if v.shape == p.shape else v.dtype) for k, v in state[n].items()}
    opt.step()
    return {n: {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
            for n, p in named if opt.state.get(p)}


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Round fp32 to bf16 so that the expected result equals x.

    bf16 is fp32 with the low 16 bits dropped; adding uniform noise in [0, 2^16) to
    those bits before truncating rounds up with probability equal to the fraction.
    """
    if dtype != torch.bfloat16:
        raise ValueError(f"stochastic rounding is implemented for bfloat16, not {dtype}")
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = (bits + noise) & ~0xFFFF
    # Inf and NaN must not be nudged into other values.
    rounded = torch.where(torch.isfinite(x), rounded, bits)
    return rounded.view(torch.float32).to(torch.bfloat16)
