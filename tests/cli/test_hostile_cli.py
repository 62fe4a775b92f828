"""A tired user at 2 a.m. against every command line: finetune.py, test_gen.py, tools/perplexity.py, tools/merge_lora.py.

The promise for bad input: a non-zero exit, one "error: ..." line last on stderr, no traceback, and
the model folder, the data and every file the user had are byte-identical afterwards.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli_helpers import SMALL, assert_unchanged, env, snapshot, start_cli

pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {"finetune": ROOT / "finetune.py", "gen": ROOT / "test_gen.py",
           "ppl": ROOT / "tools" / "perplexity.py", "merge": ROOT / "tools" / "merge_lora.py"}
ONE = [*SMALL, "--iters", "1"]


def cli(script: str, *args, cwd: Path = ROOT, timeout: int = 90) -> subprocess.CompletedProcess:
    """Run one of the command lines as a user does; still running after the timeout is a failure."""
    cmd = [sys.executable, str(SCRIPTS[script]), *map(str, args)]
    try:
        return subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{script} {' '.join(map(str, args))}: still running after {timeout}s\n"
                    f"{(e.stderr or b'')[-2000:]!r}")


def refused(r: subprocess.CompletedProcess, *names: str) -> str:
    """Non-zero exit, no traceback, 'error: ...' last on stderr naming each of names; returns that line."""
    detail = f"rc {r.returncode}\nstdout:\n{r.stdout[-1500:]}\nstderr:\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, f"traceback:\n{detail}"
    assert r.returncode != 0, f"exit 0 on bad input:\n{detail}"
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), f"last stderr line is not 'error: ...':\n{detail}"
    for n in names:
        assert n.lower() in lines[-1].lower(), f"error line does not name {n!r}: {lines[-1]}"
    print(f"rc {r.returncode}: {lines[-1]}")  # shown by pytest -rA: what the user reads
    return lines[-1]


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0 and "Traceback" not in r.stderr, f"rc {r.returncode}\n{r.stderr[-3000:]}"
    return r


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tiny HF Llama with a Llama-3-like tokenizer and no chat template (read-only)."""
    from tests.engine.test_hf_training import make_model
    return make_model(tmp_path_factory.mktemp("hf-llama"))


@pytest.fixture(scope="module")
def hf_chat(tmp_path_factory):
    """A tiny HF Llama with a ChatML template and eos <|im_end|> (read-only)."""
    from tests.cli.test_gen_cli import make_model
    return make_model(tmp_path_factory.mktemp("hf-chat"))


class Guard:
    """The model, the data and the test's folder (with a user's notes.txt), hashed when freeze() is called."""

    def __init__(self, tmp_path: Path, model: Path, data: Path):
        self.model, self.data = model, data
        self.dirs = (model, data.parent, tmp_path)
        self.freeze()

    def freeze(self):
        """Call after writing the test's own inputs: from here on nothing may change."""
        self.before = snapshot(*self.dirs)

    def __iter__(self):
        return iter((self.model, self.data))


@pytest.fixture
def user(tmp_path, probe_model, probe_data):
    """A Guard: a refused command must leave the model, the data and the user's files byte-identical."""
    (tmp_path / "notes.txt").write_text("my notes\n")
    g = Guard(tmp_path, probe_model, probe_data)
    yield g
    assert_unchanged(g.before, *g.dirs, what="user's files after a refused command")


# ---------------------------------------------------------------- finetune.py: the command line


def test_config_missing_file(user, tmp_path):
    model, data = user
    refused(cli("finetune", model, "--data", data, "--config", tmp_path / "nope.toml", *ONE), "nope.toml")


def test_config_is_a_directory(user, tmp_path):
    model, data = user
    (tmp_path / "cfg").mkdir()
    user.freeze()
    refused(cli("finetune", model, "--data", data, "--config", tmp_path / "cfg", *ONE), "cfg")


def test_config_with_a_wrong_type(user, tmp_path):
    model, data = user
    (tmp_path / "run.toml").write_text('iters = "many"\n')
    user.freeze()
    refused(cli("finetune", model, "--data", data, "--config", tmp_path / "run.toml", *SMALL), "iters")


