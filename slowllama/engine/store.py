"""The block store: a folder of block files (one per streamed module, see blockfile.py) and a manifest;
preparing one from a checkpoint and exporting it back.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import torch
import xxhash

from .. import faults
from ..blockfile import (
    DTYPE_NAMES,
    DTYPES,
    FORMAT,
    Block,
    StoreError,
    StoreFormatError,
    read_block,
    read_header,
    write_block,
)
from ..device import all_finite
from ..errors import ConfigError
from ..formats.meta import EXTRAS, MetaCheckpoint, full_key, split_key
from ..fsutil import atomic_write_json, fsync_dir, tmp_path
from ..model.transformer import ModelArgs, module_names
from ..paths import remove_stale_tmp
from .quant import dequantize_module, quantize_module

log = logging.getLogger(__name__)

def file_stem(name: str) -> str:
    # Zero-padded so that a directory listing sorts in forward order.
    if name.startswith("layers."):
        return f"layers.{int(name.split('.')[1]):03d}"
    return name


SAMPLES, SAMPLE_BYTES = 16, 1 << 16


def content_fingerprint(path: Path) -> str:
    """xxh3 of a file's size and content: all of a small file; 16 spread 64 KiB samples of a big one.

    A checkpoint is known by content, not by path or mtime: `touch` or moving the folder keeps
    it, while another fine-tune of the same shapes differs in every sample.
    """
    h = xxhash.xxh3_64()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= SAMPLES * SAMPLE_BYTES:
            h.update(f.read())
        else:
            for k in range(SAMPLES):
                f.seek((size - SAMPLE_BYTES) * k // (SAMPLES - 1))
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def source_fingerprint(ckpt) -> dict:
    return {p.name: content_fingerprint(p) for p in ckpt.files}


class BlockStore:
    """A prepared store directory: manifest.json plus one block file per module."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / "manifest.json"
        try:
            m = json.loads(path.read_text())
            if not isinstance(m, dict):
                raise ValueError("not a JSON object")
            if m.get("format") != FORMAT:
                raise StoreFormatError(f"{path}: store format {m.get('format')}, this slowllama reads {FORMAT}")
            if m["manifest_crc32"] != _manifest_crc(m):
                raise StoreError("checksum mismatch, the manifest is corrupt")
            self.args = ModelArgs(**m["params"])
            self.modules: list[str] = m["modules"]
            self.dtype = DTYPES[m["store_dtype"]]
            self.tensors = [(k, tuple(s), DTYPES[d]) for k, s, d in m["tensors"]]
            self.n_shards: int = m["n_shards"]
            self.source: dict = m["source"]
            self.initial_checksums: dict[str, int] = m["checksums"]
            self.model_id: str = m["model_id"]
            self.base_quant: str | None = m.get("base_quant")  # quant.KINDS: a quantized LoRA base
        except StoreFormatError:
            raise
        except FileNotFoundError as e:
            raise StoreError(f"{self.root}: not a prepared block store (no manifest.json)") from e
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{path}: corrupt manifest ({type(e).__name__}: {e})") from e
        self.manifest = m
        # Module reads by name since this object was opened: what a test counts a pass's reads by.
        self.reads: Counter[str] = Counter()
        j = self.journal()
        # What each module file must hold: (version, checksum) as last committed. A file whose
        # header disagrees was replaced behind our back (an older copy, another run's file).
        self.expected: dict[str, tuple[int, int]] = {
            n: (j["version"], c) for n, c in (j.get("checksums") or self.initial_checksums).items()}

    def path(self, name: str) -> Path:
        return self.root / f"{file_stem(name)}.blk"

    @property
    def trainable(self) -> list[str]:
        return [m for m in self.modules if m != EXTRAS]

    def read(self, name: str, verify: bool = True, alloc: Callable[[int], torch.Tensor] | None = None) -> Block:
        block = read_block(self.path(name), name, verify, alloc, self.model_id)
        self.reads[name] += 1
        self._check_expected(name, block.step, block.checksum)
        return block

    def write(self, name: str, block: Block, path: Path | None = None) -> int:
        """Write the module's block to its file, or to path (an interval commit stages it there first).
        A staged block stays in RAM (the budget holds the trained state), so it is written past the page
        cache, which would only cost CPU to fill and write back."""
        checksum = write_block(path or self.path(name), block, name, model=self.model_id, cached=path is None)
        self.expected[name] = (block.step, checksum)
        return checksum

    def _check_expected(self, name: str, step: int, checksum: int):
        version, want = self.expected.get(name, (None, None))
        if step == version and checksum != want:
            raise StoreError(f"{self.path(name)}: module {name} at version {step} has checksum {checksum}, the "
                             f"journal recorded {want}: the file was replaced by another copy")

    def step_of(self, name: str) -> int:
        header = read_header(self.path(name), name)
        if header.get("model") != self.model_id:
            raise StoreError(f"{self.path(name)}: module {name} of another model or store, not this one's")
        self._check_expected(name, header["step"], header["xxh3_64"])
        return header["step"]

    def header(self, name: str) -> dict:
        return read_header(self.path(name), name)

    def nbytes(self) -> int:
        return sum(self.path(m).stat().st_size for m in self.modules)

    def module_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Parameters only, keyed by parameter name (for export and generation); a quantized base's
        dequantized, in the checkpoint's dtype."""
        params = self.read(name).params
        return dequantize_module(params, self.dtype) if self.base_quant else params

    def journal(self) -> dict:
        """The training journal: steps done, the update version, module checksums."""
        path = self.root / "journal.json"
        try:
            j = json.loads(path.read_text())
        except FileNotFoundError:
            return {"step": 0, "version": 0, "phase": "idle"}
        except (ValueError, OSError) as e:
            raise StoreError(f"{path}: unreadable journal ({e})") from e
        if not isinstance(j, dict) or not isinstance(j.get("step"), int) or not isinstance(j.get("version"), int):
            raise StoreError(f"{path}: malformed journal")
        return j

    def verify(self, progress: Callable[[Iterator], Iterator] = lambda it: it) -> list[str]:
        """Check every module against its own checksum and the journal's, and for NaN/Inf."""
        problems = []
        j = self.journal()
        sums = j.get("checksums") or self.initial_checksums
        for name in progress(self.modules):
            try:
                block = self.read(name)
            except StoreError as e:
                problems.append(str(e))
                continue
            bad = [p for p, t in block.params.items() if not all_finite(t)]
            if bad:
                problems.append(f"module {name}: non-finite values in {bad}")
            if name != EXTRAS and block.step == j["version"] and sums.get(name) not in (None, block.checksum):
                problems.append(f"module {name}: checksum {block.checksum} differs from the journal's {sums[name]}")
            # A crash may leave a step's backward pass half done (version + 1), or an interval commit half
            # installed (modules still at the version it replaces; journal.py finishes it on resume).
            allowed = (j["version"], j["version"] + (j["phase"] == "backward"), j.get("from_version", j["version"]))
            if name != EXTRAS and block.step not in allowed:
                problems.append(f"{self.path(name)}: module {name} at version {block.step}, the journal is at "
                                f"{j['version']}")
        return problems

    def matches(self, ckpt) -> bool:
        return self.source == source_fingerprint(ckpt)

    @property
    def source_format(self) -> str:
        return self.manifest.get("source_format", "meta")


