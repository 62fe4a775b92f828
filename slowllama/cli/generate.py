"""Print completions from a Meta or Hugging Face checkpoint (original or tuned), streaming its modules.

    slowllama generate path/to/model --device cpu --prompt "Hello" --max-new-tokens 50 [--chat] [--json]
    python test_gen.py path/to/model --prompt-file prompts.txt --temperature 0.8 --top-p 0.9 --seed 1

Greedy by default, sampled with --temperature above 0. A single prompt's tokens are printed as they
are chosen; several prompts (--prompt-file) are generated together and printed at the end. Decoding
stops at any of the tokenizer's stop tokens.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from slowllama.device import COMPUTE_DTYPES, check_compute_dtype, pick_device
from slowllama.errors import ConfigError
from slowllama.formats import open_checkpoint
from slowllama.formats.peft import load_adapters
from slowllama.formats.tokenizer import check_vocab, load_tokenizer
from slowllama.inference.generate import (
    ModuleCache,
    Sampler,
    Sampling,
    TextStream,
    check_context,
    compute_dtype,
    generate_tokens,
)
from slowllama.run.options import parse_size


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
    from slowllama.formats.chat_template import render

    if tokenizer.chat_template is None:
        raise ConfigError(f"--chat: {tokenizer.path} has no chat template (chat_template.jinja or chat_template "
                          f"in tokenizer_config.json)")
    text, _ = render(tokenizer.chat_template, [{"role": "user", "content": prompt}], add_generation_prompt=True,
                     variables=dict(tokenizer.template_tokens))
    return tokenizer.encode_with_offsets(text)[0]  # the template writes its own BOS, as in training


def read_prompts(path: str) -> list[str]:
    """One prompt per non-blank line of a UTF-8 file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--prompt-file {path}: cannot read it ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"--prompt-file {path}: not UTF-8 text (invalid byte at offset {e.start})") from e
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"--prompt-file {path}: holds no prompt (one per line)")
    return prompts


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return compute_dtype(device)
    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"--compute-dtype {name!r}: expected auto, {', '.join(COMPUTE_DTYPES)}")
    check_compute_dtype(device, COMPUTE_DTYPES[name])
    return COMPUTE_DTYPES[name]


def generate_many(*, model_dir: str, device: str = "auto", prompts: list[str], max_new_tokens: int,
                  lora: str | None = None, chat: bool = False, sampling: Sampling | None = None,
                  ram_budget: int | None = None, dtype: str = "auto", use_kv: bool = True,
                  on_text: Callable[[int, str], None] | None = None, stats: dict | None = None) -> list[Generation]:
    """Completions of several prompts generated together, one read of each streamed module serving them all.

    ram_budget: bytes of device memory for modules and the KV cache (None: what the device has free).
    on_text(prompt index, piece) gets each completion's text as it grows; stats, if given, gets the module reads.
    """
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    sampling = sampling or Sampling()
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    ckpt = open_checkpoint(model_dir)
    tokenizer = load_tokenizer(model_dir)
    all_ids = []
    for prompt in prompts:
        ids = prompt_ids(tokenizer, prompt, chat)
        if not ids:
            raise ConfigError("--prompt: encodes to no tokens; give some text")
        check_vocab(tokenizer, max(ids), ckpt.args.vocab_size)
        all_ids.append(ids)
    n = max(len(ids) for ids in all_ids)
    try:
        check_context(ckpt.args, n, max_new_tokens)
    except ConfigError as e:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: {e}") from e
    adapters = load_adapters(Path(lora), ckpt.args) if lora else None

    def read(name):
        params = ckpt.read_module(name)
        return adapters.merge(name, params) if adapters else params

    cache = ModuleCache(ckpt.args, read, torch_device, torch_dtype, ram_budget)
    times: list[list[float]] = [[] for _ in all_ids]
    streams = [TextStream(tokenizer, ids) for ids in all_ids]

    def hook(i: int, t: int):
        times[i].append(time.perf_counter())
        if t in tokenizer.stop_ids:
            return
        streams[i].add(t)
        piece = streams[i].more()
        if piece and on_text is not None:
            on_text(i, piece)

    start = time.perf_counter()
    news = generate_tokens(cache, all_ids, max_new_tokens, tokenizer.stop_ids, Sampler(sampling), hook, use_kv)
    if stats is not None:
        stats.update(reads=cache.reads, bytes_read=cache.bytes_read, streamed=cache.streamed)
    gens = []
    for i, (ids, new, ts, stream) in enumerate(zip(all_ids, news, times, streams)):
        piece = stream.more(final=True)
        if piece and on_text is not None:
            on_text(i, piece)
        elapsed = ts[-1] - start
        gens.append(Generation(prompt_tokens=ids, tokens=new, text=stream.text(),
                               first_token_s=ts[0] - start,
                               tokens_per_s=len(new) / elapsed if elapsed > 0 else float("inf")))
    return gens


