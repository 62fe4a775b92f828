"""The fine-tuning run behind finetune.py: checks, preparation, the loop, logs, evals and exports."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from . import device as dev
from .checkpoint import MetaCheckpoint, check_shard_count
from .data import load_data
from .fsutil import IO, atomic_write_bytes, atomic_write_json
from .lora import Adapters, LoraConfig
from .generate import ModuleCache, complete
from .model import ConfigError
from .optim import OptimConfig
from .store import DTYPES, BlockStore, StoreError, export_store, open_or_prepare
from .tokenizer import Tokenizer
from .trainer import TrainConfig, Trainer, estimate_io

log = logging.getLogger("slowllama")
LOG_NAME = "train_log.jsonl"
KEEP_ON_EXPORT = (LOG_NAME, "loss.png")
ADAPTERS_NAME = "lora_adapters.blk"


@dataclass
class RunConfig:
    """Everything that decides the numbers of a run; a resume repeats it exactly."""

    model_dir: str
    data: str
    data_sha256: str
    out: str
    iters: int = 100
    batch_size: int = 4
    micro_batch: int | None = None
    seq_len: int = 128
    lr: float = 1e-4
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    dropout: float = 0.0
    seed: int = 42
    compute_dtype: str = "float32"
    store_dtype: str = "float32"
    act_dtype: str = "float32"
    eval_every: int = 0
    prompt: str = ""
    gen_tokens: int = 32
    save_every: int = 0
    shards: int | None = None
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: str = "wq,wv"
    merge: bool = False  # LoRA: also export the base with the adapters merged in
    grad_accum: int = 1
    optim_state_dtype: str = "float32"
    val_data: str | None = None
    val_fraction: float = 0.0


def parse_size(text: str) -> int | None:
    """'8G', '512M', '1.5T', '0' or 'none' (no limit) to bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)[bB]?\s*", text)
    if text.strip().lower() in ("none", "inf", "unlimited"):
        return None
    if not m:
        raise ConfigError(f"--ram-budget {text!r}: expected a size like 0, 512M, 8G or none")
    return int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))


def _inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def check_paths(model_dir: Path, out: Path, work_dir: Path):
    if _inside(out, model_dir) or _inside(model_dir, out):
        raise ConfigError(f"--out {out}: must not be the model directory {model_dir} or overlap it")
    if _inside(work_dir, model_dir) or _inside(model_dir, work_dir):
        raise ConfigError(f"--work-dir {work_dir}: must not be the model directory {model_dir} or overlap it")
    if _inside(work_dir, out) or _inside(out, work_dir):
        raise ConfigError(f"--work-dir {work_dir}: must not overlap the output directory {out}")


