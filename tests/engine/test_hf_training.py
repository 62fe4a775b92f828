"""Hugging Face folders through the whole engine: prepare, streamed training, export in the same format.

transformers is the reference: its in-memory step, its loader and its logits.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from slowllama.engine.optim import OptimConfig
from slowllama.engine.store import export_store, prepare
from slowllama.engine.trainer import TrainConfig, Trainer
from slowllama.formats import open_checkpoint
from tests.formats.test_hf_format import (
    LLAMA3_ROPE,
    all_tensors,
    make_config,
    model_class,
)
from tests.formats.test_tokenizers import make_llama3_like

pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 512  # above the test tokenizer's 400 pieces and specials


def make_model(folder: Path, kind: str = "llama", seed: int = 0, dtype=torch.float32, shard: str | None = None,
               **kw) -> Path:
    """A tiny HF model with a Llama-3-like tokenizer, weights moved off their init."""
    make_llama3_like(folder)
    torch.manual_seed(seed)
    model = model_class(kind)(make_config(kind, **{"vocab_size": VOCAB, "num_key_value_heads": 2, **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.to(dtype).save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    return folder


VARIANTS = {
    "llama2": dict(num_key_value_heads=4),
    "llama31_gqa": dict(rope_parameters=LLAMA3_ROPE),
    "sharded": dict(rope_parameters=LLAMA3_ROPE, shard="100KB"),
    "mistral": dict(kind="mistral", sliding_window=None),
    "bf16": dict(rope_parameters=LLAMA3_ROPE, dtype=torch.bfloat16),
}


TEXT = "The quick brown fox jumps over the lazy dog. 1234567 numbers! " * 40


def finetune_cli(model: Path, tmp_path: Path, *flags: str, text: str = TEXT) -> tuple[subprocess.CompletedProcess, Path]:
    """finetune.py on model with a small text, into tmp_path/out; returns the process and out."""
    data, out = tmp_path / "d.txt", tmp_path / "out"
    data.write_text(text)
    r = subprocess.run([sys.executable, str(ROOT / "finetune.py"), str(model), "--data", str(data), "--out", str(out),
                        "--seq-len", "16", "--batch-size", "2", "--device", "cpu", *flags],
                       capture_output=True, text=True, cwd=ROOT, env={"TQDM_DISABLE": "1", "PATH": "/usr/bin:/bin"})
    return r, out


def model_maker(tmp_path_factory, variants: dict):
    """get(variant) -> the folder of that variant's tiny random model (make_model's arguments in variants), made on
    first use and shared by the module's tests (treat it as read-only)."""
    made = {}

    def get(variant: str) -> Path:
        if variant not in made:
            made[variant] = make_model(tmp_path_factory.mktemp(variant), **variants[variant])
        return made[variant]
    return get


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    return model_maker(tmp_path_factory, VARIANTS)


@pytest.mark.parametrize("variant", ["llama2", "llama31_gqa", "mistral", "sharded"])
def test_streamed_sgd_step_equals_transformers(hf_model, variant, tmp_path):
    assert_streamed_sgd_step_equals_transformers(hf_model(variant), tmp_path)


def assert_streamed_sgd_step_equals_transformers(folder: Path, tmp_path: Path):
    """One streamed SGD step on folder, exported, equals one step of transformers' in-memory model."""
    store = prepare(open_checkpoint(folder), tmp_path / "store")
    tr = Trainer(store, tmp_path, torch.device("cpu"), TrainConfig(optim=OptimConfig("sgd", lr=0.5), micro_batch=1))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (2, 17), generator=g)
    loss = tr.train_step(x[:, :-1], x[:, 1:]).loss
    tr.close()
    export_store(store, folder, tmp_path / "out")

    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    logits = ref(x[:, :-1]).logits
    ref_loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    ref_loss.backward()
    torch.optim.SGD(ref.parameters(), lr=0.5).step()
    assert loss == pytest.approx(ref_loss.item(), abs=1e-5)
    got = all_tensors(tmp_path / "out")
    # A tied model's export has no lm_head.weight: transformers' is the embedding itself, trained by both uses.
    tied = ref.config.tie_word_embeddings
    want = {k: v for k, v in ref.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert set(got) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=1e-5, rtol=0, msg=k)


