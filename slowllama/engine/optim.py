"""Per-module optimizers whose state is stored in the block file beside the module.

Each module gets a fresh torch.optim instance per step with its state loaded from
the store, so the math is torch's own: a streamed step equals torch.optim on the
whole model.
"""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..device import to_device
from ..errors import ConfigError

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

    def make(self, params, foreach: bool | None = False) -> torch.optim.Optimizer:
        """torch's optimizer with these settings; foreach=None lets torch choose, as a script of a user's would."""
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                                   foreach=foreach)
        return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, eps=self.eps,
                                 weight_decay=self.weight_decay, foreach=foreach)


STEP_CHUNK = 1 << 18  # elements a chunk of the step updates: its parameter, gradient and moments stay in cache


def step_module(cfg: OptimConfig, params: dict[str, torch.nn.Parameter],
                state: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Apply one optimizer step to params (whose .grad is set); returns the new state.

    torch's single-tensor optimizers make one pass over whole tensors per operation (AdamW about
    ten), each from memory. The step is elementwise, so AdamW is handed STEP_CHUNK-element views of
    each tensor instead, one parameter each: every chunk runs all its operations while it is in cache
    (0.58 against 0.70 s for the 16 blocks of 13M weights of bench_step's model, stepped one by one on
    2 threads), with the same bits (tests/engine/test_optim_chunks.py checks them against torch's step
    on whole tensors). SGD makes one or two passes, so chunks would only add their overhead."""
    named = [(n, p) for n, p in params.items() if p.grad is not None]
    loaded, chunks = {}, {}
    for n, p in named:
        # Moments may be stored in 16 bits; the update itself always runs in the parameter's dtype.
        loaded[n] = {k: to_device(v, p.device).to(p.dtype if v.shape == p.shape else v.dtype)
                     for k, v in state.get(n, {}).items()}
        if not _chunked(cfg, p):
            chunks[n] = [(p, loaded[n])]
            continue
        if not loaded[n]:  # torch's own first state, for chunks to view
            loaded[n] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p.detach()),
                         "exp_avg_sq": torch.zeros_like(p.detach())}
        chunks[n] = _chunks(p, loaded[n])
    opt = cfg.make([q for n, _ in named for q, _ in chunks[n]])
    for n, _ in named:
        for q, st in chunks[n]:
            if st:
                opt.state[q] = st
    opt.step()
    return {n: _joined(p, loaded[n], [(st, opt.state.get(q, {})) for q, st in chunks[n]]) for n, p in named}


def _chunked(cfg: OptimConfig, p: torch.Tensor) -> bool:
    """Whether p's step runs in chunks: AdamW's, on cpu only, where a chunk fits in cache; a GPU would
    launch every operation once per chunk for nothing. SGD, measured the same way as AdamW in
    step_module, took 0.126 s chunked against 0.103 whole, and 0.323 against 0.320 with momentum."""
    return cfg.name == "adamw" and p.device.type == "cpu" and p.numel() > STEP_CHUNK


def _chunks(p: torch.nn.Parameter, st: dict[str, torch.Tensor]) -> list[tuple[torch.nn.Parameter, dict]]:
    """p as parameters viewing STEP_CHUNK elements of it each, with views of its gradient and state; p
    itself where it is not contiguous. A scalar state (AdamW's step) is copied per chunk."""
    whole = [p.detach(), p.grad, *(v for v in st.values() if v.ndim)]
    if not all(t.is_contiguous() and t.shape == p.shape for t in whole):
        return [(p, st)]
    data, grad = p.detach().view(-1), p.grad.view(-1)
    out = []
    for lo in range(0, p.numel(), STEP_CHUNK):
        q = torch.nn.Parameter(data[lo: lo + STEP_CHUNK])
        q.grad = grad[lo: lo + STEP_CHUNK]
        out.append((q, {k: v.view(-1)[lo: lo + STEP_CHUNK] if v.ndim else v.clone() for k, v in st.items()}))
    return out


def _joined(p: torch.nn.Parameter, loaded: dict, states: list[tuple[dict, dict]]) -> dict[str, torch.Tensor]:
    """p's state after the step, from its chunks' (given, after) states: a scalar from the first chunk (all
    took the same step), a tensor the step updated in place whole, one the step made anew joined."""
    if len(states) == 1:
        return {k: v for k, v in states[0][1].items() if isinstance(v, torch.Tensor)}
    first_in, first = states[0]
    out = {}
    for k, v in first.items():
        if not isinstance(v, torch.Tensor):
            continue
        if v.ndim == 0:
            out[k] = v
        elif first_in.get(k) is v:
            out[k] = loaded[k]
        else:
            out[k] = torch.cat([after[k] for _, after in states]).view(p.shape)
    return out


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Round fp32 to bf16 so that the expected result equals x; the draws depend on seed only.

    bf16 is fp32 with the low 16 bits dropped; adding uniform noise in [0, 2^16) to
    those bits before truncating rounds up with probability equal to the fraction.
    Infinities and canonical NaN stay as they are (their low 16 bits are zero); a finite
    value beyond bf16's range may round to infinity, as round-to-nearest would.
    """
    if dtype != torch.bfloat16:
        raise ValueError(f"stochastic rounding is implemented for bfloat16, not {dtype}")
    bits = x.detach().float().contiguous().view(torch.int32).reshape(-1)
    if x.device.type != "cpu":
        return _round_torch(bits, seed).view(x.shape)
    out = torch.empty(bits.numel(), dtype=torch.bfloat16)
    _round_numpy([(bits, seed, out)])
    return out.view(x.shape)


def stochastic_round_(pairs: list[tuple[torch.Tensor, int]]):
    """stochastic_round in place, for each (tensor, seed): the tensor (fp32, contiguous) keeps its dtype and
    takes the value the bf16 result holds, drawn alike. A module held in RAM between steps then needs no
    widened copy of its rounded weights (blockfile.Block.narrow says how the file keeps them). On cpu
    the tensors of a module are rounded in one call, so that their chunks keep every thread busy."""
    for x, _ in pairs:
        if x.dtype != torch.float32 or not x.is_contiguous():
            raise ValueError(f"in-place stochastic rounding needs a contiguous float32 tensor, got {x.dtype}")
    bits = [(x.detach().view(torch.int32).reshape(-1), seed) for x, seed in pairs]
    on_cpu = [(b, seed, None) for b, seed in bits if b.device.type == "cpu"]
    if on_cpu:
        _round_numpy(on_cpu)
    for b, seed in bits:
        if b.device.type != "cpu":
            _round_torch(b, seed, inplace=True)


ROUND_CHUNK = 1 << 20  # elements per pass (a multiple of 4): the temporaries, 6 bytes each, stay in cache
_round_pool: ThreadPoolExecutor | None = None
HIGH_HALF = np.uint32(0xFFFF0000)
# Generator.integers(0, 2**16, dtype=uint16) takes each raw 64-bit output as four 16-bit draws, low first:
# on a little-endian machine that is the raw outputs' own bytes, read 40% faster (0.057 against 0.094 s per
# 100M elements on 2 threads of the CI VM). tests/model/test_precision.py checks them against integers.
LITTLE_ENDIAN = sys.byteorder == "little"


def _round_numpy(jobs: list[tuple[torch.Tensor, int, torch.Tensor | None]]):
    """Round each job's int32 bits with its seed into its bf16 out, or in place where out is None.

    numpy's PCG64 draws 16-bit integers 4x faster than torch's cpu generator, and its integer
    arithmetic is vectorised: 0.05 s for a 50 MB block instead of 0.25 s. In cache-sized chunks, so
    that the noise and the sums are scratch reused and the only full-size allocation is the bf16
    result (none in place); the chunks of every job are spread over torch's threads (numpy drops the
    GIL: one module's 1M-element projections, rounded one by one, left a thread idle). A job's draws
    are those of one default_rng(seed).integers call over its whole tensor: each 64-bit output gives
    four 16-bit draws, so a chunk starting at element e advances its generator by e / 4."""
    chunks = []
    for bits, seed, out in jobs:
        src = bits.numpy().view(np.uint32)
        dst = None if out is None else out.view(torch.int16).numpy().view(np.uint16)
        chunks += [(src, seed, dst, lo) for lo in range(0, src.size, ROUND_CHUNK)]
    workers = max(1, min(len(chunks), torch.get_num_threads()))
    per = -(-len(chunks) // workers)

    def run(part: list):
        tmp = np.empty(ROUND_CHUNK, dtype=np.uint32)
        for src, seed, dst, lo in part:
            hi = min(src.size, lo + ROUND_CHUNK)
            gen = np.random.PCG64(seed)
            gen.advance(lo // 4)
            if LITTLE_ENDIAN:  # the same draws, read straight from the generator's raw 64-bit outputs
                noise = gen.random_raw(-(-(hi - lo) // 4)).view(np.uint16)[: hi - lo]
            else:
                noise = np.random.Generator(gen).integers(0, 1 << 16, hi - lo, dtype=np.uint16)
            if dst is None:  # the sum's high half, with the low one cleared: the bf16 result widened
                t = src[lo:hi]
                np.add(t, noise, out=t)
                np.bitwise_and(t, HIGH_HALF, out=t)
                continue
            t = tmp[: hi - lo]
            np.add(src[lo:hi], noise, out=t)
            np.right_shift(t, 16, out=t)
            dst[lo:hi] = t  # the high halves, exactly representable in 16 bits

    parts = [chunks[k * per: (k + 1) * per] for k in range(workers)]
    if workers == 1:
        run(parts[0])
        return
    global _round_pool
    if _round_pool is None or _round_pool._max_workers < workers:
        _round_pool = ThreadPoolExecutor(workers, thread_name_prefix="slowllama-round")
    for f in [_round_pool.submit(run, part) for part in parts]:
        f.result()


def _round_torch(bits: torch.Tensor, seed: int, inplace: bool = False) -> torch.Tensor:
    gen = torch.Generator(device=bits.device).manual_seed(seed)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=gen)
    if inplace:
        return bits.add_(noise).bitwise_and_(-(1 << 16))
    return ((bits + noise) & -(1 << 16)).view(torch.float32).to(torch.bfloat16)