def generate(*, model_dir: str, device: str = "auto", prompt: str, max_new_tokens: int, lora: str | None = None,
             chat: bool = False, on_text: Callable[[str], None] | None = None, sampling: Sampling | None = None,
             ram_budget: int | None = None, dtype: str = "auto", use_kv: bool = True) -> Generation:
    """One completion; on_text gets the text as it grows, piece by piece."""
    hook = (lambda _, piece: on_text(piece)) if on_text is not None else None
    return generate_many(model_dir=model_dir, device=device, prompts=[prompt], max_new_tokens=max_new_tokens,
                         lora=lora, chat=chat, sampling=sampling, ram_budget=ram_budget, dtype=dtype, use_kv=use_kv,
                         on_text=hook)[0]


def generate_text(*, model_dir: str, device: str = "auto", prompt: str, max_new_tokens: int,
                  lora: str | None = None) -> str:
    """The greedy continuation of prompt, as text."""
    return generate(model_dir=model_dir, device=device, prompt=prompt, max_new_tokens=max_new_tokens, lora=lora).text


def main(argv=None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # --help lists the options by group; the positionals keep their order (model_dir, then device).
    what = p.add_argument_group("model and prompt")
    sampling = p.add_argument_group("sampling")
    where = p.add_argument_group("where and how fast")
    what.add_argument("model_dir", help="checkpoint folder: Meta (params.json) or Hugging Face (config.json)")
    where.add_argument("device", nargs="?", default=None, help="the older form of --device")
    where.add_argument("--device", dest="device_flag", default=None,
                       help="auto, cpu, cuda or mps (auto: mps, then cuda, then cpu)")
    what.add_argument("--prompt", default=None, help="text to complete (default: The)")
    what.add_argument("--prompt-file", help="a UTF-8 file of prompts, one per line, generated together")
    what.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    what.add_argument("--lora", help="LoRA adapters to apply: lora_adapters.blk from finetune.py --lora-rank, or a "
                                     "PEFT folder (adapter_config.json)")
    what.add_argument("--chat", action="store_true",
                      help="send the prompt as one user message in the model's chat template")
    what.add_argument("--json", action="store_true",
                      help="end with one JSON line per prompt: prompt_tokens, tokens, text, tokens_per_s, first_token_s")
    sampling.add_argument("--temperature", type=float, default=0.0, help="0 is greedy; above 0 samples")
    sampling.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    sampling.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens holding this "
                                                                   "probability (1: all)")
    sampling.add_argument("--repetition-penalty", type=float, default=1.0,
                          help="divide the logits of tokens already in the sequence by this (1: off)")
    sampling.add_argument("--seed", type=int, default=0, help="the sampling seed: the same seed gives the same text")
    where.add_argument("--ram-budget", default=None,
                       help="device memory for modules and the KV cache, e.g. 8G (default: what the device has free; "
                            "none: no limit); modules beyond it are read again for every token")
    where.add_argument("--compute-dtype", default="auto",
                       help="auto (bfloat16 on cuda and mps where supported, float32 on cpu), float32, bfloat16 "
                            "or float16")
    a = p.parse_args(argv)

    def show(piece: str):
        sys.stdout.write(piece)
        sys.stdout.flush()

    started = []  # the prompt is printed with the first piece of text, so that an error comes alone

    def on_text(_, piece: str):
        if not started and not a.chat:
            show(a.prompt)
        started.append(True)
        show(piece)

    try:
        if a.device and a.device_flag and a.device != a.device_flag:
            raise ConfigError(f"--device {a.device_flag} and the positional device {a.device} disagree; give one")
        if a.prompt is not None and a.prompt_file:
            raise ConfigError("--prompt and --prompt-file: give one")
        prompts = read_prompts(a.prompt_file) if a.prompt_file else [a.prompt if a.prompt is not None else "The"]
        a.prompt = prompts[0]
        budget = parse_size(a.ram_budget) if a.ram_budget is not None else None
        if a.ram_budget is not None and budget is None:
            budget = sys.maxsize  # none: keep every module
        sampling = Sampling(a.temperature, a.top_k, a.top_p, a.repetition_penalty, a.seed)
        # Several prompts are printed whole at the end: their tokens arrive interleaved.
        gens = generate_many(model_dir=a.model_dir, device=a.device_flag or a.device or "auto", prompts=prompts,
                             max_new_tokens=a.max_new_tokens, lora=a.lora, chat=a.chat, sampling=sampling,
                             ram_budget=budget, dtype=a.compute_dtype, on_text=on_text if len(prompts) == 1 else None)
    except (ConfigError, OSError) as e:
        if started:
            print()
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(prompts) == 1:
        if not started and not a.chat:
            show(a.prompt)
        print()
    else:
        for prompt, gen in zip(prompts, gens):
            print(gen.text if a.chat else prompt + gen.text)
    if a.json:
        for gen in gens:
            print(json.dumps(asdict(gen), ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
