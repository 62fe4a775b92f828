"""Qwen2 and Qwen3 Hugging Face folders: q/k/v (and o) biases and per-head q/k norms, against transformers.

The models are tiny random ones that transformers builds and saves here; its logits, its SGD step and
its files are the references. The helpers are test_hf_training's, which check Llama the same way.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from slowllama.errors import ConfigError
from slowllama.formats import open_checkpoint
from slowllama.formats.hf import args_from_config
from slowllama.model.transformer import KVCache
from tests.engine.test_hf_training import (
    VOCAB,
    assert_round_trip_bit_identical,
    assert_streamed_adamw_steps_within_fp32_noise,
    assert_streamed_sgd_step_equals_transformers,
    in_memory_model,
    model_maker,
)
from tests.streamed import assert_cut_short_step_resumes_bit_identically

transformers = pytest.importorskip("transformers")

# name -> make_model arguments; each moves every weight (biases and q/k norms too) off its init.
VARIANTS = {
    "qwen2": dict(kind="qwen2"),
    "qwen2_tied": dict(kind="qwen2", tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    # head_dim 32 differs from hidden_size / heads (16), as in the real Qwen3s
    "qwen3": dict(kind="qwen3", head_dim=32),
    "qwen3_bias": dict(kind="qwen3", head_dim=32, attention_bias=True),
}
# What each variant's attention holds, as ModelArgs says it.
FLAGS = {"qwen2": (True, False, False), "qwen2_tied": (True, False, False), "qwen3": (False, False, True),
         "qwen3_bias": (True, True, True)}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return model_maker(tmp_path_factory, VARIANTS)


def tokens(seed: int, n: int = 12):
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_in_memory_logits_equal_transformers(qwen, variant):
    folder = qwen(variant)
    args = open_checkpoint(folder).args
    assert (args.qkv_bias, args.o_bias, args.qk_norm) == FLAGS[variant]
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    x = tokens(0)
    with torch.no_grad():
        torch.testing.assert_close(in_memory_model(folder)(x), ref(x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["qwen2", "qwen3_bias"])
def test_kv_cached_decoding_equals_transformers(qwen, variant):
    """Generation's path: a prompt, then one token at a time through the KV cache."""
    folder = qwen(variant)
    model = in_memory_model(folder)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    x = tokens(1)
    kv = KVCache(model.args, 2, x.shape[1], torch.device("cpu"), torch.float32)
    out = []
    with torch.no_grad():
        for chunk in (x[:, :8], *x[:, 8:].split(1, dim=1)):
            kv.advance(torch.ones_like(chunk, dtype=torch.bool))
            h = model.tok_embeddings(chunk)
            for i, layer in enumerate(model.layers):
                h = layer(h, kv, i)
            out.append(model.output(model.norm(h)))
        torch.testing.assert_close(torch.cat(out, 1), ref(x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["qwen2", "qwen3_bias"])
def test_streamed_sgd_step_equals_transformers(qwen, variant, tmp_path):
    assert_streamed_sgd_step_equals_transformers(qwen(variant), tmp_path)


@pytest.mark.parametrize("variant", ["qwen2_tied", "qwen3_bias"])
def test_import_export_without_training_is_bit_identical(qwen, variant, tmp_path):
    assert_round_trip_bit_identical(qwen(variant), tmp_path)


def edited(folder, tmp_path, **changes):
    out = shutil.copytree(folder, tmp_path / "edited")
    raw = json.loads((out / "config.json").read_text())
    raw.update(changes)
    (out / "config.json").write_text(json.dumps(raw))
    return out / "config.json"


@pytest.mark.parametrize("changes, named", [
    (dict(architectures=["Qwen2MoeForCausalLM"]), "Qwen2MoeForCausalLM"),
    (dict(model_type="qwen2_moe"), "qwen2_moe"),
    # a sliding layer with no window to slide: transformers cannot build it either
    (dict(layer_types=["full_attention", "sliding_attention"], use_sliding_window=False), "layer_types"),
    (dict(layer_types=["full_attention", "chunked_attention"]), "layer_types"),
])
def test_unknown_architectures_and_windowless_sliding_layers_are_refused_by_name(qwen, tmp_path, changes, named):
    with pytest.raises(ConfigError, match=named):
        args_from_config(edited(qwen("qwen2"), tmp_path, **changes))


def test_a_sliding_window_config_that_slides_no_layer_is_accepted(qwen, tmp_path):
    """Qwen2.5's own configs: use_sliding_window false beside a sliding_window value, which transformers ignores."""
    args = args_from_config(edited(qwen("qwen2"), tmp_path, layer_types=None, use_sliding_window=False,
                                   sliding_window=131072, max_window_layers=1))
    assert args.sliding_window is None and args.qkv_bias


@pytest.mark.parametrize("variant", ["qwen2", "qwen3_bias"])
def test_lora_adapters_export_to_what_peft_computes(qwen, variant, tmp_path):
    """LoRA needs nothing of its own: the biases and q/k norms stay in the base, adapters add to the projections."""
    peft = pytest.importorskip("peft")
    from slowllama.formats.peft import export_peft
    from tests.formats.test_peft import IDS, random_adapters, slowllama_logits

    folder = qwen(variant)
    args = open_checkpoint(folder).args
    adapters = random_adapters(args)
    out = export_peft(tmp_path / "adapter", adapters, args, str(folder))
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(IDS).logits
        got = peft.PeftModel.from_pretrained(base, out).eval()(IDS).logits
    assert (got - plain).abs().max() > 1e-2  # the adapters change the output
    torch.testing.assert_close(got, slowllama_logits(folder, adapters), rtol=0, atol=1e-5)


def test_a_qwen3_folder_without_its_q_norm_is_refused_by_name(qwen, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(qwen("qwen3"), tmp_path / "m")
    sd = load_file(folder / "model.safetensors")
    del sd["model.layers.1.self_attn.q_norm.weight"]
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="missing tensor 'model.layers.1.self_attn.q_norm.weight'"):
        open_checkpoint(folder)


def test_a_llama_config_json_cannot_be_written_for_qwen_attention():
    from slowllama.formats.hf import config_from_args
    from slowllama.model.transformer import ModelArgs

    with pytest.raises(ConfigError, match="qk_norm"):
        config_from_args(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=256, qk_norm=True), "float32")


def test_finetune_cli_trains_a_qwen3_folder_and_exports_what_transformers_loads(qwen, tmp_path):
    from tests.engine.test_hf_training import finetune_cli

    folder = qwen("qwen3_bias")
    r, out = finetune_cli(folder, tmp_path, "--iters", "1", "--lr", "0.05", "--prompt", "The quick", "--gen-tokens", "3")
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").read_bytes() == (folder / "config.json").read_bytes()
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    before = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    attn, ref = model.model.layers[0].self_attn, before.model.layers[0].self_attn
    for name in ("q_proj.bias", "o_proj.bias", "q_norm.weight", "k_norm.weight"):  # trained like any other weight
        assert not torch.equal(attn.get_parameter(name), ref.get_parameter(name)), name


@pytest.mark.parametrize("variant", ["qwen2", "qwen3_bias"])
def test_two_streamed_adamw_steps_stay_within_transformers_own_fp32_noise(qwen, variant, tmp_path):
    assert_streamed_adamw_steps_within_fp32_noise(qwen(variant), tmp_path)


def test_a_qwen3_step_cut_short_resumes_bit_identically(qwen, tmp_path, monkeypatch):
    assert_cut_short_step_resumes_bit_identically(qwen("qwen3_bias"), tmp_path, monkeypatch, VOCAB)