@pytest.mark.slow
def test_config_relative_model_dir_is_taken_from_the_config_folder(probe_model, probe_data, tmp_path, hf):
    """A relative model_dir means the model beside the config, never a same-named folder in the cwd."""
    cfg = tmp_path / "cfgdir"
    cfg.mkdir()
    copy(probe_model, cfg / "m")
    shutil.copy(probe_data, cfg / "d.txt")
    (cfg / "run.toml").write_text('model_dir = "m"\ndata = "d.txt"\niters = 1\n')
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    copy(hf, cwd / "m")  # a decoy: another model under the same relative name
    before = snapshot(cfg / "m", cwd / "m")
    ok(cli("finetune", "--config", cfg / "run.toml", "--out", tmp_path / "out", "--work-dir", tmp_path / "work",
           *SMALL, cwd=cwd))
    saved = json.loads((tmp_path / "work" / "run.json").read_text())
    assert Path(saved["model_dir"]).resolve() == (cfg / "m").resolve(), saved["model_dir"]
    assert_unchanged(before, cfg / "m", cwd / "m", what="models")


def test_export_format_meta_on_hf_folder(hf, probe_data, tmp_path):
    """Refused before any work, or a Meta export that is really Meta: never an HF folder called Meta."""
    before = snapshot(hf)
    r = cli("finetune", hf, "--data", probe_data, "--out", tmp_path / "out", "--work-dir", tmp_path / "work",
            "--export-format", "meta", *ONE)
    if r.returncode:
        refused(r, "--export-format")
        assert not (tmp_path / "work").exists(), "refused after doing work"
    else:
        assert (tmp_path / "out" / "params.json").exists() and list((tmp_path / "out").glob("consolidated.*.pth"))
    assert_unchanged(before, hf, what="HF model")


def test_shards_on_hf_folder(hf, probe_data, tmp_path):
    """--shards is a Meta export's: with an HF export it must be refused, not silently ignored."""
    before = snapshot(hf)
    refused(cli("finetune", hf, "--data", probe_data, "--out", tmp_path / "out", "--work-dir", tmp_path / "work",
                "--shards", "2", *ONE), "--shards")
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()
    assert_unchanged(before, hf, what="HF model")


@pytest.mark.parametrize("flags,name", [
    (["--lr-schedule", "cosine", "--lr", "1e-4", "--min-lr", "1e-3"], "--min-lr"),
    (["--warmup-iters", "-1"], "--warmup-iters"),
    (["--save-every", "1", "--keep", "0"], "--keep"),
    (["--ram-budget", "lots"], "--ram-budget"),
    (["--device", "tpu"], "tpu"),
    (["--prompt", "x", "--gen-tokens", "100000"], "--gen-tokens"),
], ids=["min-lr-above-lr", "warmup-negative", "keep-0", "ram-budget-lots", "device-tpu", "gen-tokens-past-context"])
def test_bad_option_values(user, tmp_path, flags, name):
    model, data = user
    refused(cli("finetune", model, "--data", data, "--out", tmp_path / "out", "--work-dir", tmp_path / "work",
                *ONE, *flags, timeout=60), name)


# ---------------------------------------------------------------- finetune.py: the data


@pytest.mark.parametrize("content,names", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n',
     ["template"]),
    ('{"text": "The clock tower of Vellmoor Island chimes at dusk."}\n{"text": "broken\n', ["d.jsonl", "2"]),
    ("", ["d.txt"]),
    ("Hi.", ["d.txt"]),
], ids=["messages-without-template", "broken-jsonl-line", "empty", "shorter-than-seq-len"])
def test_bad_data(user, tmp_path, content, names):
    model, _ = user
    data = tmp_path / names[0] if names[0].startswith("d.") else tmp_path / "d.jsonl"
    data.write_text(content * (1 if "messages" not in content else 40))
    user.freeze()
    refused(cli("finetune", model, "--data", data, "--out", tmp_path / "out", "--work-dir", tmp_path / "work",
                *ONE), *names)


# ---------------------------------------------------------------- finetune.py: the model folder