def _check_numbers(cfg: RunConfig):
    for name in ("iters", "batch_size", "seq_len", "gen_tokens", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("eval_every", "save_every"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be 0 (off) or positive")
    if cfg.micro_batch is not None and not 1 <= cfg.micro_batch <= cfg.batch_size:
        raise ConfigError(f"--micro-batch must be between 1 and --batch-size {cfg.batch_size}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ConfigError(f"--lr must be a positive number, got {cfg.lr}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"--dropout must be in [0, 1), got {cfg.dropout}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.val_fraction and cfg.val_data:
        raise ConfigError("--val-data and --val-fraction exclude each other")
    for name in ("compute_dtype", "store_dtype", "act_dtype"):
        if getattr(cfg, name) not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: expected float32, bfloat16 or float16")
    if cfg.optim_state_dtype not in ("float32", "bfloat16"):
        raise ConfigError("--optim-state-dtype must be float32 or bfloat16")
    if cfg.store_dtype not in ("float32", "bfloat16"):
        raise ConfigError("--store-dtype must be float32 or bfloat16")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


def _bar(it, **kw):
    return tqdm(it, dynamic_ncols=True, mininterval=0.5, **kw)


def finetune(
    *,
    model_dir: str | Path,
    data: str | Path | None,
    out: str | Path | None = None,
    work_dir: str | Path | None = None,
    device: str = "auto",
    ram_budget: int | None = 0,
    prefetch: bool = True,
    verify: bool = True,
    resume: bool = False,
    stop_on_nonfinite: bool = False,
    **settings,
) -> dict:
    """Fine-tune a Meta-format checkpoint; returns a summary. Everything is checked before any write.

    settings are RunConfig's fields (iters, lr, optimizer, lora_rank, ...), the choices that decide
    a run's numbers and that a resume repeats; the named arguments only decide where and how fast.
    """
    model_dir = Path(model_dir)
    out, work_dir = default_dirs(model_dir, out, work_dir)
    check_paths(model_dir, out, work_dir)
    run_path = work_dir / "run.json"
    if resume:
        try:
            saved = json.loads(run_path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"--resume: {run_path} not found, there is no run to resume in {work_dir}") from e
        except ValueError as e:
            raise ConfigError(f"--resume: {run_path} is corrupt ({e})") from e
        cfg = RunConfig(**{**saved, "iters": max(settings.get("iters", RunConfig.iters), saved["iters"])})
        if Path(cfg.model_dir).resolve() != model_dir.resolve():
            raise ConfigError(f"--resume: {work_dir} belongs to a run of {cfg.model_dir}, not {model_dir}")
        data = Path(cfg.data)
        if _sha256(data) != cfg.data_sha256:
            raise ConfigError(f"--resume: {data} changed since the run started; an exact resume needs the same data")
    else:
        if settings.get("val_data"):
            settings["val_data"] = str(settings["val_data"])
        cfg = RunConfig(model_dir=str(model_dir), data=str(data), data_sha256="", out=str(out), **settings)
    _check_numbers(cfg)
    optim = OptimConfig(cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    lora = None
    if cfg.lora_rank:
        lora = LoraConfig(cfg.lora_rank, cfg.lora_alpha, tuple(t.strip() for t in cfg.lora_targets.split(",")))
    elif cfg.merge:
        raise ConfigError("--merge needs --lora-rank")
    torch_device = dev.pick_device(device)
    dev.check_compute_dtype(torch_device, DTYPES[cfg.compute_dtype])
    ckpt = MetaCheckpoint(model_dir)
    if ckpt.tokenizer is None:
        raise ConfigError(f"{model_dir}: no tokenizer.model here or in its parent directory")
    if cfg.shards is not None:
        check_shard_count(ckpt.args, cfg.shards)
    tokenizer = Tokenizer(ckpt.tokenizer)
    windows = load_data(data, tokenizer, cfg.seq_len)
    val = None
    if cfg.val_data:
        val = load_data(cfg.val_data, tokenizer, cfg.seq_len)
    elif cfg.val_fraction:
        windows, val = windows.split(cfg.val_fraction)
    val_batches = val.fixed_batches(cfg.batch_size) if val is not None else []
    if not resume:
        cfg.data_sha256 = _sha256(Path(data))

    # -- from here on, files are written --
    # LoRA reads a store that is never written, in the checkpoint's own dtype.
    store_root = work_dir / ("base" if lora else "store")
    store_dtype = ckpt.checkpoint_dtype() if lora else DTYPES[cfg.store_dtype]
    if resume:
        store = BlockStore(store_root)
        if not store.matches(ckpt):
            raise StoreError(f"--resume: {model_dir} changed since {store_root} was prepared")
    else:
        marker = work_dir / ADAPTERS_NAME if lora else store_root / "journal.json"
        if marker.exists():
            step = _progress_step(marker)
            if step:
                raise ConfigError(f"--work-dir {work_dir} holds a run at step {step}: pass --resume to continue "
                                  f"it, or delete the directory to start over")
        new_dirs = [p for p in (work_dir, *work_dir.parents) if not p.exists()]
        work_dir.mkdir(parents=True, exist_ok=True)
        try:
            store, prepared = open_or_prepare(ckpt, store_root, store_dtype,
                                              progress=lambda it: _bar(it, desc="prepare", unit="module"))
        except BaseException:
            # Only reading the checkpoint finds NaN or damaged data: leave nothing of the run behind.
            if new_dirs:
                shutil.rmtree(new_dirs[-1], ignore_errors=True)
            raise
        log.info("%s store at %s", "prepared" if prepared else "reusing", store_root)
        atomic_write_json(run_path, dataclasses.asdict(cfg))
    old_out = out.with_name(f".{out.name}.old")
    if resume and not out.exists() and old_out.is_dir():
        # An export was cut short between its two renames: the previous output, log included, is here.
        os.replace(old_out, out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / LOG_NAME
    if not resume:
        log_path.unlink(missing_ok=True)

    micro = cfg.micro_batch or (cfg.batch_size if cfg.grad_accum > 1 else None)
    tcfg = TrainConfig(optim=optim, seed=cfg.seed, dropout=cfg.dropout, micro_batch=micro,
                       compute_dtype=DTYPES[cfg.compute_dtype], act_dtype=DTYPES[cfg.act_dtype],
                       ram_budget=ram_budget, prefetch=prefetch, verify=verify,
                       stop_on_nonfinite_loss=stop_on_nonfinite, lora=lora,
                       optim_state_dtype=DTYPES[cfg.optim_state_dtype])
    trainer = Trainer(store, work_dir, torch_device, tcfg, progress=_bar)
    est = estimate_io(store, tcfg, (cfg.batch_size * cfg.grad_accum, cfg.seq_len))
    remaining = cfg.iters - trainer.step
    print(f"store: {fmt_bytes(store.nbytes())} ({str(store.dtype).removeprefix('torch.')}) at {store_root}; checkpoint: "
          f"{fmt_bytes(sum(p.stat().st_size for p in ckpt.shards))}")
    print(f"disk per iteration: ~{fmt_bytes(est['read'])} read, ~{fmt_bytes(est['written'])} written; "
          f"for {remaining} iterations: ~{fmt_bytes(est['read'] * remaining)} read, "
          f"~{fmt_bytes(est['written'] * remaining)} written")

    def batch_for(step):
        # Gradient accumulation: the iteration's batches all pass through each block in one
        # layer-major pass, so no gradient is kept between them, on disk or in RAM.
        parts = [windows.batch(step * cfg.grad_accum + k, cfg.batch_size, cfg.seed) for k in range(cfg.grad_accum)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def evaluate(step):
        if val_batches:
            trainer.streamer.flush()
            v = trainer.eval_loss(val_batches)
            tqdm.write(f"[iter {step}] validation loss {v:.4f}")
            _append(log_path, {"iter": step, "val_loss": v})
            summary.setdefault("val_losses", []).append(v)
        if not cfg.prompt:
            return None
        trainer.streamer.flush()
        cache = ModuleCache(store.args, read_tuned, torch_device, torch.float32)
        text = complete(cache, tokenizer, cfg.prompt, cfg.gen_tokens)
        tqdm.write(f"[iter {step}] {cfg.prompt}{text}")
        _append(log_path, {"iter": step, "completion": cfg.prompt + text})
        return text

    def read_tuned(name):
        params = store.module_tensors(name)
        return trainer.adapters.merge(name, params) if trainer.adapters else params

    def save():
        trainer.streamer.flush()
        if not lora:
            export(store, out, cfg.shards)
            return
        adapters = trainer.adapters_path.read_bytes()
        if cfg.merge:
            export(store, out, cfg.shards, transform=trainer.adapters.merge, extra={ADAPTERS_NAME: adapters})
        else:
            atomic_write_bytes(out / ADAPTERS_NAME, [adapters])

    summary = {"out": str(out), "work_dir": str(work_dir), "losses": []}
    try:
        rec = trainer.recover(batch_for)
        if rec is not None:
            tqdm.write(f"resumed: finished iteration {rec.step} (loss {rec.loss:.4f})")
        last = (dict(iter=rec.step, loss=rec.loss, tokens=rec.tokens) if rec is not None
                else trainer.journal().get("last") if resume else None)
        if last and last["iter"] not in _logged_iters(log_path):
            _append(log_path, {**last, "resumed": True})  # the crash came before its log record
        start = trainer.step
        if start == 0 or cfg.eval_every and resume:
            summary["before"] = evaluate(start)
        proc = psutil.Process()
        for step in _bar(range(start, cfg.iters), desc="iterations", unit="it", initial=start, total=cfg.iters):
            inputs, targets = batch_for(step)
            r0, w0 = IO.snapshot()
            t0 = time.perf_counter()
            res = trainer.train_step(inputs, targets)
            trainer.streamer.flush()
            dt = time.perf_counter() - t0
            r1, w1 = IO.snapshot()
            rec = {"iter": step, "loss": res.loss, "seconds": round(dt, 4), "tokens": res.tokens,
                   "peak_rss_bytes": _peak_rss(proc), "bytes_read": r1 - r0, "bytes_written": w1 - w0}
            if res.skipped:
                rec["skipped"] = True
            _append(log_path, rec)
            summary["losses"].append(res.loss)
            tqdm.write(f"iter {step:5d}  loss {res.loss:.4f}  {dt:.2f}s  {res.tokens / dt:.0f} tok/s")
            done = step + 1
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.iters:
                evaluate(done)
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.iters:
                save()
        summary["after"] = evaluate(cfg.iters)
        save()
    finally:
        trainer.close()
    summary["estimate"] = est
    return summary


def default_dirs(model_dir: Path, out: str | Path | None, work_dir: str | Path | None) -> tuple[Path, Path]:
    out = Path(out) if out else model_dir.with_name(model_dir.name + "-tuned")
    return out, Path(work_dir) if work_dir else out.with_name(out.name + ".work")


def verify_store(*, model_dir: str | Path, out: str | Path | None = None, work_dir: str | Path | None = None) -> list[str]:
    """Check every module of the run's block store; returns the problems found."""
    _, work_dir = default_dirs(Path(model_dir), out, work_dir)
    store = BlockStore(work_dir / "store")
    return store.verify(progress=lambda it: _bar(it, desc="verify", unit="module"))


def export(store: BlockStore, out: Path, shards: int | None, transform=None, extra: dict | None = None):
    """Export into out, keeping the run's log files that live there."""
    keep = dict(extra or {})
    for name in KEEP_ON_EXPORT:
        if (out / name).exists():
            keep[name] = (out / name).read_bytes()
    export_store(store, out, n_shards=shards, progress=lambda it: _bar(it, desc="export", unit="module"),
                 extra_files=keep, transform=transform)


def _progress_step(path: Path) -> int:
    """The step a run in this work dir reached (journal or adapter file); 0 if none."""
    if path.suffix == ".blk":
        return Adapters.load(path).step
    try:
        return json.loads(path.read_text()).get("step", 0)
    except ValueError:
        return 1  # a damaged journal: treat it as progress rather than overwrite it


def _logged_iters(path: Path) -> set[int]:
    iters = set()
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "loss" in rec:
            iters.add(rec.get("iter"))
    return iters


def _append(path: Path, obj: dict):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj) + "\n")


def _peak_rss(proc: psutil.Process) -> int:
    try:
        import resource

        # ru_maxrss is KiB on Linux, bytes on macOS.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if os.uname().sysname == "Darwin" else peak * 1024
    except ImportError:  # Windows
        return proc.memory_info().peak_wset
