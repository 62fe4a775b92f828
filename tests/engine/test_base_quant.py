"""--base-quant: a LoRA run on a base whose blocks' linear weights are stored as NF4 or int8.

The references: torchao's own quantization (NF4Tensor, Int8Tensor) of the checkpoint's tensors, the plain
in-memory LoRA step on torchao's dequantized weights, and peft on the original model. The tiny models'
linear weights hold a multiple of 64 x 256 weights, as NF4's double quantization needs.
"""
from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

from slowllama.engine.optim import OptimConfig
from slowllama.engine.plan import module_sizes, resident_budget
from slowllama.engine.quant import PARTS, SEP, check_quantizable, part_shapes
from slowllama.engine.store import prepare
from slowllama.engine.trainer import TrainConfig, Trainer, estimate_io
from slowllama.errors import ConfigError
from slowllama.formats import open_checkpoint
from slowllama.model.lora import TARGETS, Adapters, LoraConfig
from slowllama.model.transformer import Transformer, module_names
from tests.engine.test_hf_training import TEXT, VOCAB, make_model
from tests.reference import (
    lora_reference,
    random_batch,
    reference_backward,
    reference_model,
    reference_step,
)
from tests.streamed import CPU, steady_step_io, train_through_a_crash

torchao = pytest.importorskip("torchao")
from torchao.quantization.granularity import PerRow
from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor
from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

# dim 128: every projection is (128 or 256) x (128 or 256); Qwen3's head_dim 32 with per-head q/k norms.
SHAPES = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 4}
MODELS = {"llama": dict(kind="llama", **SHAPES), "qwen3": dict(kind="qwen3", head_dim=32, **SHAPES),
          "llama_gqa": dict(kind="llama", **{**SHAPES, "num_key_value_heads": 2})}  # wk: 64 x 128, not NF4's
LORA = LoraConfig(rank=4, alpha=8.0, targets=tuple(TARGETS))
ADAMW = OptimConfig("adamw", lr=1e-2, weight_decay=0.01)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = make_model(tmp_path_factory.mktemp(name), **MODELS[name])
        return made[name]
    return get


