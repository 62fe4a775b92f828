"""CLI options not covered elsewhere, and the bf16 compute path against its in-memory twin."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from slowllama.device import derive_seed
from slowllama.engine.optim import OptimConfig
from slowllama.engine.store import prepare
from slowllama.engine.trainer import IGNORE, TrainConfig, Trainer
from slowllama.formats.meta import MetaCheckpoint
from tests.reference import random_batch, reference_model, stored_params

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "finetune.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


def test_many_options_in_one_run(gqa_model, tmp_path):
    data, val = tmp_path / "d.txt", tmp_path / "v.txt"
    data.write_text("Anna counted the hens in the field. One, two, three, four. " * 20)
    val.write_text("The wind blew the leaves along the road to the market. " * 5)
    out = tmp_path / "out"
    r = _run(gqa_model, "--data", data, "--out", out, "--iters", "3", "--seq-len", "16", "--batch-size", "2",
             "--save-every", "1", "--no-prefetch", "--no-verify", "--compute-dtype", "bfloat16",
             "--act-dtype", "bfloat16", "--ram-budget", "64M", "--stop-on-nan", "-v", "--prompt", "Anna",
             "--gen-tokens", "5", "--val-data", val, "--eval-every", "1", "--shards", "1", "--momentum", "0.5",
             "--weight-decay", "0.01", "--seed", "3", "--dropout", "0.1", "--device", "cpu",
             "--tensorboard", tmp_path / "tb")
    assert r.returncode == 0, r.stderr
    assert [p.name.startswith("events.out.tfevents.") for p in (tmp_path / "tb").iterdir()] == [True]
    assert r.stderr.count("exported") == 3  # after iterations 1 and 2 (--save-every 1), and at the end
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000001", "checkpoint-000002"]
    assert sorted(p.name for p in out.glob("*.pth")) == ["consolidated.00.pth"]  # re-sharded from 2 to 1
    ck = MetaCheckpoint(out)
    assert ck.n_shards == 1 and ck.checkpoint_dtype() == MetaCheckpoint(gqa_model).checkpoint_dtype()
    log = (out / "train_log.jsonl").read_text()
    assert log.count('"val_loss"') == 4 and log.count('"completion"') == 4


def test_lora_alpha_is_applied(gqa_model, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("Anna counted the hens in the field. " * 20)
    outs = []
    for alpha in ("4", "64"):
        out = tmp_path / f"out{alpha}"
        r = _run(gqa_model, "--data", data, "--out", out, "--iters", "2", "--seq-len", "16", "--lora-rank", "2",
                 "--lora-alpha", alpha, "--optimizer", "adamw", "--lr", "1e-2", "--lora-targets", "wq,wk,wv,wo,w1,w2,w3")
        assert r.returncode == 0, r.stderr
        outs.append(out)
    from slowllama.model.lora import Adapters

    a, b = (Adapters.load(o / "lora_adapters.blk") for o in outs)
    assert (a.cfg.alpha, b.cfg.alpha) == (4.0, 64.0) and a.cfg.targets == ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def test_bf16_compute_equals_in_memory_bf16_compute(gqa_model, tmp_path):
    """bf16 compute with fp32 masters: each step casts the masters, and bf16 gradients update fp32 weights."""
    store = prepare(MetaCheckpoint(gqa_model), tmp_path / "store")
    optim = OptimConfig("sgd", lr=0.05)
    cfg = TrainConfig(optim=optim, seed=5, dropout=0.1, micro_batch=2, compute_dtype=torch.bfloat16)
    tr = Trainer(store, tmp_path, torch.device("cpu"), cfg)
    batches = [random_batch(store.args.vocab_size, 4, 12, i) for i in range(2)]
    losses = [tr.train_step(*b).loss for b in batches]
    tr.close()
    master = reference_model(gqa_model, dropout=0.1)
    opt = optim.make(list(master.parameters()))
    for step, (x, y) in enumerate(batches):
        compute = reference_model(gqa_model, dropout=0.1)
        compute.load_state_dict(master.state_dict())
        compute.to(torch.bfloat16)
        n_tok = int((y != IGNORE).sum())
        loss = 0.0
        for m, (xm, ym) in enumerate(zip(x.split(2), y.split(2))):
            torch.manual_seed(derive_seed(5, step, m))
            part = F.cross_entropy(compute(xm).float().flatten(0, 1), ym.flatten(), reduction="sum") / n_tok
            part.backward()
            loss += part.item()
        for p, c in zip(master.parameters(), compute.parameters()):
            p.grad = c.grad.float()
        opt.step()
        opt.zero_grad()
        assert losses[step] == pytest.approx(loss, abs=1e-6)
    got = stored_params(store)
    for k, v in master.state_dict().items():
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0)