def test_hf_folder_with_a_shard_deleted(probe_data, tmp_path):
    from tests.formats.test_hf_format import make_hf_model
    from tests.formats.test_tokenizers import make_llama3_like
    model = make_hf_model(tmp_path / "sharded", "sharded_bf16")
    make_llama3_like(model)
    shards = sorted(model.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    before = snapshot(model)
    refused(cli("finetune", model, "--data", probe_data, "--out", tmp_path / "out", "--work-dir", tmp_path / "work",
                *ONE), shards[1].name)
    assert_unchanged(before, model, what="model")


def test_model_folder_that_is_a_file(probe_data, tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"not a model")
    refused(cli("finetune", f, "--data", probe_data, "--out", tmp_path / "out", *ONE), "model.bin")
    assert f.read_bytes() == b"not a model"


# ---------------------------------------------------------------- finetune.py: where it writes


def test_out_is_the_model_folders_parent(probe_model, probe_data, tmp_path):
    model = copy(probe_model, tmp_path / "m")
    before = snapshot(tmp_path, probe_data.parent)
    refused(cli("finetune", model, "--data", probe_data, "--out", tmp_path, "--work-dir", tmp_path.parent / "w-par",
                *ONE), str(tmp_path))
    assert_unchanged(before, tmp_path, probe_data.parent, what="model's parent")


def test_out_is_the_data_file(user, tmp_path):
    model, data = user
    refused(cli("finetune", model, "--data", data, "--out", data, "--work-dir", tmp_path / "work", *ONE), str(data))


def test_work_dir_inside_out(user, tmp_path):
    model, data = user
    refused(cli("finetune", model, "--data", data, "--out", tmp_path / "out", "--work-dir",
                tmp_path / "out" / "work", *ONE), "--work-dir")


def test_out_under_a_file(user, tmp_path):
    model, data = user
    refused(cli("finetune", model, "--data", data, "--out", tmp_path / "notes.txt" / "out", *ONE), "notes.txt")


@pytest.mark.slow
def test_second_fresh_run_into_the_same_out_is_refused_unless_told_to_overwrite(probe_model, probe_data, tmp_path):
    """Run 2 (another --work-dir, another --lr) into run 1's --out: refused before any work, naming the folder,
    run 1's work dir and the flag, with run 1's export untouched byte for byte; with --overwrite-out it
    replaces run 1's export wholly (no run-1 weights or log lines left mixed in)."""
    out, w1, w2 = tmp_path / "out", tmp_path / "w1", tmp_path / "w2"
    common = [probe_model, "--data", probe_data, "--out", out, *SMALL, "--iters", "3", "--save-every", "1"]
    ok(cli("finetune", *common, "--work-dir", w1, timeout=120))
    first = snapshot(out, w1)
    refused(cli("finetune", *common, "--work-dir", w2, "--lr", "3e-3", timeout=120), str(out), str(w1),
            "--overwrite-out")
    assert_unchanged(first, out, w1, what="run 1's output and work dir")
    assert not w2.exists()  # refused before any work: not even the new work dir
    ok(cli("finetune", *common, "--work-dir", w2, "--lr", "3e-3", "--overwrite-out", timeout=120))
    after = snapshot(out)
    weights = [k for k in after if k.endswith(".pth") or k.endswith(".safetensors")]
    stale = [k for k in weights if first.get(k) == after[k]]
    assert weights and not stale, f"run 1's weights left beside run 2's: {stale}"
    iters = [json.loads(ln)["iter"] for ln in (out / "train_log.jsonl").read_text().splitlines()
             if ln.strip() and "loss" in json.loads(ln)]
    assert iters == [0, 1, 2], f"train_log.jsonl mixes two runs: iters {iters}"
    # Run 1 now finds run 2's export in its --out: a resume is refused the same way.
    refused(cli("finetune", probe_model, "--out", out, "--work-dir", w1, "--resume", "--iters", "4", "--device",
                "cpu", timeout=120), str(out), str(w2))


@pytest.mark.slow
def test_second_run_on_the_same_work_dir_is_refused_with_the_pid(probe_model, probe_data, tmp_path):
    work = tmp_path / "work"
    proc = start_cli(probe_model, "--data", probe_data, "--out", tmp_path / "out", "--work-dir", work, *SMALL,
                     "--iters", "100000", log_dir=tmp_path / "first")
    try:
        deadline = time.monotonic() + 120
        while not ((tmp_path / "out" / "train_log.jsonl").exists() or (work / "train_log.jsonl").exists()):
            assert proc.poll() is None, (tmp_path / "first" / "stderr.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "first run did not start training"
            time.sleep(0.1)
        line = refused(cli("finetune", probe_model, "--data", probe_data, "--out", tmp_path / "out2",
                           "--work-dir", work, *ONE, timeout=60))
        assert re.search(rf"\b{proc.pid}\b", line), f"error line does not name pid {proc.pid}: {line}"
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_resume_after_the_store_is_deleted(probe_model, probe_data, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    ok(cli("finetune", probe_model, "--data", probe_data, "--out", out, "--work-dir", work, *ONE))
    shutil.rmtree(work / "store")
    before = snapshot(out, probe_model)
    refused(cli("finetune", probe_model, "--data", probe_data, "--out", out, "--work-dir", work, *SMALL,
                "--iters", "2", "--resume"), "store")
    assert_unchanged(before, out, probe_model, what="output and model")


# ---------------------------------------------------------------- test_gen.py


def test_gen_missing_model(tmp_path):
    refused(cli("gen", tmp_path / "nope", "--device", "cpu"), "nope")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, probe_model, probe_data):
    """A finished 1-iteration LoRA run on the Meta probe model: its OUT folder."""
    base = tmp_path_factory.mktemp("lora-run")
    ok(cli("finetune", probe_model, "--data", probe_data, "--out", base / "out", "--work-dir", base / "work",
           *ONE, "--lora-rank", "2"))
    assert (base / "out" / "lora_adapters.blk").exists()
    return base / "out"


def test_gen_lora_folder_that_is_not_peft(probe_model, tmp_path):
    (tmp_path / "adapters").mkdir()
    (tmp_path / "adapters" / "readme.txt").write_text("hi")
    before = snapshot(probe_model, tmp_path)
    refused(cli("gen", probe_model, "--device", "cpu", "--lora", tmp_path / "adapters"), "adapters")
    assert_unchanged(before, probe_model, tmp_path, what="model and adapters folder")


@pytest.mark.slow
def test_gen_lora_of_another_model(hf, lora_run):
    before = snapshot(hf, lora_run)
    refused(cli("gen", hf, "--device", "cpu", "--lora", lora_run / "lora_adapters.blk"), "lora_adapters.blk")
    assert_unchanged(before, hf, lora_run, what="model and adapters")


@pytest.mark.parametrize("content", [None, "", "\n\n"], ids=["missing", "empty", "blank-lines"])
def test_gen_prompt_file_missing_or_empty(probe_model, tmp_path, content):
    pf = tmp_path / "prompts.txt"
    if content is not None:
        pf.write_text(content)
    refused(cli("gen", probe_model, "--device", "cpu", "--prompt-file", pf), "prompts.txt")


@pytest.mark.parametrize("flags,name", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "2"], "--top-p"),
    (["--device", "cuda"], "cuda"),
], ids=["temperature-negative", "top-p-2", "cuda-on-cpu"])
def test_gen_bad_options(probe_model, flags, name):
    if name == "cuda":
        import torch
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        refused(cli("gen", probe_model, *flags), name)
    else:
        refused(cli("gen", probe_model, "--device", "cpu", *flags), name)


