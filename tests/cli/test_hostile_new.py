"""A tired user at 2 a.m. against the newest commands: `slowllama export` (GGUF and adapters), finetune's
--gguf and --tensorboard paths, the data formats (BOMs, broken CSV quoting), `slowllama plot` and
`slowllama selftest --out`.

The promise, as in test_hostile_cli.py: a non-zero exit, one "error: ..." line last on stderr naming the file or
argument, no traceback, and every file the user had byte-identical afterwards. Most commands run in-process
through slowllama.cli.main (a refusal comes before any work, so there is nothing to isolate); the Ctrl-C and
full-disk cases run as a subprocess, as a user's terminal does.
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from slowllama.cli import main as slowllama
from slowllama.cli import selftest
from slowllama.data.records import Records
from slowllama.data.windows import read_text
from slowllama.errors import ConfigError
from slowllama.formats.gguf import MAGIC
from slowllama.formats.hf import HFCheckpoint
from slowllama.formats.peft import export_peft
from slowllama.paths import lock_out_dir
from tests.cli_helpers import SMALL, assert_unchanged, env, snapshot
from tests.formats.gguf_helpers import make_model
from tests.formats.test_peft import random_adapters

pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> Path:
    """A tiny HF Llama with a Llama 3 tokenizer and chat template (read-only)."""
    return make_model(tmp_path_factory.mktemp("hf") / "m")


@pytest.fixture(scope="module")
def lora(tmp_path_factory, hf) -> Path:
    """A PEFT LoRA folder of hf, as a LoRA run writes it (read-only)."""
    return export_peft(tmp_path_factory.mktemp("lora") / "adapters", random_adapters(HFCheckpoint(hf).args),
                       HFCheckpoint(hf).args, str(hf))


def run(capsys, *argv) -> tuple[int, str, str]:
    """slowllama ARGV in-process: (exit code, stdout, stderr); an exception escaping is a traceback."""
    rc = slowllama.main([str(a) for a in argv])
    got = capsys.readouterr()
    return rc, got.out, got.err


def refused(result, *names: str, rc: int = 2) -> str:
    """Exit rc, 'error: ...' last on stderr naming each of names; returns that line."""
    code, out, err = result
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == rc and lines and lines[-1].startswith("error: "), f"rc {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert "Traceback" not in err, err
    for n in names:
        assert str(n) in lines[-1], f"error line does not name {n!r}: {lines[-1]}"
    return lines[-1]


class Mine(type(Path())):
    """The user's folder (with notes.txt); freeze() after writing a test's own inputs: from then on it, the
    model and the adapters stay byte-identical."""

    def freeze(self, *also: Path):
        self.watched = (self, *also)
        self.before = snapshot(*self.watched)


@pytest.fixture
def mine(tmp_path, hf, lora):
    (tmp_path / "notes.txt").write_text("my notes\n")
    m = Mine(tmp_path)
    m.freeze(hf, lora)
    yield m
    assert_unchanged(m.before, *m.watched, what="the user's files after a refused command")


# ---------------------------------------------------------------- slowllama export


def test_export_out_below_a_file(capsys, hf, mine):
    """notes.txt/model.gguf: the OS's ENOTDIR named the temp file beside it; now --out and the file are named."""
    line = refused(run(capsys, "export", hf, "--out", mine / "notes.txt" / "model.gguf"), "--out", "notes.txt")
    assert "slowllama-tmp" not in line, line


def test_export_out_in_a_missing_folder(capsys, hf, mine):
    """A typo in the folder: said as such, not as 'write failed; is the disk full?'."""
    line = refused(run(capsys, "export", hf, "--out", mine / "nodir" / "model.gguf"), "--out", "nodir", "not exist")
    assert "disk full" not in line, line


def test_adapter_export_out_in_a_missing_folder(capsys, hf, lora, mine):
    refused(run(capsys, "export", lora, "--base", hf, "--out", mine / "nodir" / "a.gguf"), "--out", "nodir")


def test_export_base_given_with_a_model_folder(capsys, hf, mine):
    """--base beside a model folder: the user meant an adapter; the whole model was written, --base ignored."""
    refused(run(capsys, "export", hf, "--base", hf, "--out", mine / "m.gguf"), "--base", "PEFT")


