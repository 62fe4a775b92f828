"""The two commands people type, end to end on the tiny model that ships in the package (slowllama/demo/)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import finetune
import test_gen

ROOT = Path(__file__).resolve().parents[2]
FACT = finetune.DEMO_DATA.read_text()
PROMPT = "The clock tower of Vellmoor Island"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run the demo as `python finetune.py` does, into a temp folder instead of ./demo-out."""
    tmp = tmp_path_factory.mktemp("demo")
    assert finetune.demo(tmp) == 0
    return tmp / "tiny-tuned"


@pytest.mark.slow
def test_the_demo_runs_again_into_its_own_folders(tmp_path, monkeypatch):
    """A second demo replaces the first one's export (a new run in the same --out) instead of being refused."""
    monkeypatch.setitem(finetune.DEMO, "iters", 1)
    monkeypatch.setitem(finetune.DEMO, "gen_tokens", 2)
    assert finetune.demo(tmp_path) == 0
    first = json.loads((tmp_path / "tiny-tuned" / ".slowllama").read_text())["run"]
    assert finetune.demo(tmp_path) == 0
    assert json.loads((tmp_path / "tiny-tuned" / ".slowllama").read_text())["run"] != first


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_demo_learns_the_fact(demo):
    recs = _log(demo)
    losses = [r["loss"] for r in recs if "loss" in r]
    assert len(losses) == finetune.DEMO["iters"]
    assert sum(losses[-5:]) / 5 < 0.25 * sum(losses[:5]) / 5
    for r in recs:
        if "loss" in r:
            assert {"iter", "loss", "seconds", "tokens", "peak_rss_bytes", "bytes_read", "bytes_written"} <= set(r)
            assert r["bytes_read"] >= 0
    # The default budget holds the tiny model: --commit-every auto writes the store every 10th iteration only.
    written = [r["iter"] for r in recs if "loss" in r and r["bytes_written"] > 0]
    assert written == list(range(9, finetune.DEMO["iters"], 10)), written
    completions = [r["completion"] for r in recs if "completion" in r]
    before, after = completions[0], completions[-1]
    continuation = FACT[len(PROMPT):len(PROMPT) + 30]  # " chimes thirteen times at dusk."
    assert continuation not in before
    assert continuation in after
    assert sorted(p.name for p in demo.iterdir()) == [".slowllama", "consolidated.00.pth", "params.json",
                                                       "report.html", "tokenizer.model", "train_log.jsonl"]


@pytest.mark.slow
def test_test_gen_is_deterministic_and_reads_the_tuned_model(demo):
    runs = [test_gen.generate_text(model_dir=str(demo), device="cpu", prompt=PROMPT, max_new_tokens=12)
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert FACT.startswith(PROMPT + runs[0][:20])
    base = test_gen.generate_text(model_dir=str(finetune.DEMO_MODEL), device="cpu", prompt=PROMPT,
                                  max_new_tokens=12)
    assert base != runs[0]


def test_test_gen_cli_prints_the_completion():
    r = subprocess.run([sys.executable, "test_gen.py", str(finetune.DEMO_MODEL), "cpu", "--prompt", "On Monday morning",
                        "--max-new-tokens", "8"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("On Monday morning") and len(r.stdout.strip()) > len("On Monday morning")


def test_lora_cli_end_to_end(tmp_path):
    out = tmp_path / "out"
    rc = finetune.main([str(finetune.DEMO_MODEL), "--data", str(finetune.DEMO_DATA), "--out", str(out), "--iters", "3",
                        "--seq-len", "16", "--optimizer", "adamw", "--lr", "1e-2", "--lora-rank", "4", "--merge"])
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [".slowllama", "consolidated.00.pth", "lora_adapters.blk", "params.json", "report.html",
                     "tokenizer.model", "train_log.jsonl"]
    recs = [r for r in _log(out) if "loss" in r]
    adapter_bytes = (out / "lora_adapters.blk").stat().st_size
    # LoRA writes only activations and the adapters: far less than the model per step
    assert all(r["bytes_written"] < 3 * adapter_bytes + 2_000_000 for r in recs)
    merged = test_gen.generate_text(model_dir=str(out), device="cpu", prompt=PROMPT, max_new_tokens=8)
    applied = test_gen.generate_text(model_dir=str(finetune.DEMO_MODEL), device="cpu", prompt=PROMPT, max_new_tokens=8,
                                     lora=str(out / "lora_adapters.blk"))
    assert merged == applied
