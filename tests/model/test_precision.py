"""The 16-bit store: stochastic rounding is unbiased, reproducible, and keeps small updates."""
import pytest
import torch

from slowllama.engine import optim
from slowllama.engine.optim import OptimConfig, stochastic_round
from slowllama.engine.store import BlockStore, prepare
from slowllama.engine.trainer import TrainConfig, Trainer
from slowllama.formats.meta import MetaCheckpoint
from tests.reference import random_batch, reference_model, stored_params


def _round(rounder: str, x: torch.Tensor, seed: int) -> torch.Tensor:
    """The cpu path (numpy), or the path cuda and mps take (torch), run here on cpu."""
    bits = x.float().contiguous().view(torch.int32).reshape(-1)
    if rounder == "accelerator":
        return optim._round_torch(bits, seed).view(x.shape)
    out = torch.empty(bits.numel(), dtype=torch.bfloat16)
    optim._round_numpy([(bits, seed, out)])
    return out.view(x.shape)


@pytest.mark.parametrize("rounder", ["cpu", "accelerator"])
def test_stochastic_rounding_is_unbiased(rounder):
    x = torch.tensor([0.01234567, -0.0456789, 1.0000123, 3.3e-5, -7.77e-3])
    n = 200_000
    r = _round(rounder, x.expand(n, -1).contiguous(), 0).float()
    lo = x.to(torch.bfloat16).float()
    # every draw is within one bf16 step of x
    spacing = (torch.nextafter(lo.to(torch.bfloat16), torch.tensor(float("inf"), dtype=torch.bfloat16)).float() - lo).abs()
    assert ((r - x).abs() <= 2 * spacing).all()
    # the mean converges to x, far closer than round-to-nearest gets
    err = (r.mean(0) - x).abs()
    assert (err < spacing * 0.02).all(), (err, spacing)
    assert (err < (lo - x).abs() + 1e-12).all()


@pytest.mark.parametrize("rounder", ["cpu", "accelerator"])
def test_stochastic_rounding_keeps_specials_and_exact_values(rounder):
    x = torch.tensor([0.0, 1.0, -2.0, float("inf"), float("-inf"), 0.5])
    assert torch.equal(_round(rounder, x, 1), x.to(torch.bfloat16))
    assert _round(rounder, torch.tensor([float("nan")]), 1).isnan().all()


def test_stochastic_rounding_depends_on_the_seed_only():
    x = torch.randn(1000)
    assert torch.equal(stochastic_round(x, torch.bfloat16, 5), stochastic_round(x.clone(), torch.bfloat16, 5))
    assert not torch.equal(stochastic_round(x, torch.bfloat16, 5), stochastic_round(x, torch.bfloat16, 6))


def _train(model_dir, work, store_dtype, lr, steps, vocab, seed=0):
    store = prepare(MetaCheckpoint(model_dir), work / "store", store_dtype)
    tr = Trainer(store, work, torch.device("cpu"), TrainConfig(optim=OptimConfig("adamw", lr=lr), seed=seed))
    for i in range(steps):
        tr.train_step(*random_batch(vocab, 2, 16, i))
    tr.close()
    return store


def test_bf16_store_is_reproducible_and_keeps_small_updates(model_factory, tmp_path):
    src = model_factory("bf16-store", dim=64, n_layers=2, n_heads=4, dtype=torch.bfloat16)
    vocab = MetaCheckpoint(src).args.vocab_size
    lr, steps = 1e-5, 6  # AdamW moves weights by ~lr per step: under half a bf16 step for most
    a = _train(src, tmp_path / "a", torch.bfloat16, lr, steps, vocab)
    b = _train(src, tmp_path / "b", torch.bfloat16, lr, steps, vocab)
    f = _train(src, tmp_path / "f", torch.float32, lr, steps, vocab)
    assert a.read("layers.0").params["attention.wq.weight"].dtype == torch.bfloat16
    pa, pb, pf = stored_params(a), stored_params(b), stored_params(f)
    assert sum(t.nbytes for t in pa.values()) * 2 == sum(t.nbytes for t in pf.values())
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    start = reference_model(src).state_dict()
    # Round-to-nearest of each step would keep the weights where they were.
    moved_f = sum((pf[k] - start[k]).abs().sum() for k in start)
    moved_sr = sum((pa[k].float() - start[k]).abs().sum() for k in start)
    assert 0.5 < moved_sr / moved_f < 2.0, (moved_sr, moved_f)
    # and it points where the fp32 update points. Each weight moves by 0 or one whole bf16
    # step, so the agreement is partial, but an unrelated direction would give ~1/sqrt(n) = 0.003.
    du = torch.cat([(pa[k].float() - start[k]).flatten() for k in start])
    df = torch.cat([(pf[k] - start[k]).flatten() for k in start])
    assert torch.nn.functional.cosine_similarity(du, df, dim=0) > 0.1


