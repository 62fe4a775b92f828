"""LoRA: adapters train exactly as in-memory autograd would train them; the base is never written."""
import pytest
import torch

from slowllama.device import derive_seed
from slowllama.engine.optim import OptimConfig
from slowllama.engine.store import prepare
from slowllama.engine.trainer import TrainConfig, Trainer
from slowllama.formats.meta import MetaCheckpoint
from slowllama.model.lora import Adapters, LoraConfig
from tests.reference import random_batch, reference_model, reference_step

LORA = LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv", "w2"))


def _reference(model_dir, optim, batches, seed, dropout, micro_batch):
    model = reference_model(model_dir, dropout).requires_grad_(False)
    ad = Adapters.init(model.args, LORA, derive_seed(seed, 0x10A))
    for i, layer in enumerate(model.layers):
        ad.attach(layer, f"layers.{i}")
    params = [p for m in ad.params for p in ad.named(m).values()]
    opt = optim.make(params)
    losses = [reference_step(model, opt, *b, seed=seed, step=i, micro_batch=micro_batch) for i, b in enumerate(batches)]
    return ad, losses


@pytest.mark.parametrize("optim", [OptimConfig("adamw", lr=1e-2, weight_decay=0.01), OptimConfig("sgd", lr=0.5)])
def test_lora_steps_equal_autograd_and_leave_the_base_alone(gqa_model, tmp_path, optim):
    ckpt = MetaCheckpoint(gqa_model)
    store = prepare(ckpt, tmp_path / "store", ckpt.checkpoint_dtype())
    sums = {m: store.read(m).checksum for m in store.modules}
    mtimes = {m: store.path(m).stat().st_mtime_ns for m in store.modules}
    batches = [random_batch(store.args.vocab_size, 4, 12, i) for i in range(3)]
    cfg = TrainConfig(optim=optim, seed=4, dropout=0.1, micro_batch=2, lora=LORA)
    tr = Trainer(store, tmp_path, torch.device("cpu"), cfg)
    losses = [tr.train_step(*b).loss for b in batches]
    tr.close()
    ref, ref_losses = _reference(gqa_model, optim, batches, 4, 0.1, 2)
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    saved = Adapters.load(tmp_path / "lora_adapters.blk")
    assert saved.step == 3
    for m in ref.params:
        for k, want in ref.named(m).items():
            torch.testing.assert_close(saved.named(m)[k], want.detach(), atol=1e-6, rtol=0)
            if k.endswith(".B"):
                assert want.abs().sum() > 0  # B starts at zero: it trained
    assert {m: store.read(m).checksum for m in store.modules} == sums
    assert {m: store.path(m).stat().st_mtime_ns for m in store.modules} == mtimes


def test_lora_resumes_from_its_adapter_file(gqa_model, tmp_path):
    ckpt = MetaCheckpoint(gqa_model)
    store = prepare(ckpt, tmp_path / "store", ckpt.checkpoint_dtype())
    optim = OptimConfig("adamw", lr=1e-2)
    batches = [random_batch(store.args.vocab_size, 2, 12, i) for i in range(4)]
    cfg = TrainConfig(optim=optim, seed=1, lora=LORA)
    tr = Trainer(store, tmp_path / "a", torch.device("cpu"), cfg)
    for b in batches[:2]:
        tr.train_step(*b)
    tr.close()
    tr = Trainer(store, tmp_path / "a", torch.device("cpu"), cfg)  # a new process, in effect
    assert tr.step == 2
    for b in batches[2:]:
        tr.train_step(*b)
    tr.close()
    straight = Trainer(store, tmp_path / "b", torch.device("cpu"), cfg)
    for b in batches:
        straight.train_step(*b)
    straight.close()
    a, b = Adapters.load(tmp_path / "a" / "lora_adapters.blk"), Adapters.load(tmp_path / "b" / "lora_adapters.blk")
    for m in a.params:
        for k, t in a.named(m).items():
            assert torch.equal(t, b.named(m)[k])
