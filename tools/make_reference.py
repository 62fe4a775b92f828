"""Store reference outputs of plain in-memory training in test_data/golden/ (run once).

    python tools/make_reference.py

Writes a small checkpoint (GQA, 2 shards, ffn_dim_multiplier) to test_data/golden/model/
and golden.pt: a batch, the first logits, the losses of two SGD steps and for every tensor
the values that moved most, before and after. test_backprop.py checks both the streamed
trainer and the in-memory reference against these numbers.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from make_test_model import make_test_model  # noqa: E402

from slowllama.engine.optim import OptimConfig  # noqa: E402
from slowllama.formats.meta import MetaCheckpoint  # noqa: E402
from tests.reference import random_batch, reference_model, reference_step  # noqa: E402

OUT = ROOT / "test_data" / "golden"
SLICE = 8


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    model_dir = make_test_model(OUT / "model", text=ROOT / "test_data" / "corpus.txt", dim=64, n_layers=2,
                                n_heads=4, n_kv_heads=2, n_shards=2, ffn_dim_multiplier=1.3, seed=1234)
    args = MetaCheckpoint(model_dir).args
    seed, lr, steps = 5, 0.1, 2
    batches = [random_batch(args.vocab_size, 4, 16, 100 + i) for i in range(steps)]
    model = reference_model(model_dir)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(batches[0][0])[:, :4].clone()
    opt = OptimConfig("sgd", lr=lr).make(list(model.parameters()))
    losses = [reference_step(model, opt, *batches[i], seed=seed, step=i, micro_batch=2) for i in range(steps)]
    # Per tensor, the SLICE elements that moved most: their values before and after.
    index, before, after = {}, {}, {}
    for k, v in model.state_dict().items():
        idx = (v - start[k]).abs().flatten().argsort(descending=True)[:SLICE]
        index[k], before[k], after[k] = idx, start[k].flatten()[idx], v.flatten()[idx].clone()
    torch.save({"seed": seed, "lr": lr, "inputs": [b[0] for b in batches], "targets": [b[1] for b in batches],
                "logits": logits, "losses": losses, "index": index, "before": before, "after": after}, OUT / "golden.pt")
    print(f"wrote {OUT}: losses {losses}")


if __name__ == "__main__":
    main()
