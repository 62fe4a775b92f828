"""Exactness: a streamed step equals plain in-memory autograd on the whole model.

The reference is tests/reference.py (one nn.Module, loss.backward(), torch.optim);
test_data/golden/ holds outputs stored once by tools/make_reference.py, so a drift
that moved both implementations together would still be caught.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slowllama.engine.optim import OptimConfig
from slowllama.engine.store import export_store, prepare
from slowllama.engine.trainer import IGNORE, TrainConfig, Trainer
from slowllama.formats.meta import MetaCheckpoint
from tests.reference import random_batch, reference_model, reference_step, stored_params

GOLDEN = Path(__file__).parent / "test_data" / "golden"


def run_streamed(model_dir, work, *, steps, optim, batches, store_dtype=torch.float32, device=torch.device("cpu"),
                 **cfg_kw):
    ckpt = MetaCheckpoint(model_dir)
    store = prepare(ckpt, work / "store", store_dtype)
    trainer = Trainer(store, work, device, TrainConfig(optim=optim, **cfg_kw))
    losses = [trainer.train_step(*batches[i]).loss for i in range(steps)]
    trainer.close()
    return store, losses


def run_reference(model_dir, *, steps, optim: OptimConfig, batches, seed, dropout=0.0, micro_batch=None,
                  device=torch.device("cpu")):
    model = reference_model(model_dir, dropout).to(device)
    opt = optim.make(list(model.parameters()))
    losses = [reference_step(model, opt, *batches[i], seed=seed, step=i, micro_batch=micro_batch)
              for i in range(steps)]
    return model, losses


def make_batches(vocab, n, batch=4, seq=16, seed=0):
    out = []
    for i in range(n):
        x, y = random_batch(vocab, batch, seq, seed + i)
        y[0, : 3 + i] = IGNORE  # a masked prefix exercises the token count in the loss
        out.append((x, y))
    return out


@pytest.mark.device
@pytest.mark.parametrize("micro_batch,prefetch,ram_budget,turn_blocks", [
    (None, True, 0, None),  # the minimal turn: K = 0
    (2, True, 0, None),
    (2, True, 0, 1),  # one block more in the turn
    (1, False, None, None),  # no limit: the whole model is the turn, K = all
    (2, True, None, None),
])
def test_sgd_steps_equal_autograd(gqa_model, tmp_path, test_device, micro_batch, prefetch, ram_budget, turn_blocks):
    """Dropout, micro-batches, prefetch, RAM budget and the turn change nothing: bit-identical loss and weights
    (on $SLOWLLAMA_TEST_DEVICE, both sides on that device)."""
    args = MetaCheckpoint(gqa_model).args
    batches = make_batches(args.vocab_size, 3)
    optim = OptimConfig("sgd", lr=0.05)
    store, losses = run_streamed(gqa_model, tmp_path, steps=3, optim=optim, batches=batches, seed=7, dropout=0.1,
                                 micro_batch=micro_batch, prefetch=prefetch, ram_budget=ram_budget,
                                 device=test_device, turn_blocks=turn_blocks)
    model, ref_losses = run_reference(gqa_model, steps=3, optim=optim, batches=batches, seed=7, dropout=0.1,
                                      micro_batch=micro_batch, device=test_device)
    assert losses == ref_losses
    got, want = stored_params(store), {k: v.cpu() for k, v in model.state_dict().items()}
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # every parameter trained, the norms included (the ancestor froze the final norm by accident)
    orig = reference_model(gqa_model).state_dict()
    assert all(not torch.equal(got[k], orig[k]) for k in want)
    assert all(store.step_of(m) == 3 for m in store.trainable)


def test_only_modules_below_the_turn_are_recomputed(gqa_model, tmp_path, monkeypatch):
    """Per micro-batch, a module below the turn runs twice (forward, recompute); the last block,
    the norm and the output layer run once, since the turn keeps their graphs (at budget 0, K = 0;
    tests/test_turn.py counts every K)."""
    calls = {}
    run = Trainer._run

    def counting(self, i, *a, **kw):
        calls[self.names[i]] = calls.get(self.names[i], 0) + 1
        return run(self, i, *a, **kw)

    monkeypatch.setattr(Trainer, "_run", counting)
    args = MetaCheckpoint(gqa_model).args
    run_streamed(gqa_model, tmp_path, steps=1, optim=OptimConfig("sgd", lr=0.05),
                 batches=make_batches(args.vocab_size, 1), micro_batch=2)
    last = f"layers.{args.n_layers - 1}"
    assert calls == {"tok_embeddings": 4, **{f"layers.{i}": 4 for i in range(args.n_layers - 1)},
                     last: 2, "norm": 2, "output": 2}


@pytest.mark.device
@pytest.mark.parametrize("optim", [
    OptimConfig("adamw", lr=1e-3, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6),
    OptimConfig("sgd", lr=0.05, momentum=0.9, weight_decay=0.01),
])
def test_stateful_optimizers_equal_torch(gqa_model, tmp_path, test_device, optim):
    """AdamW and SGD with momentum keep their state beside each module and match torch.optim."""
    args = MetaCheckpoint(gqa_model).args
    batches = make_batches(args.vocab_size, 4)
    store, losses = run_streamed(gqa_model, tmp_path, steps=4, optim=optim, batches=batches, seed=1, micro_batch=2,
                                 device=test_device)
    model, ref_losses = run_reference(gqa_model, steps=4, optim=optim, batches=batches, seed=1, micro_batch=2,
                                      device=test_device)
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    got = stored_params(store)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(got[k], v.cpu(), atol=1e-6, rtol=0)
    block = store.read("layers.0")
    expected_state = {"exp_avg", "exp_avg_sq", "step"} if optim.name == "adamw" else {"momentum_buffer"}
    assert set(block.optim["attention.wq.weight"]) == expected_state


def test_small_updates_survive_bf16_checkpoint(model_factory, tmp_path):
    """Updates below bf16 resolution accumulate in the fp32 master and show in the bf16 export."""
    src = model_factory("bf16", dim=64, n_layers=2, n_heads=4, dtype=torch.bfloat16)
    args = MetaCheckpoint(src).args
    # AdamW moves every weight by about lr per step: 1e-5 is below half a bf16 step
    # (6e-5 to 2.4e-4 for weights of 0.01 to 0.05), as in a real fine-tune.
    steps, lr = 8, 1e-5
    batches = make_batches(args.vocab_size, steps, seq=32)
    optim = OptimConfig("adamw", lr=lr)
    store, _ = run_streamed(src, tmp_path, steps=steps, optim=optim, batches=batches, seed=0)
    export_store(store, src, tmp_path / "out")
    exported = MetaCheckpoint(tmp_path / "out")
    model, _ = run_reference(src, steps=steps, optim=optim, batches=batches, seed=0)
    start = reference_model(src, dtype=torch.bfloat16).state_dict()
    # The control: a bf16 store that rounds to nearest after every step.
    rtn = reference_model(src)
    opt = optim.make(list(rtn.parameters()))
    for i in range(steps):
        reference_step(rtn, opt, *batches[i], seed=0, step=i)
        with torch.no_grad():
            for p in rtn.parameters():
                p.copy_(p.to(torch.bfloat16))
    same = moved = moved_rtn = total = 0
    for module in store.trainable:
        for p, t in exported.read_module(module).items():
            key = f"{module}.{p}"
            assert t.dtype == torch.bfloat16
            want = model.state_dict()[key].to(torch.bfloat16)  # fp32 training rounded once at the end
            same += int((t == want).sum())
            moved += int((t != start[key]).sum())
            moved_rtn += int((rtn.state_dict()[key].to(torch.bfloat16) != start[key]).sum())
            total += t.numel()
    assert same / total > 0.999
    assert moved / total > 0.25
    assert moved > 2 * moved_rtn, (moved, moved_rtn)


def test_golden_outputs(tmp_path):
    """Streamed and in-memory training both reproduce the outputs stored in test_data/golden."""
    golden = torch.load(GOLDEN / "golden.pt", weights_only=True)
    model_dir = GOLDEN / "model"
    optim = OptimConfig("sgd", lr=golden["lr"])
    batches = list(zip(golden["inputs"], golden["targets"]))
    steps = len(batches)
    model = reference_model(model_dir)
    with torch.no_grad():
        torch.testing.assert_close(model(golden["inputs"][0])[:, :4], golden["logits"], atol=1e-5, rtol=1e-5)
    store, losses = run_streamed(model_dir, tmp_path, steps=steps, optim=optim, batches=batches, seed=golden["seed"],
                                 micro_batch=2)
    ref, ref_losses = run_reference(model_dir, steps=steps, optim=optim, batches=batches, seed=golden["seed"],
                                    micro_batch=2)
    assert losses == pytest.approx(golden["losses"], abs=1e-5)
    assert ref_losses == pytest.approx(golden["losses"], abs=1e-5)
    got = stored_params(store)
    start = reference_model(model_dir).state_dict()
    for key, want in golden["after"].items():
        idx = golden["index"][key]
        torch.testing.assert_close(start[key].flatten()[idx], golden["before"][key], atol=0, rtol=0)
        torch.testing.assert_close(got[key].flatten()[idx], want, atol=1e-6, rtol=0)
        torch.testing.assert_close(ref.state_dict()[key].flatten()[idx], want, atol=1e-6, rtol=0)
        assert not torch.equal(want, golden["before"][key]), f"{key} did not change"


def test_round_trip_is_bit_identical(gqa_model, tmp_path):
    """Prepare then export, with no training: every tensor, dtype and name as in the input."""
    ckpt = MetaCheckpoint(gqa_model)
    store = prepare(ckpt, tmp_path / "store")
    export_store(store, gqa_model, tmp_path / "out")
    # Beside the model's own files, only the hidden marker that says slowllama wrote this folder.
    exported = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert exported == sorted([".slowllama", *(p.name for p in Path(gqa_model).iterdir())])
    for shard in ckpt.shards:
        a = torch.load(shard, weights_only=True)
        b = torch.load(tmp_path / "out" / shard.name, weights_only=True, mmap=True)
        assert list(a) == list(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
