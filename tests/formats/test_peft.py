"""PEFT's LoRA format: what export_peft writes, peft loads and computes with; what peft writes, load_peft reads.

The references are transformers' LlamaForCausalLM and peft's PeftModel (its adapters in the forward, and
its own merge_and_unload). The model has grouped-query attention, so wk's RoPE permutation acts on
n_kv_heads rows, not n_heads.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slowllama.errors import ConfigError
from slowllama.formats.hf import HFCheckpoint
from slowllama.formats.peft import CONFIG_FILE, WEIGHTS_FILE, export_peft, load_peft
from slowllama.model.lora import TARGETS, Adapters, LoraConfig, _shape
from slowllama.model.transformer import Transformer, module_names
from slowllama.paths import owner_kind

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[1, 17, 93, 5, 200, 42, 7, 64, 128, 3, 255, 0]])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf_base")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    with torch.no_grad():  # off the init, so that no mapping error can hide behind ones and zeros
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return folder


def hf_model(folder: Path):
    return transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def random_adapters(args, rank=4, alpha=6.0, seed=1) -> Adapters:
    g = torch.Generator().manual_seed(seed)
    params = {}
    for i in range(args.n_layers):
        params[f"layers.{i}"] = {t: (torch.randn(rank, _shape(args, t)[1], generator=g) * 0.1,
                                     torch.randn(_shape(args, t)[0], rank, generator=g) * 0.1) for t in TARGETS}
    return Adapters(LoraConfig(rank=rank, alpha=alpha, targets=tuple(TARGETS)), params)


def slowllama_logits(base: Path, adapters: Adapters) -> torch.Tensor:
    """The base with the adapters merged as slowllama merges them, run whole in memory."""
    ckpt = HFCheckpoint(base)
    model = Transformer(ckpt.args)
    state = {}
    for m in module_names(ckpt.args):
        state.update({f"{m}.{k}": v for k, v in adapters.merge(m, ckpt.read_module(m)).items()})
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model(IDS)


def test_export_loads_in_peft_and_computes_the_merged_model(base_dir, tmp_path):
    args = HFCheckpoint(base_dir).args
    adapters = random_adapters(args)
    out = export_peft(tmp_path / "adapter", adapters, args, str(base_dir))
    assert sorted(p.name for p in out.iterdir()) == [".slowllama", CONFIG_FILE, WEIGHTS_FILE]
    assert owner_kind(out) == "export"
    config = json.loads((out / CONFIG_FILE).read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (4, 6, sorted(HF_TARGETS))

    model = peft.PeftModel.from_pretrained(hf_model(base_dir), out).eval()
    # Every tensor of the file is in the model, and the model has no LoRA weight the file lacks.
    saved = load_file(out / WEIGHTS_FILE)
    loaded = peft.get_peft_model_state_dict(model)
    assert sorted(loaded) == sorted(saved) and len(saved) == 2 * 7 * 2
    for k, v in saved.items():
        assert torch.equal(loaded[k], v), k
    with torch.no_grad():
        got = model(IDS).logits
        ref = slowllama_logits(base_dir, adapters)
        plain = hf_model(base_dir)(IDS).logits
        merged = model.merge_and_unload()(IDS).logits
    assert (got - plain).abs().max() > 1e-2  # the adapters change the output
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged, ref, rtol=0, atol=1e-5)


def test_load_peft_round_trips_bit_identically(base_dir, tmp_path):
    args = HFCheckpoint(base_dir).args
    adapters = random_adapters(args, rank=3, alpha=5.5)
    back = load_peft(export_peft(tmp_path / "a", adapters, args, "base"), args)
    assert (back.cfg.rank, back.cfg.alpha, set(back.cfg.targets)) == (3, 5.5, set(TARGETS))
    assert set(back.params) == set(adapters.params)
    for m, layer in adapters.params.items():
        assert set(back.params[m]) == set(layer)
        for t, (a, b) in layer.items():
            assert torch.equal(back.params[m][t][0], a) and torch.equal(back.params[m][t][1], b), (m, t)


def test_load_peft_reads_what_peft_saves(base_dir, tmp_path):
    """An adapter that peft itself initialised and saved gives the logits peft computes with it."""
    torch.manual_seed(3)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"], lora_dropout=0.0,
                          init_lora_weights=False, task_type="CAUSAL_LM")
    model = peft.get_peft_model(hf_model(base_dir), cfg).eval()
    model.save_pretrained(tmp_path / "p")
    with torch.no_grad():
        want = model(IDS).logits
    adapters = load_peft(tmp_path / "p", HFCheckpoint(base_dir).args)
    assert set(adapters.cfg.targets) == {"wq", "wk", "w2"} and adapters.cfg.scale == 2.0
    torch.testing.assert_close(slowllama_logits(base_dir, adapters), want, rtol=0, atol=1e-5)


def _edit(folder: Path, config=None, tensors=None):
    if config:
        raw = json.loads((folder / CONFIG_FILE).read_text())
        config(raw)
        (folder / CONFIG_FILE).write_text(json.dumps(raw))
    if tensors:
        t = load_file(folder / WEIGHTS_FILE)
        tensors(t)
        save_file(t, folder / WEIGHTS_FILE)


K = "base_model.model.model.layers.1.self_attn.k_proj"


@pytest.mark.parametrize("config,tensors,match", [
    (lambda c: c.update(use_dora=True), None, "adapter_config.json: use_dora True is not supported"),
    (lambda c: c.update(peft_type="IA3"), None, "adapter_config.json: peft_type 'IA3' is not supported"),
    (lambda c: c.update(rank_pattern={"q_proj": 2}), None, "adapter_config.json: rank_pattern"),
    (lambda c: c.pop("r"), None, "adapter_config.json: r is missing"),
    (None, lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}),
     "unexpected tensor 'base_model.model.lm_head.lora_A.weight'"),
    (None, lambda t: t.pop(f"{K}.lora_B.weight"), "model.layers.1.self_attn.k_proj lacks its lora_B"),
    (None, lambda t: t.update({f"{K}.lora_B.weight": torch.zeros(64, 4)}),
     r"k_proj has lora_A \[4, 64\] and lora_B \[64, 4\], this model with r=4 needs \[4, 64\] and \[32, 4\]"),
    (None, lambda t: [t.pop(k) for k in list(t) if ".layers.1." in k], "adapters on 1 layers"),
], ids=["dora", "ia3", "rank_pattern", "no r", "lm_head", "no B", "B shape", "layer missing"])
def test_load_peft_refuses_what_it_cannot_represent(base_dir, tmp_path, config, tensors, match):
    args = HFCheckpoint(base_dir).args
    out = export_peft(tmp_path / "a", random_adapters(args), args, "base")
    _edit(out, config, tensors)
    with pytest.raises(ConfigError, match=match):
        load_peft(out, args)


def test_export_peft_refuses_a_folder_of_the_user(base_dir, tmp_path):
    args = HFCheckpoint(base_dir).args
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="holds files slowllama did not write"):
        export_peft(tmp_path / "mine", random_adapters(args), args, "base")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_merge_lora_writes_a_hugging_face_folder_equal_to_peft_s_merge(base_dir, tmp_path):
    """tools/merge_lora.py on an HF base and a PEFT folder: transformers loads the result, whose logits are
    those of peft's merge_and_unload."""
    from slowllama.cli import merge_lora

    args = HFCheckpoint(base_dir).args
    adapter = export_peft(tmp_path / "adapter", random_adapters(args, seed=7), args, str(base_dir))
    assert merge_lora.main([str(base_dir), str(adapter), str(tmp_path / "merged")]) == 0
    merged = tmp_path / "merged"
    assert owner_kind(merged) == "export"
    assert json.loads((merged / "config.json").read_text()) == json.loads((base_dir / "config.json").read_text())
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(hf_model(base_dir), adapter).merge_and_unload()(IDS).logits
        got = hf_model(merged)(IDS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert merge_lora.main([str(base_dir), str(adapter), str(tmp_path / "m2"), "--shards", "2"]) == 2
