"""Meta's checkpoint format: params.json, consolidated.NN.pth shards, tokenizer.model.

Reading streams one module at a time from mmapped shards; writing streams one
tensor at a time into the torch zip format, so neither holds a whole shard.
"""
from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .. import compat, faults
from ..device import all_finite
from ..errors import ConfigError
from ..fsutil import write_error
from ..model.transformer import ModelArgs, module_names
from .tokenizer import load_tokenizer, meta_tokenizer_file

log = logging.getLogger(__name__)

# Meta's model-parallel split: the axis along which shards are concatenated,
# None where every shard holds the whole tensor. "{}" stands for a layer index.
SPLIT_AXIS: dict[str, int | None] = {
    "tok_embeddings.weight": 1,
    "norm.weight": None,
    "output.weight": 0,
    "layers.{}.attention.wq.weight": 0,
    "layers.{}.attention.wk.weight": 0,
    "layers.{}.attention.wv.weight": 0,
    "layers.{}.attention.wo.weight": 1,
    "layers.{}.feed_forward.w1.weight": 0,
    "layers.{}.feed_forward.w2.weight": 1,
    "layers.{}.feed_forward.w3.weight": 0,
    "layers.{}.attention_norm.weight": None,
    "layers.{}.ffn_norm.weight": None,
    # Qwen's (ModelArgs.qkv_bias, o_bias, qk_norm); Meta's checkpoints never hold them.
    "layers.{}.attention.wq.bias": 0,
    "layers.{}.attention.wk.bias": 0,
    "layers.{}.attention.wv.bias": 0,
    "layers.{}.attention.wo.bias": None,
    "layers.{}.attention.q_norm.weight": None,
    "layers.{}.attention.k_norm.weight": None,
    # Gemma's (ModelArgs.post_norms), likewise.
    "layers.{}.post_attention_norm.weight": None,
    "layers.{}.post_ffn_norm.weight": None,
    # Some Meta checkpoints carry this; the model recomputes it, export keeps it as it was.
    "rope.freqs": None,
}
EXTRAS = "extras"  # the store's name for tensors the model does not use
FLOAT_DTYPES = {torch.float32, torch.bfloat16, torch.float16}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def template(key: str) -> str:
    m = _LAYER.match(key)
    return f"layers.{{}}.{m.group(2)}" if m else key


def split_key(key: str) -> tuple[str, str]:
    """'layers.3.attention.wq.weight' -> ('layers.3', 'attention.wq.weight'); the second
    part is the parameter's name inside the module that model.build_module makes."""
    if template(key) not in SPLIT_AXIS:
        raise ConfigError(f"unknown tensor name {key!r}")
    m = _LAYER.match(key)
    if m:
        return f"layers.{int(m.group(1))}", m.group(2)
    if key == "rope.freqs":
        return EXTRAS, key
    module, _, param = key.partition(".")
    return module, param


def full_key(module: str, param: str) -> str:
    return param if module == EXTRAS else f"{module}.{param}"


def split_axis(key: str) -> int | None:
    return SPLIT_AXIS[template(key)]


def shard_part(key: str, t: torch.Tensor, n_shards: int, shard: int) -> torch.Tensor:
    """Shard `shard`'s part of the full tensor `key`: a slice along Meta's axis, or all of it."""
    axis = split_axis(key)
    return t if axis is None else t.chunk(n_shards, dim=axis)[shard]


def expected_shapes(args: ModelArgs, module: str) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shapes of one module's parameters."""
    d, h, kv, f = args.dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.ffn_hidden_dim
    if module == "output" and args.tie_word_embeddings:
        return {}  # the output layer multiplies by the embedding's weight
    if module in ("tok_embeddings", "output"):
        return {"weight": (args.vocab_size, d)}
    if module == "norm":
        return {"weight": (d,)}
    shapes = {
        "attention.wq.weight": (h, d),
        "attention.wk.weight": (kv, d),
        "attention.wv.weight": (kv, d),
        "attention.wo.weight": (d, h),
        "feed_forward.w1.weight": (f, d),
        "feed_forward.w2.weight": (d, f),
        "feed_forward.w3.weight": (f, d),
        "attention_norm.weight": (d,),
        "ffn_norm.weight": (d,),
    }
    if args.qkv_bias:
        shapes.update({"attention.wq.bias": (h,), "attention.wk.bias": (kv,), "attention.wv.bias": (kv,)})
    if args.o_bias:
        shapes["attention.wo.bias"] = (d,)
    if args.qk_norm:
        q, k = (h, kv) if args.qk_norm_whole else (args.head_dim, args.head_dim)
        shapes.update({"attention.q_norm.weight": (q,), "attention.k_norm.weight": (k,)})
    if not args.pre_norms:
        del shapes["attention_norm.weight"], shapes["ffn_norm.weight"]
    if args.post_norms:
        shapes.update({"post_attention_norm.weight": (d,), "post_ffn_norm.weight": (d,)})
    return shapes


