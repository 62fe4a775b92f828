"""One transformer block's forward and backward, as the trainer runs it, eager and under torch.compile.

    python benchmarks/bench_block.py [--dim 1024 --n-heads 16 --batch 4 --seq 128 --device cpu --compile]

The block is slowllama's own TransformerBlock (the kernels the streamed and the in-memory paths share:
scaled_dot_product_attention, RoPE as a complex multiply, RMSNorm with its own backward), with random
weights, on a random (batch, seq, dim) input and a random output gradient. It prints one JSON object:
seconds per forward+backward (the median of --reps after warm-up), the share of aten::mm in a profiled
one (what fusing everything else could win at most), and with --compile the same figures for
torch.compile(block), the first call's seconds (tracing and code generation) and how far its output and
gradients are from eager's. A compiled block that is not bit-identical cannot replace the eager one in
training whose promise is ordinary autograd's numbers: the figures say what it would buy.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _phases import _sync  # noqa: E402

from slowllama.device import choose_device  # noqa: E402
from slowllama.errors import ConfigError  # noqa: E402
from slowllama.model.transformer import ModelArgs, TransformerBlock  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _step(fn, block, x, g):
    """One forward and backward; the output, the input's gradient and the weights' gradients."""
    for p in block.parameters():
        p.grad = None
    x.grad = None
    y = fn(x)
    y.backward(g)
    return y.detach(), x.grad, [p.grad for p in block.parameters()]


def _time(fn, block, x, g, reps: int, warmup: int) -> float:
    device = x.device
    for _ in range(warmup):
        _step(fn, block, x, g)
    times = []
    for _ in range(reps):
        _sync(torch, device)
        t = time.perf_counter()
        _step(fn, block, x, g)
        _sync(torch, device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _mm_share(fn, block, x, g) -> float:
    """aten::mm's (and addmm's) share of a profiled step's self time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        _step(fn, block, x, g)
        _sync(torch, x.device)
    attr = "self_device_time_total" if x.device.type == "cuda" else "self_cpu_time_total"
    events = prof.key_averages()
    total = sum(getattr(e, attr) for e in events)
    mm = sum(getattr(e, attr) for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    return mm / total if total else 0.0


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def run(a) -> dict:
    if a.threads:
        torch.set_num_threads(a.threads)
    (device, _), dtype = choose_device(a.device), DTYPES[a.dtype]
    torch.manual_seed(0)
    args = ModelArgs(dim=a.dim, n_layers=1, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, vocab_size=1,
                     multiple_of=a.multiple_of)
    block = TransformerBlock(args).to(device=device, dtype=dtype)
    x = torch.randn(a.batch, a.seq, a.dim, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(a.batch, a.seq, a.dim, device=device, dtype=dtype)
    eager = _step(block, block, x, g)
    eager = (eager[0].clone(), eager[1].clone(), [t.clone() for t in eager[2]])
    out = {"config": vars(a), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "eager": {"s_per_step": _time(block, block, x, g, a.reps, a.warmup), "mm_share": _mm_share(block, block, x, g)}}
    if a.compile:
        compiled = torch.compile(block)
        t = time.perf_counter()
        got = _step(compiled, block, x, g)
        _sync(torch, device)
        first = time.perf_counter() - t
        c = {"first_call_s": first, "s_per_step": _time(compiled, block, x, g, a.reps, a.warmup),
             "mm_share": _mm_share(compiled, block, x, g),
             "output_max_abs_diff": _max_diff([got[0]], [eager[0]]),
             "input_grad_max_abs_diff": _max_diff([got[1]], [eager[1]]),
             "weight_grad_max_abs_diff": _max_diff(got[2], eager[2])}
        c["bit_identical"] = c["output_max_abs_diff"] == c["input_grad_max_abs_diff"] == c["weight_grad_max_abs_diff"] == 0
        out["compiled"] = c
        out["ratio_compiled_over_eager"] = c["s_per_step"] / out["eager"]["s_per_step"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--n-heads", type=int, default=16)
    p.add_argument("--n-kv-heads", type=int, default=None)
    p.add_argument("--multiple-of", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="compute dtype of the block")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--reps", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time torch.compile(block) against eager")
    a = p.parse_args()
    try:
        out = run(a)
    except ConfigError as e:  # a device this machine lacks, a shape no model has: one line, as finetune.py says it
        p.error(str(e))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
