"""--clip-grad-norm: streamed steps equal whole-model autograd + clip_grad_norm_ + torch.optim,
for full fine-tuning (a norm-only reverse pass first), tied embeddings and LoRA, and a clipped
step cut short in its real reverse pass resumes bit for bit with the coefficient it began with."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slowllama.blockfile import StoreError
from slowllama.engine.optim import OptimConfig
from slowllama.engine.store import BlockStore, prepare
from slowllama.engine.trainer import TrainConfig, Trainer
from slowllama.formats import open_checkpoint
from slowllama.formats.meta import MetaCheckpoint
from slowllama.model.lora import LoraConfig
from slowllama.run.loop import finetune
from tests.reference import (
    lora_reference,
    random_batch,
    reference_backward,
    reference_model,
    stored_params,
    whole_store,
)
from tests.streamed import crash_at, train_through_a_crash

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")
SGD = OptimConfig("sgd", lr=0.05, momentum=0.9)
ADAMW = OptimConfig("adamw", lr=1e-2, weight_decay=0.01)
SMALL, LARGE = 0.05, 1e6  # max norms: below every step's gradient norm here, and far above it


def clipped_step(model, params, opt, inputs, targets, *, seed: int, step: int, micro_batch: int,
                 max_norm: float) -> tuple[float, float]:
    """One in-memory step with the trainer's RNG convention, clipped by torch; returns (loss, norm)."""
    loss = reference_backward(model, inputs, targets, seed=seed, step=step, micro_batch=micro_batch)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False).item()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, norm


def _check_store(store, model):
    got = stored_params(store)
    ref = dict(model.named_parameters())
    assert set(got) == set(ref)
    for k, p in ref.items():
        torch.testing.assert_close(got[k], p.detach(), atol=1e-6, rtol=0, msg=k)


def _run(store, work, cfg, batches):
    tr = Trainer(store, work, CPU, cfg)
    try:
        return [tr.train_step(*b) for b in batches]
    finally:
        tr.close()