def prepare(
    ckpt: MetaCheckpoint,
    root: str | Path,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[Iterator], Iterator] = lambda it: it,
    base_quant: str | None = None,
) -> BlockStore:
    """Convert a checkpoint into a block store at root, one module at a time.

    Everything is written into a temp directory renamed into place at the end, so a
    store that exists is complete: a crash mid-way leaves only the temp directory.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    work = tmp_path(root)
    remove_stale_tmp(root)
    source = source_fingerprint(ckpt)
    # Every block names the model it belongs to: the checkpoint's content and this preparation.
    model_id = xxhash.xxh3_64_hexdigest(json.dumps([source, DTYPE_NAMES[dtype], base_quant, os.getpid(), time.time_ns()]).encode())
    work.mkdir()
    try:
        # Forward order, extras last. Every module is stored, one without tensors too (a tied
        # model's output layer), so that the trainer's schedule and the journal see one list.
        extras = any(split_key(k)[0] == EXTRAS for k in ckpt.key_order)
        order = module_names(ckpt.args) + ([EXTRAS] if extras else [])
        checksums = {}
        for name in progress(order):
            tensors = ckpt.read_module(name)
            keep_dtype = name == EXTRAS  # never trained: keep the bytes as they are
            params = {p: (t if keep_dtype else t.to(dtype)) for p, t in tensors.items()}
            if base_quant:
                params = quantize_module(base_quant, name, params)
            checksums[name] = write_block(work / f"{file_stem(name)}.blk", Block(step=0, params=params), name,
                                          model=model_id)
            faults.point("prepare_module")
            del tensors, params
        manifest = {
            "format": FORMAT,
            "params": {k: v for k, v in vars(ckpt.args).items()},
            "modules": order,
            "store_dtype": DTYPE_NAMES[dtype],
            "tensors": [[k, list(ckpt.shapes[k]), DTYPE_NAMES[ckpt.dtypes[k]]] for k in ckpt.key_order],
            "n_shards": getattr(ckpt, "n_shards", 1),
            "source_format": source_format(ckpt),
            "source": source,
            "model_id": model_id,
            "checksums": checksums,
            **({"base_quant": base_quant} if base_quant else {}),
        }
        manifest["manifest_crc32"] = _manifest_crc(manifest)
        atomic_write_json(work / "manifest.json", manifest)
        fsync_dir(work)
        if root.exists():
            shutil.rmtree(root)
        os.replace(work, root)
        fsync_dir(root.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return BlockStore(root)


def _manifest_crc(m: dict) -> int:
    return zlib.crc32(json.dumps({k: v for k, v in m.items() if k != "manifest_crc32"}, sort_keys=True).encode())


def open_or_prepare(ckpt: MetaCheckpoint, root: str | Path, dtype: torch.dtype,
                    progress: Callable[[Iterator], Iterator] = lambda it: it,
                    base_quant: str | None = None) -> tuple[BlockStore, bool]:
    """Reuse the store at root if it was prepared from this very checkpoint with this dtype and quantization.

    Returns the store and whether it was (re)prepared.
    """
    root = Path(root)
    if (root / "manifest.json").exists():
        try:
            store = BlockStore(root)
        except StoreFormatError as e:
            if (root / "journal.json").exists():  # trained: preparing again would throw the training away
                raise StoreFormatError(f"{e}; export it with the slowllama that trained it, or delete {root} "
                                       f"to start again") from e
            log.info("%s was prepared by another slowllama version: preparing again", root)
        else:
            if store.matches(ckpt) and store.dtype == dtype and store.base_quant == base_quant:
                return store, False
            log.info("%s was prepared from a different checkpoint, dtype or --base-quant: preparing again", root)
    return prepare(ckpt, root, dtype, progress, base_quant), True


def export_store(store: BlockStore, source_dir: Path, out_dir: Path, *, n_shards: int | None = None,
                 progress: Callable[[Iterator], Iterator] = lambda it: it, extra_files: dict[str, bytes] | None = None,
                 transform: Callable[[str, dict], dict] | None = None, marker: dict | None = None,
                 export_format: str | None = None, read_params: Callable[[str], dict] | None = None):
    """Export the store to out_dir atomically, in the format its checkpoint came in (or
    export_format: a Meta checkpoint may go out as a Hugging Face folder), with the config and
    tokenizer files from source_dir (the checkpoint the store was prepared from, wherever it lives now).

    transform(module, params) may change a module's parameters on the way out (LoRA merging);
    read_params(module), if given, supplies them instead of the store (a quantized base's merge reads the checkpoint).
    """
    from ..formats.meta import export_meta
    from ..formats.tokenizer import meta_tokenizer_file

    src, out_dir = Path(source_dir), Path(out_dir)

    def read(module):
        params = (read_params or store.module_tensors)(module)
        return transform(module, params) if transform else params

    export_format = export_format or store.source_format
    if export_format == "meta" and store.source_format != "meta":
        raise ConfigError("--export-format meta: only a Meta checkpoint can be exported in Meta's format")
    if export_format == "meta":
        export_meta(out_dir, args=store.args, params_src=src / "params.json", tokenizer_src=meta_tokenizer_file(src),
                    tensors=store.tensors, n_shards=n_shards or store.n_shards, modules=store.modules,
                    read_module=read, progress=progress, extra_files=extra_files, marker=marker)
        return
    from ..formats.hf import SIDE_FILES, config_from_args, export_hf
    from ..paths import check_folder, mark_owned, remove_stale_tmp, replace_dir

    check_folder(out_dir, "export", "--out")
    remove_stale_tmp(out_dir)
    config, config_src, extra = None, src / "config.json", dict(extra_files or {})
    side = [src / n for n in SIDE_FILES if (src / n).is_file()]
    if store.source_format == "meta":  # converting: the config and tokenizer files come from the Meta folder
        from ..formats.tokenizer import LLAMA3_PATTERN, SentencePieceTokenizer, TiktokenTokenizer, load_tokenizer

        tok_path = meta_tokenizer_file(src)
        tok = load_tokenizer(tok_path)
        config = config_from_args(store.args, DTYPE_NAMES[store.tensors[0][2]], tok.bos_id, tok.eos_id)
        side = [tok_path]
        if isinstance(tok, SentencePieceTokenizer):  # what transformers' LlamaTokenizer reads beside it
            extra.setdefault("tokenizer_config.json", json.dumps(
                {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                 "add_bos_token": True, "add_eos_token": False, "legacy": True}, indent=2).encode())
        if isinstance(tok, TiktokenTokenizer):  # Llama 3: a tokenizer.json that tokenizes as tiktoken does
            from ..formats.tiktoken_json import tokenizer_config_json, tokenizer_json

            extra.setdefault("tokenizer.json", tokenizer_json(tok.ranks, LLAMA3_PATTERN, tok.special, tok.bos_token))
            extra.setdefault("tokenizer_config.json", tokenizer_config_json(
                tok.bos_token, tok.eos_token, tok.chat_template, store.args.max_seq_len))
    keys = [t for t in store.tensors if t[0] in _hf_keys(store.args)]
    work = export_hf(out_dir, args=store.args, config_src=config_src, config=config, tensors=keys,
                     modules=[m for m in store.modules if m != EXTRAS], read_module=read, side_files=side,
                     progress=progress, extra_files=extra)
    try:
        mark_owned(work, "export", **(marker or {}))
        replace_dir(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("exported %s", out_dir)


def _hf_keys(args: ModelArgs) -> set[str]:
    from ..formats.hf import expected_keys

    return set(expected_keys(args))


def source_format(ckpt) -> str:
    return "meta" if isinstance(ckpt, MetaCheckpoint) else "hf"


__all__ = ["Block", "BlockStore", "StoreError", "prepare", "open_or_prepare", "export_store",
           "read_block", "write_block", "full_key"]
