"""Phi-3 and Phi-4-mini Hugging Face folders against transformers: fused qkv_proj and gate_up_proj (split on import,
fused on export), partial rotary, LongRoPE (short factors up to original_max_position_embeddings tokens, long ones
beyond, cos and sin times its attention factor), and Phi-3's sliding window on every layer.

The models are tiny random ones that transformers builds and saves here. original_max_position_embeddings is 8, so
the 16-token training batches take the long factors, and generation starts short and switches to long on the way.
"""
from __future__ import annotations

import pytest
import torch

from slowllama.errors import ConfigError
from slowllama.formats import open_checkpoint
from slowllama.formats.hf import args_from_config
from tests.engine.test_hf_training import (
    VOCAB,
    assert_round_trip_bit_identical,
    assert_streamed_adamw_steps_within_fp32_noise,
    assert_streamed_sgd_step_equals_transformers,
    in_memory_model,
    model_maker,
)
from tests.formats.test_gemma import PAD
from tests.formats.test_qwen import edited
from tests.model.test_sliding_window import greedy_equals_generate

transformers = pytest.importorskip("transformers")

WINDOW, ORIGINAL = 4, 8


def longrope(n: int, **kw) -> dict:
    """LongRoPE parameters with n factors each (rotary_dim / 2), far enough apart to change every logit."""
    return {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0 + i / 2 for i in range(n)],
            "long_factor": [2.0 + i for i in range(n)], **kw}


