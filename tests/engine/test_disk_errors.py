"""A write that fails mid-step (disk full, I/O error) stops the run cleanly; a resume completes it."""
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.crash]

ROOT = Path(__file__).resolve().parents[2]


def _finetune(model, data, out, *extra, fsize=None):
    def limit():
        # Without SIGXFSZ ignored the kernel kills the process instead of failing the write.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    cmd = [sys.executable, str(ROOT / "finetune.py"), str(model), "--data", str(data), "--out", str(out),
           "--iters", "3", "--seq-len", "16", "--batch-size", "2", "--lr", "0.05", "--dropout", "0.1", *extra]
    # A size limit would also cut short the .pyc files Python writes as it imports: keep it from writing them.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit if fsize else None, cwd=ROOT, env=env)


def _load(out):
    return {p.name: torch.load(p, weights_only=True) for p in sorted(Path(out).glob("*.pth"))}


def test_failed_write_keeps_the_store_consistent_and_resumable(gqa_model, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text((ROOT / "test_data" / "corpus.txt").read_text()[:4000])
    ref = _finetune(gqa_model, data, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    # Preparation (no limit) then training with files capped below a module's size.
    out = tmp_path / "out"
    first = _finetune(gqa_model, data, out, "--iters", "1")
    assert first.returncode == 0, first.stderr
    failed = _finetune(gqa_model, data, out, "--resume", fsize=40_000)
    assert failed.returncode == 2, failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a write to") and "File too large" in last, failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr
    check = subprocess.run([sys.executable, str(ROOT / "finetune.py"), str(gqa_model), "--out", str(out), "--verify"],
                           capture_output=True, text=True, cwd=ROOT)
    assert check.returncode == 0, check.stderr
    resumed = _finetune(gqa_model, data, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = _load(tmp_path / "ref"), _load(out)
    assert a.keys() == b.keys()
    for name in a:
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