def shard_paths(model_dir: Path) -> list[Path]:
    paths = sorted(model_dir.glob("consolidated.*.pth"))
    if not paths:
        raise ConfigError(f"{model_dir}: no consolidated.NN.pth shards")
    for i, p in enumerate(paths):
        if p.name != f"consolidated.{i:02d}.pth":
            raise ConfigError(f"{p}: expected consolidated.{i:02d}.pth (shards must be numbered from 00 without gaps)")
    return paths


def load_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    """A dict of tensors from a .pth file, mmapped; never runs pickled code."""
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConfigError(f"{path}: refused to load, it is not a plain tensor file ({str(e).splitlines()[0]})") from e
    except Exception as e:  # torch raises RuntimeError, EOFError, ValueError... for damaged zips
        raise ConfigError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ConfigError(f"{path}: expected a dict of tensors")
    return sd


def tokenizer_vocab_size(path: Path) -> int:
    """Pieces of a tokenizer.model: sentencepiece (Llama 2) or tiktoken's BPE (Llama 3)."""
    return load_tokenizer(path).vocab_size


class MetaCheckpoint:
    """A validated Meta-format checkpoint folder, read one module at a time."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise ConfigError(f"{self.dir}: not a directory")
        self.params_path = self.dir / "params.json"
        args = ModelArgs.from_json(self.params_path)
        self.tokenizer = meta_tokenizer_file(self.dir)
        if self.tokenizer is not None:
            n = tokenizer_vocab_size(self.tokenizer)
            if args.vocab_size == -1:
                args.vocab_size = n
            elif n > args.vocab_size:
                raise ConfigError(f"{self.tokenizer}: {n} pieces, more than vocab_size {args.vocab_size} in {self.params_path}")
        elif args.vocab_size == -1:
            raise ConfigError(f"{self.params_path}: vocab_size is -1 and no tokenizer.model was found")
        self.args = args
        self.shards = shard_paths(self.dir)
        self.key_order: list[str] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._check_layout()

    @property
    def files(self) -> list[Path]:
        """Every file the model is read from (for a fingerprint of the source)."""
        return [self.params_path, *self.shards, *([self.tokenizer] if self.tokenizer else [])]

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    def _check_layout(self):
        """Check every shard's names, dtypes and shapes against params.json before any work."""
        a = self.args
        metas = []  # names, shapes and dtypes from the mmapped headers: nothing is read yet
        for path in self.shards:
            sd = load_tensor_file(path)
            metas.append({k: (tuple(v.shape), v.dtype) for k, v in sd.items()})
            del sd
        first = metas[0]
        # Count the layers the shards hold before anything loops over params.json's n_layers,
        # which may be any number (a million layers once cost half a minute and 3 GB here).
        held = {int(m.group(1)) for m in map(_LAYER.match, first) if m}
        if len(held) != a.n_layers:
            raise ConfigError(f"{self.params_path}: n_layers is {a.n_layers}, but {self.shards[0]} holds "
                              f"{len(held)} layers")
        expected = {full_key(m, k): s for m in module_names(a) for k, s in expected_shapes(a, m).items()}
        self.key_order = list(first)
        for path, meta in zip(self.shards, metas):
            if set(meta) != set(first):
                diff = sorted(set(meta) ^ set(first))
                raise ConfigError(f"{path}: holds different tensor names from {self.shards[0].name}: {diff[:5]}")
            for key, (_, dtype) in meta.items():
                if dtype not in FLOAT_DTYPES:
                    raise ConfigError(f"{path}: {key} has dtype {dtype}, expected float32, bfloat16 or float16")
                if dtype != first[key][1]:
                    raise ConfigError(f"{path}: {key} has dtype {dtype}, but {first[key][1]} in {self.shards[0].name}")
        for key in first:
            try:
                module, _ = split_key(key)
            except ConfigError as e:
                raise ConfigError(f"{self.shards[0]}: {e}") from e
            if module != EXTRAS and key not in expected:
                raise ConfigError(f"{self.shards[0]}: unexpected tensor {key!r} for n_layers={a.n_layers}")
        missing = sorted(set(expected) - set(first))
        if missing:
            raise ConfigError(f"{self.shards[0]}: missing tensors {missing[:5]}")
        for key in first:
            axis = split_axis(key)
            shapes = [meta[key][0] for meta in metas]
            if axis is None:
                full = shapes[0]
                bad = next((i for i, s in enumerate(shapes) if s != full), None)
            else:
                full = list(shapes[0])
                full[axis] = sum(s[axis] for s in shapes)
                full = tuple(full)
                bad = next((i for i, s in enumerate(shapes) if len(s) != len(full) or
                            any(x != y for j, (x, y) in enumerate(zip(s, full)) if j != axis)), None)
            if bad is not None:
                raise ConfigError(f"{self.shards[bad]}: {key} has shape {list(shapes[bad])}, inconsistent with the other shards")
            if key in expected and full != expected[key]:
                raise ConfigError(f"{self.params_path}: implies {key} of shape {list(expected[key])}, but the shards "
                                  f"hold {list(full)} ({self.shards[0].name})")
            self.shapes[key] = full
            self.dtypes[key] = first[key][1]

    def checkpoint_dtype(self) -> torch.dtype:
        return self.dtypes["tok_embeddings.weight"]

    def module_keys(self, module: str) -> list[str]:
        return [k for k in self.key_order if split_key(k)[0] == module]

    def read_module(self, module: str) -> dict[str, torch.Tensor]:
        """One module's full tensors in the checkpoint's dtype, keyed as in the checkpoint.

        Shards are reopened per module so that the pages each mapping touched are
        released with it: peak RSS stays near one module whatever the model size.
        """
        keys = self.module_keys(module)
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        for i, path in enumerate(self.shards):
            sd = load_tensor_file(path)
            for k in keys:
                if split_axis(k) is not None or i == 0:
                    parts[k].append(sd[k])
            del sd
        out = {}
        for k in keys:
            axis = split_axis(k)
            t = parts[k][0].clone() if axis is None else torch.cat(parts[k], dim=axis)
            if not all_finite(t):
                raise ConfigError(f"{self.dir}: tensor {k} holds NaN or Inf")
            out[split_key(k)[1]] = t
        return out


