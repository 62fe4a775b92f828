"""Print a greedy completion from a Meta-format checkpoint (original or tuned), streaming its modules.

    python test_gen.py path/to/llama-2-7b [cpu|cuda|mps] --prompt "Hello" --max-new-tokens 50
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from slowllama.checkpoint import MetaCheckpoint
from slowllama.device import pick_device
from slowllama.generate import ModuleCache, check_context, complete
from slowllama.lora import Adapters
from slowllama.model import ConfigError
from slowllama.tokenizer import Tokenizer


def generate_text(*, model_dir: str, device: str = "auto", prompt: str, max_new_tokens: int,
                  lora: str | None = None) -> str:
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    torch_device = pick_device(device)
    ckpt = MetaCheckpoint(model_dir)
    if ckpt.tokenizer is None:
        raise ConfigError(f"{model_dir}: no tokenizer.model here or in its parent directory")
    tokenizer = Tokenizer(ckpt.tokenizer)
    try:
        check_context(ckpt.args, len(tokenizer.encode(prompt, bos=True)), max_new_tokens)
    except ConfigError as e:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: {e}") from e
    adapters = Adapters.load(Path(lora)) if lora else None
    if adapters:
        adapters.check_args(ckpt.args, Path(lora))

    def read(name):
        params = ckpt.read_module(name)
        return adapters.merge(name, params) if adapters else params

    # Computing in fp32 keeps greedy decoding identical on every device that has fp32 kernels.
    cache = ModuleCache(ckpt.args, read, torch_device, torch.float32)
    return complete(cache, tokenizer, prompt, max_new_tokens)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", help="Meta checkpoint folder")
    p.add_argument("device", nargs="?", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--prompt", default="The", help="text to complete")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    p.add_argument("--lora", help="LoRA adapter file (lora_adapters.blk from finetune.py --lora-rank) to apply")
    a = p.parse_args(argv)
    try:
        text = generate_text(model_dir=a.model_dir, device=a.device, prompt=a.prompt, max_new_tokens=a.max_new_tokens,
                             lora=a.lora)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(a.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
