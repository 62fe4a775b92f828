"""AdamW steps cache-sized chunks of each tensor on cpu (optim.step_module): every optimizer and option
slowllama offers, chunked or not, must give torch's step on the whole tensors bit for bit, state included."""
import pytest
import torch

from slowllama.engine import optim
from slowllama.engine.optim import OptimConfig, step_module

# Tensors of 1, 2, 5 and 64 chunks; 1000 is not a multiple of a vector width, so every chunk ends in a scalar tail.
SHAPES = [(37, 101), (5000,), (999,), (3, 7), (1001,), (64, 64, 3)]
CONFIGS = [OptimConfig("sgd", lr=0.1), OptimConfig("sgd", lr=0.1, momentum=0.9, weight_decay=0.01),
           OptimConfig("adamw", lr=1e-2, weight_decay=0.1), OptimConfig("adamw", lr=3e-3, betas=(0.8, 0.95))]


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(optim, "STEP_CHUNK", 1000)


def _tensors(seed: int, steps: int):
    g = torch.Generator().manual_seed(seed)
    init = {f"p{i}": torch.randn(s, generator=g) for i, s in enumerate(SHAPES)}
    grads = [{k: torch.randn(v.shape, generator=g) for k, v in init.items()} for _ in range(steps)]
    return init, grads


def _streamed_steps(cfg, init, grads, state_dtype=None):
    """step_module over `grads`, the state kept between steps as the store keeps it (in state_dtype)."""
    weights, state = {k: v.clone() for k, v in init.items()}, {}
    for g in grads:
        params = {k: torch.nn.Parameter(v) for k, v in weights.items()}
        for k, p in params.items():
            p.grad = g[k].clone()
        state = step_module(cfg, params, state)
        if state_dtype is not None:
            state = {k: {s: v.to(state_dtype) if v.ndim else v for s, v in st.items()} for k, st in state.items()}
        weights = {k: p.detach() for k, p in params.items()}
    return weights, state


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.name}-m{c.momentum}-wd{c.weight_decay}")
def test_chunked_step_equals_torch_on_whole_tensors(small_chunks, cfg, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        init, grads = _tensors(1, 3)
        ref = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
        opt = cfg.make(list(ref.values()))
        for g in grads:
            for k, p in ref.items():
                p.grad = g[k].clone()
            opt.step()
        weights, state = _streamed_steps(cfg, init, grads)
    finally:
        torch.set_num_threads(before)
    for k, p in ref.items():
        assert torch.equal(weights[k], p.detach()), k
        want = {s: v for s, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
        assert set(state.get(k, {})) == set(want), k
        for s, v in want.items():
            assert state[k][s].shape == v.shape and torch.equal(state[k][s], v), (k, s)


def test_chunked_step_with_16_bit_moments_equals_the_unchunked_one(small_chunks, monkeypatch):
    """Moments stored in bf16 are widened, stepped in chunks and returned whole, as without chunks."""
    cfg = CONFIGS[2]
    init, grads = _tensors(2, 3)
    chunked = _streamed_steps(cfg, init, grads, torch.bfloat16)
    monkeypatch.setattr(optim, "STEP_CHUNK", 1 << 30)
    whole = _streamed_steps(cfg, init, grads, torch.bfloat16)
    for k in init:
        assert torch.equal(chunked[0][k], whole[0][k]), k
        for s, v in whole[1][k].items():
            assert torch.equal(chunked[1][k][s], v), (k, s)


def test_the_state_returned_is_whole_tensors_not_views_of_a_chunk(small_chunks):
    init, grads = _tensors(3, 1)
    _, state = _streamed_steps(CONFIGS[2], init, grads)  # AdamW's first moments: made here, viewed by the chunks
    for k in ("exp_avg", "exp_avg_sq"):
        m = state["p1"][k]
        assert m.shape == (5000,) and m.is_contiguous() and m.untyped_storage().nbytes() == 5000 * 4
    assert float(state["p1"]["step"]) == 1.0


def test_a_parameter_that_is_not_contiguous_steps_whole(small_chunks):
    p = torch.nn.Parameter(torch.randn(100, 50).t())
    p.grad = torch.randn(50, 100)
    ref = torch.nn.Parameter(p.detach().clone())
    ref.grad = p.grad.clone()
    CONFIGS[2].make([ref]).step()
    assert len(optim._chunks(p, {})) == 1
    step_module(CONFIGS[2], {"w": p}, {})
    assert torch.equal(p.detach(), ref.detach())


def test_only_adamw_on_cpu_is_chunked(small_chunks):
    """On a GPU a chunk would launch each operation once more for nothing (the logic, checked on meta);
    SGD's one or two passes gain nothing from cache."""
    adamw, sgd = CONFIGS[2], CONFIGS[1]
    assert optim._chunked(adamw, torch.empty(5000)) and not optim._chunked(adamw, torch.empty(1000))
    assert not optim._chunked(adamw, torch.empty(5000, device="meta"))
    assert not optim._chunked(sgd, torch.empty(5000)) and not optim._chunked(CONFIGS[0], torch.empty(5000))
