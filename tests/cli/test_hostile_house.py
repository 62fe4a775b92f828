"""The hostile-user pass over what grew since the last one: Hugging Face cache folders, configs with missing,
wrong-typed or huge values, tokenizers of another vocabulary, odd chat records, a checkpoint killed mid-write,
Ctrl-C while preparing. Each ends in one clear line (or a run that works), and nothing of the user's is lost."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli.test_hostile_cli import cli, ok, refused
from tests.cli_helpers import SMALL, assert_unchanged, edit_json, env, snapshot

pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")

ONE = [*SMALL, "--iters", "1"]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from tests.engine.test_hf_training import make_model
    return make_model(tmp_path_factory.mktemp("hf-llama"))


def as_hub_cache(model: Path, root: Path) -> Path:
    """model laid out as huggingface_hub's cache lays it: snapshots/REV/NAME are symlinks into blobs/."""
    blobs, snap = root / "blobs", root / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(model.iterdir())):
        blob = blobs / f"{i:040x}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return snap


def test_hub_cache_folder_trains_and_its_blobs_stay_untouched(hf, tmp_path):
    snap = as_hub_cache(hf, tmp_path / "models--tiny")
    data = tmp_path / "d.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    before = snapshot(tmp_path / "models--tiny")
    out = tmp_path / "out"
    ok(cli("finetune", snap, "--data", data, "--out", out, *ONE))
    assert_unchanged(before, tmp_path / "models--tiny", what="the hub cache after a run")
    assert all(not p.is_symlink() for p in out.iterdir())  # the export holds files, not links into the cache
    assert json.loads((out / "config.json").read_text()) == json.loads((snap / "config.json").read_text())


def edited_config(hf: Path, tmp_path: Path, **changes) -> Path:
    folder = shutil.copytree(hf, tmp_path / "model")
    edit_json(folder / "config.json", changes)
    return folder


@pytest.mark.parametrize("changes, names", [
    (dict(hidden_size=None), ["config.json", "hidden_size"]),
    (dict(num_hidden_layers="2"), ["config.json", "num_hidden_layers"]),
    (dict(num_attention_heads=2.5), ["config.json", "num_attention_heads"]),
    (dict(num_hidden_layers=10**9), ["config.json"]),
    (dict(vocab_size=-3), ["config.json", "vocab_size"]),
    (dict(rms_norm_eps="tiny"), ["config.json", "rms_norm_eps"]),
    (dict(architectures=["Qwen2MoeForCausalLM"]), ["Qwen2MoeForCausalLM"]),
])
def test_config_with_missing_wrong_typed_or_huge_values(hf, tmp_path, changes, names):
    model = edited_config(hf, tmp_path, **changes)
    data = tmp_path / "d.txt"
    data.write_text("hello world " * 50)
    before = snapshot(model)
    refused(cli("finetune", model, "--data", data, "--out", tmp_path / "out", *ONE), *names)
    refused(cli("gen", model, "--device", "cpu", "--max-new-tokens", "2"), *names)
    assert_unchanged(before, model, what="the model folder after a refused command")


def test_tokenizer_of_a_larger_vocabulary_is_refused(hf, tmp_path):
    model = edited_config(hf, tmp_path, vocab_size=64)  # the weights and the tokenizer say more
    data = tmp_path / "d.txt"
    data.write_text("hello world " * 50)
    refused(cli("finetune", model, "--data", data, "--out", tmp_path / "out", *ONE), "config.json")


@pytest.fixture(scope="module")
def hf_chat(tmp_path_factory):
    from tests.cli.test_gen_cli import make_model
    return make_model(tmp_path_factory.mktemp("hf-chat"))


@pytest.mark.parametrize("record, names", [
    ({"messages": [{"role": "robot", "content": "hi"}]}, [":2: ", "robot"]),
    ({"messages": [{"role": "user", "content": ["hi"]}]}, [":2: ", "content"]),
    ({"messages": [{"role": "user", "content": 7}]}, [":2: ", "content"]),
    ({"messages": "hi"}, [":2: ", "messages"]),
    ({"prompt": "hi", "completion": None}, [":2: ", "completion"]),
])
def test_odd_chat_records_name_their_line(hf_chat, tmp_path, record, names):
    data = tmp_path / "d.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    refused(cli("finetune", hf_chat, "--data", data, "--out", tmp_path / "out", *ONE), *names)


