"""GGUF LoRA adapters (llama.cpp's --lora) against PEFT's files of the same adapters, and finetune --gguf:
the tuned model's GGUF and Modelfile, a LoRA run's adapter GGUF, and the refusals before any work."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load

from slowllama.errors import ConfigError
from slowllama.formats.gguf_lora import export_adapter_gguf
from slowllama.formats.hf import HFCheckpoint
from slowllama.formats.peft import PEFT_WEIGHTS_FILE, peft_files
from tests.formats.gguf_helpers import (
    expected_encoding,
    field,
    gguf_tensor_name,
    llama_cpp_permute,
    make_model,
    modelfile_parts,
)
from tests.formats.test_peft import random_adapters

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]
TEXT = "The quick brown fox jumps over the lazy dog. " * 30


def assert_adapter_gguf_equals_peft(folder, out, adapters, kind: str, arch=gguf.MODEL_ARCH.LLAMA):
    """Each lora_a / lora_b is PEFT's lora_A / lora_B, with llama.cpp's q/k row permutation on B for a llama
    architecture, encoded as gguf encodes it; the metadata llama.cpp's adapter loader checks is there."""
    ckpt = HFCheckpoint(folder)
    r = gguf.GGUFReader(out)
    assert field(r, "general.type") == "adapter" and field(r, "adapter.type") == "lora"
    assert field(r, "adapter.lora.alpha") == adapters.cfg.alpha
    assert field(r, "general.architecture") == gguf.MODEL_ARCH_NAMES[arch]
    want = {}
    for key, t in load(peft_files(adapters, ckpt.args, str(folder))[PEFT_WEIGHTS_FILE]).items():
        module, ab = key.removeprefix("base_model.model.").removesuffix(".weight").rsplit(".", 1)
        if ab == "lora_B" and arch == gguf.MODEL_ARCH.LLAMA and module.endswith(("q_proj", "k_proj")):
            t = llama_cpp_permute(t, ckpt.args.n_heads if module.endswith("q_proj") else ckpt.args.n_kv_heads)
        want[gguf_tensor_name(arch, ckpt.args.n_layers, module + ".weight", "." + ab.lower())] = \
            expected_encoding(t, kind)
    got = {t.name: t for t in r.tensors}
    assert sorted(got) == sorted(want)
    for n, (qtype, data) in want.items():
        assert got[n].tensor_type == qtype, n
        assert np.array_equal(np.asarray(got[n].data).view(np.uint8).ravel(), data.view(np.uint8).ravel()), n


@pytest.mark.parametrize("kind,model,gguf_type,arch", [("llama", "llama3", "f32", gguf.MODEL_ARCH.LLAMA),
                                                       ("qwen2", "qwen", "q8_0", gguf.MODEL_ARCH.QWEN2)])
def test_adapter_gguf_equals_peft(tmp_path, kind, model, gguf_type, arch):
    folder = make_model(tmp_path / "m", kind, model)
    adapters = random_adapters(HFCheckpoint(folder).args)
    out = export_adapter_gguf(adapters, HFCheckpoint(folder).args, folder / "config.json", tmp_path / "a.gguf",
                              gguf_type)
    assert_adapter_gguf_equals_peft(folder, out, adapters, gguf_type, arch)


def _finetune(tmp_path, folder, **kw):
    from slowllama.run.loop import finetune

    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    return finetune(model_dir=str(folder), data=str(data), out=str(tmp_path / "out"), work_dir=str(tmp_path / "work"),
                    iters=1, seq_len=16, batch_size=2, device="cpu", lr=0.5, **kw)


def test_finetune_writes_the_gguf_of_its_export(tmp_path):
    """finetune --gguf f32: OUT/model-f32.gguf holds the tuned model, as transformers' GGUF loader reads it,
    and OUT/model-f32.Modelfile points Ollama at it with the model's chat format."""
    folder = make_model(tmp_path / "m", "qwen2", "qwen")
    _finetune(tmp_path, folder, gguf="f32")
    out = tmp_path / "out"
    tuned = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    got = transformers.AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f32.gguf", dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = tuned(ids).logits, got(ids).logits, base(ids).logits
    assert (a - b).abs().max() < 1e-4 and (a - c).abs().max() > 1e-3  # the tuned weights, not the base's
    parts = modelfile_parts((out / "model-f32.Modelfile").read_text())
    assert parts["FROM"] == "./model-f32.gguf" and parts["TEMPLATE"] and "<|im_end|>" in parts["stops"]


def test_lora_run_writes_its_adapter_as_gguf(tmp_path):
    """A LoRA run's --gguf: OUT/adapter-f16.gguf holds the adapters PEFT's files beside it hold."""
    from slowllama.formats.peft import load_peft

    folder = make_model(tmp_path / "m")
    _finetune(tmp_path, folder, gguf="f16", lora_rank=2, lora_targets="wq,wk,w2")
    out = tmp_path / "out"
    adapters = load_peft(out, HFCheckpoint(folder).args)
    assert_adapter_gguf_equals_peft(folder, out / "adapter-f16.gguf", adapters, "f16")
    assert not (out / "model-f16.gguf").exists()
    # tools/export_gguf.py converts the PEFT folder afterwards into the same file
    spec = importlib.util.spec_from_file_location("export_gguf_tool", ROOT / "tools" / "export_gguf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([str(out), "--out", str(tmp_path / "t.gguf")]) == 2  # no --base: refused
    assert tool.main([str(out), "--base", str(folder), "--out", str(tmp_path / "t.gguf"), "--type", "f16"]) == 0
    assert (tmp_path / "t.gguf").read_bytes() == (out / "adapter-f16.gguf").read_bytes()


def test_finetune_refuses_gguf_before_any_work(tmp_path):
    from slowllama.cli.finetune import DEMO_MODEL

    biased = make_model(tmp_path / "qb", "qwen3", "qwen", attention_bias=True)
    llama = make_model(tmp_path / "m")
    for folder, kind, match in [(biased, "f16", "attention biases"), (llama, "q4_k", "q4_k"),
                                (DEMO_MODEL, "f16", "--gguf")]:  # a Meta checkpoint
        with pytest.raises(ConfigError, match=match):
            _finetune(tmp_path, folder, gguf=kind)
        assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
    # A file of the user's where the GGUF would go: refused before training, and left as it was.
    (tmp_path / "out").mkdir()
    mine = tmp_path / "out" / "adapter-f16.gguf"
    mine.write_text("my notes")
    with pytest.raises(ConfigError, match="adapter-f16.gguf"):  # --out's own check: not ours
        _finetune(tmp_path, llama, gguf="f16", lora_rank=2)
    assert mine.read_text() == "my notes" and not (tmp_path / "work").exists()
