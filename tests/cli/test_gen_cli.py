"""test_gen.py on Hugging Face models: greedy tokens, stops, --chat, --json, --device and PEFT adapters.

The references are transformers (generate with do_sample=False, AutoTokenizer, apply_chat_template) and
peft's PeftModel; the tokenizers and models are tiny ones made here.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import test_gen
from slowllama.cli.finetune import DEMO_MODEL
from tests.data.test_chat import CHATML
from tests.formats.test_tokenizers import make_smollm_like

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512, max_position_embeddings=128, rms_norm_eps=1e-5)
PROMPT = "The quick brown fox"


def make_model(folder: Path, tied: bool = False, seed: int = 0) -> Path:
    """A tiny untied (or tied) Llama with a byte-level BPE tokenizer and a ChatML template."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, tie_word_embeddings=tied))
    with torch.no_grad():  # larger weights than the init, so that greedy tokens vary
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(folder)
    make_smollm_like(folder)  # tokenizer files and generation_config.json (eos <|im_end|>)
    (folder / "chat_template.jinja").write_text(CHATML)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {k: make_model(tmp_path_factory.mktemp(k), tied=k == "tied") for k in ("untied", "tied")}


def reference(folder: Path, ids: list[int], n: int) -> list[int]:
    """transformers' greedy tokens, with the stop tokens of the folder's generation_config.json."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, pad_token_id=0)
    return out[0, len(ids):].tolist()


def auto_ids(folder: Path, prompt: str) -> list[int]:
    return transformers.AutoTokenizer.from_pretrained(folder)(prompt).input_ids


def run_json(capsys, *args) -> tuple[dict, str]:
    """test_gen.main with --json: the JSON object of the last line and the text printed before it."""
    assert test_gen.main([str(a) for a in args] + ["--json"]) == 0
    out = capsys.readouterr().out
    streamed, _, last = out.rstrip("\n").rpartition("\n")
    return json.loads(last), streamed


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_greedy_tokens_equal_transformers_generate(models, kind, capsys):
    folder = models[kind]
    got, streamed = run_json(capsys, folder, "--device", "cpu", "--prompt", PROMPT, "--max-new-tokens", 12)
    assert got["prompt_tokens"] == auto_ids(folder, PROMPT)
    assert got["tokens"] == reference(folder, got["prompt_tokens"], 12)
    assert len(got["tokens"]) == 12 and len(set(got["tokens"])) > 2  # no stop, and not one token repeated
    assert streamed == PROMPT + got["text"]


def test_json_schema_and_text(models, capsys):
    folder = models["untied"]
    got, _ = run_json(capsys, folder, "cpu", "--prompt", PROMPT, "--max-new-tokens", 5)
    assert sorted(got) == ["first_token_s", "prompt_tokens", "text", "tokens", "tokens_per_s"]
    assert all(isinstance(t, int) for t in got["prompt_tokens"] + got["tokens"])
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    full = tok.decode(got["prompt_tokens"] + got["tokens"])
    assert full == tok.decode(got["prompt_tokens"]) + got["text"]
    assert got["tokens_per_s"] > 0 and 0 <= got["first_token_s"] <= 5 / got["tokens_per_s"]


def test_decoding_stops_at_any_stop_token(models, tmp_path, capsys):
    """A second stop id (from generation_config.json) ends decoding where transformers ends it."""
    folder = shutil.copytree(models["untied"], tmp_path / "m")
    free, _ = run_json(capsys, folder, "cpu", "--prompt", PROMPT, "--max-new-tokens", 12)
    stop = free["tokens"][4]
    gen = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [gen["eos_token_id"], stop]}))
    got, streamed = run_json(capsys, folder, "cpu", "--prompt", PROMPT, "--max-new-tokens", 12)
    first = free["tokens"].index(stop)
    assert got["tokens"] == free["tokens"][:first + 1] == reference(folder, got["prompt_tokens"], 12)
    assert got["text"] == free_text(folder, got["prompt_tokens"], got["tokens"][:-1])
    assert streamed == PROMPT + got["text"]


def free_text(folder, prompt_ids, new):
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    return tok.decode(prompt_ids + new)[len(tok.decode(prompt_ids)):]


def test_chat_wraps_the_prompt_in_the_template(models, capsys):
    folder = models["untied"]
    got, streamed = run_json(capsys, folder, "--device", "cpu", "--chat", "--prompt", "Hi there!",
                             "--max-new-tokens", 6)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    want = tok.apply_chat_template([{"role": "user", "content": "Hi there!"}], add_generation_prompt=True,
                                   tokenize=True)
    want = want["input_ids"] if not isinstance(want, list) else want
    assert got["prompt_tokens"] == list(want)
    assert got["tokens"] == reference(folder, got["prompt_tokens"], 6)
    assert streamed == got["text"]  # the reply alone, without the rendered template


def test_chat_without_a_template_is_refused(capsys):
    rc = test_gen.main([str(DEMO_MODEL), "--device", "cpu", "--chat", "--prompt", "Hi"])
    err = capsys.readouterr()
    assert rc == 2 and err.out == ""
    assert err.err.count("\n") == 1 and err.err.startswith("error: --chat: ") and "no chat template" in err.err


def test_device_flag_and_positional_form(models, capsys):
    outs = []
    for device_args in (["--device", "cpu"], ["cpu"], ["cpu", "--device", "cpu"]):
        assert test_gen.main([str(models["untied"]), *device_args, "--prompt", PROMPT, "--max-new-tokens", "4"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] == outs[2] and outs[0].startswith(PROMPT) and len(outs[0]) > len(PROMPT + "\n")


def test_disagreeing_devices_are_refused(capsys):
    assert test_gen.main([str(DEMO_MODEL), "cpu", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device cuda" in err and "cpu" in err


def test_text_is_handed_out_as_tokens_come(models):
    pieces = []
    gen = test_gen.generate(model_dir=str(models["untied"]), device="cpu", prompt=PROMPT, max_new_tokens=8,
                            on_text=pieces.append)
    assert "".join(pieces) == gen.text and len(pieces) > 2


def test_peft_folder_as_lora(models, tmp_path, capsys):
    """--lora takes a PEFT folder: tokens equal those of transformers with peft's adapters."""
    peft = pytest.importorskip("peft")
    folder = models["untied"]
    torch.manual_seed(5)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"],
                          init_lora_weights=False, task_type="CAUSAL_LM")
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = peft.get_peft_model(base, cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(3.0)  # strong enough to change the greedy tokens
    model.save_pretrained(tmp_path / "adapter")
    got, _ = run_json(capsys, folder, "cpu", "--prompt", PROMPT, "--max-new-tokens", 8, "--lora", tmp_path / "adapter")
    ids = torch.tensor([got["prompt_tokens"]])
    want = model.generate(input_ids=ids, do_sample=False, max_new_tokens=8, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert got["tokens"] == want
    assert want != reference(folder, got["prompt_tokens"], 8)