def test_test_gen_on_a_checkpoint_killed_mid_write_says_so(hf, tmp_path):
    """--save-every writes OUT/checkpoint-N through a temp folder; a kill leaves only that temp folder, and a
    user who points test_gen.py at it (or at the checkpoint name that never appeared) gets one line."""
    data = tmp_path / "d.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    out = tmp_path / "out"
    ok(cli("finetune", hf, "--data", data, "--out", out, *SMALL, "--iters", "2", "--save-every", "1"))
    ckpt = sorted(out.glob("checkpoint-*"))[-1]
    half = tmp_path / "half"
    shutil.copytree(ckpt, half)
    for f in half.glob("*.safetensors"):  # what a power cut mid-write leaves: a shard cut short
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    refused(cli("gen", half, "--device", "cpu", "--max-new-tokens", "2"), "safetensors")
    refused(cli("finetune", half, "--data", data, "--out", tmp_path / "out2", *ONE), "safetensors")
    refused(cli("gen", out / "checkpoint-000099", "--device", "cpu"), "checkpoint-000099")


def test_ctrl_c_while_preparing_leaves_a_work_dir_that_starts_over(hf, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    out, work = tmp_path / "out", tmp_path / "work"
    before = snapshot(hf)
    args = [sys.executable, str(Path(__file__).resolve().parents[2] / "finetune.py"), str(hf), "--data", str(data),
            "--out", str(out), "--work-dir", str(work), *SMALL, "--iters", "1"]
    p = subprocess.Popen(args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (work / "store").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the store's folder appears when prepare starts writing modules
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert "Traceback" not in err, err[-3000:]
    if p.returncode != 0:  # Ctrl-C landed: one line, and the next run starts (or resumes) cleanly
        assert p.returncode == 130 and err.strip().splitlines()[-1].startswith("interrupted"), err[-2000:]
    assert_unchanged(before, hf, what="the model after Ctrl-C")
    r = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=120)
    if r.returncode != 0:  # a fresh run over a half-prepared work dir is refused only with the way forward
        last = refused(r)
        assert "--resume" in last or "delete" in last, last
        ok(subprocess.run(args + ["--resume"], env=env(), capture_output=True, text=True, timeout=120))
    assert (out / "config.json").exists()


@pytest.mark.parametrize("how", ["edited", "deleted"])
def test_data_edited_or_deleted_before_a_resume_is_named(hf, tmp_path, how):
    """A resume without --data reads the saved path: the file's hash, not its name, says whether the
    steps still to come would draw the same batches."""
    data = tmp_path / "d.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    out, work = tmp_path / "out", tmp_path / "work"
    ok(cli("finetune", hf, "--data", data, "--out", out, "--work-dir", work, *SMALL, "--iters", "1"))
    if how == "edited":
        data.write_text("Another text entirely, of about the same size. " * 30)
    else:
        data.unlink()
    before = snapshot(out, work)
    last = refused(cli("finetune", hf, "--resume", "--work-dir", work, "--iters", "2"), str(data), "--data")
    assert ("changed since the run began" if how == "edited" else "not found") in last, last
    assert_unchanged(before, out, work, what="the run after a refused resume")


@pytest.mark.parametrize("save_every", [None, 1], ids=["final-export", "checkpoint"])
def test_ctrl_c_during_export_or_checkpointing_leaves_one_line_and_resumes(hf, tmp_path, save_every):
    """Ctrl-C as the first module is written (into --out at the end, or into checkpoint-000001 with
    --save-every 1): one line, no half-written model where the user looks, and --resume completes it."""
    data = tmp_path / "d.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    out, work = tmp_path / "out", tmp_path / "work"
    args = [sys.executable, str(Path(__file__).resolve().parents[2] / "finetune.py"), str(hf), "--data", str(data),
            "--out", str(out), "--work-dir", str(work), *SMALL, "--iters", "2",
            *(["--save-every", str(save_every)] if save_every else [])]
    r = subprocess.run(args, env=env(kill="export_module:1:INT"), capture_output=True, text=True, timeout=180)
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("interrupted"), r.stderr[-2000:]
    target = out / "checkpoint-000001" if save_every else out
    assert not (target / "config.json").exists(), "a half-written export appeared under its final name"
    ok(subprocess.run(args + ["--resume"], env=env(), capture_output=True, text=True, timeout=180))
    for folder in [out] + ([out / "checkpoint-000001"] if save_every else []):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.num_hidden_layers == json.loads((hf / "config.json").read_text())["num_hidden_layers"]
    left = [p.name for p in out.parent.iterdir() if p.name not in ("d.txt", "out", "work")]
    left += [p.name for p in out.iterdir() if p.name.startswith(".") and p.name not in (".slowllama", ".slowllama.lock")]
    assert not left, f"the interrupted export left {left}"
