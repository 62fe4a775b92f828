"""GGUF export: read back with gguf's own reader, loaded by transformers' GGUF loader, and its refusals."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from slowllama.errors import ConfigError
from slowllama.formats.gguf import _qtype, encode_tensor, export_gguf, gguf_name
from slowllama.formats.hf import HFCheckpoint, expected_shapes
from slowllama.model.transformer import module_names
from tests.engine.test_hf_training import make_model

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
KEYS = ["general.architecture", "llama.context_length", "llama.embedding_length", "llama.block_count",
        "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
        "llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base", "llama.rope.dimension_count",
        "llama.vocab_size", "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("m") / "m", hidden_size=64, intermediate_size=96)


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
def test_tensors_read_back(model, tmp_path, kind):
    out = export_gguf(model, tmp_path / "m.gguf", kind)
    r = gguf.GGUFReader(out)
    assert set(KEYS) <= set(r.fields), set(KEYS) - set(r.fields)
    got = {t.name: t for t in r.tensors}
    ckpt = HFCheckpoint(model)
    names = []
    for module in module_names(ckpt.args):
        tensors = ckpt.read_module(module)
        for param, shape in expected_shapes(ckpt.args, module).items():
            name = gguf_name(module, param)
            names.append(name)
            t = got[name]
            qtype = _qtype(kind, tuple(shape))
            assert t.tensor_type == qtype, name
            assert [int(x) for x in t.shape] == list(reversed(shape)), name
            want = encode_tensor(tensors[param], qtype)
            assert np.array_equal(np.asarray(t.data).view(np.uint8).ravel(), want.view(np.uint8).ravel()), name
    assert sorted(got) == sorted(names)
    if kind == "q8_0":  # the bytes are gguf's own quantizer's
        t = got["blk.0.attn_v.weight"]
        w = ckpt.read_module("layers.0")["attention.wv.weight"].float().numpy()
        assert np.array_equal(np.asarray(t.data).ravel(), gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0).ravel())


@pytest.mark.parametrize("tied", [False, True])
def test_transformers_loads_gguf(tmp_path, tied):
    folder = make_model(tmp_path / "m", hidden_size=64, intermediate_size=96, tie_word_embeddings=tied)
    out = export_gguf(folder, tmp_path / "m.gguf", "f32")
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert ("output.weight" in names) == (not tied)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ids = torch.randint(0, 400, (1, 12))
    with torch.no_grad():
        a, b = ref(ids).logits, got(ids).logits
    assert (a - b).abs().max() < 1e-4
    text = "The quick brown fox, 1234!"
    want = transformers.AutoTokenizer.from_pretrained(folder)(text)["input_ids"]
    have = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")(text)["input_ids"]
    assert have == want


def test_refusals(model, tmp_path):
    with pytest.raises(ConfigError, match="--type"):
        export_gguf(model, tmp_path / "a.gguf", "q4_k")
    other = tmp_path / "notes.txt"
    other.write_text("mine")
    with pytest.raises(ConfigError, match="not a GGUF"):
        export_gguf(model, other, "f16")
    assert other.read_text() == "mine"
    mistral = make_model(tmp_path / "mi", kind="mistral", hidden_size=64, intermediate_size=96, sliding_window=None)
    with pytest.raises(ConfigError, match="model_type"):
        export_gguf(mistral, tmp_path / "b.gguf", "f16")
    assert list(tmp_path.glob("*.gguf")) == [] and not list(tmp_path.glob(".*tmp*"))
    r = subprocess.run([sys.executable, str(ROOT / "tools/export_gguf.py"), str(model), "--out", str(other),
                        "--type", "f16"], capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not a GGUF" in r.stderr


def test_overwrites_own_gguf(model, tmp_path):
    out = tmp_path / "m.gguf"
    export_gguf(model, out, "f32")
    export_gguf(model, out, "f16")
    assert {t.tensor_type for t in gguf.GGUFReader(out).tensors} == {gguf.GGMLQuantizationType.F16,
                                                                      gguf.GGMLQuantizationType.F32}


def test_full_disk_leaves_no_partial_file(model, tmp_path, monkeypatch):
    """A write failing mid-data (ENOSPC) leaves the previous GGUF as it was and no temp file; one line names out."""
    import errno

    out = tmp_path / "m.gguf"
    export_gguf(model, out, "f32")
    before = out.read_bytes()
    calls = []

    def failing(self, tensor, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, tensor, *a, **k)

    real = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", failing)
    with pytest.raises(OSError, match="m.gguf: write failed") as e:
        export_gguf(model, out, "f16")
    assert e.value.errno == errno.ENOSPC and "\n" not in str(e.value)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_finetune_writes_the_gguf_of_its_export(tmp_path):
    """finetune --gguf f32: OUT/model-f32.gguf holds the tuned model, as transformers' GGUF loader reads it."""
    from slowllama.run.loop import finetune

    folder = make_model(tmp_path / "m", hidden_size=64, intermediate_size=96)
    data = tmp_path / "d.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    out = tmp_path / "out"
    finetune(model_dir=str(folder), data=str(data), out=str(out), iters=1, seq_len=16, batch_size=2,
             device="cpu", lr=0.5, gguf="f32")
    tuned = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    got = transformers.AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f32.gguf", dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.randint(0, 400, (1, 12))
    with torch.no_grad():
        a, b, c = tuned(ids).logits, got(ids).logits, base(ids).logits
    assert (a - b).abs().max() < 1e-4 and (a - c).abs().max() > 1e-3  # the tuned weights, not the base's


def test_finetune_refuses_gguf_before_any_work(tmp_path):
    from slowllama.run.loop import finetune

    mistral = make_model(tmp_path / "mi", kind="mistral", hidden_size=64, intermediate_size=96, sliding_window=None)
    data = tmp_path / "d.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    from slowllama.cli.finetune import DEMO_MODEL

    llama = make_model(tmp_path / "m")
    for kw, match in [({"model_dir": str(mistral), "gguf": "f16"}, "model_type"),
                      ({"model_dir": str(llama), "gguf": "f16", "lora_rank": 2}, "--merge"),
                      ({"model_dir": str(DEMO_MODEL), "gguf": "f16"}, "--gguf")]:  # a Meta checkpoint
        with pytest.raises(ConfigError, match=match):
            finetune(data=str(data), out=str(tmp_path / "out"), work_dir=str(tmp_path / "work"), iters=1,
                     seq_len=16, batch_size=2, device="cpu", **kw)
        assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
    # A file of the user's where the GGUF would go: refused before training, and left as it was.
    (tmp_path / "out").mkdir()
    mine = tmp_path / "out" / "model-f16.gguf"
    mine.write_text("my notes")
    with pytest.raises(ConfigError, match="model-f16.gguf"):  # --out's own check: not ours
        finetune(model_dir=str(llama), data=str(data), out=str(tmp_path / "out"), work_dir=str(tmp_path / "work"),
                 iters=1, seq_len=16, batch_size=2, device="cpu", gguf="f16")
    assert mine.read_text() == "my notes" and not (tmp_path / "work").exists()