def check_shard_count(args: ModelArgs, n: int):
    if n < 1:
        raise ConfigError(f"--shards must be at least 1, got {n}")
    for what, size in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads), ("dim", args.dim),
                       ("FFN hidden size", args.ffn_hidden_dim), ("vocab_size", args.vocab_size)):
        if size % n:
            raise ConfigError(f"--shards {n}: {what} {size} cannot be split into {n} equal parts")


# ---- writing -----------------------------------------------------------------

class ShardWriter:
    """Writes one torch.save-compatible dict of tensors, one tensor at a time, in any order.

    A failed write (a full disk) is an OSError naming the file; the writer is then closed
    and its file left for the caller to delete.
    """

    def __init__(self, path: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]]):
        self.path = path
        self.specs = {name: (i, tuple(shape), dtype) for i, (name, shape, dtype) in enumerate(specs)}
        self.written: set[str] = set()
        self.zf = compat.open_torch_zip(path)
        self._guarded(self._header)

    def _header(self):
        self.zf.write_record("data.pkl", compat.torch_pickle(
            {name: (str(i), shape, dtype) for name, (i, shape, dtype) in self.specs.items()}))
        self.zf.write_record("byteorder", sys.byteorder.encode())

    def _guarded(self, fn, *a):
        try:
            return fn(*a)
        except OSError as e:
            self.zf.abort()
            raise write_error(self.path, e) from e
        except BaseException:
            self.zf.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor):
        i, shape, dtype = self.specs[name]
        if name in self.written or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"{self.path}: {name} {tuple(tensor.shape)} {tensor.dtype} does not match {shape} {dtype} or was written twice")
        t = tensor.detach().to("cpu").contiguous()
        if t.storage_offset() or t.untyped_storage().nbytes() != t.nbytes:
            t = t.clone()  # the record is the whole storage, so it must hold this tensor alone
        self._guarded(self.zf.write_record, f"data/{i}", t)
        self.written.add(name)

    def close(self):
        missing = set(self.specs) - self.written
        if missing:
            self.zf.abort()
            raise RuntimeError(f"{self.path}: tensors never written: {sorted(missing)[:5]}")
        self._guarded(self.zf.finish)

    def abort(self):
        """Stop writing; the file is incomplete."""
        self.zf.abort()