def test_gen_chat_without_a_template(hf):
    refused(cli("gen", hf, "--device", "cpu", "--chat", "--prompt", "hi"), "template")


@pytest.mark.slow
def test_gen_json_with_a_stop_at_the_first_token(hf_chat, tmp_path):
    """The first generated token is a stop: the run still ends with a JSON line, with no text."""
    probe = ok(cli("gen", hf_chat, "--device", "cpu", "--json", "--max-new-tokens", "3", "--prompt", "The"))
    first = json.loads(probe.stdout.strip().splitlines()[-1])["tokens"][0]
    model = copy(hf_chat, tmp_path / "m")
    gen = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [gen["eos_token_id"], first]}))
    r = ok(cli("gen", model, "--device", "cpu", "--json", "--max-new-tokens", "3", "--prompt", "The"))
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["tokens"] == [first] and got["text"] == "", got  # the stop id is kept, as generate() does
    assert all(v is None or (isinstance(v, (int, float)) and math.isfinite(v))
               for k, v in got.items() if k in ("tokens_per_s", "first_token_s")), got


# ---------------------------------------------------------------- tools/perplexity.py


def test_ppl_data_missing(probe_model, tmp_path):
    refused(cli("ppl", probe_model, "--device", "cpu", "--data", tmp_path / "nope.txt"), "nope.txt")


