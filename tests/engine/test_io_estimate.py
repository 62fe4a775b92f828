"""The disk bytes finetune.py announces per iteration match what an iteration moves, within 5%."""
import json

import pytest
import torch

from slowllama.run.loop import finetune


@pytest.mark.parametrize("kw", [
    dict(),
    dict(optimizer="adamw", micro_batch=1),
    dict(optimizer="sgd", momentum=0.9, ram_budget=None),
    dict(optimizer="adamw", lora_rank=4, lora_targets="wq,wv,w1"),
    dict(store_dtype="bfloat16", act_dtype="bfloat16", ram_budget=3_000_000),
])
def test_estimate_matches_measured_bytes(gqa_model, tmp_path, kw):
    data = tmp_path / "d.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    # Every step commits, so that each iteration's record can be compared with the estimate; the estimate
    # under --commit-every (an average over its commits) is checked in test_commit_every.py.
    summary = finetune(model_dir=gqa_model, data=data, out=tmp_path / "out", iters=4, batch_size=2, seq_len=24,
                       lr=1e-3, commit_every="1", **kw)
    est = summary["estimate"]
    recs = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r][2:]  # steady state: the first iterations fill caches and state
    assert recs
    for r in recs:
        assert r["bytes_read"] == pytest.approx(est["read"], rel=0.05), (r, est)
        assert r["bytes_written"] == pytest.approx(est["written"], rel=0.05), (r, est)


def test_bf16_optimizer_state_is_stored_in_bf16_and_estimated(gqa_model, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    summary = finetune(model_dir=gqa_model, data=data, out=tmp_path / "out", iters=3, batch_size=2, seq_len=24,
                       lr=1e-3, optimizer="adamw", optim_state_dtype="bfloat16", commit_every="1")
    from slowllama.engine.store import BlockStore

    block = BlockStore(tmp_path / "out.work" / "store").read("layers.0")
    state = block.optim["attention.wq.weight"]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert state["step"].dtype == torch.float32 and float(state["step"]) == 3
    rec = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    last = [r for r in rec if "loss" in r][-1]
    assert last["bytes_written"] == pytest.approx(summary["estimate"]["written"], rel=0.05)
    assert all(l == l and l < 10 for l in summary["losses"])
