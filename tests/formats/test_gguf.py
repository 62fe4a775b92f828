"""GGUF export: read back with gguf's own reader against gguf's name map and quantizer, loaded by transformers'
GGUF loader against the Hugging Face folder, RoPE scaling against transformers' own, and the refusals."""
from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from slowllama.errors import ConfigError
from slowllama.formats.gguf import export_gguf
from tests.formats.gguf_helpers import (
    expected_encoding,
    field,
    gguf_tensor_name,
    llama_cpp_permute,
    make_model,
)
from tests.formats.test_hf_format import LLAMA3_ROPE

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
K = gguf.Keys
# What llama.cpp's loader needs of every architecture here ({arch} is the architecture's name).
REQUIRED = [K.General.ARCHITECTURE, K.General.TYPE, K.LLM.CONTEXT_LENGTH, K.LLM.EMBEDDING_LENGTH, K.LLM.BLOCK_COUNT,
            K.LLM.FEED_FORWARD_LENGTH, K.Attention.HEAD_COUNT, K.Attention.HEAD_COUNT_KV, K.Attention.LAYERNORM_RMS_EPS,
            K.Attention.KEY_LENGTH, K.Attention.VALUE_LENGTH, K.Rope.FREQ_BASE, K.Rope.DIMENSION_COUNT,
            K.Tokenizer.MODEL, K.Tokenizer.PRE, K.Tokenizer.LIST, K.Tokenizer.TOKEN_TYPE, K.Tokenizer.MERGES,
            K.Tokenizer.EOS_ID, K.Tokenizer.CHAT_TEMPLATE]
