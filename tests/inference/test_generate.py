"""Generation with the KV cache, batches of prompts, streamed modules and sampling.

References: transformers' generate (greedy, left-padded batches, repetition penalty) and its
logits processors (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
RepetitionPenaltyLogitsProcessor) on tiny Hugging Face models made here.
"""
from __future__ import annotations

import json

import pytest
import torch

import test_gen
from slowllama import device as dev
from slowllama.device import memory_budget
from slowllama.errors import ConfigError
from slowllama.inference import generate as gen
from slowllama.inference.generate import ModuleCache, Sampler, Sampling, module_nbytes
from slowllama.model.transformer import ModelArgs, module_names
from tests.cli.test_gen_cli import PROMPT, auto_ids, make_model, run_json

transformers = pytest.importorskip("transformers")

PROMPTS = ["The quick brown fox", "Hello", "A much longer prompt about the weather in the hills today"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {k: make_model(tmp_path_factory.mktemp(k), tied=k == "tied", seed=3) for k in ("untied", "tied")}


def hf_greedy(folder, ids, n, **kw):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, pad_token_id=0, **kw)
    return out[0, len(ids):].tolist()


def many(folder, prompts, n=10, stats=None, **kw):
    return test_gen.generate_many(model_dir=str(folder), device="cpu", prompts=prompts, max_new_tokens=n,
                                  stats=stats, **kw)


# ---- greedy: the KV cache, batches and streaming -----------------------------------

@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_batched_cached_greedy_equals_transformers_per_prompt(models, kind):
    folder = models[kind]
    gens = many(folder, PROMPTS)
    for prompt, g in zip(PROMPTS, gens):
        assert g.prompt_tokens == auto_ids(folder, prompt)
        assert g.tokens == hf_greedy(folder, g.prompt_tokens, 10)
    assert len({tuple(g.tokens) for g in gens}) == 3  # the prompts do lead somewhere different


def test_cached_equals_uncached_and_transformers_batch(models):
    """The cache against full recomputation, and against transformers' own left-padded batch."""
    folder = models["untied"]
    cached = [g.tokens for g in many(folder, PROMPTS, 8)]
    uncached = [g.tokens for g in many(folder, PROMPTS, 8, use_kv=False)]
    assert cached == uncached
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = model.generate(**enc, do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)
    assert cached == out[:, enc.input_ids.shape[1]:].tolist()


def test_streamed_modules_give_the_same_tokens_and_are_read_per_token(models):
    folder = models["untied"]
    resident, streamed = {}, {}
    a = many(folder, PROMPTS[:2], 6, stats=resident)
    b = many(folder, PROMPTS[:2], 6, stats=streamed, ram_budget=0)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    n_mod = 5  # embedding, 2 blocks, norm, output
    assert resident["reads"] == n_mod and resident["streamed"] == []
    steps = max(len(g.tokens) for g in b)
    assert streamed["reads"] == n_mod * steps  # one read per module and token serves both prompts
    store = sum(p.nbytes for p in transformers.AutoModelForCausalLM.from_pretrained(folder).parameters())
    assert streamed["bytes_read"] == store * steps


def test_tied_model_streams_the_embedding_twice_per_token(models):
    stats = {}
    a = many(models["tied"], [PROMPT], 4)
    b = many(models["tied"], [PROMPT], 4, stats=stats, ram_budget=0)
    assert a[0].tokens == b[0].tokens
    assert stats["reads"] == 6 * len(b[0].tokens)  # the output layer needs the embedding again


def test_budget_keeps_modules_in_forward_order(models):
    args = ModelArgs(dim=64, n_layers=4, n_heads=4, vocab_size=512, intermediate_size=96)
    sizes = {n: module_nbytes(args, n, torch.float32) for n in module_names(args)}
    biggest = max(sizes.values())
    cache = ModuleCache(args, dict, torch.device("cpu"), torch.float32, budget=sum(sizes.values()))
    assert cache.streamed == []
    cache = ModuleCache(args, dict, torch.device("cpu"), torch.float32,
                        budget=2 * biggest + sizes["tok_embeddings"] + sizes["layers.0"])
    assert cache.resident >= {"tok_embeddings", "layers.0"} and "layers.1" not in cache.resident
    bf16 = ModuleCache(args, dict, torch.device("cpu"), torch.bfloat16, budget=sum(sizes.values()) // 2)
    assert bf16.streamed == []  # modules are counted in the compute dtype, not fp32


def test_generation_budget_follows_the_device_memory(monkeypatch):
    """The budget is what cuda says is free, MPS's recommended working set less what it holds, or available RAM."""
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * gib, 80 * gib))
    assert memory_budget(torch.device("cuda")) == int(3 * gib * (1 - dev.HEADROOM))
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 16 * gib)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 6 * gib)
    assert memory_budget(torch.device("mps")) == int(10 * gib * (1 - dev.HEADROOM))

    class Mem:
        available = 5 * gib
    monkeypatch.setattr(dev.psutil, "virtual_memory", lambda: Mem)
    assert memory_budget(torch.device("cpu")) == int(5 * gib * (1 - dev.HEADROOM))
    # A cache on a device with little free memory keeps fewer modules than one with much.
    args = ModelArgs(dim=1024, n_layers=8, n_heads=8, vocab_size=32000, intermediate_size=2816)
    total = sum(module_nbytes(args, n, torch.bfloat16) for n in module_names(args))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * total, 80 * gib))
    roomy = ModuleCache(args, dict, torch.device("cuda"), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (total // 2, 80 * gib))
    tight = ModuleCache(args, dict, torch.device("cuda"), torch.bfloat16)
    assert roomy.streamed == [] and 0 < len(tight.resident) < len(roomy.resident)


def test_bf16_is_the_compute_dtype_where_supported(monkeypatch):
    assert gen.compute_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert gen.compute_dtype(torch.device("cuda")) == torch.bfloat16


# ---- sampling --------------------------------------------------------------------

def logits_and_ids(seed=0, bs=3, vocab=50):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(bs, vocab, generator=g) * 3, torch.randint(0, vocab, (bs, 7), generator=g)


@pytest.mark.parametrize("k", [1, 5, 49, 50, 80])
def test_top_k_equals_transformers(k):
    logits, _ = logits_and_ids(k)
    assert torch.equal(gen.apply_top_k(logits, k), transformers.TopKLogitsWarper(k)(None, logits.clone()))


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999, 1.0])
def test_top_p_equals_transformers(p):
    logits, _ = logits_and_ids(int(p * 100))
    assert torch.equal(gen.apply_top_p(logits, p), transformers.TopPLogitsWarper(p)(None, logits.clone()))


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_equals_transformers(penalty):
    logits, ids = logits_and_ids(7)
    want = transformers.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    assert torch.equal(gen.apply_repetition_penalty(logits, ids, penalty), want)


