"""Print a greedy completion from a Meta or Hugging Face checkpoint (original or tuned), streaming its modules.

    python test_gen.py path/to/model --device cpu --prompt "Hello" --max-new-tokens 50 [--chat] [--json]

Tokens are printed as they are chosen. Decoding stops at any of the tokenizer's stop tokens.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from slowllama.device import pick_device
from slowllama.formats import open_checkpoint
from slowllama.generate import ModuleCache, TextStream, check_context, greedy
from slowllama.lora import load_adapters
from slowllama.model import ConfigError
from slowllama.tokenizer import load_tokenizer


@dataclass
class Generation:
    prompt_tokens: list[int]
    tokens: list[int]  # the new ones, ending with the stop token if one was chosen
    text: str  # the new tokens' text, without the stop token
    tokens_per_s: float
    first_token_s: float  # from the first module read to the first token


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """The prompt's ids; with chat, the prompt as one user message in the model's chat template."""
    if not chat:
        return tokenizer.encode(prompt, bos=True)
    from slowllama.chat import render

    if tokenizer.chat_template is None:
        raise ConfigError(f"--chat: {tokenizer.path} has no chat template (chat_template.jinja or chat_template "
                          f"in tokenizer_config.json)")
    text, _ = render(tokenizer.chat_template, [{"role": "user", "content": prompt}], add_generation_prompt=True,
                     variables=dict(tokenizer.template_tokens))
    return tokenizer.encode_with_offsets(text)[0]  # the template writes its own BOS, as in training


def generate(*, model_dir: str, device: str = "auto", prompt: str, max_new_tokens: int, lora: str | None = None,
             chat: bool = False, on_text: Callable[[str], None] | None = None) -> Generation:
    """Greedy decoding in fp32; on_text gets the text as it grows, piece by piece."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    torch_device = pick_device(device)
    ckpt = open_checkpoint(model_dir)
    tokenizer = load_tokenizer(model_dir)
    ids = prompt_ids(tokenizer, prompt, chat)
    if not ids:
        raise ConfigError("--prompt: encodes to no tokens; give some text")
    too_big = [i for i in ids if i >= ckpt.args.vocab_size]
    if too_big:
        raise ConfigError(f"{tokenizer.path}: token id {too_big[0]} is beyond the model's vocab_size "
                          f"{ckpt.args.vocab_size}")
    try:
        check_context(ckpt.args, len(ids), max_new_tokens)
    except ConfigError as e:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: {e}") from e
    adapters = load_adapters(Path(lora), ckpt.args) if lora else None

    def read(name):
        params = ckpt.read_module(name)
        return adapters.merge(name, params) if adapters else params

    # Computing in fp32 keeps greedy decoding identical on every device that has fp32 kernels.
    cache = ModuleCache(ckpt.args, read, torch_device, torch.float32)
    stream = TextStream(tokenizer, ids)
    times = []

    def on_token(t: int):
        times.append(time.perf_counter())
        if t in tokenizer.stop_ids:
            return
        stream.add(t)
        if on_text is not None:
            piece = stream.more()
            if piece:
                on_text(piece)

    start = time.perf_counter()
    new = greedy(cache, ids, max_new_tokens, tokenizer.stop_ids, on_token)
    if on_text is not None:
        piece = stream.more(final=True)
        if piece:
            on_text(piece)
    elapsed = times[-1] - start
    return Generation(prompt_tokens=ids, tokens=new, text=stream.text(), first_token_s=times[0] - start,
                      tokens_per_s=len(new) / elapsed if elapsed > 0 else float("inf"))


def generate_text(*, model_dir: str, device: str = "auto", prompt: str, max_new_tokens: int,
                  lora: str | None = None) -> str:
    """The greedy continuation of prompt, as text."""
    return generate(model_dir=model_dir, device=device, prompt=prompt, max_new_tokens=max_new_tokens, lora=lora).text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", help="checkpoint folder: Meta (params.json) or Hugging Face (config.json)")
    p.add_argument("device", nargs="?", default=None, help="the older form of --device")
    p.add_argument("--device", dest="device_flag", default=None,
                   help="auto, cpu, cuda or mps (auto: mps, then cuda, then cpu)")
    p.add_argument("--prompt", default="The", help="text to complete")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    p.add_argument("--lora", help="LoRA adapters to apply: lora_adapters.blk from finetune.py --lora-rank, or a "
                                  "PEFT folder (adapter_config.json)")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as one user message in the model's chat template")
    p.add_argument("--json", action="store_true",
                   help="end with one JSON line: prompt_tokens, tokens, text, tokens_per_s, first_token_s")
    a = p.parse_args(argv)

    def show(piece: str):
        sys.stdout.write(piece)
        sys.stdout.flush()

    started = []  # the prompt is printed with the first piece of text, so that an error comes alone

    def on_text(piece: str):
        if not started and not a.chat:
            show(a.prompt)
        started.append(True)
        show(piece)

    try:
        if a.device and a.device_flag and a.device != a.device_flag:
            raise ConfigError(f"--device {a.device_flag} and the positional device {a.device} disagree; give one")
        device = a.device_flag or a.device or "auto"
        gen = generate(model_dir=a.model_dir, device=device, prompt=a.prompt, max_new_tokens=a.max_new_tokens,
                       lora=a.lora, chat=a.chat, on_text=on_text)
    except (ConfigError, OSError) as e:
        if started:
            print()
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not started and not a.chat:
        show(a.prompt)
    print()
    if a.json:
        print(json.dumps(asdict(gen), ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