@pytest.mark.parametrize("variant", ["llama31_gqa", "mistral"])
def test_streamed_adamw_steps_stay_within_transformers_own_fp32_noise(hf_model, variant, tmp_path):
    """Two AdamW steps: slowllama against transformers in fp32 differs no more than transformers' fp32 run
    differs from its fp64 run (AdamW divides by the root of tiny second moments, which magnifies rounding)."""
    assert_streamed_adamw_steps_within_fp32_noise(hf_model(variant), tmp_path)


def assert_streamed_adamw_steps_within_fp32_noise(folder: Path, tmp_path: Path):
    """Two streamed AdamW steps on folder, exported, lie within twice transformers' own fp32-vs-fp64 distance."""
    store = prepare(open_checkpoint(folder), tmp_path / "store")
    tr = Trainer(store, tmp_path, torch.device("cpu"), TrainConfig(optim=OptimConfig("adamw", lr=1e-3)))
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, VOCAB, (2, 17), generator=g) for _ in range(2)]
    for x in batches:
        tr.train_step(x[:, :-1], x[:, 1:])
    tr.close()
    export_store(store, folder, tmp_path / "out")
    got = all_tensors(tmp_path / "out")

    def reference(dtype):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)  # slowllama's default decay
        for x in batches:
            F.cross_entropy(model(x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad()
        # a tied model's export has no lm_head.weight (transformers' is the embedding itself)
        return {k: v.double() for k, v in model.state_dict().items()
                if not (model.config.tie_word_embeddings and k == "lm_head.weight")}

    fp32, fp64 = reference(torch.float32), reference(torch.float64)
    noise = max((fp32[k] - fp64[k]).abs().max().item() for k in fp64)
    ours = max((got[k].double() - fp64[k]).abs().max().item() for k in fp64)
    assert noise > 0 and ours <= 2 * noise, (ours, noise)


def in_memory_model(folder: Path):
    """slowllama's whole-model Transformer with folder's weights, read through its checkpoint reader."""
    from slowllama.model.transformer import Transformer, module_names

    ckpt = open_checkpoint(folder)
    model = Transformer(ckpt.args)
    model.load_state_dict({f"{m}.{k}": t for m in module_names(ckpt.args) for k, t in ckpt.read_module(m).items()})
    return model


@pytest.mark.parametrize("variant", ["llama31_gqa", "bf16"])
def test_import_export_without_training_is_bit_identical(hf_model, variant, tmp_path):
    assert_round_trip_bit_identical(hf_model(variant), tmp_path)


def assert_round_trip_bit_identical(folder: Path, tmp_path: Path):
    """prepare then export with no training gives back folder's tensors and files, bit for bit."""
    store = prepare(open_checkpoint(folder), tmp_path / "store")
    export_store(store, folder, tmp_path / "out")
    a, b = all_tensors(folder), all_tensors(tmp_path / "out")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (folder / name).read_bytes(), name


def test_finetune_cli_on_an_hf_folder_exports_what_transformers_loads(hf_model, tmp_path):
    folder = hf_model("llama31_gqa")
    r, out = finetune_cli(folder, tmp_path, "--iters", "2", "--lr", "0.05", "--prompt", "The quick", "--gen-tokens", "4")
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "train_log.jsonl"} <= set(names)
    assert not any(n.endswith(".pth") or n == "params.json" for n in names)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    # The export holds the trained weights: they moved, and slowllama's own reading of them gives transformers' logits.
    before = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, before.model.layers[0].self_attn.q_proj.weight)
    mine = in_memory_model(out)
    x = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(mine(x), model(x).logits, atol=1e-5, rtol=0)
    recs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in recs if "loss" in r] == [0, 1]