# name -> (model kind, tokenizer, config changes, llama.cpp architecture, its tokenizer.ggml.pre)
MODELS = {
    "llama": ("llama", "llama3", {}, gguf.MODEL_ARCH.LLAMA, "llama-bpe"),
    "tied_llama": ("llama", "llama3", {"tie_word_embeddings": True}, gguf.MODEL_ARCH.LLAMA, "llama-bpe"),
    "mistral": ("mistral", "llama3", {"sliding_window": 64}, gguf.MODEL_ARCH.LLAMA, "llama-bpe"),
    "qwen2": ("qwen2", "qwen", {"tie_word_embeddings": True}, gguf.MODEL_ARCH.QWEN2, "qwen2"),
    "qwen3": ("qwen3", "qwen", {"num_attention_heads": 2, "num_key_value_heads": 1}, gguf.MODEL_ARCH.QWEN3, "qwen2"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    made = {}

    def get(name: str) -> Path:
        if name not in made:
            kind, tok, kw, _, _ = MODELS[name]
            # not named "mistral": transformers would then map it to a "mistral" architecture gguf lacks
            made[name] = make_model(tmp_path_factory.mktemp(name) / f"tiny-{name}", kind, tok, **kw)
        return made[name]
    return get


def expected_tensors(folder: Path, name: str, kind: str) -> dict[str, tuple]:
    """{GGUF name: (ggml type, bytes)} as llama.cpp's converter makes them from the safetensors file."""
    cfg = json.loads((folder / "config.json").read_text())
    arch = MODELS[name][3]
    out = {}
    for hf, t in load_file(folder / "model.safetensors").items():
        if arch == gguf.MODEL_ARCH.LLAMA and ".q_proj." in hf:
            t = llama_cpp_permute(t, cfg["num_attention_heads"])
        elif arch == gguf.MODEL_ARCH.LLAMA and ".k_proj." in hf:
            t = llama_cpp_permute(t, cfg["num_key_value_heads"])
        out[gguf_tensor_name(arch, cfg["num_hidden_layers"], hf)] = expected_encoding(t, kind)
    return out


@pytest.mark.parametrize("name,kind", [("llama", "f32"), ("llama", "f16"), ("llama", "bf16"), ("llama", "q8_0"),
                                       ("qwen2", "q8_0"), ("qwen3", "bf16"), ("mistral", "f16")])
def test_tensors_and_metadata_read_back(models, tmp_path, name, kind):
    folder = models(name)
    out = export_gguf(folder, tmp_path / "m.gguf", kind)
    r = gguf.GGUFReader(out)
    arch = gguf.MODEL_ARCH_NAMES[MODELS[name][3]]
    assert field(r, K.General.ARCHITECTURE) == arch and field(r, K.General.TYPE) == "model"
    missing = [k for k in (k.format(arch=arch) for k in REQUIRED) if k not in r.fields]
    assert not missing
    cfg = json.loads((folder / "config.json").read_text())
    assert [field(r, k.format(arch=arch)) for k in (K.LLM.BLOCK_COUNT, K.Attention.HEAD_COUNT,
                                                     K.Attention.HEAD_COUNT_KV, K.LLM.FEED_FORWARD_LENGTH)] == \
        [cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]]
    assert field(r, K.Tokenizer.PRE) == MODELS[name][4] and field(r, K.Tokenizer.MODEL) == "gpt2"
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)  # llama.cpp adds BOS where transformers does
    assert field(r, K.Tokenizer.ADD_BOS) == (hf_tok("x")["input_ids"][0] == hf_tok.bos_token_id)
    assert field(r, K.Tokenizer.CHAT_TEMPLATE) == hf_tok.chat_template
    assert field(r, K.General.FILE_TYPE) == gguf.LlamaFileType[{"f32": "ALL_F32", "f16": "MOSTLY_F16",
                                                             "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}[kind]]
    want = expected_tensors(folder, name, kind)
    got = {t.name: t for t in r.tensors}
    assert sorted(got) == sorted(want)  # a tied model has no output.weight, as llama.cpp expects
    for n, (qtype, data) in want.items():
        assert got[n].tensor_type == qtype, n
        assert np.array_equal(np.asarray(got[n].data).view(np.uint8).ravel(), data.view(np.uint8).ravel()), n
    if name == "mistral":
        assert field(r, K.Attention.SLIDING_WINDOW.format(arch=arch)) == 64


def _f16_rounded(model):
    """The model with every matrix rounded to f16, as the f16 GGUF holds it (1-D tensors stay f32)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(p.half().float())
    return model


@pytest.mark.parametrize("name,kind", [("tied_llama", "f32"), ("mistral", "f32"), ("qwen2", "f16"), ("qwen3", "f32")])
def test_transformers_loads_the_gguf(models, tmp_path, name, kind):
    """transformers' GGUF loader: logits equal the Hugging Face folder's (f16: the folder's rounded to f16)
    within 1e-4, and the tokenizer it builds from the GGUF gives the same ids."""
    folder = models(name)
    export_gguf(folder, tmp_path / "m.gguf", kind)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if kind == "f16":
        ref = _f16_rounded(ref)
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ids = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ref(ids).logits - got(ids).logits).abs().max() < 1e-4
    want_tok = transformers.AutoTokenizer.from_pretrained(folder)
    have_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in ("The quick brown fox, 1234567 numbers!", "  spaces\t\ttabs\n\nnewlines  ", "x<|im_end|>y"):
        assert have_tok(text)["input_ids"] == want_tok(text)["input_ids"], text


def test_rope_scaling(tmp_path):
    """Llama 3 RoPE as llama.cpp's rope_freqs (the frequencies divide by it: transformers' llama3 ones result);
    linear scaling as rope.scaling metadata."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # an original context of 256 puts this tiny model's 8 frequencies in all three of Llama 3's bands
    folder = make_model(tmp_path / "l31", rope_parameters={**LLAMA3_ROPE, "original_max_position_embeddings": 256})
    r = gguf.GGUFReader(export_gguf(folder, tmp_path / "l31.gguf", "q8_0"))
    factors = {t.name: t for t in r.tensors}["rope_freqs.weight"]
    assert factors.tensor_type == gguf.GGMLQuantizationType.F32 and r.tensors[0].name == "rope_freqs.weight"
    config = transformers.AutoConfig.from_pretrained(folder)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = config.head_dim  # transformers' unscaled frequencies, as its rope init computes them
    default = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    got = torch.from_numpy(np.array(factors.data))
    torch.testing.assert_close(default / got, scaled, rtol=1e-6, atol=0)
    assert len(set(got.tolist())) > 2  # unscaled, divided by factor, and smoothed frequencies all present
    assert K.Rope.SCALING_TYPE.format(arch="llama") not in r.fields  # llama.cpp would scale twice

    linear = make_model(tmp_path / "lin", rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    r = gguf.GGUFReader(export_gguf(linear, tmp_path / "lin.gguf", "f16"))
    assert field(r, K.Rope.SCALING_TYPE.format(arch="llama")) == "linear"
    assert field(r, K.Rope.SCALING_FACTOR.format(arch="llama")) == 2.0
    assert "rope_freqs.weight" not in {t.name for t in r.tensors}


def test_refusals(models, tmp_path):
    """Each bad request is one line naming what is wrong, before any file is written."""
    model = models("llama")
    with pytest.raises(ConfigError, match="--type"):
        export_gguf(model, tmp_path / "a.gguf", "q4_k")
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    with pytest.raises(ConfigError, match="not a GGUF"):
        export_gguf(model, other, "f16")
    assert other.read_text() == "mine"
    (tmp_path / "b.Modelfile").write_text("FROM llama3\n")  # the user's own Modelfile
    with pytest.raises(ConfigError, match="b.Modelfile: exists and was not written by slowllama"):
        export_gguf(model, tmp_path / "b.gguf", "f16")
    assert (tmp_path / "b.Modelfile").read_text() == "FROM llama3\n"
    biased = make_model(tmp_path / "qb", "qwen3", "qwen", attention_bias=True)
    with pytest.raises(ConfigError, match="attention biases on wk, wo, wq, wv have no place"):
        export_gguf(biased, tmp_path / "c.gguf", "f16")
    raw = json.loads((model / "tokenizer.json").read_text())  # a byte-level BPE with a splitting rule of its own
    raw["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}+|\s+|."
    odd = tmp_path / "odd"
    odd.mkdir()
    for p in model.iterdir():
        (odd / p.name).write_bytes(p.read_bytes())
    (odd / "tokenizer.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="tokenizer.json: its pre_tokenizer .* llama.cpp has no name for"):
        export_gguf(odd, tmp_path / "d.gguf", "f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.Modelfile", "notes.txt", "odd", "qb"]
    r = subprocess.run([sys.executable, str(ROOT / "tools/export_gguf.py"), str(model), "--out", str(other),
                        "--type", "f16"], check=False, capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not a GGUF" in r.stderr


def test_overwrites_own_gguf(models, tmp_path):
    out = tmp_path / "m.gguf"
    export_gguf(models("llama"), out, "f32")
    export_gguf(models("llama"), out, "f16")
    assert {t.tensor_type for t in gguf.GGUFReader(out).tensors} == {gguf.GGMLQuantizationType.F16,
                                                                      gguf.GGMLQuantizationType.F32}


def test_full_disk_leaves_no_partial_file(models, tmp_path, monkeypatch):
    """A write failing mid-data (ENOSPC) leaves the previous GGUF and Modelfile as they were and no temp file;
    one line names out."""
    out = tmp_path / "m.gguf"
    export_gguf(models("llama"), out, "f32")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    calls = []

    def failing(self, tensor, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tensor, *a, **k)

    real = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", failing)
    with pytest.raises(OSError, match="m.gguf: write failed") as e:
        export_gguf(models("llama"), out, "f16")
    assert e.value.errno == errno.ENOSPC and "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert sorted(before) == ["m.Modelfile", "m.gguf"]


def test_sentencepiece_tokenizer(tmp_path):
    """A folder with a sentencepiece tokenizer.model and no tokenizer.json: llama.cpp's "llama" vocabulary, whose
    tokenizer in transformers' GGUF loader gives sentencepiece's own ids (BOS first, as llama.cpp adds it)."""
    import sentencepiece as spm

    from slowllama.cli.finetune import DEMO_MODEL

    folder = make_model(tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    (folder / "tokenizer.model").write_bytes((DEMO_MODEL / "tokenizer.model").read_bytes())
    r = gguf.GGUFReader(export_gguf(folder, tmp_path / "m.gguf", "f16"))
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert field(r, K.Tokenizer.MODEL) == "llama" and len(r.fields[K.Tokenizer.LIST].data) == sp.vocab_size()
    assert (field(r, K.Tokenizer.BOS_ID), field(r, K.Tokenizer.EOS_ID)) == (sp.bos_id(), sp.eos_id())
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in ("The quick brown fox, 1234!", "the lazy dog jumps"):
        assert tok(text)["input_ids"] == [sp.bos_id(), *sp.encode(text)], text
