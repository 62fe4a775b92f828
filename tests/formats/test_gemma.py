"""Gemma 2 and Gemma 3 (text) Hugging Face folders against transformers: (1 + w) RMSNorms, four norms per block,
gelu_pytorch_tanh, the sqrt(dim) embedding scale, soft-capping, query_pre_attn_scalar, alternating local and
global layers (Gemma 3: a RoPE base of their own, scaling on the global ones), q/k norms, tied embeddings.

The models are tiny random ones that transformers builds and saves here; sequences are longer than the window.
"""
from __future__ import annotations

import json

import pytest
import torch

from slowllama.errors import ConfigError
from slowllama.formats import open_checkpoint
from slowllama.formats.hf import args_from_config
from slowllama.model.transformer import CastLastRMSNorm, Embedding, ModelArgs
from tests.engine.test_hf_training import (
    VOCAB,
    assert_round_trip_bit_identical,
    assert_streamed_adamw_steps_within_fp32_noise,
    assert_streamed_sgd_step_equals_transformers,
    in_memory_model,
    model_maker,
)
from tests.formats.test_qwen import edited
from tests.model.test_sliding_window import greedy_equals_generate
from tests.streamed import assert_cut_short_step_resumes_bit_identically

transformers = pytest.importorskip("transformers")

WINDOW = 4
# The first token of assert_streamed_sgd_step_equals_transformers' batch: as pad_token_id, its embedding row
# takes no gradient from that step in transformers (nn.Embedding's padding_idx), and must take none here.
PAD = int(torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))[0, 0])
COMMON = dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW, pad_token_id=PAD)
VARIANTS = {
    # layer_types left to Gemma2Config's rule (layer 0 local, layer 1 global); caps small enough to bite
    "gemma2": dict(kind="gemma2", attn_logit_softcapping=2.0, final_logit_softcapping=3.0, **COMMON),
    "gemma3": dict(kind="gemma3", layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=3.0,
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}},
                   **COMMON),
    "gemma3_untied_bias": dict(kind="gemma3", tie_word_embeddings=False, attention_bias=True,
                               layer_types=["full_attention", "sliding_attention"], **COMMON),
}


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return model_maker(tmp_path_factory, VARIANTS)


def reference(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_configs_read_as_transformers_builds_them(gemma):
    g2, g3 = open_checkpoint(gemma("gemma2")).args, open_checkpoint(gemma("gemma3")).args
    assert g2.layer_windows == [WINDOW, None] and g2.tie_word_embeddings and g2.pad_id == PAD
    assert (g2.attn_softcap, g2.final_softcap, g2.query_pre_attn_scalar, g2.qk_norm) == (2.0, 3.0, 24, False)
    assert g3.rope_of(0) == (10000.0, None) and g3.rope_of(1) == (1e6, {"rope_type": "linear", "factor": 2.0})
    assert g3.attn_softcap is None and g3.qk_norm and g3.norm_plus_one and g3.post_norms and g3.embed_scale


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_in_memory_logits_equal_transformers(gemma, variant):
    folder = gemma(variant)
    x = torch.randint(0, VOCAB, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(in_memory_model(folder)(x), reference(folder)(x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["gemma2", "gemma3_untied_bias"])
def test_streamed_sgd_step_equals_transformers(gemma, variant, tmp_path):
    assert_streamed_sgd_step_equals_transformers(gemma(variant), tmp_path)


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_import_export_without_training_is_bit_identical(gemma, variant, tmp_path):
    assert_round_trip_bit_identical(gemma(variant), tmp_path)


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_kv_cached_greedy_decoding_equals_generate_with_prompts_longer_than_the_window(gemma, variant):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (3 * WINDOW, 2 * WINDOW + 1)]
    greedy_equals_generate(gemma(variant), prompts, 2 * WINDOW)


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_lora_adapters_export_to_what_peft_computes(gemma, variant, tmp_path):
    peft = pytest.importorskip("peft")
    from slowllama.formats.peft import export_peft
    from tests.formats.test_peft import IDS, random_adapters, slowllama_logits

    folder = gemma(variant)
    adapters = random_adapters(open_checkpoint(folder).args)
    out = export_peft(tmp_path / "adapter", adapters, open_checkpoint(folder).args, str(folder))
    base = reference(folder)
    with torch.no_grad():
        plain = base(IDS).logits
        got = peft.PeftModel.from_pretrained(base, out).eval()(IDS).logits
    assert (got - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, slowllama_logits(folder, adapters), rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_and_embedding_scale_round_as_transformers_does_in_half_precision(dtype):
    from transformers.models.gemma3.modeling_gemma3 import (
        Gemma3RMSNorm,
        Gemma3TextScaledWordEmbedding,
    )

    dim = 48  # sqrt(48) = 6.928..., which bf16 rounds
    g = torch.Generator().manual_seed(3)
    w, table = torch.randn(dim, generator=g), torch.randn(VOCAB, dim, generator=g)
    theirs = Gemma3RMSNorm(dim, eps=1e-6)
    ours = CastLastRMSNorm(dim, 1e-6, offset=1.0)
    theirs.weight.data, ours.weight.data = w.clone(), w.clone()
    x = torch.randn(3, dim, generator=g).to(dtype)
    assert torch.equal(ours.to(dtype)(x), theirs.to(dtype)(x))
    emb = Gemma3TextScaledWordEmbedding(VOCAB, dim, 0, embed_scale=dim ** 0.5).to(dtype)
    emb.weight.data = table.to(dtype)
    mine = Embedding(ModelArgs(dim=dim, n_layers=1, n_heads=3, vocab_size=VOCAB, embed_scale=True), table.to(dtype))
    ids = torch.tensor([[1, 5, 300]])
    assert torch.equal(mine(ids), emb(ids))


def test_a_transformers_4_gemma3_config_reads_like_its_transformers_5_twin(gemma, tmp_path):
    """Hub configs of Gemma 3 say rope_theta, rope_local_base_freq, rope_scaling and sliding_window_pattern."""
    raw = json.loads((gemma("gemma3") / "config.json").read_text())
    old = {k: v for k, v in raw.items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=1e6, rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
               sliding_window_pattern=2)
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert args_from_config(tmp_path / "config.json") == args_from_config(gemma("gemma3") / "config.json")


@pytest.mark.parametrize("changes, named", [
    (dict(architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3"), "gemma3"),
    (dict(architectures=["Gemma3ForConditionalGeneration"]), "Gemma3ForConditionalGeneration"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(hidden_activation="gelu"), "hidden_activation"),
    (dict(sliding_window=None), "layer_types"),
])
def test_unsupported_gemma_variants_are_refused_by_name(gemma, tmp_path, changes, named):
    with pytest.raises(ConfigError, match=named) as e:
        args_from_config(edited(gemma("gemma3"), tmp_path, **changes))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_two_streamed_adamw_steps_stay_within_transformers_own_fp32_noise(gemma, variant, tmp_path):
    assert_streamed_adamw_steps_within_fp32_noise(gemma(variant), tmp_path)


def test_a_gemma2_step_cut_short_resumes_bit_identically(gemma, tmp_path, monkeypatch):
    """Soft-caps, the window, four norms per block and the scaled embedding, killed mid reverse pass."""
    assert_cut_short_step_resumes_bit_identically(gemma("gemma2"), tmp_path, monkeypatch, VOCAB)