def test_meta_llama3_folder_trains_and_exports_its_own_files(tmp_path):
    """Meta's Llama 3.1 layout: a tiktoken tokenizer.model and params.json with use_scaled_rope."""
    from slowllama.formats.meta import save_meta
    from slowllama.formats.tokenizer import TiktokenTokenizer, load_tokenizer
    from slowllama.model.transformer import ModelArgs
    from tests.formats.test_tokenizers import write_tiktoken_file
    from tools.make_test_model import random_state_dict

    model = tmp_path / "llama3"
    model.mkdir()
    ranks = write_tiktoken_file(model / "tokenizer.model")
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "norm_eps": 1e-5,
              "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": len(ranks) + 256}
    save_meta(model, params, random_state_dict(ModelArgs(**params)))
    ckpt = open_checkpoint(model)
    assert ckpt.args.rope_scaling["rope_type"] == "llama3"
    assert isinstance(load_tokenizer(model), TiktokenTokenizer)
    r, out = finetune_cli(model, tmp_path, "--iters", "1", text="the and then thing 123456 " * 60)
    assert r.returncode == 0, r.stderr
    assert (out / "tokenizer.model").read_bytes() == (model / "tokenizer.model").read_bytes()
    assert json.loads((out / "params.json").read_text()) == params


def test_lora_run_on_an_hf_model_writes_adapters_peft_loads(hf_model, tmp_path):
    peft = pytest.importorskip("peft")
    folder = hf_model("llama31_gqa")
    r, out = finetune_cli(folder, tmp_path, "--iters", "2", "--lr", "0.05", "--lora-rank", "4",
                          "--lora-targets", "wq,wk,wv,w2", "--optimizer", "adamw")
    assert r.returncode == 0, r.stderr
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    x = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = base(x).logits
        tuned = peft.PeftModel.from_pretrained(base, out)(x).logits
    assert not torch.allclose(plain, tuned, atol=1e-4)  # the adapters trained (B moved off zero)
    from slowllama.model.lora import Adapters
    from slowllama.model.transformer import Transformer

    ckpt = open_checkpoint(folder)
    adapters = Adapters.load(out / "lora_adapters.blk")
    mine = Transformer(ckpt.args)
    mine.load_state_dict({f"{m}.{k}": t for m in ("tok_embeddings", *(f"layers.{i}" for i in range(ckpt.args.n_layers)),
                                                    "norm", "output")
                          for k, t in adapters.merge(m, ckpt.read_module(m)).items()})
    with torch.no_grad():
        torch.testing.assert_close(mine(x), tuned, atol=1e-5, rtol=0)


def test_a_meta_checkpoint_exported_as_hf_gives_transformers_the_same_model(gqa_model, tmp_path):
    from slowllama.formats.hf import args_from_config
    from tests.reference import reference_model

    store = prepare(open_checkpoint(gqa_model), tmp_path / "store")
    export_store(store, gqa_model, tmp_path / "out", export_format="hf")
    out = tmp_path / "out"
    got, want = args_from_config(out / "config.json"), store.args  # the config says what the Meta params said
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden_dim", "vocab_size", "norm_eps",
                  "rope_theta", "rope_scaling", "max_seq_len", "tie_word_embeddings"):
        assert getattr(got, field) == getattr(want, field), field
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    x = torch.randint(0, store.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference_model(gqa_model)(x), atol=1e-5, rtol=0)
    from slowllama.formats.tokenizer import load_tokenizer

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    sp = load_tokenizer(gqa_model)
    # Runs of spaces are left out: the test tokenizer's normalizer collapses them (Llama 2's does not), which
    # transformers' sentencepiece conversion does not reproduce.
    for text in ("Anna counted the hens.", "Hello", "a 1234, don't!"):
        assert hf_tok(text).input_ids == sp.encode(text)


def test_a_tied_model_trains_and_exports_tied(tmp_path):
    folder = make_model(tmp_path / "tied", tie_word_embeddings=True, head_dim=32,
                        rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    r, out = finetune_cli(folder, tmp_path, "--iters", "2", "--lr", "0.05")
    assert r.returncode == 0, r.stderr
    assert "tied embeddings:" in r.stdout
    got = all_tensors(out)
    assert "lm_head.weight" not in got
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    assert torch.equal(model.lm_head.weight, got["model.embed_tokens.weight"])
    before = all_tensors(folder)["model.embed_tokens.weight"]
    assert not torch.equal(got["model.embed_tokens.weight"], before)
