"""Tied embeddings (one matrix for the embedding and the output layer): streamed full fine-tuning
and LoRA equal in-memory autograd, the matrix is updated once per step, and a step cut short
anywhere in its reverse pass resumes bit for bit."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers

from slowllama import faults
from slowllama.engine.journal import Journal
from slowllama.engine.optim import OptimConfig
from slowllama.engine.store import BlockStore, prepare
from slowllama.engine.streamer import WriteError
from slowllama.engine.trainer import IGNORE, TrainConfig, Trainer, estimate_io
from slowllama.formats import open_checkpoint
from slowllama.formats.hf import export_hf
from slowllama.inference.evaluate import evaluate
from slowllama.inference.generate import ModuleCache, greedy
from slowllama.model.lora import Adapters, LoraConfig
from tests.reference import lora_reference, random_batch, reference_model, reference_step, stored_params, whole_store
from tests.streamed import steady_step_io

CPU = torch.device("cpu")
SGD = OptimConfig("sgd", lr=0.05, momentum=0.9)
ADAMW = OptimConfig("adamw", lr=1e-2, weight_decay=0.01)


def _store(folder: Path, root: Path) -> BlockStore:
    return prepare(open_checkpoint(folder), root)


def _batches(n: int, batch: int = 4, seq: int = 12):
    return [random_batch(256, batch, seq, 10 + i) for i in range(n)]


def test_store_keeps_an_empty_output_module(tied_hf, tmp_path):
    store = _store(tied_hf, tmp_path / "s")
    assert store.modules[-1] == "output" and store.read("output").params == {}
    assert "output.weight" not in [k for k, _, _ in store.tensors]
    model = reference_model(tied_hf)
    assert [n for n, _ in model.named_parameters()].count("tok_embeddings.weight") == 1
    assert not any(n.startswith("output") for n, _ in model.named_parameters())


@pytest.mark.parametrize("ram_budget", [0, None], ids=["grad-on-disk", "grad-in-ram"])
@pytest.mark.parametrize("optim", [SGD, ADAMW], ids=["sgd", "adamw"])
def test_streamed_steps_equal_the_in_memory_tied_model(tied_hf, tmp_path, monkeypatch, optim, ram_budget):
    kinds = []
    save = Journal.save_tied
    monkeypatch.setattr(Journal, "save_tied", lambda self, v, kind, t: kinds.append(kind) or save(self, v, kind, t))
    store = _store(tied_hf, tmp_path / "s")
    batches = _batches(3)
    tr = Trainer(store, tmp_path / "w", CPU, TrainConfig(optim=optim, seed=3, dropout=0.1, micro_batch=2,
                                                       ram_budget=ram_budget))
    losses = [tr.train_step(*b).loss for b in batches]
    tr.close()
    model = reference_model(tied_hf, dropout=0.1)
    opt = optim.make(model.parameters())
    want = [reference_step(model, opt, *b, seed=3, step=i, micro_batch=2) for i, b in enumerate(batches)]
    assert losses == pytest.approx(want, abs=1e-6)
    got = stored_params(store)
    ref = dict(model.named_parameters())
    assert set(got) == set(ref)
    for k, p in ref.items():
        torch.testing.assert_close(got[k], p.detach(), atol=1e-6, rtol=0, msg=k)
    start = dict(reference_model(tied_hf).named_parameters())
    assert not torch.equal(got["tok_embeddings.weight"], start["tok_embeddings.weight"])
    # Where the output side's gradient waited: on disk, or in RAM with the output's inputs on disk.
    assert kinds == ["grad" if ram_budget == 0 else "inputs"] * 3
    assert not (store.root / "tied.blk").exists() and store.journal()["version"] == 3
    assert store.read("output").step == 3 and store.verify() == []


def test_one_sgd_step_equals_transformers(tied_hf, tmp_path):
    store = _store(tied_hf, tmp_path / "s")
    x, y = random_batch(256, 2, 12, 5)
    tr = Trainer(store, tmp_path / "w", CPU, TrainConfig(optim=OptimConfig("sgd", lr=0.5)))
    loss = tr.train_step(x, y).loss
    tr.close()
    hf = transformers.LlamaForCausalLM.from_pretrained(tied_hf, dtype=torch.float32)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    opt = torch.optim.SGD(hf.parameters(), lr=0.5)
    logits = hf(x).logits
    want = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
    want.backward()
    opt.step()
    assert loss == pytest.approx(want.item(), abs=1e-6)
    out = export_hf(tmp_path / "out", args=store.args, config_src=tied_hf / "config.json",
                    tensors=[(k, s, torch.float32) for k, s, _ in store.tensors], modules=store.modules,
                    read_module=store.module_tensors)
    got = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    for k, p in hf.state_dict().items():
        torch.testing.assert_close(got[k], p, atol=1e-5, rtol=0, msg=k)
    assert not torch.equal(got["model.embed_tokens.weight"],
                           transformers.LlamaForCausalLM.from_pretrained(tied_hf).state_dict()["model.embed_tokens.weight"])


def test_evaluation_and_generation_use_the_embedding_as_output(tied_hf, tmp_path):
    store = _store(tied_hf, tmp_path / "s")
    hf = transformers.LlamaForCausalLM.from_pretrained(tied_hf, dtype=torch.float32)
    x, y = random_batch(256, 2, 10, 7)
    total, n = evaluate(store.module_tensors, store.args, [(x, y)], CPU)
    got = total / n
    with torch.no_grad():
        want = F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item()
    assert got == pytest.approx(want, abs=1e-5)
    prompt = [1, 17, 42, 99]
    new = greedy(ModuleCache(store.args, store.module_tensors, CPU, torch.float32, budget=0), prompt, 6)
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(prompt):].tolist()
    assert new == ref


def test_lora_on_a_tied_model_equals_autograd(tied_hf, tmp_path):
    lora = LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv", "w2"))
    store = _store(tied_hf, tmp_path / "s")
    sums = {m: store.read(m).checksum for m in store.modules}
    batches = _batches(2)
    cfg = TrainConfig(optim=ADAMW, seed=4, dropout=0.1, micro_batch=2, lora=lora)
    tr = Trainer(store, tmp_path / "w", CPU, cfg)
    start = {m: {k: t.detach().clone() for k, t in tr.adapters.named(m).items()} for m in tr.adapters.params}
    losses = [tr.train_step(*b).loss for b in batches]
    tr.close()
    # The reference: plain hooks on the in-memory model, adapters starting where slowllama's did.
    model, ref = lora_reference(tied_hf, start, lora.targets, lora.alpha / lora.rank, dropout=0.1)
    opt = ADAMW.make([t for s in ref.values() for t in s.values()])
    want = [reference_step(model, opt, *b, seed=4, step=i, micro_batch=2) for i, b in enumerate(batches)]
    assert losses == pytest.approx(want, abs=1e-6)
    saved = Adapters.load(tmp_path / "w" / "lora_adapters.blk")
    for m, s in ref.items():
        for k, t in s.items():
            torch.testing.assert_close(saved.named(m)[k], t.detach(), atol=1e-6, rtol=0)
    assert {m: store.read(m).checksum for m in store.modules} == sums


# ---- crash consistency -------------------------------------------------------------------

class Crash(BaseException):
    """Stands for the process dying at a fault point."""


def crash_at(monkeypatch, event: str, file: str | None, n: int):
    """Raise Crash the n-th time `event` is reached (for file events: for that file)."""
    count = [0]

    def point(e):
        if e != event:
            return
        if file is not None and getattr(sys._getframe(1).f_locals.get("path"), "name", None) != file:
            return
        count[0] += 1
        if count[0] == n:
            raise Crash(f"{event}:{file}:{n}")
    monkeypatch.setattr(faults, "point", point)


def _assert_same(got: dict, want: dict):
    assert got["journal"] == want["journal"]
    for m in want:
        if m == "journal":
            continue
        step, params, optim = want[m]
        assert got[m][0] == step, m
        assert set(got[m][1]) == set(params) and set(got[m][2]) == set(optim), m
        for k, t in params.items():
            assert torch.equal(got[m][1][k], t), f"{m}.{k} differs"
        for k, st in optim.items():
            for s, t in st.items():
                assert torch.equal(got[m][2][k][s], t), f"{m}.{k}#{s} differs"


# Modules: tok_embeddings, layers.0, layers.1, norm, output.
CRASHES = [  # (event, file, n): the second step of three, from the top of its reverse pass down
    ("backward", None, 6),                          # before anything of the step is written
    ("before_rename", "tied.blk", 2),               # the partial gradient not yet durable
    ("after_rename", "tied.blk", 2),                # durable, the output not yet committed
    ("after_rename", "output.blk", 2),              # the output committed: recovery needs tied.blk
    ("backward", None, 9),                          # before layers.0: norm and layers.1 committed
    ("before_rename", "tok_embeddings.blk", 2),     # just before the embedding's commit
    ("after_rename", "tok_embeddings.blk", 2),      # just after it, the journal not yet idle
]


@pytest.mark.parametrize("ram_budget", [0, None], ids=["grad-on-disk", "grad-in-ram"])
def test_a_step_cut_short_resumes_bit_identically(tied_hf, tmp_path, monkeypatch, ram_budget):
    batches = _batches(3)
    cfg = TrainConfig(optim=ADAMW, seed=2, dropout=0.1, micro_batch=2, ram_budget=ram_budget)

    resumed = []  # the first module already updated, at each resume

    def run(root: Path, crash=None) -> BlockStore:
        store = _store(tied_hf, root / "s")
        tr = Trainer(store, root / "w", CPU, cfg)
        if crash is not None:
            with monkeypatch.context() as mp:
                crash_at(mp, *crash)
                with pytest.raises((Crash, WriteError)):
                    for b in batches:
                        tr.train_step(*b)
                try:
                    tr.close()
                except WriteError:
                    pass  # the "crash" stopped the writer
            store = BlockStore(root / "s")  # a new process
            tr = Trainer(store, root / "w", CPU, cfg)
            resumed.append(tr.update.resume_point().first_updated)
            tr.recover(lambda s: batches[s])
        for b in batches[tr.step:]:
            tr.train_step(*b)
        tr.close()
        return BlockStore(root / "s")

    want = whole_store(run(tmp_path / "straight"))
    for j, crash in enumerate(CRASHES):
        got = run(tmp_path / f"crash{j}", crash)
        _assert_same(whole_store(got), want)
        assert not (got.root / "tied.blk").exists()
    # From the top three times, then with the output, everything but layers.0 and the embedding,
    # everything but the embedding, and everything already updated.
    assert resumed == [5, 5, 5, 4, 2, 1, 0]


def test_estimate_counts_the_tied_read_and_gradient(tied_hf, tmp_path):
    batches = _batches(4, batch=2, seq=16)
    lora = LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv"))
    for ram_budget, lora in ((0, None), (None, None), (0, lora)):
        cfg = TrainConfig(optim=SGD, ram_budget=ram_budget, lora=lora)
        store = _store(tied_hf, tmp_path / f"s{ram_budget}{lora is not None}")
        est = estimate_io(store, cfg, (2, 16))
        tr = Trainer(store, tmp_path / f"w{ram_budget}{lora is not None}", CPU, cfg)
        read, written = steady_step_io(tr, batches)
        tr.close()
        assert read == pytest.approx(est["read"], rel=0.05), (ram_budget, est)
        assert written == pytest.approx(est["written"], rel=0.05), (ram_budget, est)
        matrix = 256 * 64 * 4  # the output side's gradient, fp32
        if lora is not None:  # the base never changes: only the embedding read at the turn
            assert est["tied"] == store.path("tok_embeddings").stat().st_size
        elif ram_budget == 0:  # the embedding read at the turn, the gradient written and read back
            assert est["tied"] > 3 * matrix
        else:  # only the output layer's inputs, written
            assert 2 * 16 * 64 * 4 <= est["tied"] < matrix / 4