@pytest.mark.parametrize("ram_budget", [0, None], ids=["ram0", "ram-unlimited"])
@pytest.mark.parametrize("max_norm", [SMALL, LARGE], ids=["active", "inactive"])
@pytest.mark.parametrize("optim", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_clipped_steps_equal_autograd_and_clip_grad_norm(gqa_model, tmp_path, optim, max_norm, ram_budget):
    store = prepare(MetaCheckpoint(gqa_model), tmp_path / "store")
    batches = [random_batch(store.args.vocab_size, 4, 8, i) for i in range(3)]
    cfg = TrainConfig(optim=optim, seed=3, dropout=0.1, micro_batch=2, ram_budget=ram_budget, clip_grad_norm=max_norm)
    res = _run(store, tmp_path, cfg, batches)
    model = reference_model(gqa_model, dropout=0.1)
    params = list(model.parameters())
    opt = optim.make(params)
    for i, b in enumerate(batches):
        loss, norm = clipped_step(model, params, opt, *b, seed=3, step=i, micro_batch=2, max_norm=max_norm)
        assert res[i].loss == pytest.approx(loss, abs=1e-6)
        assert res[i].grad_norm == pytest.approx(norm, rel=1e-5)
    norms = [r.grad_norm for r in res]
    if max_norm == SMALL:
        assert all(n > max_norm for n in norms)  # clipping was active on every step (coefficient < 1)
    else:
        assert all(n < max_norm for n in norms)
    _check_store(store, model)
    assert store.journal()["version"] == 3 and not list(store.root.glob("grad_in.*"))
    assert not list((tmp_path / "acts").glob("*"))  # the second pass consumed every cached input


def test_clipping_changes_the_update(gqa_model, tmp_path):
    """The control: without clipping the same steps end elsewhere, so the tests above can fail."""
    batches = [random_batch(256, 4, 8, i) for i in range(2)]
    ends = []
    for clip in (0.0, SMALL):
        store = prepare(MetaCheckpoint(gqa_model), tmp_path / f"s{clip}")
        res = _run(store, tmp_path / f"w{clip}", TrainConfig(optim=SGD, seed=1, clip_grad_norm=clip), batches)
        assert all((r.grad_norm is None) == (clip == 0) for r in res)
        ends.append(stored_params(store))
    assert any((ends[0][k] - ends[1][k]).abs().max() > 1e-4 for k in ends[0])


# ---- tied embeddings ---------------------------------------------------------------------

@pytest.mark.parametrize("ram_budget", [0, None], ids=["grad-on-disk", "grad-in-ram"])
@pytest.mark.parametrize("optim", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_a_tied_model_counts_the_shared_matrix_once(tied_hf, tmp_path, optim, ram_budget):
    store = prepare(open_checkpoint(tied_hf), tmp_path / "s")
    batches = [random_batch(256, 4, 12, 10 + i) for i in range(3)]
    cfg = TrainConfig(optim=optim, seed=3, dropout=0.1, micro_batch=2, ram_budget=ram_budget, clip_grad_norm=SMALL)
    res = _run(store, tmp_path / "w", cfg, batches)
    model = reference_model(tied_hf, 0.1)
    params = list(model.parameters())  # the shared matrix is one parameter: its gradient is the sum of both uses
    opt = optim.make(params)
    for i, b in enumerate(batches):
        loss, norm = clipped_step(model, params, opt, *b, seed=3, step=i, micro_batch=2, max_norm=SMALL)
        assert res[i].loss == pytest.approx(loss, abs=1e-6)
        assert res[i].grad_norm == pytest.approx(norm, rel=1e-5) and norm > SMALL
    _check_store(store, model)


# ---- LoRA --------------------------------------------------------------------------------

@pytest.mark.parametrize("max_norm", [1e-3, LARGE], ids=["active", "inactive"])
@pytest.mark.parametrize("optim", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_lora_clips_all_adapters_at_once(gqa_model, tmp_path, optim, max_norm):
    lora = LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv", "w2"))
    store = prepare(MetaCheckpoint(gqa_model), tmp_path / "store")
    batches = [random_batch(store.args.vocab_size, 4, 12, i) for i in range(3)]
    cfg = TrainConfig(optim=optim, seed=4, dropout=0.1, micro_batch=2, lora=lora, clip_grad_norm=max_norm)
    tr = Trainer(store, tmp_path / "w", CPU, cfg)
    start = {m: {k: t.detach().clone() for k, t in tr.adapters.named(m).items()} for m in tr.adapters.params}
    res = [tr.train_step(*b) for b in batches]
    got = {m: {k: t.detach().clone() for k, t in tr.adapters.named(m).items()} for m in tr.adapters.params}
    tr.close()
    # The reference: plain forward hooks on the in-memory model, adapters starting where slowllama's did.
    model, ref = lora_reference(gqa_model, start, lora.targets, lora.alpha / lora.rank, dropout=0.1)
    params = [t for s in ref.values() for t in s.values()]
    opt = optim.make(params)
    for i, b in enumerate(batches):
        loss, norm = clipped_step(model, params, opt, *b, seed=4, step=i, micro_batch=2, max_norm=max_norm)
        assert res[i].loss == pytest.approx(loss, abs=1e-6)
        assert res[i].grad_norm == pytest.approx(norm, rel=1e-5)
        assert (norm > max_norm) == (max_norm != LARGE)
    for m, s in ref.items():
        for k, t in s.items():
            torch.testing.assert_close(got[m][k], t.detach(), atol=1e-6, rtol=0, msg=f"{m}.{k}")


# ---- crash consistency -------------------------------------------------------------------

def _crashes(n_modules: int) -> list[tuple[tuple[str, int], int | None]]:
    """Crash points in the second step of three, with the first module already updated at each.

    Each step reaches "norm" once per module below the turn (n - 3) and "backward" once per module."""
    n = n_modules
    return [(("norm", 2 * (n - 3)), None),   # the norm pass's last module: nothing written, no resume point
            (("backward", n + 1), n),        # the journal says "backward", nothing updated yet
            (("backward", n + 2), n - 1),    # the output committed (a tied model's tied.blk is needed)
            (("backward", 2 * n - 2), 3),    # all but the three lowest
            (("backward", 2 * n), 1)]        # all but the embedding


@pytest.mark.parametrize("model", ["gqa_model", "tied_hf"])
def test_a_clipped_step_cut_short_resumes_bit_identically(request, tmp_path, monkeypatch, model):
    folder = request.getfixturevalue(model)
    batches = [random_batch(256, 4, 8, i) for i in range(3)]
    cfg = TrainConfig(optim=ADAMW, seed=2, dropout=0.1, micro_batch=2, clip_grad_norm=SMALL)
    resumed, norms = [], []

    def run(root: Path, crash=None) -> BlockStore:
        store, first_updated, rec = train_through_a_crash(root, open_checkpoint(folder), cfg, batches, monkeypatch,
                                                          crash)
        if crash is not None:
            resumed.append(first_updated)
            norms.append(rec and rec.grad_norm)
        return store

    straight = run(tmp_path / "straight")
    want = whole_store(straight)
    crashes = _crashes(len(straight.trainable))
    for j, (crash, _) in enumerate(crashes):
        got = whole_store(run(tmp_path / f"crash{j}", crash))
        assert got["journal"] == want["journal"], crash
        for m in straight.trainable:
            assert got[m][0] == want[m][0], (crash, m)
            for k, t in want[m][1].items():
                assert torch.equal(got[m][1][k], t), (crash, m, k)
            for k, st in want[m][2].items():
                for s, t in st.items():
                    assert torch.equal(got[m][2][k][s], t), (crash, m, k, s)
    assert resumed == [k for _, k in crashes]
    assert norms[0] is None and len(set(norms[1:])) == 1 and norms[1] > SMALL
    assert not (straight.root / "tied.blk").exists()


def test_a_clipped_step_resumes_only_with_clipping(gqa_model, tmp_path, monkeypatch):
    store = prepare(MetaCheckpoint(gqa_model), tmp_path / "s")
    batch = random_batch(256, 2, 8, 0)
    cfg = TrainConfig(optim=SGD, clip_grad_norm=SMALL)
    tr = Trainer(store, tmp_path / "w", CPU, cfg)
    with monkeypatch.context() as mp:
        crash_at(tr, mp, "backward", 3)
        with pytest.raises(KeyboardInterrupt):
            tr.train_step(*batch)
    tr.close()
    j = BlockStore(store.root).journal()
    assert j["phase"] == "backward" and 0 < j["clip_coef"] < 1 and j["grad_norm"] > SMALL
    tr = Trainer(BlockStore(store.root), tmp_path / "w", CPU, TrainConfig(optim=SGD))
    try:
        with pytest.raises(StoreError, match="began with gradient clipping"):
            tr.recover(lambda s: batch)
    finally:
        tr.close()


# ---- the run -----------------------------------------------------------------------------

# ram-unlimited commits every iteration: each record's bytes are compared with the per-iteration estimate
# (test_commit_every checks the interval's average).
@pytest.mark.parametrize("kw", [dict(ram_budget=0), dict(ram_budget=None, optimizer="adamw", commit_every="1"),
                                dict(lora_rank=4)], ids=["ram0", "ram-unlimited", "lora"])
def test_the_run_logs_the_norm_and_estimates_the_extra_pass(gqa_model, tmp_path, capsys, kw):
    data = tmp_path / "d.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    summary = finetune(model_dir=gqa_model, data=data, out=tmp_path / "out", iters=4, batch_size=2, seq_len=24,
                       lr=1e-3, clip_grad_norm=0.5, device="cpu", **kw)
    recs = [json.loads(x) for x in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r]
    assert len(recs) == 4 and all(r["grad_norm"] > 0 for r in recs)
    est = summary["estimate"]
    for r in recs[2:]:  # steady state
        assert r["bytes_read"] == pytest.approx(est["read"], rel=0.05), (r, est)
        assert r["bytes_written"] == pytest.approx(est["written"], rel=0.05), (r, est)
    printed = capsys.readouterr().out
    assert ("gradient clipping:" in printed) == ("lora_rank" not in kw)
    if kw == {"ram_budget": 0}:  # with nothing cached, the norm pass reads every module below the turn once more
        store = BlockStore(tmp_path / "out.work" / "store")
        below = sum(store.path(n).stat().st_size for n in store.trainable[:-3])
        assert est["clip"] >= below
