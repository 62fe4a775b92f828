"""SmolLM3 Hugging Face folders against transformers: Llama's layers, some without RoPE (no_rope_layers, or every
no_rope_layer_interval-th layer), tied embeddings, and windows on the RoPE-less layers where use_sliding_window says.

The models are tiny random ones that transformers builds and saves here.
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

WINDOW = 4
VARIANTS = {
    # SmolLM3Config's rule: every 2nd layer (layer 1) without RoPE; tied by default
    "smollm3": dict(kind="smollm3", no_rope_layer_interval=2, pad_token_id=PAD),
    # an explicit list, untied, biases, and a window on the RoPE-less layer 0
    "smollm3_window": dict(kind="smollm3", no_rope_layers=[0, 1], tie_word_embeddings=False, attention_bias=True,
                           use_sliding_window=True, sliding_window=WINDOW, pad_token_id=PAD),
}


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    return model_maker(tmp_path_factory, VARIANTS)


def reference(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_configs_read_as_transformers_builds_them(smol):
    a, b = open_checkpoint(smol("smollm3")).args, open_checkpoint(smol("smollm3_window")).args
    assert a.rope_layers == [True, False] and a.tie_word_embeddings and a.layer_windows is None
    assert b.rope_layers == [False, True] and b.layer_windows == [WINDOW, None] and b.qkv_bias and b.o_bias
    assert a.rope_theta == reference(smol("smollm3")).config.rope_parameters["rope_theta"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_in_memory_logits_equal_transformers(smol, variant):
    folder = smol(variant)
    x = torch.randint(0, VOCAB, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(in_memory_model(folder)(x), reference(folder)(x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_streamed_sgd_step_equals_transformers_and_the_export_loads_as_slowllama_computes_it(smol, variant, tmp_path):
    assert_streamed_sgd_step_equals_transformers(smol(variant), tmp_path)
    out = tmp_path / "out"
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(in_memory_model(out)(x), reference(out)(x).logits, atol=1e-5, rtol=0)


def test_two_streamed_adamw_steps_stay_within_transformers_own_fp32_noise(smol, tmp_path):
    assert_streamed_adamw_steps_within_fp32_noise(smol("smollm3"), tmp_path)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_export_without_training_is_bit_identical(smol, variant, tmp_path):
    assert_round_trip_bit_identical(smol(variant), tmp_path)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cached_greedy_decoding_equals_generate_with_prompts_longer_than_the_window(smol, variant):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (3 * WINDOW, 2 * WINDOW + 1)]
    greedy_equals_generate(smol(variant), prompts, 2 * WINDOW)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lora_adapters_export_to_what_peft_computes(smol, variant, tmp_path):
    peft = pytest.importorskip("peft")
    from slowllama.formats.peft import export_peft
    from tests.formats.test_peft import IDS, random_adapters, slowllama_logits

    folder = smol(variant)
    args = open_checkpoint(folder).args
    out = export_peft(tmp_path / "adapter", random_adapters(args), args, str(folder))
    base = reference(folder)
    with torch.no_grad():
        plain = base(IDS).logits
        got = peft.PeftModel.from_pretrained(base, out).eval()(IDS).logits
    assert (got - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, slowllama_logits(folder, random_adapters(args)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("changes, named", [
    (dict(no_rope_layers=[1, 2]), "no_rope_layers"),
    (dict(no_rope_layers=[1]), "no_rope_layers"),
    (dict(no_rope_layers=None, no_rope_layer_interval=0), "no_rope_layer_interval"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_unsupported_smollm3_configs_are_refused_by_name(smol, tmp_path, changes, named):
    with pytest.raises(ConfigError, match=named) as e:
        args_from_config(edited(smol("smollm3"), tmp_path, **changes))
    assert "\n" not in str(e.value)


def test_a_transformers_4_config_without_the_derived_lists_reads_the_same(smol, tmp_path):
    """Hub configs of SmolLM3 may leave no_rope_layers and layer_types to the interval rule."""
    import json

    raw = json.loads((smol("smollm3") / "config.json").read_text())
    raw.pop("no_rope_layers"), raw.pop("layer_types", None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert args_from_config(tmp_path / "config.json") == args_from_config(smol("smollm3") / "config.json")
