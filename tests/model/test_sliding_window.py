"""Sliding-window attention (Mistral's sliding_window, Qwen's use_sliding_window and max_window_layers), computed
exactly with a mask: logits, a streamed SGD step and KV-cached greedy decoding against transformers, on sequences
longer than the window.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from slowllama.formats import open_checkpoint
from slowllama.inference.generate import ModuleCache, generate_tokens
from slowllama.model.transformer import Transformer, window_mask
from tests.engine.test_hf_training import (
    VOCAB,
    assert_streamed_sgd_step_equals_transformers,
    in_memory_model,
    model_maker,
)

transformers = pytest.importorskip("transformers")

WINDOW = 4
VARIANTS = {
    "mistral": dict(kind="mistral", sliding_window=WINDOW),
    # layer 0 full, layer 1 sliding, as transformers derives layer_types from max_window_layers
    "qwen2": dict(kind="qwen2", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
}
WINDOWS = {"mistral": [WINDOW, WINDOW], "qwen2": [None, WINDOW]}


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    return model_maker(tmp_path_factory, VARIANTS)


def test_the_window_counts_the_query_itself_as_transformers_does():
    from transformers.masking_utils import sliding_window_causal_mask_function

    theirs = sliding_window_causal_mask_function(WINDOW)
    for n_q, n_k in ((9, 9), (1, 9), (3, 9)):  # training, one decoding step, a chunk after a prefill
        t = torch.tensor
        want = torch.tensor([[bool(theirs(t(0), t(0), t(n_k - n_q + r), t(c))) for c in range(n_k)] for r in range(n_q)])
        assert torch.equal(window_mask(n_q, n_k, WINDOW, "cpu"), want)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_in_memory_logits_equal_transformers_beyond_the_window(windowed, variant):
    folder = windowed(variant)
    args = open_checkpoint(folder).args
    assert [args.window(i) for i in range(args.n_layers)] == WINDOWS[variant]
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    x = torch.randint(0, VOCAB, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(0))
    model = in_memory_model(folder)
    full = Transformer(dataclasses.replace(args, sliding_window=None, layer_windows=None))
    full.load_state_dict(model.state_dict())
    with torch.no_grad():
        want = ref(x).logits
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=0)
        assert (full(x) - want).abs().max() > 1e-3  # the window matters: plain causal attention differs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_streamed_sgd_step_equals_transformers_beyond_the_window(windowed, variant, tmp_path):
    assert_streamed_sgd_step_equals_transformers(windowed(variant), tmp_path)  # 16 tokens, window 4


def greedy_equals_generate(folder, prompts: list[list[int]], new: int):
    """slowllama's KV-cached greedy tokens for a left-padded batch equal transformers' generate(do_sample=False)."""
    ckpt = open_checkpoint(folder)
    cache = ModuleCache(ckpt.args, ckpt.read_module, torch.device("cpu"), torch.float32, budget=0)
    got = generate_tokens(cache, prompts, new)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    assert got == out[:, longest:].tolist()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cached_greedy_decoding_equals_generate_with_prompts_longer_than_the_window(windowed, variant):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (3 * WINDOW, 2 * WINDOW + 1)]
    greedy_equals_generate(windowed(variant), prompts, 2 * WINDOW)
