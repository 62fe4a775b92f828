"""OLMo 2 Hugging Face folders against transformers: norms after each sublayer only, q/k RMSNorms over the whole
projections (their weights permuted with RoPE's rows), norm weights applied in fp32.
"""
from __future__ import annotations

import pytest
import torch

from slowllama.formats import open_checkpoint
from slowllama.model.transformer import CastLastRMSNorm
from tests.engine.test_hf_training import (
    VOCAB,
    assert_round_trip_bit_identical,
    assert_streamed_adamw_steps_within_fp32_noise,
    assert_streamed_sgd_step_equals_transformers,
    in_memory_model,
    make_model,
)
from tests.formats.test_gemma import PAD
from tests.model.test_sliding_window import greedy_equals_generate

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def olmo2(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("olmo2"), kind="olmo2", pad_token_id=PAD)


def test_in_memory_logits_equal_transformers(olmo2):
    args = open_checkpoint(olmo2).args
    assert args.qk_norm_whole and not args.pre_norms and args.post_norms and args.norm_eps == 1e-5
    ref = transformers.AutoModelForCausalLM.from_pretrained(olmo2, dtype=torch.float32)
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(in_memory_model(olmo2)(x), ref(x).logits, atol=1e-5, rtol=0)


def test_streamed_sgd_step_equals_transformers(olmo2, tmp_path):
    assert_streamed_sgd_step_equals_transformers(olmo2, tmp_path)


def test_import_export_without_training_is_bit_identical(olmo2, tmp_path):
    assert_round_trip_bit_identical(olmo2, tmp_path)


def test_kv_cached_greedy_decoding_equals_generate(olmo2):
    g = torch.Generator().manual_seed(2)
    greedy_equals_generate(olmo2, [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (9, 6)], 6)


def test_lora_adapters_export_to_what_peft_computes(olmo2, tmp_path):
    peft = pytest.importorskip("peft")
    from slowllama.formats.peft import export_peft
    from tests.formats.test_peft import IDS, random_adapters, slowllama_logits

    adapters = random_adapters(open_checkpoint(olmo2).args)
    out = export_peft(tmp_path / "adapter", adapters, open_checkpoint(olmo2).args, str(olmo2))
    base = transformers.AutoModelForCausalLM.from_pretrained(olmo2, dtype=torch.float32).eval()
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(base, out).eval()(IDS).logits
    torch.testing.assert_close(got, slowllama_logits(olmo2, adapters), rtol=0, atol=1e-5)


def test_the_norm_rounds_as_transformers_does_in_bf16():
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(64, generator=g), torch.randn(3, 64, generator=g).bfloat16()
    theirs, ours = Olmo2RMSNorm(64, eps=1e-5), CastLastRMSNorm(64, 1e-5, offset=0.0)
    theirs.weight.data, ours.weight.data = w.clone(), w.clone()
    assert torch.equal(ours.bfloat16()(x), theirs.bfloat16()(x))


def test_two_streamed_adamw_steps_stay_within_transformers_own_fp32_noise(olmo2, tmp_path):
    assert_streamed_adamw_steps_within_fp32_noise(olmo2, tmp_path)
