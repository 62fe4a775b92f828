"""LoRA adapters as a GGUF adapter for llama.cpp's --lora (and Ollama's ADAPTER), beside PEFT's files.

The layout is the one llama.cpp's convert_lora_to_gguf.py writes and llama-adapter.cpp checks: general.type
"adapter", adapter.type "lora", adapter.lora.alpha, and per adapted weight `<its GGUF name>.lora_a` (A,
rank x in, so ggml's ne is [in, rank]) and `.lora_b` (B, out x rank: ne [rank, out]). llama.cpp scales
B @ A by alpha / rank, as PEFT and slowllama do. B's rows for wq and wk follow the base tensor's RoPE layout
in that architecture (gguf.gguf_layout); A's columns index the layer's input, which no layout touches.
"""
from __future__ import annotations

from pathlib import Path

from ..model.lora import TARGETS, Adapters
from ..model.transformer import ModelArgs
from .gguf import (
    _qtype,
    check_out,
    check_type,
    encode_tensor,
    gguf_layout,
    gguf_name,
    model_arch,
    write_gguf,
)


def check_adapter_request(config_path: Path, out: Path, gguf_type: str):
    """Every refusal before any work: the type, the architecture, the output path."""
    check_type(gguf_type)
    model_arch(config_path)
    check_out(out)


def export_adapter_gguf(adapters: Adapters, args: ModelArgs, config_path: Path, out: Path, gguf_type: str,
                        name: str = "") -> Path:
    """Write the adapters of the model config_path describes as a GGUF LoRA adapter at out, atomically."""
    import gguf

    check_adapter_request(config_path, out, gguf_type)
    arch = model_arch(config_path)
    tensors = []  # (gguf name, array): small, rank x layer width each
    for layer in sorted(adapters.params, key=lambda m: int(m.split(".")[1])):
        for t in (t for t in TARGETS if t in adapters.params[layer]):  # the base model's tensor order
            a, b = (x.detach().to("cpu") for x in adapters.params[layer][t])
            key = f"{TARGETS[t]}.weight"
            base = gguf_name(layer, key)
            b = gguf_layout(arch, args, f"{layer}.{key}", b)
            for suffix, x in (("lora_a", a), ("lora_b", b)):
                tensors.append((f"{base}.{suffix}", tuple(x.shape), _qtype(gguf_type, tuple(x.shape)), x))

    def metadata(w):
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(adapters.cfg.alpha))
        if name:
            w.add_name(name)

    return write_gguf(out, arch, metadata, [(n, s, q) for n, s, q, _ in tensors],
                      (encode_tensor(x, q) for _, _, q, x in tensors))
