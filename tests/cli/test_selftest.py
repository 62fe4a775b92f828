"""The device self-test: it passes on cpu as CI runs it, and each check fails when what it checks is broken."""
import ctypes
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from slowllama import device as dev
from slowllama.cli import selftest
from slowllama.engine import streamer as blackbox
from slowllama.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
CHECKS = ["device", "dropout_replay", "copy_safety", "exact_sgd", "exact_adamw", "recovery", "stochastic_rounding",
          "memory", "benchmark"]


@pytest.mark.slow
def test_the_cli_passes_on_cpu_and_writes_the_report(tmp_path):
    out, tmp = tmp_path / "report.json", tmp_path / "tmp"
    tmp.mkdir()
    r = subprocess.run([sys.executable, "-m", "slowllama.cli.selftest", "--device", "cpu", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(tmp)})
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["versions"]["torch"] == torch.__version__
    assert [c["name"] for c in report["checks"]] == CHECKS
    assert all(c["ok"] is True and c["detail"] for c in report["checks"])
    assert "max |param diff| 0," in next(c for c in report["checks"] if c["name"] == "exact_sgd")["detail"]
    assert "all checks passed" in r.stdout
    assert not list(tmp.glob("slowllama-selftest-*"))  # the model and stores it made are gone


def test_a_failing_check_fails_the_exit_status_and_the_temp_folder_goes(monkeypatch, tmp_path, capsys):
    made = []
    real = selftest.make_model
    monkeypatch.setattr(selftest, "make_model", lambda folder: made.append(folder) or real(folder))
    for name in ("check_exact", "check_recovery", "check_memory", "check_benchmark", "check_copy_safety",
                 "check_rounding"):
        monkeypatch.setattr(selftest, name, lambda *a, name=name, **kw: selftest.Check(name, True, "skipped"))
    monkeypatch.setattr(dev, "set_rng_state", lambda device, state: None)  # dropout replay cannot work
    assert selftest.main(["--device", "cpu", "--out", str(tmp_path / "r.json")]) == 1
    report = json.loads((tmp_path / "r.json").read_text())
    assert [c["ok"] for c in report["checks"] if c["name"] == "dropout_replay"] == [False] and not report["ok"]
    assert "FAILED" in capsys.readouterr().out
    assert made and not made[0].parent.exists()


def test_a_device_that_is_missing_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has cuda")
    assert selftest.main(["--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == "error: --device cuda: not available on this machine"


def test_dropout_replay_fails_when_the_rng_restore_is_broken(monkeypatch):
    assert selftest.check_dropout_replay(CPU).ok
    monkeypatch.setattr(dev, "set_rng_state", lambda device, state: None)
    c = selftest.check_dropout_replay(CPU)
    assert not c.ok and "differ in" in c.detail


class _AsyncCopies:
    """A device whose copies run later, as a non_blocking copy does: they read the source only when
    an event after them is waited for or the device is synchronized. They hold the source by address,
    not by reference, as the hardware does."""

    def __init__(self):
        self.pending = []

    def to_device(self, t, device, non_blocking=False):
        dst = torch.empty_like(t)
        self.pending.append((t.data_ptr(), t.nbytes, dst))
        return dst

    def run(self):
        for ptr, nbytes, dst in self.pending:
            raw = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))
            dst.view(torch.uint8).reshape(-1).copy_(torch.from_numpy(raw.copy()))
        self.pending.clear()

    def fence(self, device, stream=None):
        copies = self

        class Event:
            def synchronize(self):
                copies.run()

        return Event()


def test_copy_safety_fails_without_the_fence(monkeypatch):
    fake = _AsyncCopies()
    monkeypatch.setattr(dev, "to_device", fake.to_device)
    monkeypatch.setattr(dev, "copy_fence", fake.fence)
    monkeypatch.setattr(dev, "synchronize", lambda device: fake.run())
    c = selftest.check_copy_safety(CPU)
    assert c.ok and "refilled at once" in c.detail  # the buffer was handed out again, after the copy
    monkeypatch.setattr(blackbox.BufferPool, "fence", lambda self, buffer, event: None)
    c = selftest.check_copy_safety(CPU)
    assert not c.ok and "0 values wrong" not in c.detail


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return selftest.make_model(tmp_path_factory.mktemp("selftest-model"))


def test_recovery_fails_when_recover_does_nothing(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "recover", lambda self, batch_for_step: None)
    c = selftest.check_recovery(CPU, model_dir, tmp_path)
    assert not c.ok and "recovered nothing" in c.detail


def test_exactness_fails_when_the_recompute_draws_other_masks(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(dev, "set_rng_state", lambda device, state: None)
    c = selftest.check_exact(CPU, model_dir, tmp_path, "sgd", 1e-6)
    assert not c.ok and "max |param diff| 0," not in c.detail


def test_rounding_fails_when_it_rounds_to_nearest(monkeypatch):
    monkeypatch.setattr(selftest, "stochastic_round", lambda x, dtype, seed: x.to(dtype))
    c = selftest.check_rounding(CPU)
    assert not c.ok and "ulp" in c.detail


def test_memory_fails_when_the_process_grows_beyond_the_budget(model_dir, tmp_path, monkeypatch):
    rss = itertools.count(0, 1 << 30)  # a GiB more at every sample, however many samples a slow machine takes
    monkeypatch.setattr(selftest._PeakRss, "now", staticmethod(lambda: next(rss)))
    c = selftest.check_memory(CPU, model_dir, tmp_path)
    assert not c.ok and "RSS grew" in c.detail