@pytest.mark.parametrize("raw", sorted({optim.LITTLE_ENDIAN, False}))
def test_chunked_threaded_rounding_draws_what_one_call_draws(raw, monkeypatch):
    """The cpu path rounds in chunks on several threads; its draws must be those of one generator call
    over the whole tensor, so that a store's bits do not depend on the thread count; read from the
    generator's raw outputs (little-endian machines) or through integers, the same draws."""
    import numpy as np

    monkeypatch.setattr(optim, "LITTLE_ENDIAN", raw)
    x = torch.randn(3 * optim.ROUND_CHUNK + 5) * 3
    bits = x.view(torch.int32)
    noise = np.random.default_rng(11).integers(0, 1 << 16, x.numel(), dtype=np.uint16)
    want = ((bits.numpy().view(np.uint32) + noise) >> 16).astype(np.uint16)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got = stochastic_round(x, torch.bfloat16, 11).view(torch.int16).numpy().view(np.uint16)
            assert np.array_equal(got, want), n
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("budget", [None, 0], ids=["held in RAM", "streamed"])
def test_bf16_store_steps_equal_the_reference_rounding(model_factory, tmp_path, budget):
    """A bf16 store's module after a step holds the bits of stochastic_round(the fp32 update), with the seed
    each tensor's rounding is documented to take, whether the module stays in RAM between interval commits
    (rounded in place, fp32 until written) or is written and read back each step."""
    from slowllama.device import derive_seed
    from slowllama.engine.trainer import IGNORE
    from tests.reference import reference_backward

    src = model_factory("bf16-store", dim=64, n_layers=2, n_heads=4, dtype=torch.bfloat16)
    ckpt = MetaCheckpoint(src)
    vocab, seed, lr, steps = ckpt.args.vocab_size, 3, 1e-2, 3
    store = prepare(ckpt, tmp_path / "store", torch.bfloat16)
    cfg = TrainConfig(optim=OptimConfig("sgd", lr=lr), seed=seed, ram_budget=budget, commit_every=2)
    tr = Trainer(store, tmp_path / "work", torch.device("cpu"), cfg)
    model = reference_model(src)
    for s in range(steps):
        x, y = random_batch(vocab, 2, 16, s)
        assert (y != IGNORE).all()
        tr.train_step(x, y)
        reference_backward(model, x, y, seed=seed, step=s)
        with torch.no_grad():
            for i, name in enumerate(store.trainable):
                for j, (_, p) in enumerate(model.get_submodule(name).named_parameters()):
                    new = p - lr * p.grad
                    p.copy_(stochastic_round(new, torch.bfloat16, derive_seed(seed, s, i, j, 0x5217)).float())
                    p.grad = None
    tr.commit()
    tr.close()
    assert tr.commit_interval == (2 if budget is None else 1)
    want = {f"{m}.{k}": t for m in store.trainable for k, t in model.get_submodule(m).named_parameters()}
    got = stored_params(BlockStore(tmp_path / "store"))
    assert set(got) == set(want)
    for k, t in got.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t.float(), want[k]), k


@pytest.mark.parametrize("rounder", ["cpu", "accelerator"])
def test_rounding_in_place_keeps_what_the_bf16_result_holds(rounder):
    """Several tensors rounded in place at once (their chunks shared among threads) take the values their own
    stochastic_round would give each, whatever the thread count."""
    xs = [torch.randn(n) * 5 for n in (3 * optim.ROUND_CHUNK + 7, 5, optim.ROUND_CHUNK)]
    xs[0][:4] = torch.tensor([0.0, float("inf"), float("-inf"), 1.0])
    want = [_round(rounder, x, 9 + m).float() for m, x in enumerate(xs)]
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            ys = [x.clone() for x in xs]
            if rounder == "cpu":
                optim.stochastic_round_([(y, 9 + m) for m, y in enumerate(ys)])
            else:
                for m, y in enumerate(ys):
                    optim._round_torch(y.view(torch.int32), 9 + m, inplace=True)
            assert all(torch.equal(y, w) for y, w in zip(ys, want)), n
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="contiguous float32"):
        optim.stochastic_round_([(xs[1].to(torch.bfloat16), 9)])
