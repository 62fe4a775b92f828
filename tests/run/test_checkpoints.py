"""Numbered checkpoints: OUT/checkpoint-NNNNNN every --save-every iterations, the newest --keep kept,
each a complete export that survives a kill during its save."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import test_gen
from slowllama.paths import owner_info

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _run(model, data, base: Path, *extra, kill: str | None = None):
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("SLOWLLAMA_KILL_AT", None)
    if kill:
        env["SLOWLLAMA_KILL_AT"] = kill
    cmd = [sys.executable, str(ROOT / "finetune.py"), str(model), "--data", str(data), "--out", str(base / "out"),
           "--work-dir", str(base / "work"), "--iters", "5", "--save-every", "1", "--seq-len", "16",
           "--batch-size", "2", "--lr", "0.05", "--device", "cpu", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{p.name}:{k}": v for p in sorted(folder.glob("*.pth"))
            for k, v in torch.load(p, weights_only=True).items()}


@pytest.fixture(scope="module")
def setup(model_factory, tmp_path_factory):
    model = model_factory("ckpt", dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
    base = tmp_path_factory.mktemp("ckpt")
    data = base / "d.txt"
    data.write_text((ROOT / "test_data" / "corpus.txt").read_text()[:4000])
    ref = base / "ref"
    r = _run(model, data, ref)
    assert r.returncode == 0, r.stderr
    return model, data, ref / "out"


def test_the_newest_checkpoints_are_kept_and_each_is_a_model(setup):
    model, _, out = setup
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert names == ["checkpoint-000003", "checkpoint-000004"]  # --keep 2; iteration 5 is the final export in OUT
    for name, step in zip(names, (3, 4)):
        assert owner_info(out / name)["step"] == step
        assert sorted(p.name for p in (out / name).iterdir() if not p.name.startswith(".")) == [
            "consolidated.00.pth", "params.json", "tokenizer.model"]
    assert owner_info(out)["step"] == 5 and (out / "consolidated.00.pth").exists()
    a = test_gen.generate_text(model_dir=str(out / "checkpoint-000004"), device="cpu", prompt="The", max_new_tokens=4)
    assert isinstance(a, str) and a
    a, b = _tensors(out / "checkpoint-000004"), _tensors(out)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the final export moved on from iteration 4


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["export_module:8", "export_swap:2", "export_swap:5"])
def test_a_kill_while_saving_a_checkpoint_resumes_to_the_same_checkpoints(setup, tmp_path, kill):
    model, data, ref = setup
    r = _run(model, data, tmp_path, kill=kill)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    r = _run(model, data, tmp_path, "--resume")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in ref.iterdir() if not p.name.startswith("."))
    assert not [p.name for p in [*out.iterdir(), *out.parent.iterdir()] if "slowllama-tmp" in p.name
                or "slowllama-old" in p.name]
    for sub in ("checkpoint-000003", "checkpoint-000004", "."):
        got, want = _tensors(out / sub), _tensors(ref / sub)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), sub
