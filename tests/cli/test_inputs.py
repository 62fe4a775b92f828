"""Bad inputs: one "error: ..." line on stderr, a non-zero exit, no traceback, and nothing written.

Each case runs finetune.py (or test_gen.py) as a subprocess, with --out and --work-dir pointing at
folders that do not exist yet; afterwards neither may exist, and the model folder is unchanged.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import edit_json

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "test_data" / "corpus.txt"
GOOD = ["--iters", "2", "--batch-size", "2", "--seq-len", "16", "--device", "cpu"]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "SLOWLLAMA_KILL_AT"}
    env.update(OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return env


def run_script(script: str, *args, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def sha_tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def written(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


def assert_clean_error(r: subprocess.CompletedProcess, match: str | None = None):
    assert r.returncode != 0, f"exit 0, expected an error\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, f"expected one 'error:' line, stderr:\n{r.stderr[-4000:]}"
    if match:
        assert match.lower() in errors[0].lower(), errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def base_model(model_factory):
    return model_factory("inputs", dim=32, n_layers=2, n_heads=4)


@pytest.fixture(scope="module")
def good_data(tmp_path_factory):
    p = tmp_path_factory.mktemp("inputs-data") / "data.txt"
    p.write_text(CORPUS.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    return p


@pytest.fixture
def model_copy(base_model, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(base_model, dst)
    return dst


def edit_params(**changes):
    def edit(d: Path):
        edit_json(d / "params.json", changes)
    return edit


def edit_shard(fn):
    def edit(d: Path):
        path = d / "consolidated.00.pth"
        sd = torch.load(path, weights_only=True)
        fn(sd)
        torch.save(sd, path)
    return edit


class _Code:
    """Pickles as a call to os.getcwd: harmless, but code all the same, which weights_only refuses."""

    def __reduce__(self):
        return (os.getcwd, ())


def _pickled_code(d: Path):
    sd = torch.load(d / "consolidated.00.pth", weights_only=True)
    sd["norm.weight"] = _Code()
    torch.save(sd, d / "consolidated.00.pth")


def _set(key, value):
    def fn(sd):
        sd[key] = value(sd[key])
    return fn


def _nan(t):
    t = t.clone()
    t[0, 0] = float("nan")
    return t


MODEL_CASES = {
    "params-invalid-json": (lambda d: (d / "params.json").write_text('{"dim": 32, "n_layers": 2,'), "params.json"),
    "params-missing-dim": (edit_params(dim=None), "dim"),
    "params-heads-not-dividing-dim": (edit_params(n_heads=5), "n_heads"),
    "params-unknown-key": (edit_params(flash_attention=True), "flash_attention"),
    "params-negative-vocab": (edit_params(vocab_size=-5), "vocab_size must be"),
    "params-zero-layers": (edit_params(n_layers=0), "n_layers must be"),
    "params-dim-as-string": (edit_params(dim="32"), "dim must be"),
    "params-not-an-object": (lambda d: (d / "params.json").write_text("[1, 2]"), "params.json"),
    "params-missing": (lambda d: (d / "params.json").unlink(), "params.json"),
    "no-shards": (lambda d: (d / "consolidated.00.pth").unlink(), "consolidated"),
    "shard-gap": (lambda d: (d / "consolidated.00.pth").rename(d / "consolidated.01.pth"), "consolidated.00"),
    "shard-wrong-shape": (edit_shard(_set("layers.1.attention.wq.weight",
                                          lambda t: torch.zeros(t.shape[0], t.shape[1] + 4))),
                          "layers.1.attention.wq.weight"),
    "shard-int-dtype": (edit_shard(_set("layers.0.feed_forward.w2.weight", lambda t: t.to(torch.int32))), "int32"),
    "shard-missing-tensor": (edit_shard(lambda sd: sd.pop("layers.1.ffn_norm.weight")), "layers.1.ffn_norm.weight"),
    "shard-unknown-tensor": (edit_shard(lambda sd: sd.__setitem__("lm_head.bias", torch.zeros(3))), "lm_head.bias"),
    "shard-pickled-code": (_pickled_code, "consolidated.00.pth"),
    "shard-not-a-zip": (lambda d: (d / "consolidated.00.pth").write_bytes(b"not a checkpoint at all"),
                        "consolidated.00.pth"),
    "shard-nan": (edit_shard(_set("layers.1.attention.wv.weight", _nan)), "layers.1.attention.wv.weight"),
    "tokenizer-larger-than-vocab": (edit_params(vocab_size=100), "vocab_size"),
    "tokenizer-garbage": (lambda d: (d / "tokenizer.model").write_bytes(b"\x00garbage"), "tokenizer.model"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model_is_refused_before_any_write(case, model_copy, good_data, tmp_path):
    damage, match = MODEL_CASES[case]
    damage(model_copy)
    before = sha_tree(model_copy)
    out, work = tmp_path / "run" / "out", tmp_path / "run" / "work"
    r = run_script("finetune.py", model_copy, "--data", good_data, "--out", out, "--work-dir", work, *GOOD)
    assert_clean_error(r, match)
    assert not out.exists() and not work.exists(), f"{case}: wrote {written(tmp_path / 'run')}"
    assert sha_tree(model_copy) == before


def _data(content: bytes):
    def make(tmp_path: Path) -> Path:
        p = tmp_path / "data.txt"
        p.write_bytes(content)
        return p
    return make


def _good(tmp_path: Path) -> Path:
    p = tmp_path / "data.txt"
    p.write_text(CORPUS.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    return p


# name -> (data maker, extra args (with {model} for the model dir), expected text in the error)
ARG_CASES = {
    "empty-data": (_data(b""), [], "empty"),
    "blank-data": (_data(b" \n\n  \n"), [], "empty"),
    "non-utf8-data": (_data("caf\u00e9 ".encode("latin-1") * 200), [], "UTF-8"),
    "missing-data": (lambda t: t / "nope.txt", [], "nope.txt"),
    "seq-len-longer-than-text": (_data(b"A short text."), [], "seq-len"),
    "device-bogus": (_good, ["--device", "bogus"], "bogus"),
    "out-is-model-dir": (_good, ["--out", "{model}"], "--out"),
    "out-inside-model-dir": (_good, ["--out", "{model}/tuned"], "--out"),
    "work-dir-inside-model-dir": (_good, ["--work-dir", "{model}/work"], "--work-dir"),
    "negative-lr": (_good, ["--lr", "-0.1"], "--lr"),
    "nan-lr": (_good, ["--lr", "nan"], "--lr"),
    "micro-batch-over-batch-size": (_good, ["--micro-batch", "3"], "--micro-batch"),
    "zero-iters": (_good, ["--iters", "0"], "--iters"),
    "dropout-one": (_good, ["--dropout", "1.0"], "--dropout"),
    "bad-ram-budget": (_good, ["--ram-budget", "lots"], "--ram-budget"),
    "shards-not-dividing": (_good, ["--shards", "3"], "--shards"),
    "resume-without-run": (_good, ["--resume"], "--resume"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(ARG_CASES))
def test_bad_arguments_are_refused_before_any_write(case, base_model, tmp_path):
    make_data, extra, match = ARG_CASES[case]
    data = make_data(tmp_path)
    before = sha_tree(base_model)
    out, work = tmp_path / "run" / "out", tmp_path / "run" / "work"
    args = [base_model, "--data", data, "--out", out, "--work-dir", work, *GOOD]
    # Later options win in argparse, so the case's own values override the good ones.
    args += [a.replace("{model}", str(base_model)) for a in extra]
    r = run_script("finetune.py", *args)
    assert_clean_error(r, match)
    assert not out.exists() and not work.exists(), f"{case}: wrote {written(tmp_path / 'run')}"
    assert sha_tree(base_model) == before
    assert not any(p.name.endswith(("-tuned", ".work")) for p in base_model.parent.iterdir())


@pytest.mark.parametrize("case", ["missing-dir", "bad-params", "no-shards"])
def test_gen_with_bad_model_dir(case, model_copy, tmp_path):
    if case == "missing-dir":
        d = tmp_path / "does-not-exist"
    elif case == "bad-params":
        d = model_copy
        (d / "params.json").write_text("{")
    else:
        d = model_copy
        (d / "consolidated.00.pth").unlink()
    r = run_script("test_gen.py", d, "cpu", "--prompt", "Hello", "--max-new-tokens", "2")
    assert_clean_error(r)
    assert r.stdout.strip() == ""


def test_gen_bad_device_and_token_count(base_model):
    assert_clean_error(run_script("test_gen.py", base_model, "bogus"), "bogus")
    assert_clean_error(run_script("test_gen.py", base_model, "cpu", "--max-new-tokens", "0"), "--max-new-tokens")


def _parser_of(module_name: str) -> argparse.ArgumentParser:
    """The parser a script's main() builds, caught at parse_args (so its options are read, not guessed)."""
    mod = importlib.import_module(module_name)
    caught = []

    class Caught(Exception):
        pass

    def fake_parse_args(self, *a, **kw):
        caught.append(self)
        raise Caught

    orig = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = fake_parse_args
    try:
        with pytest.raises(Caught):
            mod.main(["model"])  # any argument: with none at all, finetune.py runs the demo
    finally:
        argparse.ArgumentParser.parse_args = orig
    return caught[0]


