"""Merge LoRA adapters into their base checkpoint and write the result in Meta's format, streaming.

    python tools/merge_lora.py BASE_DIR OUT/lora_adapters.blk MERGED_DIR [--shards N]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slowllama.checkpoint import MetaCheckpoint, export_meta, split_key  # noqa: E402
from slowllama.lora import Adapters  # noqa: E402
from slowllama.model import ConfigError  # noqa: E402
from slowllama.paths import check_folder, lock_out_dir  # noqa: E402
from slowllama.run import _bar, check_paths  # noqa: E402


def merge_lora(base: Path, adapters_path: Path, out: Path, shards: int | None = None):
    """OUT must be apart from BASE and new, empty or an earlier slowllama export: the merge
    replaces nothing it did not write."""
    check_paths(base, out, out.with_name(out.name + ".work"))
    check_folder(out, "export", "OUT")
    ckpt = MetaCheckpoint(base)
    adapters = Adapters.load(adapters_path)
    adapters.check_args(ckpt.args, adapters_path)
    modules = list(dict.fromkeys(split_key(k)[0] for k in ckpt.key_order))
    lock = lock_out_dir(out)
    try:
        export_meta(out, args=ckpt.args, params_src=ckpt.params_path, tokenizer_src=ckpt.tokenizer,
                    tensors=[(k, ckpt.shapes[k], ckpt.dtypes[k]) for k in ckpt.key_order],
                    n_shards=shards or ckpt.n_shards, modules=modules,
                    read_module=lambda m: adapters.merge(m, ckpt.read_module(m)),
                    progress=lambda it: _bar(it, desc="merge", unit="module"))
    finally:
        lock.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", type=Path, help="the Meta checkpoint the adapters were trained on")
    p.add_argument("adapters", type=Path, help="lora_adapters.blk")
    p.add_argument("out", type=Path, help="folder for the merged model")
    p.add_argument("--shards", type=int, default=None, help="shard count (default: as the base)")
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
