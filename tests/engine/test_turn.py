"""The turn grows with the RAM budget (plan.py): at every K the streamed step is plain autograd bit for
bit, the same bits as at every other K; a step cut short inside or below a larger turn resumes exactly;
and the saved-tensor bytes the plan counts per block are what autograd really keeps."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slowllama.blockfile import read_block
from slowllama.engine.optim import OptimConfig
from slowllama.engine.plan import cached_input_bytes, module_sizes, plan_step, saved_bytes_per_block
from slowllama.engine.store import BlockStore, prepare
from slowllama.engine.trainer import TrainConfig, Trainer, estimate_io
from slowllama.formats import open_checkpoint
from slowllama.formats.meta import MetaCheckpoint
from slowllama.model.lora import ADAPTERS, LoraConfig
from slowllama.model.transformer import ModelArgs, TransformerBlock
from tests.reference import random_batch, reference_model, reference_step, stored_params, whole_store
from tests.streamed import steady_step_io, train_through_a_crash

CPU = torch.device("cpu")
SGD = OptimConfig("sgd", lr=0.05, momentum=0.9)
ADAMW = OptimConfig("adamw", lr=1e-2, weight_decay=0.01)
ALL = 99  # more blocks than any test model has: the whole model


def measured_saved_bytes(args: ModelArgs, rows: int, seq: int, dtype: torch.dtype, dropout: float) -> int:
    """What autograd keeps for one block's forward with grad: every saved tensor's storage, once,
    the parameters left out."""
    block = TransformerBlock(args, dropout).to(dtype)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randn(rows, seq, args.dim, dtype=dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = block(x)
    del y
    return sum(seen.values())


GEMMA = dict(dim=64, n_heads=4, n_kv_heads=2, norm_plus_one=True, post_norms=True, hidden_act="gelu_pytorch_tanh",
             query_pre_attn_scalar=24, layer_windows=[8])


@pytest.mark.parametrize("shape", [dict(dim=64, n_heads=4, n_kv_heads=2), dict(dim=96, n_heads=6),
                                   dict(dim=64, n_heads=4, head_dim=32, ffn_dim_multiplier=1.3),
                                   dict(dim=64, n_heads=4, n_kv_heads=2, qk_norm=True, sliding_window=8),
                                   dict(GEMMA, attn_softcap=50.0), dict(GEMMA, qk_norm=True),
                                   dict(dim=64, n_heads=4, qk_norm=True, qk_norm_whole=True, norm_weight_fp32=True,
                                        pre_norms=False, post_norms=True),
                                   dict(dim=64, n_heads=4, n_kv_heads=2, rope_dim=12, sliding_window=8,
                                        rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 6,
                                                      "long_factor": [2.0] * 6, "original_max_position_embeddings": 8,
                                                      "attention_factor": 1.2}),
                                   dict(dim=64, n_heads=4, n_kv_heads=2, rope_layers=[False])],
                         ids=["gqa", "mha", "wide-heads", "qwen3-window", "gemma2", "gemma3", "olmo2", "phi4mini",
                              "smollm3-nope"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_saved_bytes_per_block_are_what_autograd_keeps(shape, dtype, dropout):
    args = ModelArgs(n_layers=1, vocab_size=128, **shape)
    for rows, seq in ((2, 16), (3, 40)):
        got = measured_saved_bytes(args, rows, seq, dtype, dropout)
        est = saved_bytes_per_block(args, rows, seq, dtype, dropout)
        assert got <= est <= 1.15 * got, (rows, seq, got, est)


def _run(store: BlockStore, work: Path, cfg: TrainConfig, batches):
    tr = Trainer(store, work, CPU, cfg)
    try:
        losses = [tr.train_step(*b).loss for b in batches]
        return losses, tr.plan
    finally:
        tr.close()


def test_every_turn_is_autograd_bit_for_bit(gqa_model, tmp_path, monkeypatch):
    """K = 0, 1, 2 and all (the embedding too: no recompute at all): losses and weights equal the
    in-memory reference exactly, the stores equal each other byte for byte, and only the modules
    below the turn run twice per micro-batch."""
    args = MetaCheckpoint(gqa_model).args
    batches = [random_batch(args.vocab_size, 4, 12, i) for i in range(2)]
    model = reference_model(gqa_model, dropout=0.1)
    opt = SGD.make(list(model.parameters()))
    ref_losses = [reference_step(model, opt, *b, seed=7, step=i, micro_batch=2) for i, b in enumerate(batches)]
    want = model.state_dict()
    calls: dict[str, int] = {}
    run = Trainer._run
    monkeypatch.setattr(Trainer, "_run", lambda self, i, *a, **kw: calls.update(
        {self.names[i]: calls.get(self.names[i], 0) + 1}) or run(self, i, *a, **kw))
    stores = {}
    for k in (0, 1, 2, ALL):
        calls.clear()
        cfg = TrainConfig(optim=SGD, seed=7, dropout=0.1, micro_batch=2, turn_blocks=k)
        store = prepare(MetaCheckpoint(gqa_model), tmp_path / f"s{k}")
        losses, plan = _run(store, tmp_path / f"w{k}", cfg, batches)
        n = len(store.trainable)
        assert plan.top == max(0, n - 3 - k)
        assert losses == ref_losses, k
        got = stored_params(store)
        for key in want:
            assert torch.equal(got[key], want[key]), (k, key)
        assert calls == {m: 2 * 2 * (2 if i < plan.top else 1) for i, m in enumerate(store.trainable)}, k
        stores[k] = whole_store(store)  # every tensor, version and the journal (its data checksums too)
    assert all(_diff(s, stores[0]) is None for s in stores.values())


# K = 0 and all of clipping and of tied models are checked against autograd in test_clipping.py and
# test_tied.py (budget 0 and no limit); LoRA and bf16 compute there run at K = 0 only.
@pytest.mark.parametrize("variant,ks", [("clip", (0, 1)), ("lora", (0, 1, ALL)), ("bf16-compute", (0, ALL))])
def test_the_turn_changes_no_bit(variant, ks, gqa_model, tmp_path):
    """Clipping's norm-only pass, LoRA (whose turn stops above the frozen embedding) and bf16 compute
    with a bf16 store: the same stores (or adapters) after two steps at each K."""
    kw = {"clip": dict(optim=ADAMW, clip_grad_norm=0.05),
          "lora": dict(optim=ADAMW, lora=LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv", "w2"))),
          "bf16-compute": dict(optim=SGD, compute_dtype=torch.bfloat16, act_dtype=torch.bfloat16)}[variant]
    ckpt = open_checkpoint(gqa_model)
    batches = [random_batch(ckpt.args.vocab_size, 4, 12, 20 + i) for i in range(2)]
    results, tops = [], []
    for k in ks:
        store_dtype = ckpt.checkpoint_dtype() if variant == "lora" else (
            torch.bfloat16 if variant == "bf16-compute" else torch.float32)
        store = prepare(ckpt, tmp_path / f"s{k}", store_dtype)
        cfg = TrainConfig(seed=3, dropout=0.1, micro_batch=2, turn_blocks=k, **kw)
        losses, plan = _run(store, tmp_path / f"w{k}", cfg, batches)
        tops.append(plan.top)
        if variant == "lora":
            ad = read_block(tmp_path / f"w{k}" / "lora_adapters.blk", ADAPTERS)
            state = {"journal": {}, "adapters": (ad.step, ad.params, ad.optim)}
        else:
            state = whole_store(store)
        results.append((losses, state))
    n = len(store.trainable)
    lowest = 1 if variant == "lora" else 0  # the turn never takes a frozen embedding
    assert tops == [max(lowest, n - 3 - k) for k in ks]
    for losses, state in results[1:]:
        assert losses == results[0][0] and _diff(state, results[0][1]) is None


def test_the_budget_sets_the_turn(gqa_model, tmp_path):
    """The budget goes to the activations first, then to blocks of the turn from the top down; the
    module cache gets the rest. 0: the minimal turn; no limit: the whole model."""
    store = prepare(MetaCheckpoint(gqa_model), tmp_path / "s")
    n = len(store.trainable)
    rows, seq = 4, 16

    def plan(budget, **kw):
        cfg = TrainConfig(optim=SGD, ram_budget=budget, micro_batch=2, **kw)
        return plan_step(cfg, store.args, module_sizes(store, cfg), rows, 2, seq)

    zero, unlimited = plan(0), plan(None)
    assert (zero.top, zero.turn_blocks, zero.acts_in_ram, zero.cache_budget) == (n - 3, 0, False, 0)
    assert (unlimited.top, unlimited.acts_in_ram) == (0, True) and unlimited.cache_budget == float("inf")
    cfg = TrainConfig(optim=SGD)
    acts = sum(cached_input_bytes(i, store.args, cfg, rows, seq) for i in range(n - 3))
    assert plan(acts).top == n - 3 and plan(acts).acts_in_ram and plan(acts - 1).acts_in_ram is False
    # Exactly what a turn of K blocks holds, with the activations below it: K; a byte less: K - 1.
    for k in range(1, n - 2):
        need = plan(None, turn_blocks=k)
        budget = need.turn_bytes + need.act_bytes
        assert plan(budget).turn_blocks == k and plan(budget).cache_budget == 0
        assert plan(budget - 1).turn_blocks == k - 1
        assert plan(budget + 12345).cache_budget == 12345
    # On CUDA the turn lives on the device: its free memory bounds K whatever the host budget.
    cfg = TrainConfig(optim=SGD, ram_budget=None, micro_batch=2)
    one = plan(None, turn_blocks=1).turn_bytes
    assert plan_step(cfg, store.args, module_sizes(store, cfg), rows, 2, seq, device_budget=one).turn_blocks == 1
    lora = plan(None, lora=LoraConfig(rank=2, alpha=4.0, targets=("wq",)))
    assert lora.top == 1  # LoRA's embedding is frozen: it stays below the turn


# In the second step, "backward" comes once per module from the top down, after the first step's 6:
# 6 + 3 is before layers.2 (the output and the norm committed), 6 + 5 before layers.0, 12 before the
# embedding. With K = 1 the turn is modules 2..5: the resumes begin inside it, at its lowest module
# and below it; with K = all the whole step was the turn.
@pytest.mark.parametrize("k,points,resumed_at", [(1, (9, 11, 12), [4, 2, 1]), (ALL, (12,), [1])])
def test_a_step_cut_short_inside_or_below_the_turn_resumes_bit_identically(gqa_model, tmp_path, monkeypatch, k,
                                                                            points, resumed_at):
    """The resume recomputes layer-major whatever K the step began with, and the reverse pass goes on
    with the turn's modules that were not yet committed: the same store as a run never cut short."""
    batches = [random_batch(256, 4, 8, i) for i in range(3)]
    cfg = TrainConfig(optim=ADAMW, seed=2, dropout=0.1, micro_batch=2, turn_blocks=k)
    resumed = []

    def run(root: Path, crash=None) -> BlockStore:
        store, first_updated, _ = train_through_a_crash(root, MetaCheckpoint(gqa_model), cfg, batches, monkeypatch,
                                                        crash)
        if crash is not None:
            resumed.append(first_updated)
        return store

    straight = run(tmp_path / "straight")
    want = whole_store(straight)
    assert len(straight.trainable) == 6  # tok_embeddings, layers.0-2, norm, output
    for j, n in enumerate(points):
        got = whole_store(run(tmp_path / f"crash{j}", ("backward", n)))
        assert _diff(got, want) is None, (n, _diff(got, want))
    assert resumed == resumed_at


