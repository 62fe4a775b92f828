"""Peak disk use of the work directory during training steps, against its size at rest.

    python benchmarks/bench_disk.py [--dim 512 --n-layers 8 --batch 4 --seq 128 --steps 2]

A sampling thread sums the sizes of all files under the work dir every few milliseconds
while streamed SGD steps run (ram budget 0: activations on disk). Prints JSON: store bytes
at rest, peak bytes during the steps, the overhead, and the largest module for scale.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from make_test_model import make_test_model  # noqa: E402

from slowllama.engine.optim import OptimConfig  # noqa: E402
from slowllama.engine.store import prepare  # noqa: E402
from slowllama.engine.trainer import TrainConfig, Trainer  # noqa: E402
from slowllama.formats.meta import MetaCheckpoint  # noqa: E402


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_size
            except FileNotFoundError:  # replaced between listing and stat
                pass
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=8)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="slowllama-disk-"))
    ckpt_dir = make_test_model(tmp / "ckpt", text=ROOT / "test_data" / "corpus.txt", dim=a.dim, n_layers=a.n_layers,
                               n_heads=a.n_heads, multiple_of=256, dtype=torch.bfloat16)
    work = tmp / "work"
    store = prepare(MetaCheckpoint(ckpt_dir), work / "store")
    tr = Trainer(store, work, torch.device("cpu"), TrainConfig(optim=OptimConfig(a.optimizer, lr=1e-4)))
    x = torch.randint(0, store.args.vocab_size, (a.batch, a.seq + 1))
    tr.train_step(x[:, :-1], x[:, 1:])  # AdamW's state appears in the first step
    tr.streamer.flush()
    rest = tree_bytes(work)
    peak, done = [rest], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_bytes(work))
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    for _ in range(a.steps):
        tr.train_step(x[:, :-1], x[:, 1:])
    tr.streamer.flush()
    done.set()
    t.join()
    tr.close()
    largest = max(store.path(m).stat().st_size for m in store.modules)
    acts = a.batch * a.seq * a.dim * 4 * (len(store.trainable) - 1)
    print(json.dumps({"store_bytes_at_rest": rest, "peak_bytes_during_steps": peak[0],
                      "overhead_bytes": peak[0] - rest, "overhead_ratio": round(peak[0] / rest, 4),
                      "largest_module_bytes": largest, "activation_bytes": acts,
                      "boundary_gradient_bytes": a.batch * a.seq * a.dim * 4}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