@pytest.mark.parametrize("script", ["finetune.py", "test_gen.py"])
def test_help_mentions_every_option(script):
    r = run_script(script, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    parser = _parser_of(script[:-3])
    names = [s for a in parser._actions for s in (a.option_strings or [a.dest])]
    assert len(names) > 3
    missing = [n for n in names if n not in r.stdout]
    assert not missing, f"{script} --help does not mention {missing}"
    for a in parser._actions:
        if a.help not in (None, argparse.SUPPRESS) and a.dest != "help":
            assert a.help.split()[0] in r.stdout, f"{script} --help lacks the help of {a.dest}"


def test_a_store_from_another_slowllama_is_prepared_again_unless_trained(gqa_model, tmp_path):
    from slowllama.blockfile import FORMAT, StoreFormatError
    from slowllama.engine.store import BlockStore, open_or_prepare, prepare
    from slowllama.formats.meta import MetaCheckpoint

    ckpt = MetaCheckpoint(gqa_model)
    root = tmp_path / "store"
    prepare(ckpt, root)
    manifest = root / "manifest.json"
    old = {**json.loads(manifest.read_text()), "format": 1}
    manifest.write_text(json.dumps(old))
    with pytest.raises(StoreFormatError, match="store format 1, this slowllama reads"):
        BlockStore(root)
    store, fresh = open_or_prepare(ckpt, root, torch.float32)
    assert fresh and store.manifest["format"] == FORMAT
    # A trained store is never thrown away: the error says what to do instead.
    manifest.write_text(json.dumps(old))
    (root / "journal.json").write_text(json.dumps({"step": 3, "version": 3, "phase": "idle"}))
    with pytest.raises(StoreFormatError, match="delete"):
        open_or_prepare(ckpt, root, torch.float32)
    assert json.loads(manifest.read_text())["format"] == 1