def export_meta(
    out_dir: Path,
    *,
    args: ModelArgs,
    params_src: Path,
    tokenizer_src: Path | None,
    tensors: list[tuple[str, tuple[int, ...], torch.dtype]],
    n_shards: int,
    modules: list[str],
    read_module: Callable[[str], dict[str, torch.Tensor]],
    progress: Callable[[Iterator], Iterator] = lambda it: it,
    extra_files: dict[str, bytes] | None = None,
    marker: dict | None = None,
):
    """Write a Meta-format folder at out_dir, module by module, replacing it atomically.

    `tensors` lists (key, full shape, dtype) in the checkpoint's key order; read_module
    returns one module's full tensors keyed by parameter name. Every shard is open at
    once, so each module is read once and sliced into all of them. extra_files
    (name -> bytes) go beside the shards, e.g. the run's log.
    """
    from ..fsutil import atomic_write_bytes, fsync_dir, fsync_file, tmp_path
    from ..paths import check_folder, mark_owned, remove_stale_tmp, replace_dir

    check_shard_count(args, n_shards)
    check_folder(out_dir, "export", "--out")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = tmp_path(out_dir)
    remove_stale_tmp(out_dir)  # partial exports that killed processes left
    work.mkdir()
    mark_owned(work, "export", **(marker or {}))
    writers: list[ShardWriter] = []
    try:
        def shard_shape(key, shape):
            axis = split_axis(key)
            shape = list(shape)
            if axis is not None:
                shape[axis] //= n_shards
            return tuple(shape)

        specs = [(k, shard_shape(k, s), dt) for k, s, dt in tensors]
        dtypes = {k: dt for k, _, dt in tensors}
        paths = [work / f"consolidated.{s:02d}.pth" for s in range(n_shards)]
        for p in paths:
            writers.append(ShardWriter(p, specs))
        for module in progress(modules):
            for param, t in read_module(module).items():
                key = full_key(module, param)
                t = t.to(dtypes[key])
                if not all_finite(t):
                    raise ValueError(f"refusing to export {key}: it holds NaN or Inf")
                for s, w in enumerate(writers):
                    w.write(key, shard_part(key, t, n_shards, s))
            faults.point("export_module")
        for w in writers:
            w.close()
        shutil.copyfile(params_src, work / "params.json")
        if tokenizer_src is not None:
            shutil.copyfile(tokenizer_src, work / "tokenizer.model")
        for name, data in (extra_files or {}).items():
            atomic_write_bytes(work / name, [data])
        for p in work.iterdir():
            fsync_file(p)
        fsync_dir(work)
        replace_dir(work, out_dir)
    except BaseException:
        for w in writers:
            w.abort()  # closes its file, so that the temp folder can go
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("exported %s", out_dir)


def save_meta(out_dir: str | Path, params: dict, state_dict: dict[str, torch.Tensor], *, n_shards: int = 1,
              dtype: torch.dtype | None = None, tokenizer: str | Path | None = None):
    """Write an in-memory state dict (Meta names) as a Meta checkpoint folder.

    For small models (tests, tools): it holds each whole shard in RAM, as Meta's own code does.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        shard = {}
        for key, t in state_dict.items():
            t = t.detach().to("cpu", dtype or t.dtype)
            shard[key] = shard_part(key, t, n_shards, s).clone()
        torch.save(shard, out_dir / f"consolidated.{s:02d}.pth")
    (out_dir / "params.json").write_text(json.dumps(params, indent=1))
    if tokenizer is not None and Path(tokenizer).resolve() != (out_dir / "tokenizer.model").resolve():
        shutil.copyfile(tokenizer, out_dir / "tokenizer.model")
