"""Nothing non-finite reaches the store: NaN losses skip or stop, NaN gradients stop before the write."""
import pytest
import torch

from slowllama.blockfile import Block
from slowllama.engine import update as update_mod
from slowllama.engine.optim import OptimConfig
from slowllama.engine.store import prepare
from slowllama.engine.trainer import NonFiniteError, TrainConfig, Trainer
from slowllama.formats.meta import MetaCheckpoint
from tests.reference import random_batch


def _store(model_dir, tmp_path):
    return prepare(MetaCheckpoint(model_dir), tmp_path / "store")


def _blow_up_output(store):
    """Finite weights whose logits overflow to inf, so the loss is not finite."""
    block = store.read("output")
    store.write("output", Block(block.step, {"weight": torch.full_like(block.params["weight"], 3e38)}))


@pytest.mark.parametrize("stop", [False, True])
def test_nonfinite_loss_touches_no_module(gqa_model, tmp_path, stop):
    store = _store(gqa_model, tmp_path)
    _blow_up_output(store)
    before = {m: store.read(m).checksum for m in store.trainable}
    tr = Trainer(store, tmp_path, torch.device("cpu"), TrainConfig(optim=OptimConfig(lr=0.1),
                                                                   stop_on_nonfinite_loss=stop))
    batch = random_batch(store.args.vocab_size, 2, 8, 0)
    if stop:
        with pytest.raises(NonFiniteError, match="no module was touched"):
            tr.train_step(*batch)
    else:
        res = tr.train_step(*batch)
        assert res.skipped and tr.step == 1
    tr.close()
    assert {m: store.read(m).checksum for m in store.trainable} == before
    assert all(store.step_of(m) == 0 for m in store.trainable)
    assert store.journal()["version"] == 0


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


def test_nonfinite_gradient_stops_before_the_module_is_written(gqa_model, tmp_path, monkeypatch):
    store = _store(gqa_model, tmp_path)
    real = update_mod.materialize

    def poisoned(name, args, params, dropout=0.0):
        module = real(name, args, params, dropout)
        if name == "layers.1":
            module.attention.wq.register_forward_hook(lambda m, i, o: _NanGrad.apply(o) if o.requires_grad else o)
        return module

    monkeypatch.setattr(update_mod, "materialize", poisoned)
    before = {m: store.read(m).checksum for m in store.trainable}
    tr = Trainer(store, tmp_path, torch.device("cpu"), TrainConfig(optim=OptimConfig(lr=0.1)))
    with pytest.raises(NonFiniteError) as e:
        tr.train_step(*random_batch(store.args.vocab_size, 2, 8, 0))
    tr.streamer.flush()
    tr.close()
    msg = str(e.value)
    assert "module layers.1" in msg and "layers.2, norm, output" in msg
    # the modules above were updated and committed, layers.1 and below untouched
    assert [store.step_of(m) for m in store.trainable] == [0, 0, 0, 1, 1, 1]
    for m in ("tok_embeddings", "layers.0", "layers.1"):
        assert store.read(m).checksum == before[m]
    for m in store.trainable:
        assert all(torch.isfinite(t).all() for t in store.read(m).params.values())


def _poison_grad(monkeypatch, module_name: str, value: float):
    """Every gradient of module_name's attention.wq.weight becomes `value`, the gradient it hands down stays finite."""
    real = update_mod.materialize

    def poisoned(name, args, params, dropout=0.0):
        module = real(name, args, params, dropout)
        if name == module_name:
            module.attention.wq.weight.register_hook(lambda g: torch.full_like(g, value))
        return module

    monkeypatch.setattr(update_mod, "materialize", poisoned)


@pytest.mark.parametrize("store_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_parameters_own_nonfinite_gradient_stops_before_its_module_is_written(gqa_model, tmp_path, monkeypatch,
                                                                                store_dtype, optimizer, value):
    """The parameters' gradients are checked through the step's result (update.FullUpdate._step): the error
    still names the gradient, and nothing of the module reaches the store."""
    store = prepare(MetaCheckpoint(gqa_model), tmp_path / "store", dtype=store_dtype)
    _poison_grad(monkeypatch, "layers.1", value)
    before = {m: store.read(m).checksum for m in store.trainable}
    tr = Trainer(store, tmp_path, torch.device("cpu"), TrainConfig(optim=OptimConfig(optimizer, lr=1e-3)))
    with pytest.raises(NonFiniteError, match=r"non-finite gradient in module layers.1 \(attention.wq.weight\)"):
        tr.train_step(*random_batch(store.args.vocab_size, 2, 8, 0))
    tr.streamer.flush()
    tr.close()
    assert [store.step_of(m) for m in store.trainable] == [0, 0, 0, 1, 1, 1]
    for m in ("tok_embeddings", "layers.0", "layers.1"):
        assert store.read(m).checksum == before[m]
    for m in store.trainable:
        b = store.read(m)
        assert all(torch.isfinite(t).all() for t in b.params.values())
        assert all(torch.isfinite(t).all() for st in b.optim.values() for t in st.values())


def test_a_second_moment_that_overflows_is_not_written(gqa_model, tmp_path, monkeypatch):
    """A finite gradient of 1e21 squares to Inf in AdamW's second moment while its parameter stays finite."""
    store = _store(gqa_model, tmp_path)
    _poison_grad(monkeypatch, "layers.1", 1e21)
    before = store.read("layers.1").checksum
    tr = Trainer(store, tmp_path, torch.device("cpu"), TrainConfig(optim=OptimConfig("adamw", lr=1e-3)))
    with pytest.raises(NonFiniteError, match=r"second moment of layers.1.attention.wq.weight non-finite"):
        tr.train_step(*random_batch(store.args.vocab_size, 2, 8, 0))
    tr.streamer.flush()
    tr.close()
    assert store.step_of("layers.1") == 0 and store.read("layers.1").checksum == before
    for m in store.trainable:
        assert all(torch.isfinite(t).all() for st in store.read(m).optim.values() for t in st.values())
