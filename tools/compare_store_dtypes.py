"""Train one model three ways at a small learning rate: fp32 master store, bf16 store with
stochastic rounding, and bf16 store with round-to-nearest (the control), and plot the losses.

    python tools/compare_store_dtypes.py [--iters 60] [--lr 2e-5] [--out store_dtypes]

Writes OUT/{fp32,bf16-stochastic,bf16-nearest}/train_log.jsonl and OUT/store_dtypes.png
(the plot needs matplotlib), and prints the final losses as JSON.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from slowllama.cli.finetune import DEMO_MODEL  # noqa: E402
from slowllama.cli.plot import plot  # noqa: E402
from slowllama.data.windows import TokenWindows  # noqa: E402
from slowllama.engine.optim import OptimConfig  # noqa: E402
from slowllama.engine.store import prepare  # noqa: E402
from slowllama.engine.trainer import TrainConfig, Trainer  # noqa: E402
from slowllama.formats.meta import MetaCheckpoint  # noqa: E402
from slowllama.formats.tokenizer import Tokenizer  # noqa: E402

RUNS = {"fp32": (torch.float32, "stochastic"), "bf16-stochastic": (torch.bfloat16, "stochastic"),
        "bf16-nearest": (torch.bfloat16, "nearest")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEMO_MODEL)
    p.add_argument("--data", type=Path, default=ROOT / "test_data" / "corpus.txt")
    p.add_argument("--iters", type=int, default=60)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path("store_dtypes"))
    a = p.parse_args(argv)
    ckpt = MetaCheckpoint(a.model)
    windows = TokenWindows.from_file(a.data, Tokenizer(ckpt.tokenizer), a.seq_len)
    final = {}
    for name, (dtype, rounding) in RUNS.items():
        work = a.out / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        store = prepare(ckpt, work / "store", dtype)
        cfg = TrainConfig(optim=OptimConfig("adamw", lr=a.lr), seed=0, store_rounding=rounding)
        trainer = Trainer(store, work, torch.device("cpu"), cfg)
        with open(work / "train_log.jsonl", "w") as log:
            for step in range(a.iters):
                res = trainer.train_step(*windows.batch(step, a.batch_size, seed=0))
                log.write(json.dumps({"iter": step, "loss": res.loss}) + "\n")
        trainer.close()
        final[name] = res.loss
        shutil.rmtree(work / "store")
    try:
        plot([a.out / n / "train_log.jsonl" for n in RUNS], list(RUNS), a.out / "store_dtypes.png",
             title=f"AdamW lr {a.lr}: fp32 master vs bf16 store")
    except SystemExit as e:
        print(e, file=sys.stderr)
    print(json.dumps({"lr": a.lr, "iters": a.iters, "final_loss": final}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