def _diff(got: dict, want: dict):
    """The first difference between two whole_store snapshots, or None."""
    if got["journal"] != want["journal"]:
        return "journal"
    for m in want:
        if m == "journal":
            continue
        if got[m][0] != want[m][0]:
            return m
        for k, t in want[m][1].items():
            if not torch.equal(got[m][1][k], t):
                return f"{m}.{k}"
        for k, st in want[m][2].items():
            for s, t in st.items():
                if not torch.equal(got[m][2][k][s], t):
                    return f"{m}.{k}#{s}"
    return None


def test_the_estimate_follows_the_plan(gqa_model, tmp_path):
    """A middle budget: the bytes a step moves are what estimate_io says, and fewer than at budget 0
    (the turn's blocks are read once); the estimate carries the plan the trainer ran."""
    batches = [random_batch(256, 2, 16, i) for i in range(4)]
    moved = {}
    for name, budget in (("zero", 0), ("middle", None)):
        store = prepare(MetaCheckpoint(gqa_model), tmp_path / f"s{name}")
        if budget is None:  # room for the activations and a turn of two blocks, nothing more
            cfg = TrainConfig(optim=SGD, turn_blocks=2)
            p = plan_step(cfg, store.args, module_sizes(store, cfg), 2, 2, 16)
            budget = p.turn_bytes + p.act_bytes
        cfg = TrainConfig(optim=SGD, ram_budget=budget)
        est = estimate_io(store, cfg, (2, 16))
        tr = Trainer(store, tmp_path / f"w{name}", CPU, cfg)
        try:
            read, written = steady_step_io(tr, batches)
            assert tr.plan == est["plan"]
        finally:
            tr.close()
        assert read == pytest.approx(est["read"], rel=0.05), (name, est)
        assert written == pytest.approx(est["written"], rel=0.05), (name, est)
        moved[name] = (read, est["plan"].turn_blocks)
    assert moved["zero"][1] == 0 and moved["middle"][1] == 2
    assert moved["middle"][0] < moved["zero"][0]


def test_a_16_bit_store_is_cached_at_its_widened_size(gqa_model, tmp_path):
    """The streamer widens a bf16 store's modules to fp32 as it reads them, so the cache holds half as
    many as their files suggest: with a cache that holds all the files but not all the widened
    modules, the estimate counts the re-reads that happen."""
    store = prepare(MetaCheckpoint(gqa_model), tmp_path / "s", torch.bfloat16)
    batches = [random_batch(256, 2, 16, i) for i in range(4)]
    probe = TrainConfig(optim=SGD, turn_blocks=0)
    sizes = module_sizes(store, probe)
    p = plan_step(probe, store.args, sizes, 2, 2, 16)
    assert sum(s.file for s in sizes) < 0.8 * sum(s.ram for s in sizes)
    cfg = TrainConfig(optim=SGD, turn_blocks=0, ram_budget=p.act_bytes + sum(s.file for s in sizes))
    est = estimate_io(store, cfg, (2, 16))
    tr = Trainer(store, tmp_path / "w", CPU, cfg)
    try:
        read, _ = steady_step_io(tr, batches)
    finally:
        tr.close()
    assert read > 0.2 * est["store"]  # modules are read again: they do not all fit widened
    assert read == pytest.approx(est["read"], rel=0.05), est
