"""Training controls for unattended runs: the lr schedule, config files and the SSD wear line."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slowllama.engine.optim import OptimConfig
from slowllama.engine.store import prepare
from slowllama.engine.trainer import TrainConfig, Trainer
from slowllama.formats.meta import MetaCheckpoint
from slowllama.run import costs as costs_mod
from slowllama.run.loop import finetune
from slowllama.run.schedule import lr_at
from tests.reference import random_batch, reference_model, reference_step, stored_params

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_schedule_follows_the_formula_and_torch_schedulers():
    lr, lo, T, W = 0.1, 0.01, 20, 4
    for i in range(T):
        if i < W:
            want = lr * (i + 1) / W
            assert lr_at(i, T, lr, "cosine", W, lo) == pytest.approx(want)
            assert lr_at(i, T, lr, "linear", W, lo) == pytest.approx(want)
        else:
            t = (i - W) / (T - W)
            assert lr_at(i, T, lr, "cosine", W, lo) == pytest.approx(lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * t)))
            assert lr_at(i, T, lr, "linear", W, lo) == pytest.approx(lr - (lr - lo) * t)
        assert lr_at(i, T, lr, "constant", W, lo) == pytest.approx(lr * (i + 1) / W if i < W else lr)
    # Without warmup, cosine and linear are torch's CosineAnnealingLR and LinearLR.
    for name, make in (("cosine", lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=T, eta_min=lo)),
                       ("linear", lambda o: torch.optim.lr_scheduler.LinearLR(o, 1.0, lo / lr, total_iters=T))):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        sched = make(opt)
        for i in range(T):
            assert lr_at(i, T, lr, name, 0, lo) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9), (name, i)
            opt.step()
            sched.step()


@pytest.mark.parametrize("turn_blocks", [None, 99], ids=["minimal-turn", "whole-model-turn"])
def test_streamed_steps_with_a_schedule_equal_autograd_with_the_same_lrs(gqa_model, tmp_path, turn_blocks):
    T, W = 3, 1
    sched = dict(total=T, lr=0.05, schedule="cosine", warmup=W, min_lr=0.005)
    optim = OptimConfig("sgd", lr=0.05, momentum=0.9)
    store = prepare(MetaCheckpoint(gqa_model), tmp_path / "store")
    cfg = TrainConfig(optim=optim, seed=3, dropout=0.1, micro_batch=2, lr_at=lambda s: lr_at(s, **sched),
                      turn_blocks=turn_blocks)
    tr = Trainer(store, tmp_path, torch.device("cpu"), cfg)
    batches = [random_batch(store.args.vocab_size, 4, 8, i) for i in range(T)]
    losses = [tr.train_step(*b).loss for b in batches]
    tr.close()
    model = reference_model(gqa_model, dropout=0.1)
    opt = optim.make(list(model.parameters()))
    for step, b in enumerate(batches):
        opt.param_groups[0]["lr"] = lr_at(step, **sched)
        assert losses[step] == pytest.approx(reference_step(model, opt, *b, seed=3, step=step, micro_batch=2), abs=1e-6)
    got = stored_params(store)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0)


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "finetune.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env={"TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin"})


def _records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_config_file_equals_the_same_flags_and_run_json_is_one(gqa_model, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("Anna counted the hens in the field. One, two, three, four. " * 20)
    flags = ["--iters", "3", "--seq-len", "16", "--batch-size", "2", "--lr", "0.05", "--lr-schedule", "linear",
             "--warmup-iters", "1", "--min-lr", "0.01", "--device", "cpu"]
    r = _cli(gqa_model, "--data", data, "--out", tmp_path / "a", *flags)
    assert r.returncode == 0, r.stderr
    cfg = tmp_path / "conf" / "run.toml"
    cfg.parent.mkdir()
    # Relative paths in a config are the config file's; flags on the command line win over it.
    cfg.write_text(f'model_dir = "{gqa_model}"\ndata = "../d.txt"\niters = 3\nseq-len = 16\nbatch_size = 2\n'
                   f'lr = 0.05\nlr_schedule = "linear"\nwarmup_iters = 1\nmin_lr = 0.01\nseed = 7\n')
    r = _cli("--config", cfg, "--seed", "42", "--out", tmp_path / "b", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    a, b = _records(tmp_path / "a"), _records(tmp_path / "b")
    assert [x["loss"] for x in a] == [x["loss"] for x in b]
    assert [x["lr"] for x in a] == pytest.approx([lr_at(i, 3, 0.05, "linear", 1, 0.01) for i in range(3)])
    # A run's run.json, given as a config, repeats it.
    r = _cli("--config", tmp_path / "a.work" / "run.json", "--out", tmp_path / "c", "--work-dir", tmp_path / "c.work")
    assert r.returncode == 0, r.stderr
    assert [x["loss"] for x in _records(tmp_path / "c")] == [x["loss"] for x in a]
    bad = tmp_path / "bad.toml"
    for text, match in (('lrr = 0.1\n', "unknown option 'lrr'"), ('iters = "ten"\n', "iters = 'ten' is not a int"),
                        ('iters = \n', "not valid TOML")):
        bad.write_text(text)
        r = _cli(gqa_model, "--config", bad, "--data", data, "--out", tmp_path / "x")
        assert r.returncode == 2 and match in r.stderr.strip().splitlines()[-1], r.stderr
        assert not (tmp_path / "x").exists()


def test_a_run_that_writes_more_than_the_threshold_warns_up_front(gqa_model, tmp_path, capsys, monkeypatch):
    data = tmp_path / "d.txt"
    data.write_text("Anna counted the hens in the field. " * 20)
    monkeypatch.setattr(costs_mod, "WEAR_WARNING_BYTES", 1000)
    finetune(model_dir=gqa_model, data=data, out=tmp_path / "out", iters=1, seq_len=16, batch_size=2, device="cpu")
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("disk per iteration"))
    assert line.endswith("TB)")
    warning = next(x for x in printed.splitlines() if x.startswith("warning:"))
    assert "--store-dtype bfloat16" in warning and "LoRA" in warning
    monkeypatch.setattr(costs_mod, "WEAR_WARNING_BYTES", 1e12)
    finetune(model_dir=gqa_model, data=data, out=tmp_path / "out2", iters=1, seq_len=16, batch_size=2, device="cpu")
    assert "warning:" not in capsys.readouterr().out


def test_the_estimate_counts_evaluation_passes_and_completions():
    from slowllama.run.costs import eval_reads
    from slowllama.run.options import RunOptions

    o = RunOptions(model_dir="m", data="d", iters=10, eval_every=4, prompt="Hi", gen_tokens=5)
    # evaluations at 0, 4, 8 and 10: each a validation pass and a completion
    assert eval_reads(o, 0, 100, True, device_budget=10**9) == 4 * (100 + 100)
    # a resumed run at 5 evaluates at 8 and 10; a store too big for the device is read once per token
    assert eval_reads(o, 5, 100, True, device_budget=10) == 2 * (100 + 5 * 100)
    assert eval_reads(RunOptions(model_dir="m", data="d", iters=10), 0, 100, False, 10**9) == 0