def test_export_of_a_meta_checkpoint_says_what_to_do(capsys, probe_model, mine):
    """A Meta folder (params.json): it said only 'config.json: missing'."""
    refused(run(capsys, "export", probe_model, "--out", mine / "m.gguf"), str(probe_model), "Meta", "--export-format hf")


def test_a_merged_lora_out_exports_its_adapters_with_base_and_its_model_without(capsys, hf, lora, tmp_path):
    """A LoRA run's OUT with --merge holds a model and its PEFT files: --base picks the adapters (not refused as
    'a model folder'), no --base the merged model."""
    import gguf

    both = tmp_path / "out"
    both.mkdir()
    for p in [*hf.iterdir(), *lora.iterdir()]:
        if p.is_file():
            (both / p.name).write_bytes(p.read_bytes())
    for argv, kind in ((["--base", hf], "adapter"), ([], "model")):
        out = tmp_path / f"{kind}.gguf"
        code, _, err = run(capsys, "export", both, *argv, "--out", out, "--no-modelfile")
        assert code == 0, err
        assert bytes(gguf.GGUFReader(out).fields["general.type"].parts[-1]).decode() == kind


@pytest.mark.parametrize("what", ["gguf-file", "work-dir", "adapters-as-base"])
def test_export_wrong_folders(capsys, hf, lora, mine, what):
    """A GGUF given as the model, a finetune work dir as the model, the adapters as their own --base."""
    if what == "gguf-file":
        (mine / "x.gguf").write_bytes(MAGIC + b"\0" * 20)
        argv, name = ["export", mine / "x.gguf", "--out", mine / "y.gguf"], "x.gguf"
    elif what == "work-dir":
        (mine / "work").mkdir()
        (mine / "work" / "run.json").write_text("{}")
        argv, name = ["export", mine / "work", "--out", mine / "y.gguf"], "work"
    else:
        argv, name = ["export", lora, "--base", lora, "--out", mine / "y.gguf"], "adapters"
    mine.freeze(hf, lora)
    refused(run(capsys, *argv), name)
    assert not (mine / "y.gguf").exists()


@pytest.mark.parametrize("target", ["model-weights", "model-folder", "users-modelfile"])
def test_export_never_replaces_the_users_files(capsys, hf, lora, mine, target):
    """--out on the model's own safetensors or on the model folder; a Modelfile of the user's beside --out."""
    if target == "model-weights":
        out, name = hf / "model.safetensors", "model.safetensors"
    elif target == "model-folder":
        out, name = hf, str(hf)
    else:
        (mine / "llama.Modelfile").write_text("FROM llama3\n")
        out, name = mine / "llama.gguf", "llama.Modelfile"
    mine.freeze(hf, lora)
    refused(run(capsys, "export", hf, "--out", out), name)


