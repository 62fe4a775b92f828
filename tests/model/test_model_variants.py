"""model.py's later-Llama features against transformers: logits and one SGD step per variant.

Each variant is a tiny model that transformers builds and saves (see tests/formats/test_hf_format.py);
slowllama's in-memory Transformer is filled from HFCheckpoint's modules.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from slowllama.errors import ConfigError
from slowllama.formats.hf import HFCheckpoint, to_hf_name, to_meta
from slowllama.formats.meta import expected_shapes
from slowllama.model.transformer import (
    META_LLAMA3_SCALING,
    ModelArgs,
    Transformer,
    build_module,
    module_names,
    rope_frequencies,
)
from tests.formats.test_hf_format import VARIANTS, hf_models, transformers  # noqa: F401  (hf_models is a fixture)


def slowllama_model(ckpt: HFCheckpoint) -> Transformer:
    model = Transformer(ckpt.args)
    sd = {f"{m}.{p}": t.float() for m in module_names(ckpt.args) for p, t in ckpt.read_module(m).items()}
    model.load_state_dict(sd, strict=True)
    return model


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")


def batch(seq=24, seed=3):
    toks = torch.randint(0, 256, (2, seq + 1), generator=torch.Generator().manual_seed(seed))
    return toks[:, :-1], toks[:, 1:]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_equal_transformers(hf_models, variant):
    folder = hf_models(variant)
    ours, ref = slowllama_model(HFCheckpoint(folder)), hf_model(folder)
    x, _ = batch()  # 24 positions: beyond original_max_position_embeddings 16, so llama3 scaling matters
    with torch.no_grad():
        got, want = ours(x), ref(x).logits
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_sgd_step_equals_transformers(hf_models, variant):
    folder = hf_models(variant)
    ckpt = HFCheckpoint(folder)
    ours, ref = slowllama_model(ckpt), hf_model(folder)
    x, y = batch()
    for model, logits in ((ours, lambda: ours(x)), (ref, lambda: ref(x).logits)):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        F.cross_entropy(logits().flatten(0, 1), y.flatten()).backward()
        opt.step()
    theirs = dict(ref.named_parameters())  # a tied lm_head is the embedding: listed once, as in ours
    mine = dict(ours.named_parameters())
    assert len(mine) == len(theirs)
    before = {f"{m}.{p}": t.float() for m in module_names(ckpt.args) for p, t in ckpt.read_module(m).items()}
    a = ckpt.args
    for name, p in mine.items():
        w = theirs[to_hf_name(name)].detach()
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            w = to_meta(w, a.n_heads if "wq" in name else a.n_kv_heads, a.head_dim)
        torch.testing.assert_close(p.detach(), w, atol=1e-5, rtol=0, msg=name)
        assert not torch.equal(p.detach(), before[name]), f"{name} did not move"


def test_llama3_and_linear_frequencies_equal_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    # Meta's params.json flag means the same constants
    args = ModelArgs(dim=4096, n_layers=1, n_heads=32, vocab_size=8, rope_theta=500000.0, use_scaled_rope=True)
    got = rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)
    torch.testing.assert_close(got, want, atol=0, rtol=1e-6)
    plain = rope_frequencies(128, 500000.0, None)
    assert (got < plain).any() and (got == plain).any()  # some scaled, the shortest wavelengths kept
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})
    want, _ = ROPE_INIT_FUNCTIONS["linear"](cfg, "cpu")
    torch.testing.assert_close(rope_frequencies(16, 10000.0, {"rope_type": "linear", "factor": 4.0}), want, atol=0, rtol=1e-6)


def test_meta_params_json_use_scaled_rope(tmp_path):
    p = tmp_path / "params.json"
    p.write_text(json.dumps({"dim": 256, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2, "vocab_size": 100,
                             "multiple_of": 64, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5, "rope_theta": 500000.0,
                             "use_scaled_rope": True}))
    args = ModelArgs.from_json(p)
    assert args.rope_scaling == META_LLAMA3_SCALING and args.head_dim == 32 and args.ffn_hidden_dim == 896
    # the store saves vars(args) and rebuilds ModelArgs from it
    assert ModelArgs(**json.loads(json.dumps(vars(args)))) == args
    raw = json.loads(p.read_text())
    p.write_text(json.dumps({**raw, "rope_scaling_type": "llama3"}))
    with pytest.raises(ConfigError, match="unsupported keys"):
        ModelArgs.from_json(p)
    with pytest.raises(ConfigError, match="rope_scaling"):
        ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=8, rope_scaling={"rope_type": "yarn", "factor": 2.0})


def test_llama2_args_unchanged():
    args = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000)
    assert args.head_dim == 128 and args.ffn_hidden_dim == 11008 and args.rope_scaling is None
    assert not args.tie_word_embeddings and args.max_seq_len == 4096
    with pytest.raises(ConfigError, match="not divisible"):
        ModelArgs(dim=65, n_layers=1, n_heads=4, vocab_size=8)


def test_explicit_head_dim_and_tied_output():
    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=32, intermediate_size=80,
                     vocab_size=50, tie_word_embeddings=True)
    shapes = expected_shapes(args, "layers.0")
    assert shapes["attention.wq.weight"] == (128, 64) and shapes["attention.wk.weight"] == (64, 64)
    assert shapes["attention.wo.weight"] == (64, 128) and shapes["feed_forward.w1.weight"] == (80, 64)
    block = build_module("layers.0", args)
    assert {k: tuple(v.shape) for k, v in block.state_dict().items()} == shapes
    assert list(build_module("output", args).parameters()) == []
    model = Transformer(args)
    assert "output.weight" not in model.state_dict()
    x = torch.randint(0, 50, (1, 5))
    logits = model(x)
    logits.sum().backward()
    h = model.norm(model.layers[0](model.tok_embeddings(x)))
    torch.testing.assert_close(logits, h @ model.tok_embeddings.weight.T)
    assert math.isfinite(float(model.tok_embeddings.weight.grad.abs().sum()))
