"""Driving finetune.py as a user does, and checking what a refusal must leave behind (issue 14).

A refusal: exit code 2, the last non-empty stderr line starts with "error: ", no traceback, and
every folder the user owns is exactly as before (same paths, same bytes).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slowllama.paths import LOCK

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ROOT / "finetune.py"
CORPUS = ROOT / "test_data" / "corpus.txt"
SMALL = ["--seq-len", "16", "--batch-size", "2", "--device", "cpu"]
REFUSAL_TIMEOUT = 60  # a refusal comes before any work; a run still going after this was not refused


def env(kill: str | None = None) -> dict:
    e = {k: v for k, v in os.environ.items() if k != "SLOWLLAMA_KILL_AT"}
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1")
    if kill:
        e["SLOWLLAMA_KILL_AT"] = kill
    return e


def run_cli(*args, cwd: Path = ROOT, kill: str | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    """finetune.py ARGS in cwd; a run past the timeout is a failure, not a hang."""
    cmd = [sys.executable, str(FINETUNE), *map(str, args)]
    try:
        return subprocess.run(cmd, cwd=cwd, env=env(kill), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # subprocess.run has killed it
        pytest.fail(f"finetune.py {' '.join(map(str, args))} still running after {timeout}s "
                    f"(expected it to finish or be refused)\n{(e.stderr or b'')[-2000:]!r}")


def start_cli(*args, cwd: Path = ROOT, log_dir: Path) -> subprocess.Popen:
    """finetune.py in the background; its output goes to files (a pipe nobody reads would stall it)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out = open(log_dir / "stdout.txt", "w")
    err = open(log_dir / "stderr.txt", "w")
    return subprocess.Popen([sys.executable, str(FINETUNE), *map(str, args)], cwd=cwd, env=env(),
                            stdout=out, stderr=err, text=True)


def train(model: Path, data: Path, out: Path, work: Path, *extra, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """A small run that must succeed."""
    r = run_cli(model, "--data", data, "--out", out, "--work-dir", work, *SMALL, *extra, cwd=cwd)
    assert r.returncode == 0, f"run {extra} failed, rc {r.returncode}\n{r.stderr[-3000:]}"
    return r


def snapshot(*dirs: Path) -> dict[str, str]:
    """Every path under dirs (folders included): 'dir' for a folder, the sha256 of a file's bytes.

    slowllama's lock files are left out: they exist only while a process holds them, and a
    killed process leaves one that the next process takes over or removes."""
    got = {}
    for d in dirs:
        d = Path(d)
        for p in sorted([d, *d.rglob("*")]) if d.exists() else []:
            if not p.name.endswith(LOCK):
                got[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return got


def assert_unchanged(before: dict[str, str], *dirs: Path, what: str = ""):
    after = snapshot(*dirs)
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert not (added or removed or changed), f"{what}: added {added}, removed {removed}, changed {changed}"


def assert_refused(r: subprocess.CompletedProcess, what: str = "") -> str:
    """Exit 2, one 'error: ' line last on stderr, no traceback; returns that line."""
    detail = f"{what}\nstdout:\n{r.stdout[-2000:]}\nstderr:\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, f"traceback: {detail}"
    assert r.returncode == 2, f"exit {r.returncode}, expected 2 (refused): {detail}"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), f"last stderr line is not 'error: ...': {detail}"
    return lines[-1]


def loss_iters(out: Path) -> list[int]:
    """The iterations logged with a loss in out/train_log.jsonl, in order (resumed records included)."""
    path = Path(out) / "train_log.jsonl"
    recs = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    return [r["iter"] for r in recs if "loss" in r]


@pytest.fixture(scope="session")
def probe_model(model_factory) -> Path:
    """A tiny GQA model (read-only: copy it before changing it)."""
    return model_factory("probe", dim=32, n_layers=2, n_heads=4, n_kv_heads=2)


@pytest.fixture(scope="session")
def probe_data(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("probe-data") / "data.txt"
    p.write_text(CORPUS.read_text(encoding="utf-8")[:4000], encoding="utf-8")
    return p


def edit_json(path: Path, changes: dict):
    """Set each key of a JSON file to its value in `changes`, or remove it where the value is None."""
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    path.write_text(json.dumps(d))
