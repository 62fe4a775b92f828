"""Perplexity of a Meta or Hugging Face checkpoint on a text file or records, reading each module once.

    slowllama perplexity MODEL --data FILE [--seq-len N] [--batch-size B] [--device D] [--lora FILE]

Plain text is cut into consecutive windows of --seq-len + 1 tokens, so every token after the first is
scored once; records (JSONL, JSON, Parquet, CSV) are scored as finetune.py trains on them (completions and
assistant turns only, unless --train-on-prompt). The last line is JSON: {"loss": ..., "ppl": ..., "tokens": ...}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from slowllama.data.windows import load_data
from slowllama.device import COMPUTE_DTYPES, check_compute_dtype, pick_device
from slowllama.errors import ConfigError
from slowllama.formats import open_checkpoint
from slowllama.formats.peft import load_adapters
from slowllama.formats.tokenizer import check_vocab, load_tokenizer
from slowllama.inference.evaluate import eval_batches, evaluate, perplexity


def run(*, model_dir: str, data: str, seq_len: int | None = None, batch_size: int = 8, device: str = "auto",
        dtype: str = "float32", lora: str | None = None, train_on_prompt: bool = False) -> dict:
    """{"loss", "ppl", "tokens", "seconds", "data"} of the model on the data file ("data": what was read)."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    if dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"--compute-dtype {dtype!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
    torch_device = pick_device(device)
    check_compute_dtype(torch_device, COMPUTE_DTYPES[dtype])
    ckpt = open_checkpoint(model_dir)
    args = ckpt.args
    seq_len = min(512, args.max_seq_len) if seq_len is None else seq_len
    if seq_len > args.max_seq_len:
        raise ConfigError(f"--seq-len {seq_len} is longer than the model's context of {args.max_seq_len} tokens")
    tokenizer = load_tokenizer(model_dir)
    examples = load_data(data, tokenizer, seq_len, train_on_prompt)
    batches = eval_batches(examples, batch_size)
    check_vocab(tokenizer, examples.max_id(), args.vocab_size)
    adapters = load_adapters(Path(lora), args) if lora else None

    def read(name):
        params = ckpt.read_module(name)
        return adapters.merge(name, params) if adapters else params

    start = time.perf_counter()
    loss_sum, n = evaluate(read, args, batches, torch_device, COMPUTE_DTYPES[dtype])
    loss, ppl = perplexity(loss_sum, n)
    return {"loss": loss, "ppl": ppl, "tokens": n, "seconds": time.perf_counter() - start, "data": examples.summary}


def main(argv=None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = p.add_argument_group("model and data")
    what.add_argument("model_dir", help="checkpoint folder: Meta (params.json) or Hugging Face (config.json)")
    what.add_argument("--data", required=True, help="a text file, or records (.jsonl, .json, .parquet, .csv) as "
                                                    "finetune.py reads them")
    what.add_argument("--lora", help="LoRA adapters: lora_adapters.blk or a PEFT folder")
    what.add_argument("--train-on-prompt", action="store_true", help="records: score prompts and every turn too")
    what.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: 512 or the context)")
    where = p.add_argument_group("where and how fast")
    where.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    where.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    where.add_argument("--compute-dtype", default="float32", help="float32, bfloat16 or float16")
    a = p.parse_args(argv)
    try:
        out = run(model_dir=a.model_dir, data=a.data, seq_len=a.seq_len, batch_size=a.batch_size, device=a.device,
                  dtype=a.compute_dtype, lora=a.lora, train_on_prompt=a.train_on_prompt)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"data: {out['data']}", file=sys.stderr)
    print(f"{out['tokens']} tokens in {out['seconds']:.1f} s", file=sys.stderr)
    print(json.dumps({k: out[k] for k in ("loss", "ppl", "tokens")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