def test_the_chain_equals_transformers_processors_in_order():
    logits, ids = logits_and_ids(11)
    chain = transformers.LogitsProcessorList([
        transformers.RepetitionPenaltyLogitsProcessor(1.2), transformers.TemperatureLogitsWarper(0.7),
        transformers.TopKLogitsWarper(20), transformers.TopPLogitsWarper(0.8)])
    got = Sampler(Sampling(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.2)).scores(
        logits, ids.tolist())
    assert torch.allclose(got, chain(ids, logits.clone()), rtol=0, atol=1e-6)
    assert torch.equal(got.isinf(), chain(ids, logits.clone()).isinf())


def test_greedy_with_repetition_penalty_equals_transformers(models):
    folder = models["untied"]
    g = test_gen.generate(model_dir=str(folder), device="cpu", prompt=PROMPT, max_new_tokens=12,
                          sampling=Sampling(repetition_penalty=1.5))
    assert g.tokens == hf_greedy(folder, g.prompt_tokens, 12, repetition_penalty=1.5)
    assert g.tokens != hf_greedy(folder, g.prompt_tokens, 12)


def test_same_seed_same_text(models, capsys):
    folder = models["untied"]
    flags = [folder, "--device", "cpu", "--prompt", PROMPT, "--max-new-tokens", 12, "--temperature", 1.5,
             "--top-k", 50, "--top-p", 0.95]
    a, _ = run_json(capsys, *flags, "--seed", 1)
    b, _ = run_json(capsys, *flags, "--seed", 1)
    c, _ = run_json(capsys, *flags, "--seed", 2)
    assert a["tokens"] == b["tokens"] and a["text"] == b["text"]
    assert a["tokens"] != c["tokens"]
    assert a["tokens"] != hf_greedy(folder, a["prompt_tokens"], 12)  # it did sample


def test_top_k_one_samples_the_greedy_tokens(models):
    folder = models["untied"]
    g = test_gen.generate(model_dir=str(folder), device="cpu", prompt=PROMPT, max_new_tokens=8,
                          sampling=Sampling(temperature=2.0, top_k=1, seed=5))
    assert g.tokens == hf_greedy(folder, g.prompt_tokens, 8)


@pytest.mark.parametrize("field, value, flag", [("temperature", -1.0, "--temperature"), ("top_k", -2, "--top-k"),
                                                ("top_p", 0.0, "--top-p"), ("top_p", 1.5, "--top-p"),
                                                ("repetition_penalty", 0.0, "--repetition-penalty")])
def test_bad_sampling_values_are_refused(field, value, flag):
    with pytest.raises(ConfigError, match=flag):
        Sampling(**{field: value})


# ---- the CLI -----------------------------------------------------------------------

def test_prompt_file_prints_each_completion_and_one_json_line_each(models, tmp_path, capsys):
    folder = models["untied"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:2]) + "\n\n")
    assert test_gen.main([str(folder), "--device", "cpu", "--prompt-file", str(path), "--max-new-tokens", "6",
                          "--json", "--ram-budget", "1M"]) == 0
    lines = capsys.readouterr().out.rstrip("\n").split("\n")
    objs = [json.loads(line) for line in lines[-2:]]
    for prompt, line, obj in zip(PROMPTS, lines, objs):
        assert sorted(obj) == ["first_token_s", "prompt_tokens", "text", "tokens", "tokens_per_s"]
        assert obj["prompt_tokens"] == auto_ids(folder, prompt)
        assert obj["tokens"] == hf_greedy(folder, obj["prompt_tokens"], 6)
        assert line == prompt + obj["text"]


def test_prompt_and_prompt_file_together_are_refused(models, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("Hi\n")
    for extra, what in ((["--prompt", "Hi", "--prompt-file", str(tmp_path / "p.txt")], "--prompt-file"),
                        (["--prompt-file", str(tmp_path / "none.txt")], "none.txt"),
                        (["--ram-budget", "lots"], "--ram-budget"), (["--top-p", "2"], "--top-p")):
        assert test_gen.main([str(models["untied"]), "--device", "cpu", *extra]) == 2
        err = capsys.readouterr()
        assert err.out == "" and err.err.count("\n") == 1 and what in err.err
