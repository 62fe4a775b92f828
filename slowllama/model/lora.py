"""LoRA: low-rank adapters beside read-only base weights.

An adapter on a linear layer W adds (alpha / rank) * B @ A, with A (rank, in) and
B (out, rank). Adapters attach to a module through forward hooks, so the base
module keeps Meta's parameter names and loads from the store unchanged.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..blockfile import Block, read_block, write_block
from ..errors import ConfigError
from .transformer import ModelArgs

ADAPTERS = "lora_adapters"  # what an adapter file's header says it holds
_LAYER = re.compile(r"layers\.(0|[1-9]\d*)")  # an adapter's module: a transformer block

# --lora-targets names -> the linear layer inside a transformer block
TARGETS = {
    "wq": "attention.wq", "wk": "attention.wk", "wv": "attention.wv", "wo": "attention.wo",
    "w1": "feed_forward.w1", "w2": "feed_forward.w2", "w3": "feed_forward.w3",
}


@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("wq", "wv")

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"--lora-rank must be at least 1, got {self.rank}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ConfigError(f"--lora-alpha must be positive, got {self.alpha}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"--lora-targets {','.join(self.targets)}: expected names from {', '.join(TARGETS)}")
        twice = sorted({t for t in self.targets if self.targets.count(t) > 1})
        if twice:
            raise ConfigError(f"--lora-targets {','.join(self.targets)}: names {', '.join(twice)} more than once")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _shape(args: ModelArgs, target: str) -> tuple[int, int]:
    """(out, in) of a target linear layer."""
    d, h, kv, f = args.dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.ffn_hidden_dim
    return {"wq": (h, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, h), "w1": (f, d), "w2": (d, f), "w3": (f, d)}[target]


class Adapters:
    """All adapters of a model: {module name: {target: (A, B)}} as leaf tensors that train."""

    def __init__(self, cfg: LoraConfig, params: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]):
        self.cfg = cfg
        self.params = params
        self.optim: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # module -> "target.A" -> state
        self.step = 0
        self.version = 0

    @classmethod
    def init(cls, args: ModelArgs, cfg: LoraConfig, seed: int) -> "Adapters":
        """A as in nn.Linear's default init (kaiming uniform), B zero: the model starts unchanged."""
        g = torch.Generator().manual_seed(seed)
        params = {}
        for i in range(args.n_layers):
            layer = {}
            for t in cfg.targets:
                out_f, in_f = _shape(args, t)
                bound = 1.0 / math.sqrt(in_f)
                a = (torch.rand(cfg.rank, in_f, generator=g) * 2 - 1) * bound
                layer[t] = (a.requires_grad_(), torch.zeros(out_f, cfg.rank, requires_grad=True))
            params[f"layers.{i}"] = layer
        return cls(cfg, params)

    def to(self, device: torch.device) -> "Adapters":
        for layer in self.params.values():
            for t, (a, b) in layer.items():
                layer[t] = (a.detach().to(device).requires_grad_(), b.detach().to(device).requires_grad_())
        return self

    def named(self, module: str) -> dict[str, torch.Tensor]:
        """A module's adapter tensors as {"wq.A": A, "wq.B": B, ...}."""
        out = {}
        for t, (a, b) in self.params.get(module, {}).items():
            out[f"{t}.A"], out[f"{t}.B"] = a, b
        return out

    def attach(self, module: nn.Module, name: str) -> list:
        """Hook this module's target layers; returns the hook handles."""
        handles = []
        scale = self.cfg.scale
        for t, (a, b) in self.params.get(name, {}).items():
            linear = module.get_submodule(TARGETS[t])

            def hook(mod, inputs, out, a=a, b=b):
                x = inputs[0]
                return out + (x @ a.t().to(x.dtype)) @ b.t().to(x.dtype) * scale

            handles.append(linear.register_forward_hook(hook))
        return handles

    def merge(self, name: str, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Base parameters of one module with its adapters folded in, in fp32."""
        out = dict(params)
        for t, (a, b) in self.params.get(name, {}).items():
            key = f"{TARGETS[t]}.weight"
            w = params[key].float()
            out[key] = w + (b.detach().to(w.device, torch.float32) @ a.detach().to(w.device, torch.float32)) * self.cfg.scale
        return out

    # ---- file ----
    def save(self, path: Path, durable: bool = True):
        write_block(path, self.to_block(), ADAPTERS, durable)

    def to_block(self) -> Block:
        """A copy of the adapters and their optimizer state, safe to write while training goes on."""
        tensors, state = {}, {}
        for m in self.params:
            for k, v in self.named(m).items():
                tensors[f"{m}.{k}"] = v.detach().to("cpu", copy=True)
                if k in self.optim.get(m, {}):
                    state[f"{m}.{k}"] = {s: x.detach().to("cpu", copy=True) for s, x in self.optim[m][k].items()}
        meta = {"rank": self.cfg.rank, "alpha": self.cfg.alpha, "targets": list(self.cfg.targets),
                "step": self.step}
        return Block(self.version, tensors, state, meta)

    @classmethod
    def load(cls, path: Path) -> "Adapters":
        block = read_block(path, ADAPTERS)
        m = block.meta
        try:
            cfg = LoraConfig(rank=m["rank"], alpha=m["alpha"], targets=tuple(m["targets"]))
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{path}: not a LoRA adapter file") from e
        params: dict[str, dict[str, list]] = {}
        for key, t in block.params.items():
            module, target, ab = (key.rsplit(".", 2) + ["", ""])[:3]
            if not _LAYER.fullmatch(module) or target not in TARGETS or ab not in ("A", "B") or t.dim() != 2:
                raise ConfigError(f"{path}: unexpected tensor {key!r} {list(t.shape)} for a LoRA adapter file")
            params.setdefault(module, {}).setdefault(target, [None, None])["AB".index(ab)] = t.clone().requires_grad_()
        for module, layer in params.items():
            for target, (a, b) in layer.items():
                if a is None or b is None:
                    raise ConfigError(f"{path}: adapter {module}.{target} lacks its {'A' if a is None else 'B'} matrix")
        ad = cls(cfg, {m: {t: tuple(p) for t, p in layer.items()} for m, layer in params.items()})
        for key, st in block.optim.items():
            module, rest = key.rsplit(".", 2)[0], ".".join(key.rsplit(".", 2)[1:])
            ad.optim.setdefault(module, {})[rest] = {s: x.clone() for s, x in st.items()}
        ad.step, ad.version = m.get("step", block.step), block.step
        return ad

    def check_args(self, args: ModelArgs, path: Path):
        """The adapters must be exactly those of this model: one set per layer, the file's targets, its shapes."""
        want = [f"layers.{i}" for i in range(args.n_layers)]
        have = sorted(self.params, key=lambda m: int(m.split(".")[1]))
        if have != want:
            span = f" ({have[0]} to {have[-1]})" if have else ""
            raise ConfigError(f"{path}: adapters on {len(have)} layers{span}, the model has {args.n_layers} layers")
        for m in want:
            layer = self.params[m]
            if set(layer) != set(self.cfg.targets):
                raise ConfigError(f"{path}: {m} has adapters on {','.join(sorted(layer))}, the file's targets are "
                                  f"{','.join(self.cfg.targets)}")
            for t, (a, b) in layer.items():
                out_f, in_f = _shape(args, t)
                want_a, want_b = (self.cfg.rank, in_f), (out_f, self.cfg.rank)
                if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                    raise ConfigError(f"{path}: adapter {m}.{t} has A {list(a.shape)} and B {list(b.shape)}, this model "
                                      f"needs {list(want_a)} and {list(want_b)}")
