"""What a hostile pass over finetune found, kept as tests: a symlinked --out, a tokenizer of another model, data
from a pipe, a resumed run's log, misleading error lines and options that would silently do nothing.

The promise, as in test_hostile_cli.py: bad input gets a non-zero exit and one "error: ..." line last on stderr
that names the file or option and says what is wrong, with nothing of the user's touched. Commands run in-process
through slowllama.cli.main unless a terminal's behaviour (a pipe, a file-size limit) needs a subprocess.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from slowllama.cli import main as slowllama
from slowllama.data.source import read_hashed
from slowllama.errors import ConfigError
from tests.cli_helpers import FINETUNE, SMALL, assert_unchanged, env, snapshot

ONE = [*SMALL, "--iters", "1"]


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = slowllama.main(["finetune", *map(str, argv)])
    got = capsys.readouterr()
    return rc, got.out, got.err


def refused(result, *names: str) -> str:
    """Exit 2, no traceback, 'error: ...' last on stderr naming each of names; returns that line."""
    rc, out, err = result
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and lines and lines[-1].startswith("error: "), f"rc {rc}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in err, err
    for n in names:
        assert str(n) in lines[-1], f"error line does not name {n!r}: {lines[-1]}"
    return lines[-1]


def ok(result):
    rc, out, err = result
    assert rc == 0, f"rc {rc}\n{err[-3000:]}"
    return out


# ---------------------------------------------------------------- a symlinked --out


def test_a_symlinked_out_gets_the_model_in_the_folder_it_points_to(capsys, probe_model, probe_data, tmp_path):
    """The export replaces the output folder; given a link, it used to replace the link with a folder and leave
    '.out.slowllama-old -> target' behind. Now the target is the output folder, its mode kept, the link intact."""
    real = tmp_path / "disk" / "runs"
    real.mkdir(parents=True)
    real.chmod(0o700)
    link = tmp_path / "out"
    link.symlink_to(real, target_is_directory=True)
    ok(run(capsys, probe_model, "--data", probe_data, "--out", link, *ONE))
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real / "consolidated.00.pth").is_file()
    assert stat.S_IMODE(real.stat().st_mode) == 0o700, "the folder the user made private came back readable"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "out"], "something was left beside the link"
    # Again through the link, as a resume: the same run, the same folder.
    ok(run(capsys, probe_model, "--data", probe_data, "--out", link, *SMALL, "--iters", "2", "--resume"))
    assert link.is_symlink() and json.loads((real / ".slowllama").read_text())["step"] == 2
    assert stat.S_IMODE(real.stat().st_mode) == 0o700


def test_merge_into_a_symlinked_out(capsys, probe_model, probe_data, tmp_path):
    from slowllama.cli.merge_lora import main as merge

    ok(run(capsys, probe_model, "--data", probe_data, "--out", tmp_path / "lora", *ONE, "--lora-rank", "2"))
    real = tmp_path / "merged-real"
    real.mkdir()
    (tmp_path / "merged").symlink_to(real)
    assert merge([str(probe_model), str(tmp_path / "lora" / "lora_adapters.blk"), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged").is_symlink() and (real / "consolidated.00.pth").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- a tokenizer of another model


@pytest.mark.slow
def test_a_tokenizer_with_ids_beyond_the_model_is_one_line_before_any_write(capsys, tmp_path):
    """An HF config whose vocab_size is below its tokenizer's ids: an IndexError from F.embedding after the store
    was prepared, leaving OUT and OUT.work; now refused before any write, naming the tokenizer."""
    pytest.importorskip("transformers")
    from tests.engine.test_hf_training import TEXT, make_model

    model = make_model(tmp_path / "hf", vocab_size=300)
    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    line = refused(run(capsys, model, "--data", data, "--out", tmp_path / "out", *ONE), str(model),
                   "vocab_size 300")
    assert "is beyond the model's vocab_size" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.txt", "hf"], "the refusal left folders behind"


def test_a_meta_folder_trains_with_its_own_tokenizer_model(capsys, probe_model, probe_data, tmp_path):
    """A tokenizer.json lying in a Meta folder was picked over its tokenizer.model, which the export carries."""
    from slowllama.formats.tokenizer import find_tokenizer_file, load_tokenizer

    model = shutil.copytree(probe_model, tmp_path / "meta")
    (model / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": {}, "merges": []}}')
    assert find_tokenizer_file(model) == model / "tokenizer.model"
    assert load_tokenizer(model).encode("hello", bos=False, eos=False) == \
        load_tokenizer(probe_model).encode("hello", bos=False, eos=False)
    ok(run(capsys, model, "--data", probe_data, "--out", tmp_path / "out", *ONE))


# ---------------------------------------------------------------- data from a pipe


@pytest.mark.parametrize("kind", ["fifo", "process-substitution", "folder"])
def test_data_that_is_not_a_regular_file_is_refused(capsys, probe_model, tmp_path, kind):
    """A FIFO hung (read once to tokenize, again to hash); `<(...)` trained, then recorded the hash of empty
    input, so a resume could never check its data."""
    out = tmp_path / "out"
    if kind == "fifo":
        data = tmp_path / "data.fifo"
        os.mkfifo(data)
        line = refused(run(capsys, probe_model, "--data", data, "--out", out, *ONE), str(data))
    elif kind == "folder":
        line = refused(run(capsys, probe_model, "--data", tmp_path, "--out", out, *ONE), str(tmp_path))
        assert "is a folder" in line
        return
    else:  # as bash runs `finetune.py MODEL --data <(cat notes.txt)`: a pipe under /dev/fd
        read, write = os.pipe()
        os.write(write, b"some text " * 50)
        os.close(write)
        r = subprocess.run([sys.executable, str(FINETUNE), str(probe_model), "--data", f"/dev/fd/{read}", "--out",
                            str(out), *ONE], env=env(), capture_output=True, text=True, timeout=60, pass_fds=(read,))
        os.close(read)
        line = refused((r.returncode, r.stdout, r.stderr), f"/dev/fd/{read}")
    assert "not a regular file" in line
    assert not out.exists() and not (tmp_path / "out.work").exists()


def test_the_hash_is_of_the_bytes_that_were_read(tmp_path):
    """A file changed while it was tokenized is refused, not recorded under the hash of its new content."""
    data = tmp_path / "d.txt"
    data.write_text("first version")

    def load_while_someone_writes(path):
        text = Path(path).read_text()
        data.write_text("second version, longer")
        return text

    with pytest.raises(ConfigError, match="changed while it was read"):
        read_hashed(data, "--data", load_while_someone_writes)
    text, digest = read_hashed(data, "--data", lambda p: Path(p).read_text())
    import hashlib
    assert text == "second version, longer" and digest == hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------- a resumed run's log


def test_a_resume_logs_each_evaluation_once(capsys, probe_model, probe_data, tmp_path):
    """An interrupted run with --eval-every, resumed: train_log.jsonl held the resumed step's val_loss and
    completion twice (the first run's, then the resume's own evaluation at the same step)."""
    out = tmp_path / "out"
    flags = [probe_model, "--data", probe_data, "--out", out, *SMALL, "--val-fraction", "0.2", "--eval-every", "2",
             "--prompt", "The", "--gen-tokens", "2"]
    ok(run(capsys, *flags, "--iters", "2"))
    ok(run(capsys, *flags, "--iters", "4", "--resume"))
    recs = [json.loads(ln) for ln in (out / "train_log.jsonl").read_text().splitlines()]
    for key in ("loss", "val_loss", "completion"):
        iters = [r["iter"] for r in recs if key in r]
        assert len(iters) == len(set(iters)), f"{key} logged twice at an iteration: {iters}"
    assert sorted({r["iter"] for r in recs if "val_loss" in r}) == [0, 2, 4]


# ---------------------------------------------------------------- lines that said the wrong thing


@pytest.fixture(scope="module")
def finished(tmp_path_factory, probe_model, probe_data) -> Path:
    """A finished one-iteration run: tmp/out and tmp/out.work (read-only: copy it)."""
    root = tmp_path_factory.mktemp("finished")
    assert slowllama.main(["finetune", str(probe_model), "--data", str(probe_data), "--out", str(root / "out"),
                           *ONE]) == 0
    return root


@pytest.mark.parametrize("damage,says", [
    ("store/journal.json=xx{", "journal.json: unreadable journal"),
    ("store/journal.json=[]", "journal.json: malformed journal"),
    ("store/manifest.json=", "manifest.json: corrupt manifest"),
    ("store/manifest.json=[1]", "manifest.json: corrupt manifest"),
    ("run.json={}", "run.json is unreadable or corrupt (it lacks model_dir"),
], ids=["journal-garbage", "journal-list", "manifest-empty", "manifest-list", "run-json-empty"])
def test_a_damaged_work_dir_is_named_as_such(capsys, probe_model, probe_data, finished, tmp_path, damage, says):
    """Each of these said "--out holds the output of another run", or (run.json {}) listed option differences
    against the defaults, or (manifest [1]) was an AttributeError traceback."""
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    name, content = damage.split("=", 1)
    (tmp_path / "out.work" / name).write_text(content)
    before = snapshot(tmp_path)
    line = refused(run(capsys, probe_model, "--data", probe_data, "--out", tmp_path / "out", *SMALL, "--iters", "2",
                       "--resume"), says)
    assert "another run" not in line and "options differ" not in line, line
    assert_unchanged(before, tmp_path, what="a refused resume")


def _fsize_limited(nbytes):
    def limit():
        import resource
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


@pytest.mark.slow
@pytest.mark.parametrize("limit,resumable", [(16 * 1024, False), (64 * 1024, True)],
                         ids=["while-preparing", "while-exporting"])
def test_a_full_disk_says_resume_only_where_there_is_a_run(probe_model, probe_data, tmp_path, limit, resumable):
    """A disk full while the store was prepared advised --resume, which then failed: no run.json yet."""
    r = subprocess.run([sys.executable, str(FINETUNE), str(probe_model), "--data", str(probe_data), "--out",
                        str(tmp_path / "out"), *ONE], env=env(), capture_output=True, text=True, timeout=90,
                       preexec_fn=_fsize_limited(limit))
    line = refused((r.returncode, r.stdout, r.stderr), "write failed", "run the command again")
    assert ("with --resume" in line) == resumable, line
    assert (tmp_path / "out.work" / "run.json").is_file() == resumable


# ---------------------------------------------------------------- options that would do nothing


@pytest.mark.parametrize("flags,named", [
    (["--optimizer", "adamw", "--momentum", "0.9"], "--momentum 0.9"),
    (["--min-lr", "1e-6"], "--min-lr"),
    (["--warmup-iters", "5"], "--warmup-iters 5"),
    (["--lora-rank", "2", "--store-dtype", "bfloat16"], "--store-dtype bfloat16"),
    (["--optim-state-dtype", "bfloat16"], "--optim-state-dtype bfloat16"),
    (["--lora-alpha", "8"], "--lora-alpha"),
    (["--lora-targets", "wq,wk"], "--lora-targets wq,wk"),
    (["--beta", "0.2"], "--beta 0.2"),
    (["--lora-rank", "2", "--lora-targets", "wq,wq"], "--lora-targets wq,wq"),
], ids=["adamw-momentum", "constant-min-lr", "warmup-past-iters", "lora-store-dtype", "sgd-state-dtype",
        "alpha-without-lora", "targets-without-lora", "beta-with-sft", "targets-twice"])
def test_an_option_that_would_do_nothing_is_refused(capsys, probe_model, probe_data, tmp_path, flags, named):
    """Each was accepted with exit 0 and no word, while --merge without --lora-rank was refused."""
    refused(run(capsys, probe_model, "--data", probe_data, "--out", tmp_path / "out", *ONE, *flags), named)
    assert list(tmp_path.iterdir()) == []


def test_the_same_options_where_they_act_are_accepted(capsys, probe_model, probe_data, tmp_path):
    ok(run(capsys, probe_model, "--data", probe_data, "--out", tmp_path / "out", *SMALL, "--iters", "2",
           "--momentum", "0.9", "--optim-state-dtype", "bfloat16", "--lr-schedule", "cosine", "--min-lr", "1e-6",
           "--warmup-iters", "2"))


# ---------------------------------------------------------------- Ctrl-C while torch loads

CTRL_C_AT_IMPORT = """
import runpy, sys
class CtrlC:  # the user's Ctrl-C, arriving as the import of torch runs
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
sys.meta_path.insert(0, CtrlC())
sys.argv = [sys.argv[1], "MODEL", "--data", "notes.txt"]
if sys.argv[0] == "slowllama":
    from slowllama.cli.main import main
    sys.exit(main(["finetune", *sys.argv[1:]]))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script", ["finetune.py", "test_gen.py", "slowllama"])
def test_ctrl_c_while_torch_loads_is_one_line(script):
    root = Path(FINETUNE).parent
    r = subprocess.run([sys.executable, "-c", CTRL_C_AT_IMPORT, str(root / script) if script != "slowllama" else script],
                       cwd=root, env=env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 130 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    assert r.stderr.strip() == "interrupted before anything started"
