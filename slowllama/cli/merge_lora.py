"""Merge LoRA adapters into their base checkpoint and write the result in the base's format, streaming.

    slowllama merge-lora BASE_DIR OUT/lora_adapters.blk MERGED_DIR [--shards N]
    python tools/merge_lora.py HF_BASE_DIR PEFT_ADAPTER_DIR MERGED_DIR

BASE_DIR is a Meta (params.json) or Hugging Face (config.json) folder; the adapters are a
lora_adapters.blk file or a PEFT folder (adapter_config.json). --shards applies to Meta's format.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from slowllama.errors import ConfigError
from slowllama.formats import open_checkpoint
from slowllama.formats.meta import MetaCheckpoint, export_meta, split_key
from slowllama.formats.peft import load_adapters
from slowllama.model.transformer import module_names
from slowllama.paths import (check_folder, lock_out_dir, mark_owned, real_folder, remove_stale_tmp,
                             replace_dir)
from slowllama.run.loop import _bar, check_paths


def merge_lora(base: Path, adapters_path: Path, out: Path, shards: int | None = None):
    """OUT must be apart from BASE and new, empty or an earlier slowllama export: the merge
    replaces nothing it did not write."""
    if shards is not None and shards < 1:
        raise ConfigError(f"--shards must be an integer of at least 1, got {shards}")
    out = real_folder(out)
    check_paths(base, out, out.with_name(out.name + ".work"))
    check_folder(out, "export", "OUT")
    ckpt = open_checkpoint(base)
    adapters = load_adapters(adapters_path, ckpt.args)
    if not isinstance(ckpt, MetaCheckpoint) and shards is not None:
        raise ConfigError(f"--shards: {base} is a Hugging Face folder, whose shards follow their size")

    def read(module):
        return adapters.merge(module, ckpt.read_module(module))

    def progress(it):
        return _bar(it, desc="merge", unit="module")

    lock = lock_out_dir(out)
    try:
        if isinstance(ckpt, MetaCheckpoint):
            modules = list(dict.fromkeys(split_key(k)[0] for k in ckpt.key_order))
            export_meta(out, args=ckpt.args, params_src=ckpt.params_path, tokenizer_src=ckpt.tokenizer,
                        tensors=[(k, ckpt.shapes[k], ckpt.dtypes[k]) for k in ckpt.key_order],
                        n_shards=ckpt.n_shards if shards is None else shards, modules=modules, read_module=read, progress=progress)
        else:
            _merge_hf(ckpt, out, read, progress)
    finally:
        lock.close()


def _merge_hf(ckpt, out: Path, read, progress):
    from slowllama.formats.hf import export_hf

    remove_stale_tmp(out)
    work = export_hf(out, args=ckpt.args, config_src=ckpt.config_path, side_files=ckpt.side_files,
                     tensors=[(k, ckpt.shapes[k], ckpt.dtypes[k]) for k in ckpt.key_order],
                     modules=module_names(ckpt.args), read_module=read, progress=progress)
    try:
        mark_owned(work, "export")
        replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def main(argv=None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    what = p.add_argument_group("what to merge")
    what.add_argument("base", type=Path, help="the Meta or Hugging Face checkpoint the adapters were trained on")
    what.add_argument("adapters", type=Path, help="lora_adapters.blk or a PEFT adapter folder")
    out = p.add_argument_group("the merged model")
    out.add_argument("out", type=Path, help="folder for the merged model")
    out.add_argument("--shards", type=int, default=None, help="shard count of a Meta base's merge (default: as the "
                                                              "base)")
    a = p.parse_args(argv)
    try:
        merge_lora(a.base, a.adapters, a.out, a.shards)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
