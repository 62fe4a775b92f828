"""Issue 14: finetune.py never loses a user's files, and refuses bad requests before any work.

Every refusal exits 2 with one "error: ..." line last on stderr, and leaves every folder the user
owns (work dir, out dir, model dir, data) byte-identical, with no new path in them.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.cli_helpers import SMALL, assert_refused, assert_unchanged, loss_iters, run_cli, snapshot, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished(probe_model, probe_data, tmp_path_factory):
    """base/W: a run at step 2; base/X: its export plus the user's notes.txt; base/f.txt: data.

    Shared: the tests that use it only make requests that must be refused, which change nothing.
    A copy of W made at once (spare_w) serves the tests that damage it.
    """
    base = tmp_path_factory.mktemp("user-files")
    train(probe_model, probe_data, base / "X", base / "W", "--iters", "2")
    shutil.copytree(base / "W", base.parent / f"{base.name}-W-spare")
    (base / "X" / "notes.txt").write_text("my notes about this model\n")
    shutil.copy(probe_data, base / "f.txt")
    return base


def spare_w(base: Path) -> Path:
    return base.parent / f"{base.name}-W-spare"


NO_MODEL = {
    "resume": ["--resume", "--work-dir", "W"],
    "verify-work-dir": ["--verify", "--work-dir", "W"],
    "verify-out": ["--verify", "--out", "X"],
    "data": ["--data", "f.txt"],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(NO_MODEL))
def test_without_a_model_only_no_arguments_runs_the_demo(case, finished, probe_model):
    """Options without a model folder are a mistake, not a request for the demo (which would reuse W or X)."""
    before = snapshot(finished, probe_model)
    r = run_cli(*NO_MODEL[case], cwd=finished, timeout=60)
    assert_refused(r, case)
    assert_unchanged(before, finished, probe_model, what=case)


@pytest.mark.slow
def test_out_holding_a_users_file_is_refused(probe_model, probe_data, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "precious.txt").write_text("only copy of my thesis\n")
    (d / "sub").mkdir()
    (d / "sub" / "more.txt").write_text("more\n")
    before = snapshot(tmp_path, probe_model, probe_data.parent)
    r = run_cli(probe_model, "--data", probe_data, "--out", d, "--work-dir", tmp_path / "work", *SMALL, "--iters", "2")
    assert_refused(r, "--out holding precious.txt")
    assert_unchanged(before, tmp_path, probe_model, probe_data.parent, what="--out holding precious.txt")
    assert not (tmp_path / "work").exists()


@pytest.mark.slow
def test_empty_existing_out_is_accepted(probe_model, probe_data, tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    train(probe_model, probe_data, d, tmp_path / "work", "--iters", "2")
    assert (d / "consolidated.00.pth").is_file() and (d / "params.json").is_file()
    assert loss_iters(d) == [0, 1]


@pytest.mark.slow
def test_a_finished_runs_out_is_exported_into_again(probe_model, probe_data, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    train(probe_model, probe_data, out, work, "--iters", "2")
    first = (out / "consolidated.00.pth").read_bytes()
    r = run_cli(probe_model, "--out", out, "--work-dir", work, "--resume", "--iters", "3", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert loss_iters(out) == [0, 1, 2]
    assert (out / "consolidated.00.pth").read_bytes() != first


@pytest.mark.slow
def test_temp_like_files_that_are_not_slowllamas_survive_a_run(probe_model, probe_data, tmp_path):
    """Only files slowllama wrote may be deleted: a name that looks like a temp file proves nothing."""
    a, b = tmp_path / "a", tmp_path / "b"
    for parent in (a, b):
        parent.mkdir()
        (parent / ".foo.tmp123").write_text("a user's file\n")
        (parent / ".out.tmp999").mkdir()
        (parent / ".out.tmp999" / "inside.txt").write_text("a user's folder\n")
    before = snapshot(tmp_path)
    train(probe_model, probe_data, b / "out", a / "work", "--iters", "2")
    after = snapshot(tmp_path)
    kept = {k: v for k, v in before.items() if ".tmp" in k}
    assert len(kept) == 6
    lost = [k for k, v in kept.items() if after.get(k) != v]
    assert not lost, f"deleted or changed: {lost}"


@pytest.fixture
def model_copy(probe_model, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(probe_model, dst)
    return dst


@pytest.mark.slow
@pytest.mark.parametrize("case", ["momentum", "weight-decay", "iters", "lr-nan"])
def test_bad_numbers_are_refused(case, probe_model, probe_data, tmp_path):
    extra = {"momentum": ["--momentum", "-5"], "weight-decay": ["--weight-decay", "-1"],
             "iters": ["--iters", "0"], "lr-nan": ["--lr", "nan"]}[case]
    before = snapshot(tmp_path, probe_model, probe_data.parent)
    r = run_cli(probe_model, "--data", probe_data, "--out", tmp_path / "out", "--work-dir", tmp_path / "work",
                *SMALL, "--iters", "2", *extra, timeout=60)
    assert_refused(r, case)
    assert_unchanged(before, tmp_path, probe_model, probe_data.parent, what=case)


@pytest.mark.slow
def test_out_dot_inside_the_model_folder_is_refused(model_copy, probe_data, tmp_path):
    before = snapshot(tmp_path, probe_data.parent)
    r = run_cli(model_copy, "--data", probe_data, "--out", ".", *SMALL, "--iters", "2", cwd=model_copy, timeout=60)
    assert_refused(r, "--out . in the model folder")
    assert_unchanged(before, tmp_path, probe_data.parent, what="--out . in the model folder")


@pytest.mark.slow
def test_malformed_run_json_is_refused_on_resume(finished, probe_model, tmp_path):
    work = tmp_path / "W"
    shutil.copytree(spare_w(finished), work)
    (work / "run.json").write_text('{"lr": ')
    before = snapshot(tmp_path, probe_model)
    r = run_cli(probe_model, "--resume", "--work-dir", work, "--out", tmp_path / "X", "--device", "cpu", timeout=60)
    assert_refused(r, "malformed run.json")
    assert_unchanged(before, tmp_path, probe_model, what="malformed run.json")


def _owned(folder: Path, **info):
    from slowllama.paths import mark_owned

    folder.mkdir(parents=True, exist_ok=True)
    mark_owned(folder, "export", **info)


def test_an_out_holding_another_runs_output_is_refused_by_name(tmp_path, monkeypatch):
    """check_out_run on OWNER files as each stage of a run leaves them; this run's own are never refused."""
    from slowllama.errors import ConfigError
    from slowllama.run import loop as run
    from slowllama.run.options import RunOptions

    monkeypatch.setattr(run, "this_run_id", lambda work_dir, lora: {"wA": "A", "wB": "B"}.get(work_dir.name))
    out = tmp_path / "out"

    def check(work: str, **kw):
        run.check_out_run(out, tmp_path / work, RunOptions(model_dir="m", data="d", **kw))

    check("wB")  # no out yet
    _owned(out)  # claimed by a run from before run ids were recorded: as today
    check("wB")
    _owned(out, run="A", work_dir=str(tmp_path / "wA"))  # run A's log, no export yet
    with pytest.raises(ConfigError, match=r"another run \(run A: its training log, no export yet\).*--work-dir .*wA"):
        check("wB")
    _owned(out, run="A", step=3)
    with pytest.raises(ConfigError, match=r"--out .*out: .*run A: its export at iteration 3.*--overwrite-out"):
        check("new")  # a fresh run (no store prepared yet) is another run
    check("wA")  # run A's resume, or a rerun of its work dir, writes over its own output
    check("wB", overwrite_out=True)
    _owned(out, run="B", step=1)
    _owned(out / "checkpoint-000002", run="A", step=2)  # run A's checkpoint beside run B's export
    with pytest.raises(ConfigError, match=r"run A: its checkpoint checkpoint-000002"):
        check("wB")
