"""Issue 14: one finetune.py per work dir and per --out; a second one is refused, naming the holder's pid.

The first run trains in the background (enough --iters to outlast the test); once it is killed,
the kernel frees its locks and a resume is accepted.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.cli_helpers import SMALL, assert_refused, run_cli, start_cli

pytestmark = pytest.mark.slow

FOREVER = "100000"  # iterations: the first run is still training whenever the test looks


def _trained(base: Path) -> int:
    """Loss records logged by training itself (not the ones a resume adds for a recovered step)."""
    n = 0
    for log in (base / "out" / "train_log.jsonl", base / "work" / "train_log.jsonl"):
        if log.exists():
            for line in log.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line being written right now
                n += isinstance(rec, dict) and "loss" in rec and not rec.get("resumed")
    return n


def _wait(cond, proc: subprocess.Popen, logs: Path, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"{what}: the run exited {proc.returncode}\n{(logs / 'stderr.txt').read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout}s")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def training(probe_model, probe_data, tmp_path):
    """(first run's Popen, base): training into base/work and base/out, at least one iteration logged."""
    proc = start_cli(probe_model, "--data", probe_data, "--out", tmp_path / "out", "--work-dir", tmp_path / "work",
                     *SMALL, "--iters", FOREVER, log_dir=tmp_path / "first")
    try:
        _wait(lambda: (tmp_path / "work" / "run.json").exists() and _trained(tmp_path) > 0, proc,
              tmp_path / "first", "first run starting to train")
        yield proc, tmp_path
    finally:
        _stop(proc)


def _assert_names_pid(line: str, pid: int):
    assert "pid" in line and re.search(rf"\b{pid}\b", line), f"error line does not name pid {pid}: {line}"


def _assert_still_training(proc: subprocess.Popen, base: Path):
    n = _trained(base)
    _wait(lambda: _trained(base) > n, proc, base / "first", "first run going on after the refusals", timeout=60)


@pytest.mark.slow
def test_a_second_resume_of_a_training_run_is_refused(training, probe_model):
    proc, base = training
    r = run_cli(probe_model, "--resume", "--work-dir", base / "work", "--out", base / "out", "--device", "cpu",
                timeout=30)
    _assert_names_pid(assert_refused(r, "second --resume while training"), proc.pid)
    _assert_still_training(proc, base)
    # A killed process holds no lock: its run resumes.
    _stop(proc)
    n = _trained(base)
    again = start_cli(probe_model, "--resume", "--work-dir", base / "work", "--out", base / "out", "--device", "cpu",
                      log_dir=base / "again")
    try:
        _wait(lambda: _trained(base) > n, again, base / "again", "resume after the first run was killed")
    finally:
        _stop(again)


@pytest.mark.slow
def test_a_second_run_on_the_same_out_is_refused(training, probe_model, probe_data):
    proc, base = training
    r = run_cli(probe_model, "--data", probe_data, "--out", base / "out", "--work-dir", base / "work2", *SMALL,
                "--iters", "2", timeout=30)
    _assert_names_pid(assert_refused(r, "second run on the same --out"), proc.pid)
    assert not (base / "work2").exists()
    _assert_still_training(proc, base)
