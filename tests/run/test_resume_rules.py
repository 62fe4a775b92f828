"""Issue 14: what --resume accepts and refuses, driven through finetune.py as a user would.

A resume repeats the run's numbers exactly, so an option that changes them is refused by name;
options that only decide where and how fast (device, RAM, prefetch, more iterations) are accepted.
A store whose module files were swapped or rolled back is refused, naming the file.
"""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.cli_helpers import CORPUS, SMALL, assert_refused, assert_unchanged, loss_iters, run_cli, snapshot, train

pytestmark = pytest.mark.slow


def resume(model: Path, base: Path, *extra, cwd: Path | None = None, timeout: int = 180):
    """--resume of the run in base/work (exported to base/out)."""
    kw = {"cwd": cwd} if cwd else {}
    return run_cli(model, "--resume", "--work-dir", base / "work", "--out", base / "out", "--device", "cpu", *extra,
                   timeout=timeout, **kw)


@pytest.fixture
def model_copy(probe_model, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(probe_model, dst)
    return dst


# -- 4. swapped or stale module files --

def _verify_reports_a_problem(model: Path, work: Path):
    r = run_cli(model, "--verify", "--work-dir", work, timeout=60)
    assert r.returncode == 1, f"--verify: exit {r.returncode}, expected 1 (a problem)\n{r.stdout}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


@pytest.mark.slow
def test_swapped_module_files_are_refused(probe_model, probe_data, tmp_path):
    train(probe_model, probe_data, tmp_path / "out", tmp_path / "work", "--iters", "2")
    store = tmp_path / "work" / "store"
    a, b = store / "layers.000.blk", store / "layers.001.blk"
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    assert a_bytes != b_bytes
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    before = snapshot(tmp_path, probe_model, probe_data.parent)
    line = assert_refused(resume(probe_model, tmp_path, "--iters", "3", timeout=60), "swapped layer files")
    assert "layers.000.blk" in line or "layers.001.blk" in line, line
    assert_unchanged(before, tmp_path, probe_model, probe_data.parent, what="swapped layer files")
    _verify_reports_a_problem(probe_model, tmp_path / "work")


@pytest.mark.slow
def test_a_module_file_rolled_back_to_an_older_copy_is_refused(probe_model, probe_data, tmp_path):
    train(probe_model, probe_data, tmp_path / "out", tmp_path / "work", "--iters", "1")
    layer = tmp_path / "work" / "store" / "layers.000.blk"
    old = layer.read_bytes()
    r = resume(probe_model, tmp_path, "--iters", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert layer.read_bytes() != old
    layer.write_bytes(old)
    before = snapshot(tmp_path, probe_model, probe_data.parent)
    line = assert_refused(resume(probe_model, tmp_path, "--iters", "3", timeout=60), "stale layer file")
    assert "layers.000.blk" in line, line
    assert_unchanged(before, tmp_path, probe_model, probe_data.parent, what="stale layer file")
    _verify_reports_a_problem(probe_model, tmp_path / "work")


# -- 5. options on --resume --

@pytest.fixture(scope="module")
def finished(probe_model, probe_data, tmp_path_factory):
    """A finished 2-iteration run in base/work and base/out, and base/other.txt: different data.

    Shared: the tests that use it make requests that must change nothing (refusals, a bare resume).
    """
    base = tmp_path_factory.mktemp("resume-rules")
    train(probe_model, probe_data, base / "out", base / "work", "--iters", "2", "--lr", "0.01")
    (base / "other.txt").write_text(CORPUS.read_text(encoding="utf-8")[4000:8000], encoding="utf-8")
    return base


CHANGED = {
    "--lr": ["--lr", "0.05"],
    "--batch-size": ["--batch-size", "4"],
    "--seq-len": ["--seq-len", "32"],
    "--optimizer": ["--optimizer", "adamw"],
    "--lora-rank": ["--lora-rank", "2"],
    "--data": ["--data", "{other}"],
}


@pytest.mark.slow
@pytest.mark.parametrize("option", list(CHANGED))
def test_resume_with_a_changed_option_is_refused_naming_it(option, finished, probe_model, probe_data):
    extra = [a.replace("{other}", str(finished / "other.txt")) for a in CHANGED[option]]
    before = snapshot(finished, probe_model, probe_data.parent)
    # --iters 3: there is work left, so only the changed option can be the reason to refuse.
    line = assert_refused(resume(probe_model, finished, "--iters", "3", *extra, timeout=60), option)
    assert option in line, line
    assert_unchanged(before, finished, probe_model, probe_data.parent, what=option)


@pytest.mark.slow
def test_resume_accepts_options_that_do_not_change_the_numbers(probe_model, probe_data, tmp_path):
    train(probe_model, probe_data, tmp_path / "out", tmp_path / "work", "--iters", "2")
    r = resume(probe_model, tmp_path, "--ram-budget", "1G", "--no-prefetch", "--iters", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert loss_iters(tmp_path / "out") == [0, 1, 2]


@pytest.mark.slow
def test_bare_resume_of_a_finished_run_has_nothing_to_do(finished, probe_model):
    before = snapshot(finished / "work", finished / "out")
    r = run_cli(probe_model, "--resume", "--work-dir", finished / "work", "--out", finished / "out", timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "nothing to do" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    assert_unchanged(before, finished / "work", finished / "out", what="bare --resume")


# -- 6. a work dir holds one run --

def _other_kind_is_refused(base: Path, model: Path, data: Path, second: list[str], what: str):
    before = snapshot(base, model, data.parent)
    r = run_cli(model, "--data", data, "--out", base / "out", "--work-dir", base / "work", *SMALL, "--iters", "2",
                *second, timeout=60)
    assert_refused(r, what)
    assert_unchanged(before, base, model, data.parent, what=what)


@pytest.mark.slow
def test_a_lora_run_is_refused_in_a_full_runs_work_dir(finished, probe_model, probe_data):
    _other_kind_is_refused(finished, probe_model, probe_data, ["--lora-rank", "2"], "LoRA run on a full run")


@pytest.mark.slow
def test_a_full_run_is_refused_in_a_lora_runs_work_dir(probe_model, probe_data, tmp_path):
    train(probe_model, probe_data, tmp_path / "out", tmp_path / "work", "--iters", "2", "--lora-rank", "2")
    _other_kind_is_refused(tmp_path, probe_model, probe_data, [], "full run on a LoRA run")


@pytest.mark.slow
def test_a_fresh_run_over_a_run_killed_in_step_0_is_refused(probe_model, probe_data, tmp_path):
    # Every step commits: under --commit-every a run killed before its first commit leaves the store as
    # prepared, with no step to lose, and a fresh run may start over it (as over one killed in step 0's forward).
    args = [probe_model, "--data", probe_data, "--out", tmp_path / "out", "--work-dir", tmp_path / "work", *SMALL,
            "--iters", "2", "--lr", "0.01", "--commit-every", "1"]
    r = run_cli(*args, kill="backward:2")
    assert r.returncode == -signal.SIGKILL, f"expected death by SIGKILL, got {r.returncode}\n{r.stderr[-3000:]}"
    before = snapshot(tmp_path, probe_model, probe_data.parent)
    r = run_cli(*args, "--lr", "0.05", timeout=60)
    assert_refused(r, "fresh run over a killed one")
    assert_unchanged(before, tmp_path, probe_model, probe_data.parent, what="fresh run over a killed one")


# -- 7, 8. a run is found again from another folder, after a touch, after a move --

@pytest.mark.slow
def test_resume_from_another_cwd_with_absolute_paths(model_copy, probe_data, tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    a.mkdir()
    b.mkdir()
    shutil.copy(probe_data, a / "d.txt")
    r = run_cli("../model", "--data", "d.txt", "--out", "o", "--work-dir", "w", *SMALL, "--iters", "1", cwd=a)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli(model_copy.resolve(), "--resume", "--work-dir", (a / "w").resolve(), "--iters", "2", "--device", "cpu",
                cwd=b)
    assert r.returncode == 0, r.stderr[-3000:]
    assert loss_iters(a / "o") == [0, 1]


@pytest.mark.slow
def test_resume_after_params_json_is_touched_and_the_model_folder_moved(model_copy, probe_data, tmp_path):
    """Neither an mtime nor a folder's name is part of a model: both resumes are accepted."""
    params = (model_copy / "params.json").read_bytes()
    train(model_copy, probe_data, tmp_path / "out", tmp_path / "work", "--iters", "2")
    st = (model_copy / "params.json").stat()
    os.utime(model_copy / "params.json", ns=(st.st_atime_ns + 10**10, st.st_mtime_ns + 10**10))
    r = resume(model_copy, tmp_path, "--iters", "3")
    assert r.returncode == 0, f"after touch: {r.stderr[-3000:]}"
    assert loss_iters(tmp_path / "out") == [0, 1, 2]
    moved = tmp_path / "moved-model"
    os.rename(model_copy, moved)
    r = resume(moved, tmp_path, "--iters", "4")
    assert r.returncode == 0, f"after move: {r.stderr[-3000:]}"
    assert loss_iters(tmp_path / "out") == [0, 1, 2, 3]
    assert (tmp_path / "out" / "params.json").read_bytes() == params