def test_ppl_jsonl_without_targets_prompt_past_seq_len(probe_model, tmp_path):
    """Every completion starts beyond --seq-len: nothing to score."""
    d = tmp_path / "d.jsonl"
    d.write_text(json.dumps({"prompt": "The clock tower of Vellmoor Island " * 8, "completion": " chimes."}) + "\n")
    refused(cli("ppl", probe_model, "--device", "cpu", "--data", d, "--seq-len", "8"), "d.jsonl")


def test_ppl_jsonl_without_targets_no_assistant_turn(hf_chat, tmp_path):
    """Chat records with no assistant turn: nothing to score without --train-on-prompt."""
    d = tmp_path / "d.jsonl"
    d.write_text(json.dumps({"messages": [{"role": "user", "content": "hi there"}]}) + "\n")
    refused(cli("ppl", hf_chat, "--device", "cpu", "--data", d), "d.jsonl")


def test_ppl_seq_len_zero(probe_model, probe_data):
    refused(cli("ppl", probe_model, "--device", "cpu", "--data", probe_data, "--seq-len", "0"), "--seq-len")


@pytest.mark.parametrize("which", ["meta", "hf"])
def test_ppl_works_on_both_formats(which, probe_model, hf, probe_data):
    model = probe_model if which == "meta" else hf
    before = snapshot(model)
    r = ok(cli("ppl", model, "--device", "cpu", "--data", probe_data, "--seq-len", "32"))
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert math.isfinite(got["ppl"]) and got["ppl"] > 1, got
    assert_unchanged(before, model, what="model")


# ---------------------------------------------------------------- tools/merge_lora.py


@pytest.mark.slow
def test_merge_out_is_the_base(probe_model, lora_run, tmp_path):
    base = copy(probe_model, tmp_path / "base")
    before = snapshot(base, lora_run)
    refused(cli("merge", base, lora_run / "lora_adapters.blk", base), str(base))
    assert_unchanged(before, base, lora_run, what="base and adapters")


@pytest.mark.slow
def test_merge_out_holds_a_user_file(probe_model, lora_run, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out, probe_model, lora_run)
    refused(cli("merge", probe_model, lora_run / "lora_adapters.blk", out), "notes.txt")
    assert_unchanged(before, out, probe_model, lora_run, what="out, base and adapters")


