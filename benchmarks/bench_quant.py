"""LoRA on a quantized base: a 7B-shaped LoRA step with a bf16 base against an NF4 base, and what fits 16 GB.

    python benchmarks/bench_quant.py [--dim 4096 --n-heads 32 --n-layers 2 --batch 1 --seq 128 --steps 2
                                      --ram-budget 1G --threads N --workdir DIR]

It writes one bfloat16 Meta checkpoint with random weights (Llama 2 7B's block shapes: dim 4096, 32 heads,
FFN 11008; a few layers and a ~320-piece vocabulary, so the blocks are nearly all of it), then for each base
(the checkpoint's bf16, --base-quant nf4) prepares the LoRA base store in a process of its own and runs
1 warm-up + --steps LoRA steps (adapters on wq,wv, AdamW, float32 compute) under --ram-budget in another.
Per base it reports bytes read per step (slowllama.fsutil.IO), seconds per step, the step process's peak
RSS (VmHWM: interpreter and torch included, the baseline after the imports beside it), the store's size,
the planner's plan (plan.py) and its resident_budget: the smallest budget at which the base stays cached
and a step reads none of it.

Then, by the planner's own arithmetic (plan.module_sizes' formula on each module's stored tensors, the
parts quant.part_shapes gives, and plan.resident_budget), the largest of a list of real model shapes whose
quantized base stays resident under the default --ram-budget (auto: options.AUTO_SHARE of the memory
available when the run starts) on a 16 GB machine: for 16 GB available (the upper bound) and for 12 GB
(macOS and a browser holding 4 GB), with float32 and bfloat16 compute, at finetune's default batch
(4 x 128 tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _phases import ROOT, bench_dir, parse_bytes, peak_rss_bytes, rss_bytes, run_phase

sys.path.insert(0, str(ROOT))
GB = 1e9
# name -> ModelArgs fields of real checkpoints (bf16 on disk), smallest first.
MODELS = {
    "Llama-2-7B": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32, "vocab_size": 32000, "intermediate_size": 11008},
    "Llama-3.1-8B": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256, "intermediate_size": 14336},
    "Llama-2-13B": {"dim": 5120, "n_layers": 40, "n_heads": 40, "n_kv_heads": 40, "vocab_size": 32000, "intermediate_size": 13824},
    "Qwen3-14B": {"dim": 5120, "n_layers": 40, "n_heads": 40, "n_kv_heads": 8, "head_dim": 128, "vocab_size": 151936,
                      "intermediate_size": 17408, "qk_norm": True},
    "Mistral-Small-24B": {"dim": 5120, "n_layers": 40, "n_heads": 32, "n_kv_heads": 8, "head_dim": 128, "vocab_size": 131072,
                              "intermediate_size": 32768},
    "Qwen3-32B": {"dim": 5120, "n_layers": 64, "n_heads": 64, "n_kv_heads": 8, "head_dim": 128, "vocab_size": 151936,
                      "intermediate_size": 25600, "qk_norm": True},
    "Llama-3.1-70B": {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "vocab_size": 128256, "intermediate_size": 28672},
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--n-heads", type=int, default=32)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=320)
    p.add_argument("--multiple-of", type=int, default=256, help="with dim 4096: Llama 2 7B's FFN width, 11008")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--ram-budget", type=parse_bytes, default=1 << 30,
                   help="bytes for both runs: between the NF4 base's resident budget and the bf16 one's by default")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", default=None)
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)  # internal: one phase in this process
    a = p.parse_args()
    if a.phase:
        name, cfg = a.phase.split(" ", 1)
        print(json.dumps({"prepare": phase_prepare, "lora": phase_lora}[name](json.loads(cfg))))
        return
    with bench_dir(a.workdir, "slowllama-benchquant-") as work:
        print(json.dumps(run(a, work), indent=1))


def _phase(name: str, cfg: dict) -> dict:
    """One phase of this script in a fresh interpreter: its peak RSS is its own (see _phases.py)."""
    proc = subprocess.run([sys.executable, __file__, "--phase", f"{name} {json.dumps(cfg)}"], check=False,
                          stdout=subprocess.PIPE,
                          text=True, cwd=str(ROOT))
    if proc.returncode != 0:
        raise SystemExit(f"phase {name} failed ({proc.returncode}):\n" + "\n".join(proc.stdout.splitlines()[-20:]))
    return json.loads(proc.stdout.splitlines()[-1])


def run(a, work: Path) -> dict:
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    ckpt = work / "ckpt"
    gen = run_phase("generate", {"out": str(ckpt), "dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads,
                                 "vocab_size": a.vocab_size, "multiple_of": a.multiple_of, "dtype": "bfloat16",
                                 "seed": 0})
    runs = {}
    for base in ("bf16", "nf4"):
        quant = None if base == "bf16" else base
        store = work / f"base-{base}"
        prep = _phase("prepare", {"ckpt": str(ckpt), "store": str(store), "base_quant": quant, "threads": a.threads})
        step = _phase("lora", {"store": str(store), "work": str(work / f"train-{base}"), "batch": a.batch,
                               "seq": a.seq, "steps": a.steps, "ram_budget": a.ram_budget, "threads": a.threads})
        runs[base] = {"prepare": prep, "step": step}
    bf, nf = runs["bf16"]["step"], runs["nf4"]["step"]
    return {
        "model": {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "vocab_size": a.vocab_size,
                  "checkpoint_bytes": gen["checkpoint_bytes"], "ckpt_dtype": "bfloat16"},
        "ram_budget_bytes": a.ram_budget, "batch": a.batch, "seq": a.seq,
        "runs": runs,
        "nf4_over_bf16": {"bytes_read_per_step": nf["bytes_read_per_step"] / max(1, bf["bytes_read_per_step"]),
                          "s_per_step": nf["s_per_step"] / bf["s_per_step"],
                          "peak_rss": nf["peak_rss_bytes"] / bf["peak_rss_bytes"]},
        "fits_16GB": fits_16gb(),
        "load_average": [load0, os.getloadavg()[0]], "seconds": time.perf_counter() - t0,
    }


def phase_prepare(cfg: dict) -> dict:
    import torch

    from slowllama.engine.store import prepare
    from slowllama.formats.meta import MetaCheckpoint

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    ckpt = MetaCheckpoint(cfg["ckpt"])
    t0 = time.perf_counter()
    store = prepare(ckpt, cfg["store"], ckpt.checkpoint_dtype(), base_quant=cfg["base_quant"])
    return {"seconds": time.perf_counter() - t0, "store_bytes": store.nbytes(), "peak_rss_bytes": peak_rss_bytes()}


def phase_lora(cfg: dict) -> dict:
    import torch

    from slowllama.engine.optim import OptimConfig
    from slowllama.engine.plan import resident_budget
    from slowllama.engine.store import BlockStore
    from slowllama.engine.trainer import TrainConfig, Trainer, estimate_io
    from slowllama.fsutil import IO
    from slowllama.model.lora import LoraConfig

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    base_rss = rss_bytes()
    store = BlockStore(cfg["store"])
    tcfg = TrainConfig(optim=OptimConfig("adamw", lr=1e-4), seed=0, ram_budget=cfg["ram_budget"],
                       lora=LoraConfig(rank=8, targets=("wq", "wv")))
    b, t = cfg["batch"], cfg["seq"]
    est = estimate_io(store, tcfg, (b, t))
    Path(cfg["work"]).mkdir(parents=True, exist_ok=True)
    tr = Trainer(store, cfg["work"], torch.device("cpu"), tcfg)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, store.args.vocab_size, (cfg["steps"] + 1, b, t + 1), generator=g)
    times, reads, losses = [], [], []
    for i in range(cfg["steps"] + 1):
        r0, _ = IO.snapshot()
        t0 = time.perf_counter()
        losses.append(tr.train_step(tokens[i, :, :-1], tokens[i, :, 1:]).loss)
        tr.streamer.flush()
        times.append(time.perf_counter() - t0)
        reads.append(IO.snapshot()[0] - r0)
    plan = tr.plan
    tr.close()
    return {"store_bytes": store.nbytes(), "s_per_step": sum(times[1:]) / cfg["steps"], "step_seconds": times,
            "bytes_read_per_step": reads[-1], "bytes_read_by_step": reads, "estimated_read_per_step": est["read"],
            "losses": losses, "peak_rss_bytes": peak_rss_bytes(), "rss_baseline_bytes": base_rss,
            "plan": {"turn_blocks_K": plan.turn_blocks, "top": plan.top, "cache_budget": plan.cache_budget},
            "resident_budget_bytes": resident_budget(tcfg, store.args, tr.sizes, b, t)}


def fits_16gb(machine: float = 16 * 2**30, batch: int = 4, seq: int = 128) -> dict:
    """The largest MODELS entry whose base stays resident under the auto budget of a 16 GB machine."""
    import torch

    from slowllama.engine.plan import resident_budget
    from slowllama.engine.trainer import TrainConfig
    from slowllama.model.lora import LoraConfig
    from slowllama.model.transformer import ModelArgs
    from slowllama.run.options import AUTO_SHARE

    out = {}
    for available in (machine, machine - 4 * 2**30):
        budget = AUTO_SHARE * available
        for compute in (torch.float32, torch.bfloat16):
            cfg = TrainConfig(compute_dtype=compute, lora=LoraConfig())
            need = {q: {m: resident_budget(cfg, ModelArgs(**f), planned_sizes(ModelArgs(**f), q, compute), batch, seq)
                        for m, f in MODELS.items()} for q in (None, "int8", "nf4")}
            out[f"{available / 2**30:.0f}GB_available_{str(compute).removeprefix('torch.')}_compute"] = {
                "auto_budget_bytes": budget,
                **{q or "bf16": {"largest_resident": max((m for m in MODELS if n[m] <= budget), default=None,
                                                         key=list(MODELS).index),
                                 "resident_budget_GB": {m: round(v / GB, 2) for m, v in n.items()}}
                   for q, n in need.items()}}
    return out


def planned_sizes(args, base_quant: str | None, compute) -> list:
    """plan.module_sizes' figures for a LoRA base of a bf16 checkpoint, from the shapes alone (no store)."""
    import torch

    from slowllama.engine.plan import ModuleSize
    from slowllama.engine.quant import SEP, is_quantized, part_shapes, stored_sizes
    from slowllama.formats.meta import expected_shapes
    from slowllama.model.transformer import module_names

    sizes = []
    for m in module_names(args):
        tensors = []
        for key, shape in expected_shapes(args, m).items():
            if base_quant and is_quantized(m, key):
                tensors += [(f"{key}{SEP}{p}", dt, s) for p, (dt, s) in part_shapes(base_quant, shape, torch.bfloat16).items()]
            else:
                tensors.append((key, torch.bfloat16, shape))
        numel, held, dequant = stored_sizes(tensors, compute.itemsize)
        sizes.append(ModuleSize(ram=held, file=held, numel=numel, dequant=dequant))
    return sizes


if __name__ == "__main__":
    main()