VARIANTS = {
    # Phi-3-mini's shape: full rotary (head_dim 16, 8 factors), a window on every layer, untied
    "phi3": dict(kind="phi3", sliding_window=WINDOW, original_max_position_embeddings=ORIGINAL,
                 rope_parameters=longrope(8), pad_token_id=PAD),
    # Phi-4-mini's: partial_rotary_factor 0.75 (12 of 16 entries turn, 6 factors), tied, no window
    "phi4mini": dict(kind="phi3", tie_word_embeddings=True, original_max_position_embeddings=ORIGINAL,
                     rope_parameters=longrope(6, partial_rotary_factor=0.75), pad_token_id=PAD),
    # Phi-3 without rope scaling, a half rotary
    "phi3_plain": dict(kind="phi3", sliding_window=WINDOW, pad_token_id=PAD,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
}


@pytest.fixture(scope="module")
def phi(tmp_path_factory):
    return model_maker(tmp_path_factory, VARIANTS)


def reference(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_configs_read_as_transformers_builds_them(phi):
    import math

    p3, p4, plain = (open_checkpoint(phi(v)).args for v in ("phi3", "phi4mini", "phi3_plain"))
    assert p3.fused_proj and p3.sliding_window == WINDOW and p3.rotary_dim == 16 and not p3.tie_word_embeddings
    # transformers' default attention factor: sqrt(1 + log(max_position_embeddings / original) / log(original))
    assert p3.rope_scaling["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(128 / 8) / math.log(8)))
    assert p4.rotary_dim == 12 and p4.tie_word_embeddings and p4.sliding_window is None
    assert plain.rotary_dim == 8 and plain.rope_scaling is None


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("n", [ORIGINAL - 2, 2 * ORIGINAL])  # LongRoPE's short factors, then its long ones
def test_in_memory_logits_equal_transformers(phi, variant, n):
    folder = phi(variant)
    x = torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(in_memory_model(folder)(x), reference(folder)(x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["phi3", "phi4mini"])
def test_streamed_sgd_step_equals_transformers_and_the_export_loads_as_slowllama_computes_it(phi, variant, tmp_path):
    assert_streamed_sgd_step_equals_transformers(phi(variant), tmp_path)
    out = tmp_path / "out"
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(in_memory_model(out)(x), reference(out)(x).logits, atol=1e-5, rtol=0)


def test_two_streamed_adamw_steps_stay_within_transformers_own_fp32_noise(phi, tmp_path):
    # Phi-3's shape. (Phi-4-mini's tiny model has one weight whose gradient, 1.7e-7 among neighbours of 1e-2, lands
    # where AdamW's first step g / (|g| + eps) magnifies fp32's summation order 40 times: SGD checks that one.)
    assert_streamed_adamw_steps_within_fp32_noise(phi("phi3"), tmp_path)


@pytest.mark.parametrize("variant", ["phi3", "phi4mini"])
def test_import_export_without_training_is_bit_identical(phi, variant, tmp_path):
    assert_round_trip_bit_identical(phi(variant), tmp_path)


@pytest.mark.parametrize("variant", ["phi3", "phi4mini", "phi3_plain"])
@pytest.mark.parametrize("lengths", [(ORIGINAL - 2, 3), (3 * WINDOW, 2 * WINDOW + 1)])
def test_kv_cached_greedy_decoding_equals_generate(phi, variant, lengths):
    """Prompts longer than the window; the first pair starts within LongRoPE's short range and crosses into the long
    one, where transformers drops its cache and recomputes every token with the long factors."""
    g = torch.Generator().manual_seed(2)
    greedy_equals_generate(phi(variant), [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths], 6)


@pytest.mark.parametrize("variant", ["phi3", "phi4mini"])
@pytest.mark.parametrize("targets", [None, ("wq", "wv", "w3", "w2")])
def test_lora_adapters_export_to_what_peft_computes_on_the_fused_modules(phi, variant, targets, tmp_path):
    peft = pytest.importorskip("peft")
    from slowllama.formats.peft import export_peft, load_peft
    from slowllama.model.lora import Adapters, LoraConfig
    from tests.formats.test_peft import IDS, random_adapters, slowllama_logits

    folder = phi(variant)
    args = open_checkpoint(folder).args
    adapters = random_adapters(args)
    if targets is not None:  # only some parts of each fused module: the others' rows of B stay zero
        adapters = Adapters(LoraConfig(rank=4, alpha=6.0, targets=targets),
                            {m: {t: ab for t, ab in p.items() if t in targets} for m, p in adapters.params.items()})
    out = export_peft(tmp_path / "adapter", adapters, args, str(folder))
    base = reference(folder)
    with torch.no_grad():
        plain = base(IDS).logits
        model = peft.PeftModel.from_pretrained(base, out).eval()
        got = model(IDS).logits
    assert {n.rsplit(".", 1)[1] for n, _ in model.named_modules() if n.endswith(("qkv_proj", "gate_up_proj"))} \
        == {"qkv_proj", "gate_up_proj"}
    assert (got - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, slowllama_logits(folder, adapters), rtol=0, atol=1e-5)
    back = load_peft(out, args)  # the stacked layout splits back into the parts, bit for bit
    assert (back.cfg.rank, back.cfg.alpha, set(back.cfg.targets)) == (4, 6.0, set(adapters.cfg.targets))
    assert back.params.keys() == adapters.params.keys()
    for m, p in adapters.params.items():
        assert back.params[m].keys() == p.keys()
        for t, (a, b) in p.items():
            assert torch.equal(back.params[m][t][0], a) and torch.equal(back.params[m][t][1], b), (m, t)
    # peft's own fused adapter (one rank, no patterns) reads back as parts sharing A: the same logits
    cfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    fresh = peft.get_peft_model(reference(folder), cfg)
    with torch.no_grad():
        for n, p in fresh.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
        fresh.save_pretrained(tmp_path / "theirs")
        theirs = fresh.eval()(IDS).logits
    torch.testing.assert_close(slowllama_logits(folder, load_peft(tmp_path / "theirs", args)), theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("changes, named", [
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}), "rope_type"),
    (dict(resid_pdrop=0.1), "resid_pdrop"),
    (dict(rope_parameters={**longrope(8), "short_factor": [1.0] * 3}), "short_factor"),
    (dict(rope_parameters={**longrope(8), "beta_fast": 3}), "beta_fast"),
    (dict(architectures=["Phi3VForCausalLM"]), "Phi3VForCausalLM"),
    (dict(model_type="phimoe"), "phimoe"),
])
def test_unsupported_phi3_configs_are_refused_by_name(phi, tmp_path, changes, named):
    with pytest.raises(ConfigError, match=named) as e:
        args_from_config(edited(phi("phi3"), tmp_path, **changes))
    assert "\n" not in str(e.value)


def test_a_transformers_4_phi4mini_config_reads_like_its_transformers_5_twin(phi, tmp_path):
    """Hub configs of Phi-4-mini say rope_scaling {type: longrope} and a top-level partial_rotary_factor."""
    import json

    raw = json.loads((phi("phi4mini") / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw.update(rope_theta=rope["rope_theta"], partial_rotary_factor=0.75,
               rope_scaling={"type": "longrope", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert args_from_config(tmp_path / "config.json") == args_from_config(phi("phi4mini") / "config.json")


def test_a_lora_run_through_the_cli_writes_fused_adapters_peft_loads(phi, tmp_path):
    """The finetune command's LoRA on Phi-3: its PEFT folder gives the logits of slowllama's merged adapters."""
    peft = pytest.importorskip("peft")
    from slowllama.model.lora import Adapters
    from slowllama.model.transformer import Transformer, module_names
    from tests.engine.test_hf_training import finetune_cli

    folder = phi("phi3")
    r, out = finetune_cli(folder, tmp_path, "--iters", "2", "--lr", "0.05", "--lora-rank", "4",
                          "--lora-targets", "wq,wk,w1,w2", "--optimizer", "adamw")
    assert r.returncode == 0, r.stderr
    x = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    base = reference(folder)
    with torch.no_grad():
        plain = base(x).logits
        tuned = peft.PeftModel.from_pretrained(base, out).eval()(x).logits
    assert not torch.allclose(plain, tuned, atol=1e-4)  # the adapters trained
    ckpt = open_checkpoint(folder)
    adapters = Adapters.load(out / "lora_adapters.blk")
    mine = Transformer(ckpt.args)
    mine.load_state_dict({f"{m}.{k}": t for m in module_names(ckpt.args) for k, t in adapters.merge(m, ckpt.read_module(m)).items()})
    with torch.no_grad():
        torch.testing.assert_close(mine(x), tuned, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["phi3"])
def test_gguf_refuses_phi3_by_name(phi, variant):
    """llama.cpp's phi3 keeps qkv and gate+up fused and its own partial-rotary and LongRoPE keys: not mapped here."""
    from slowllama.formats.gguf import model_arch

    with pytest.raises(ConfigError, match="model_type 'phi3' has no GGUF mapping"):
        model_arch(phi(variant) / "config.json")


def test_merge_lora_of_fused_adapters_equals_peft_s_merge(phi, tmp_path):
    """merge_lora on a Phi-3 folder and slowllama's PEFT folder: the merged qkv_proj / gate_up_proj that
    transformers loads give the logits of peft's merge_and_unload."""
    peft = pytest.importorskip("peft")
    from slowllama.cli import merge_lora
    from slowllama.formats.peft import export_peft
    from tests.formats.test_peft import IDS, random_adapters

    folder = phi("phi4mini")
    args = open_checkpoint(folder).args
    adapter = export_peft(tmp_path / "adapter", random_adapters(args, seed=7), args, str(folder))
    assert merge_lora.main([str(folder), str(adapter), str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(reference(folder), adapter).merge_and_unload()(IDS).logits
        got = reference(tmp_path / "merged")(IDS).logits
        assert (got - reference(folder)(IDS).logits).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("edit, named", [
    ("drop", "missing tensor 'model.layers.1.mlp.gate_up_proj.weight'"),
    ("shrink", r"model.layers.0.self_attn.qkv_proj.weight has shape \[127, 64\], config.json implies \[128, 64\]"),
    ("split", "unknown tensor name 'model.layers.0.self_attn.q_proj.weight'"),
])
def test_a_phi3_folder_with_a_wrong_fused_tensor_is_refused_by_name(phi, tmp_path, edit, named):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(phi("phi3"), tmp_path / "m")
    sd = load_file(folder / "model.safetensors")
    if edit == "drop":
        del sd["model.layers.1.mlp.gate_up_proj.weight"]
    elif edit == "shrink":
        sd["model.layers.0.self_attn.qkv_proj.weight"] = sd["model.layers.0.self_attn.qkv_proj.weight"][:-1]
    else:  # Llama's unfused names have no place in a Phi-3 folder
        sd["model.layers.0.self_attn.q_proj.weight"] = sd.pop("model.layers.0.self_attn.qkv_proj.weight")[:64]
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=named):
        open_checkpoint(folder)


def test_a_step_cut_short_resumes_bit_identically(phi, tmp_path, monkeypatch):
    """A Phi-3-mini-shaped run (LongRoPE's long factors, the window, AdamW, dropout) killed in its second step's
    reverse pass, then resumed, holds the bits of a run never cut short."""
    from tests.streamed import assert_cut_short_step_resumes_bit_identically

    assert_cut_short_step_resumes_bit_identically(phi("phi3"), tmp_path, monkeypatch, VOCAB)