def torchao_parts(kind: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """What torchao makes of w, by the names of the store's parts."""
    if kind == "nf4":
        q = to_nf4(w, 64, 256)
        return {"nf4.data": q.quantized_data, "nf4.scalers": q.quantized_scalers,
                "nf4.factor": q.quantization_factor, "nf4.mean": q.scaler_mean}
    q = Int8Tensor.from_hp(w, PerRow())
    return {"int8.q": q.qdata, "int8.scale": q.scale}


def torchao_dequantized(kind: str, w: torch.Tensor) -> torch.Tensor:
    return to_nf4(w, 64, 256).get_original_weight() if kind == "nf4" else Int8Tensor.from_hp(w, PerRow()).dequantize()


def dequantized_reference(folder, kind: str, dropout: float):
    """The in-memory model with every block's linear weights replaced by torchao's round trip of them."""
    ref = reference_model(folder, dropout=dropout)
    with torch.no_grad():
        for layer in ref.layers:
            for path in TARGETS.values():
                w = layer.get_submodule(path).weight
                w.copy_(torchao_dequantized(kind, w))
    return ref


@pytest.mark.parametrize("name, kind", [("qwen3", "nf4"), ("llama_gqa", "int8")])
def test_stored_weights_are_torchaos_quantization_and_the_rest_the_checkpoints(model, tmp_path, name, kind):
    ckpt = open_checkpoint(model(name))
    store = prepare(ckpt, tmp_path / "base", ckpt.checkpoint_dtype(), base_quant=kind)
    assert store.base_quant == kind
    for m in store.trainable:
        source, stored = ckpt.read_module(m), store.read(m).params
        plain = {k for k in stored if SEP not in k}
        quantized = set(source) - plain
        assert quantized == ({f"{p}.weight" for p in TARGETS.values()} if m.startswith("layers.") else set())
        for k in plain:  # norms (Qwen3's q/k norms too), embedding, output: the checkpoint's bytes
            assert stored[k].dtype == source[k].dtype and torch.equal(stored[k], source[k]), (m, k)
        for k in quantized:
            want = torchao_parts(kind, source[k])
            assert set(want) == set(PARTS[kind])
            assert part_shapes(kind, source[k].shape, source[k].dtype) == {
                p: (stored[f"{k}{SEP}{p}"].dtype, tuple(stored[f"{k}{SEP}{p}"].shape)) for p in want}
            for part, t in want.items():
                got = stored[f"{k}{SEP}{part}"]
                assert got.dtype == t.dtype and torch.equal(got.flatten(), t.flatten()), (m, k, part)
            # What evaluation and generation read: torchao's dequantization, in the checkpoint's dtype.
            assert torch.equal(store.module_tensors(m)[k], torchao_dequantized(kind, source[k]))
        if m.startswith("layers."):  # 4.1 bits a weight (NF4 and its scales), or 8 and a scale a row, of 32
            assert store.path(m).stat().st_size < (0.27 if kind == "int8" else 0.15) * sum(
                t.nbytes for t in source.values())


@pytest.mark.parametrize("name, kind", [("llama", "nf4"), ("qwen3", "nf4"), ("llama_gqa", "int8")])
def test_a_lora_step_on_a_quantized_base_equals_an_in_memory_step_on_the_dequantized_weights(model, tmp_path, name, kind):
    folder = model(name)
    ckpt = open_checkpoint(folder)
    batches = [random_batch(VOCAB, 4, 12, 30)]
    cfg = TrainConfig(optim=ADAMW, seed=4, dropout=0.1, micro_batch=2, lora=LORA)
    tr = Trainer(prepare(ckpt, tmp_path / "base", ckpt.checkpoint_dtype(), base_quant=kind), tmp_path / "w", CPU, cfg)
    start = {m: {k: t.detach().clone() for k, t in tr.adapters.named(m).items()} for m in tr.adapters.params}
    losses = [tr.train_step(*b).loss for b in batches]
    tr.close()
    ref_model, ref = lora_reference(folder, start, LORA.targets, LORA.scale, model=dequantized_reference(folder, kind, 0.1))
    opt = ADAMW.make([t for s in ref.values() for t in s.values()])
    want = [reference_step(ref_model, opt, *b, seed=4, step=i, micro_batch=2) for i, b in enumerate(batches)]
    assert losses == pytest.approx(want, abs=1e-6)
    saved = Adapters.load(tmp_path / "w" / "lora_adapters.blk")
    for m, s in ref.items():
        for k, t in s.items():
            torch.testing.assert_close(saved.named(m)[k], t.detach(), atol=1e-6, rtol=0)
    # Not the original weights' step: the quantization shows in the loss.
    plain_model, _ = lora_reference(folder, start, LORA.targets, LORA.scale, dropout=0.1)
    plain = reference_backward(plain_model, *batches[0], seed=4, step=0, micro_batch=2)
    assert abs(plain - losses[0]) > 1e-4


def test_a_budget_that_holds_the_quantized_base_reads_nothing_per_step(model, tmp_path):
    """The planner counts the quantized sizes: from resident_budget on, a step reads nothing of the NF4 base,
    while the same budget streams the float32 one; the estimate's bytes are the streamer's."""
    ckpt = open_checkpoint(model("llama"))
    stores = {q: prepare(ckpt, tmp_path / str(q), ckpt.checkpoint_dtype(), base_quant=q) for q in (None, "nf4")}
    cfg = TrainConfig(optim=ADAMW, seed=1, lora=LORA)
    fits = resident_budget(cfg, ckpt.args, module_sizes(stores["nf4"], cfg), 2, 12)
    assert fits < resident_budget(cfg, ckpt.args, module_sizes(stores[None], cfg), 2, 12)
    batches = [random_batch(VOCAB, 2, 12, 50 + i) for i in range(3)]
    reads = {}
    for q, budget in ((None, fits), ("nf4", fits), ("nf4", fits - 1)):
        run = dataclasses.replace(cfg, ram_budget=budget)
        est = estimate_io(stores[q], run, (2, 12))
        work = tmp_path / f"w{q}{budget}"
        work.mkdir()
        tr = Trainer(stores[q], work, CPU, run)
        reads[q, budget], _ = steady_step_io(tr, batches)
        tr.close()
        assert reads[q, budget] == est["read"] - est["activations"]  # the estimate's arithmetic is the streamer's
    assert reads["nf4", fits] == 0 and reads["nf4", fits - 1] > 0 and reads[None, fits] > 0


def test_kill_and_resume_of_a_quantized_base_lora_run_is_bit_identical(model, tmp_path, monkeypatch):
    ckpt = open_checkpoint(model("llama"))
    batches = [random_batch(VOCAB, 2, 12, 70 + i) for i in range(2)]
    cfg = TrainConfig(optim=ADAMW, seed=2, dropout=0.1, lora=LORA)

    def adapters(root):
        ad = Adapters.load(root / "w" / "lora_adapters.blk")
        return {m: ad.named(m) for m in ad.params}, ad.optim, ad.step

    train_through_a_crash(tmp_path / "plain", ckpt, cfg, batches, monkeypatch, base_quant="nf4")
    want = adapters(tmp_path / "plain")
    for event, n in (("forward", 7), ("backward", 7)):  # inside the second step: its forward, its reverse pass
        root = tmp_path / f"{event}{n}"
        train_through_a_crash(root, ckpt, cfg, batches, monkeypatch, crash=(event, n), base_quant="nf4")
        got = adapters(root)
        assert got[2] == want[2] == 2
        for m in want[0]:
            for k, t in want[0][m].items():
                assert torch.equal(got[0][m][k], t), (event, m, k)
            for k, state in want[1][m].items():
                assert all(torch.equal(got[1][m][k][s], v) for s, v in state.items()), (event, m, k)


def test_a_run_writes_peft_adapters_for_the_original_model_and_merges_into_its_original_weights(
        model, tmp_path, caplog, capsys):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from slowllama.formats.hf import HFCheckpoint
    from slowllama.run.loop import finetune

    folder = model("llama")
    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    with caplog.at_level(logging.INFO, logger="slowllama"):
        finetune(model_dir=str(folder), data=str(data), out=str(tmp_path / "out"), iters=2, seq_len=16, batch_size=2,
                 device="cpu", lora_rank=4, lora_targets="wq,wv,w2", optimizer="adamw", lr=0.05, base_quant="nf4",
                 merge=True, ram_budget="none", val_fraction=0.2, prompt="the", gen_tokens=2)
    out = tmp_path / "out"
    printed = capsys.readouterr().out
    assert "base: the blocks' linear weights in nf4" in printed and "stays resident" in printed
    logged = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in logged if "val_loss" in r] == [0, 2]  # validation and completions on the NF4 base
    assert [r["iter"] for r in logged if "completion" in r] == [0, 2]
    assert any("original weights" in r.getMessage() for r in caplog.records)
    ckpt = open_checkpoint(folder)
    ad = Adapters.load(out / "lora_adapters.blk")
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    x = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = base(x).logits
        tuned = peft.PeftModel.from_pretrained(base, out).eval()(x).logits
    assert not torch.allclose(plain, tuned, atol=1e-4)  # the adapters trained
    merged = HFCheckpoint(out)
    for m in (f"layers.{i}" for i in range(ckpt.args.n_layers)):
        want = ad.merge(m, ckpt.read_module(m))  # the adapters on the checkpoint's weights, not the NF4 ones
        got = merged.read_module(m)
        assert all(torch.equal(got[k], want[k]) for k in want), m
    # peft's adapters on the original model compute what the merged export does.
    mine = Transformer(ckpt.args)
    mine.load_state_dict({f"{m}.{k}": t for m in module_names(ckpt.args) for k, t in merged.read_module(m).items()})
    with torch.no_grad():
        torch.testing.assert_close(mine(x), tuned, atol=1e-5, rtol=0)


def test_unquantizable_shapes_and_full_fine_tuning_are_refused_in_one_line_before_any_work(model, tmp_path):
    from slowllama.run.loop import finetune

    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    run = {"data": str(data), "out": str(tmp_path / "out"), "iters": 1, "device": "cpu"}
    with pytest.raises(ConfigError, match=r"^--base-quant nf4: layers.0.attention.wk.weight \[64, 128\] has 8192 "):
        finetune(model_dir=str(model("llama_gqa")), lora_rank=4, base_quant="nf4", **run)
    with pytest.raises(ConfigError, match="^--base-quant needs --lora-rank"):
        finetune(model_dir=str(model("llama")), base_quant="nf4", **run)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()
    check_quantizable("int8", open_checkpoint(model("llama_gqa")).shapes)  # int8 takes any shape