@pytest.mark.slow
def test_merge_truncated_adapters(probe_model, lora_run, tmp_path):
    blk = tmp_path / "lora_adapters.blk"
    raw = (lora_run / "lora_adapters.blk").read_bytes()
    blk.write_bytes(raw[: len(raw) // 2])
    before = snapshot(probe_model, tmp_path)
    refused(cli("merge", probe_model, blk, tmp_path / "merged"), "lora_adapters.blk")
    assert_unchanged(before, probe_model, tmp_path, what="base, adapters and their folder")


# ---------------------------------------------------------------- more of 2 a.m.


@pytest.mark.parametrize("flags,name", [
    (["--iters", "0"], "--iters"),
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--lora-rank", "2", "--lora-targets", "wq,wz"], "wz"),
    (["--batch-size", "2", "--micro-batch", "3"], "--micro-batch"),
    (["--dropout", "1.5"], "--dropout"),
    (["--seq-len", "-4"], "--seq-len"),
    (["--merge"], "--merge"),
], ids=["iters-0", "val-fraction-1.5", "lora-target-typo", "micro-batch-above-batch", "dropout-1.5", "seq-len-negative",
        "merge-without-lora"])
def test_more_bad_option_values(user, tmp_path, flags, name):
    model, data = user
    refused(cli("finetune", model, "--data", data, "--out", tmp_path / "out", "--work-dir", tmp_path / "work",
                *ONE, *flags, timeout=60), name)


def test_data_is_a_directory(user, tmp_path):
    model, _ = user
    (tmp_path / "notes").mkdir()
    user.freeze()
    refused(cli("finetune", model, "--data", tmp_path / "notes", "--out", tmp_path / "out", *ONE), "notes")


def test_data_not_utf8(user, tmp_path):
    model, _ = user
    (tmp_path / "d.txt").write_bytes(b"caf\xe9 " * 200)
    user.freeze()
    refused(cli("finetune", model, "--data", tmp_path / "d.txt", "--out", tmp_path / "out", *ONE), "d.txt")


def test_out_holds_a_user_file(user, tmp_path):
    model, data = user
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("years of work")
    user.freeze()
    refused(cli("finetune", model, "--data", data, "--out", tmp_path / "out", "--work-dir", tmp_path / "work", *ONE),
            "thesis.tex")


def test_resume_without_a_work_dir(user, tmp_path):
    model, data = user
    refused(cli("finetune", model, "--data", data, "--out", tmp_path / "out", "--work-dir", tmp_path / "work",
                *ONE, "--resume"), "work")


@pytest.mark.parametrize("damage", ["config-not-json", "shard-truncated", "no-tokenizer"])
def test_damaged_hf_folder(hf, probe_data, tmp_path, damage):
    model = copy(hf, tmp_path / "m")
    if damage == "config-not-json":
        (model / "config.json").write_text('{"model_type": "llama",')
        name = "config.json"
    elif damage == "shard-truncated":
        f = model / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        name = "model.safetensors"
    else:
        (model / "tokenizer.json").unlink()
        name = "tokenizer"
    before = snapshot(model)
    refused(cli("finetune", model, "--data", probe_data, "--out", tmp_path / "out", "--work-dir", tmp_path / "work",
                *ONE), name)
    assert_unchanged(before, model, what="model")


def test_meta_shard_truncated(probe_model, probe_data, tmp_path):
    model = copy(probe_model, tmp_path / "m")
    f = model / "consolidated.00.pth"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    before = snapshot(model)
    refused(cli("finetune", model, "--data", probe_data, "--out", tmp_path / "out", "--work-dir", tmp_path / "work",
                *ONE), "consolidated.00.pth")
    assert_unchanged(before, model, what="model")


def limited_env() -> dict:
    """No .pyc writes: under RLIMIT_FSIZE Python's own bytecode cache is written short and breaks later imports."""
    return {**env(), "PYTHONDONTWRITEBYTECODE": "1"}


def _fsize_limited(nbytes: int):
    def limit():
        import resource
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead of failing the write
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


@pytest.mark.slow
@pytest.mark.parametrize("limit,then", [(16 * 1024, []), (64 * 1024, ["--resume"])],
                         ids=["while-preparing-the-store", "while-exporting"])
def test_full_disk(user, tmp_path, limit, then):
    """No file may grow past the limit (16 KB: the store's embedding is bigger; 64 KB: the store fits, the export
    does not): one error line naming the file, nothing of the user's hurt, no temp folder left; with room again,
    the same command (after a finished step: with --resume) delivers the model."""
    model, data = user
    args = [str(model), "--data", str(data), "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), *ONE]
    r = subprocess.run([sys.executable, str(SCRIPTS["finetune"]), *args], cwd=ROOT, env=limited_env(),
                       capture_output=True, text=True, timeout=90, preexec_fn=_fsize_limited(limit))
    refused(r, str(tmp_path))  # the line names the file that could not be written
    left = sorted(p.name for p in (tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []
    assert set(left) <= {".slowllama", "train_log.jsonl", "report.html"}, f"a failed export left {left} under --out"
    ok(cli("finetune", *args, *then))  # whatever the failure left in the work dir does not wedge the next run
    assert (tmp_path / "out" / "consolidated.00.pth").exists()
    shutil.rmtree(tmp_path / "work")  # slowllama's own folders, not the user's
    shutil.rmtree(tmp_path / "out")


@pytest.mark.slow
def test_merge_full_disk(probe_model, lora_run, tmp_path):
    before = snapshot(probe_model, lora_run)
    cmd = [sys.executable, str(SCRIPTS["merge"]), str(probe_model), str(lora_run / "lora_adapters.blk"),
           str(tmp_path / "merged")]
    r = subprocess.run(cmd, cwd=ROOT, env=limited_env(), capture_output=True, text=True, timeout=90,
                       preexec_fn=_fsize_limited(64 * 1024))
    refused(r, str(tmp_path))
    assert not (tmp_path / "merged").exists() or not list((tmp_path / "merged").glob("*.pth")), \
        "a half-written merge left under the final name"
    assert_unchanged(before, probe_model, lora_run, what="base and adapters")


@pytest.mark.slow
def test_merge_adapters_of_another_model(hf, lora_run, tmp_path):
    before = snapshot(hf, lora_run)
    refused(cli("merge", hf, lora_run / "lora_adapters.blk", tmp_path / "merged"), "lora_adapters.blk")
    assert not (tmp_path / "merged").exists()
    assert_unchanged(before, hf, lora_run, what="base and adapters")


@pytest.mark.slow
def test_merge_out_inside_the_base(probe_model, lora_run, tmp_path):
    base = copy(probe_model, tmp_path / "base")
    before = snapshot(base)
    refused(cli("merge", base, lora_run / "lora_adapters.blk", base / "merged"), "merged")
    assert_unchanged(before, base, what="base")


@pytest.mark.parametrize("flags,name", [
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "100000"], "--max-new-tokens"),
    (["--top-k", "-3"], "--top-k"),
    (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--ram-budget", "lots"], "--ram-budget"),
], ids=["max-new-0", "max-new-past-context", "top-k-negative", "repetition-penalty-0", "ram-budget-lots"])
def test_gen_more_bad_options(probe_model, flags, name):
    refused(cli("gen", probe_model, "--device", "cpu", *flags, timeout=60), name)


@pytest.mark.parametrize("flags,name", [
    (["--batch-size", "0"], "--batch-size"),
    (["--seq-len", "100000"], "--seq-len"),
], ids=["batch-0", "seq-len-past-context"])
def test_ppl_more_bad_options(probe_model, probe_data, flags, name):
    refused(cli("ppl", probe_model, "--device", "cpu", "--data", probe_data, *flags), name)


@pytest.mark.slow
def test_ppl_lora_of_another_model(hf, lora_run, probe_data):
    refused(cli("ppl", hf, "--device", "cpu", "--data", probe_data, "--lora", lora_run / "lora_adapters.blk"),
            "lora_adapters.blk")


def test_gen_empty_prompt(probe_model, hf_chat):
    """An empty prompt is BOS alone where the tokenizer adds one (generation from scratch, as transformers
    allows); without a BOS it encodes to nothing and is refused."""
    ok(cli("gen", probe_model, "--device", "cpu", "--prompt", "", "--max-new-tokens", "4"))
    refused(cli("gen", hf_chat, "--device", "cpu", "--prompt", ""), "--prompt")


@pytest.mark.parametrize("where", ["model", "data-folder"])
def test_work_dir_on_the_users_folders(user, tmp_path, where):
    """--work-dir is the model folder, or the folder holding the data (and the user's notes)."""
    model, data = user
    work = model if where == "model" else data.parent
    refused(cli("finetune", model, "--data", data, "--out", tmp_path / "out", "--work-dir", work, *ONE), str(work))


@pytest.mark.parametrize("flags,name", [
    (["--val-data", "missing-val.txt"], "missing-val.txt"),
    (["--eval-every", "-1", "--prompt", "x"], "--eval-every"),
    (["--lr", "nan"], "--lr"),
    (["--seed", "-1"], "--seed"),
], ids=["val-data-missing", "eval-every-negative", "lr-nan", "seed-negative"])
def test_yet_more_bad_option_values(user, tmp_path, flags, name):
    model, data = user
    refused(cli("finetune", model, "--data", data, "--out", tmp_path / "out", "--work-dir", tmp_path / "work",
                *ONE, *flags, timeout=60), name)


def test_params_json_corrupt(probe_model, probe_data, tmp_path):
    model = copy(probe_model, tmp_path / "m")
    (model / "params.json").write_text('{"dim": 32, "n_layers": ')
    refused(cli("finetune", model, "--data", probe_data, "--out", tmp_path / "out", *ONE), "params.json")
    refused(cli("gen", model, "--device", "cpu"), "params.json")
    refused(cli("ppl", model, "--device", "cpu", "--data", probe_data), "params.json")


@pytest.mark.slow
@pytest.mark.parametrize("n", ["0", "-1", "3"])
def test_merge_bad_shard_count(probe_model, lora_run, tmp_path, n):
    """0 and -1 are no shard count; 3 does not divide the probe model's 4 heads."""
    refused(cli("merge", probe_model, lora_run / "lora_adapters.blk", tmp_path / "merged", "--shards", n), "--shards")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("n", ["0", "-1", "3"])
def test_finetune_bad_shard_count(user, tmp_path, n):
    model, data = user
    refused(cli("finetune", model, "--data", data, "--out", tmp_path / "out", "--work-dir", tmp_path / "work",
                *ONE, "--shards", n), "--shards")