def test_export_never_replaces_a_gguf_it_did_not_write(capsys, hf, lora, mine):
    """A downloaded (or llama.cpp-converted) GGUF at --out was replaced: only the magic was checked, while the
    README says a .gguf slowllama did not write is never replaced. Its own GGUF it still replaces."""
    import gguf

    theirs = mine / "llama-3-8b.Q4_K_M.gguf"
    w = gguf.GGUFWriter(theirs, "llama")
    w.add_tensor("token_embd.weight", np.ones((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    mine.freeze(hf, lora)
    refused(run(capsys, "export", hf, "--out", theirs, "--no-modelfile"), theirs.name, "did not write")
    refused(run(capsys, "export", lora, "--base", hf, "--out", theirs), theirs.name, "did not write")
    ours = mine / "ours.gguf"
    for gguf_type in ("f32", "q8_0"):
        code, _, err = run(capsys, "export", hf, "--out", ours, "--type", gguf_type, "--no-modelfile")
        assert code == 0, err
    assert {t.tensor_type.name for t in gguf.GGUFReader(ours).tensors} == {"F32", "Q8_0"}
    ours.unlink()


def test_export_out_named_like_its_modelfile(capsys, hf, mine):
    """--out x.Modelfile: the GGUF was written there, then refused as 'not written by slowllama' with exit 2
    when the Modelfile came to be written over it."""
    refused(run(capsys, "export", hf, "--out", mine / "x.Modelfile"), "--out", "x.Modelfile")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    """A tiny Qwen2 of the same shapes as hf (read-only)."""
    return make_model(tmp_path_factory.mktemp("qwen") / "q", "qwen2", "qwen")


def test_adapter_export_with_a_base_of_another_architecture(capsys, hf, lora, qwen, mine):
    """Llama adapters with a Qwen2 --base of the same shapes: written as a qwen2 adapter in qwen2's RoPE layout,
    without a word. adapter_config.json names the model they were trained on; its architecture must match."""
    mine.freeze(hf, lora, qwen)
    refused(run(capsys, "export", lora, "--base", qwen, "--out", mine / "a.gguf"), "--base", "qwen2", "llama")
    code, _, err = run(capsys, "export", lora, "--base", hf, "--out", mine / "a.gguf")  # its own base: written
    assert code == 0 and (mine / "a.gguf").read_bytes()[:4] == MAGIC, err
    (mine / "a.gguf").unlink()


def test_second_terminal_exporting_into_the_same_out_is_refused(capsys, hf, tmp_path):
    """Two exports into one --out both said 'wrote' while the later rename replaced the other's file; now the
    second is refused naming --out and the pid, and the first one's GGUF stands."""
    out = tmp_path / "m.gguf"
    held = lock_out_dir(out)  # the first terminal, mid-export
    try:
        refused(run(capsys, "export", hf, "--out", out, "--type", "q8_0"), "--out", "in use", f"pid {os.getpid()}")
    finally:
        held.close()
    assert not out.exists()
    code, _, err = run(capsys, "export", hf, "--out", out)  # once it is done, the export goes ahead
    assert code == 0 and out.read_bytes()[:4] == MAGIC, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.Modelfile", "m.gguf"]  # no lock file left


def test_export_missing_arguments(capsys, hf):
    with pytest.raises(SystemExit) as e:
        slowllama.main(["export", str(hf)])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err


def test_export_unicode_paths(capsys, hf, tmp_path):
    """A model folder and an --out under non-ASCII names: written, and the Modelfile names the GGUF."""
    folder = tmp_path / "модель ü"
    folder.mkdir()
    for p in hf.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "выход é" / "m-f16.gguf"
    out.parent.mkdir()
    rc, _, err = run(capsys, "export", folder, "--out", out)
    assert rc == 0, err
    assert out.read_bytes()[:4] == MAGIC and "FROM ./m-f16.gguf" in (out.parent / "m-f16.Modelfile").read_text()


def _export_subprocess(args, kill=None, limit=None) -> subprocess.CompletedProcess:
    """slowllama ARGS as a terminal runs it; limit: RLIMIT_FSIZE (a full disk), with SIGXFSZ ignored so a write
    past it fails with EFBIG instead of killing the process."""
    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    e = {**env(kill), "PYTHONDONTWRITEBYTECODE": "1"}  # no .pyc written short under the limit
    return subprocess.run([sys.executable, "-m", "slowllama", *map(str, args)], check=False, cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=60, preexec_fn=limited if limit else None)


@pytest.mark.parametrize("source", ["model", "adapter"])
def test_ctrl_c_mid_export_leaves_the_previous_gguf_and_no_partial_file(capsys, hf, lora, tmp_path, source):
    """Ctrl-C as the second tensor is written: one 'interrupted' line (it was a KeyboardInterrupt traceback),
    exit 130, the previous GGUF byte-identical, no temp file."""
    args = ["export", hf] if source == "model" else ["export", lora, "--base", hf]
    out = tmp_path / "m.gguf"
    code, _, err = run(capsys, *args, "--out", out, "--type", "f32")  # the previous export
    assert code == 0, err
    before = snapshot(tmp_path)
    r = _export_subprocess([*args, "--out", out, "--type", "q8_0"], kill="gguf_tensor:2:INT")
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("interrupted: "), r.stderr[-1000:]
    assert_unchanged(before, tmp_path, what="the folder after an interrupted export")


def test_full_disk_mid_export_is_one_line_that_fits_the_command(hf, tmp_path):
    """RLIMIT_FSIZE below the GGUF's size: one line naming the file, no temp file left, and advice that fits
    an export (it said 'then --resume', an option export does not have)."""
    out = tmp_path / "m.gguf"
    r = _export_subprocess(["export", hf, "--out", out], limit=100_000)  # the f16 GGUF is ~270 KB
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {out}: write failed") and "disk full" in last, last
    assert "then --resume" not in last, last
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------- finetune's new paths


@pytest.mark.parametrize("flag", ["--tensorboard", "--out"])
def test_finetune_path_below_a_file(capsys, hf, mine, flag):
    """--tensorboard notes.txt/tb: refused only after the run had set up OUT and the work dir, as a bare
    '[Errno 20] Not a directory'; --out notes.txt/out named OUT.work. Now both are named before any work."""
    data = mine / "d.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    mine.freeze(hf)
    paths = {"--out": mine / "out", "--work-dir": mine / "work", flag: mine / "notes.txt" / "x"}
    argv = ["finetune", hf, "--data", data, *SMALL, "--iters", "1", "--lora-rank", "2"]
    for k, v in paths.items():
        argv += [k, v]
    line = refused(run(capsys, *argv), flag, "notes.txt")
    assert "Errno" not in line, line


# ---------------------------------------------------------------- data formats


BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_json_records_with_a_bom_are_read(tmp_path, suffix):
    """Notepad saves UTF-8 with a BOM: CSV dropped it, JSONL and JSON arrays refused the file as not JSON."""
    recs = [{"text": "first record"}, {"prompt": "Q", "completion": "A"}]
    body = "\n".join(map(json.dumps, recs)) if suffix == ".jsonl" else json.dumps(recs)
    path = tmp_path / f"d{suffix}"
    path.write_bytes(BOM + body.encode())
    assert [r for r, _ in Records(path)] == ["first record", ("Q", "A")]


def test_text_with_a_bom_is_trained_without_it(tmp_path):
    """A BOM at the start of a .txt was kept as a U+FEFF character and trained on."""
    path = tmp_path / "d.txt"
    path.write_bytes(BOM + b"Hello there")
    assert read_text(path) == "Hello there"


def test_bom_offsets_stay_file_offsets(tmp_path):
    """A bad byte after a BOM is still named at its offset in the file (3 BOM bytes, then 11 of JSON)."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(BOM + b'{"text": "a\xff"}\n')
    with pytest.raises(ConfigError, match=r"offset 14\)"):
        list(Records(path))


def test_csv_with_an_unclosed_quote_is_refused(tmp_path):
    """An unclosed quote made the rest of the file one cell, trained on silently; now it names the record."""
    path = tmp_path / "d.csv"
    path.write_text('text\nfine row\n"a quote that never closes\nrow three\nrow four\n')
    with pytest.raises(ConfigError, match=r"d\.csv: record 2: unreadable CSV"):
        list(Records(path))


def test_csv_quoting_that_is_fine_still_reads(tmp_path):
    """strict CSV keeps every legal form: doubled quotes, commas and newlines in quotes, quotes mid-field."""
    path = tmp_path / "d.csv"
    path.write_bytes(BOM + b'text\n"say ""hi"""\n"a, b\nc"\nhe said "x" ok\n')
    assert [r for r, _ in Records(path)] == ['say "hi"', "a, b\nc", 'he said "x" ok']


@pytest.mark.parametrize("body", ['text\n""\n"  "\n', "prompt,completion\nhi,\nhello, \n"], ids=["text", "completion"])
def test_csv_whose_column_is_blank_is_refused(capsys, hf, mine, body):
    """A blanked column trained silently: every example was BOS -> EOS, teaching the model to stop at once."""
    data = mine / "d.csv"
    data.write_text(body)
    mine.freeze(hf)
    refused(run(capsys, "finetune", hf, "--data", data, "--out", mine / "out", "--work-dir", mine / "work", *SMALL,
                "--iters", "1"), "d.csv", "empty")


def test_one_blank_record_among_others_still_trains(tmp_path, hf):
    """Only a file with no text at all is refused: a blank row in a real file is left to the data."""
    from slowllama.data.windows import load_data
    from slowllama.formats.tokenizer import load_tokenizer

    data = tmp_path / "d.csv"
    data.write_text('text\n""\nThe quick brown fox\n')
    assert len(load_data(data, load_tokenizer(hf), 16)) == 2


def test_csv_header_with_a_trailing_space_is_shown_as_it_is(tmp_path):
    """'text ' from a spreadsheet: the refusal said 'among text ', reading as if the column were there."""
    path = tmp_path / "d.csv"
    path.write_text("text ,id\nhello,1\n")
    with pytest.raises(ConfigError, match=r"among 'text ', 'id';"):
        list(Records(path))


# ---------------------------------------------------------------- slowllama plot


def _log(path: Path) -> Path:
    path.write_text("".join(json.dumps({"iter": i, "loss": 3.0 - i}) + "\n" for i in range(3)))
    return path


@pytest.mark.parametrize("case", ["missing", "folder", "not-utf8", "no-iter", "not-object", "no-loss"])
def test_plot_bad_logs(capsys, mine, case):
    """Each was a traceback (FileNotFoundError, IsADirectoryError, UnicodeDecodeError, KeyError, TypeError) or
    a bare 'error:' with exit 1; now one line naming the log, exit 2, before matplotlib is even needed."""
    log = mine / "train_log.jsonl"
    content = {"not-utf8": b"\xff\xfe\n", "no-iter": b'{"loss": 1.0}\n', "not-object": b"5\n",
               "no-loss": b'{"iter": 0}\n'}
    if case == "folder":
        log.mkdir()
    elif case in content:
        log.write_bytes(content[case])
    mine.freeze()
    refused(run(capsys, "plot", log), "train_log.jsonl")


@pytest.mark.parametrize("target", ["the-log", "a-users-file", "a-folder", "missing-folder"])
def test_plot_out_never_replaces_a_users_file(capsys, mine, target):
    """-o on the log itself or on notes.txt overwrote it with a PNG; a folder or a missing one was a traceback."""
    log = _log(mine / "train_log.jsonl")
    out = {"the-log": log, "a-users-file": mine / "notes.txt", "a-folder": mine,
           "missing-folder": mine / "nodir" / "loss.png"}[target]
    mine.freeze()
    refused(run(capsys, "plot", log, "-o", out), "-o")


# ---------------------------------------------------------------- slowllama selftest --out


@pytest.mark.parametrize("target", ["a-users-file", "a-folder", "below-a-file", "missing-folder"])
def test_selftest_out_refused_before_the_checks(capsys, mine, monkeypatch, target):
    """--out notes.txt was overwritten with the report; a folder or a bad path was a traceback after the
    minute of checks. Now refused at once: no check runs."""
    monkeypatch.setattr(selftest, "make_model", lambda *a: pytest.fail("a check ran before --out was checked"))
    out = {"a-users-file": mine / "notes.txt", "a-folder": mine, "below-a-file": mine / "notes.txt" / "r.json",
           "missing-folder": mine / "nodir" / "r.json"}[target]
    refused(run(capsys, "selftest", "--device", "cpu", "--out", out), "--out")


def test_selftest_ctrl_c_is_one_line_and_writes_nothing(capsys, tmp_path, monkeypatch):
    """Ctrl-C during the checks: a KeyboardInterrupt traceback before; now one line, exit 130, no report."""
    def interrupted(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(selftest, "make_model", interrupted)
    code, _, err = run(capsys, "selftest", "--device", "cpu", "--out", tmp_path / "r.json")
    assert code == 130 and err.strip().splitlines()[-1].startswith("interrupted: "), err
    assert not (tmp_path / "r.json").exists()


def test_selftest_accepts_its_own_earlier_report_at_out(tmp_path):
    """Running the self-test twice into one --out replaces the earlier report; only a user's file is refused."""
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"device": "cpu", "checks": [], "ok": False}))
    selftest.check_out(out)
    out.write_text(json.dumps({"my": "settings"}))
    with pytest.raises(ConfigError, match="not a self-test report"):
        selftest.check_out(out)
