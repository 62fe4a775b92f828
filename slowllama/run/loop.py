"""The fine-tuning run behind finetune.py: checks, preparation, the loop, logs, evals and exports."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import psutil
import torch
from tqdm import tqdm

from .. import device as dev
from ..blockfile import DTYPES, StoreError
from ..data.preference import load_pairs
from ..data.source import check_regular, read_hashed, sha256_file
from ..data.windows import load_data
from ..engine import distributed
from ..engine.optim import OptimConfig
from ..engine.preference import (
    NEEDS_REFERENCE,
    PreferenceConfig,
    reference_logps,
    reference_path,
)
from ..engine.quant import check_quantizable
from ..engine.store import BlockStore, export_store, open_or_prepare
from ..engine.trainer import TrainConfig, estimate_io
from ..errors import ConfigError
from ..formats import open_checkpoint
from ..formats.gguf import check_request as check_gguf
from ..formats.gguf import export_gguf
from ..formats.gguf_lora import check_adapter_request, export_adapter_gguf
from ..formats.hf import HFCheckpoint
from ..formats.meta import MetaCheckpoint, check_shard_count
from ..formats.peft import peft_files
from ..formats.tokenizer import check_vocab, load_tokenizer
from ..fsutil import IO, atomic_write_bytes, atomic_write_json
from ..inference.evaluate import eval_batches, perplexity
from ..inference.evaluate import evaluate as evaluate_layer_major
from ..inference.generate import ModuleCache, check_context, complete
from ..model.lora import Adapters, LoraConfig
from ..paths import (
    REPORT_FILE,
    adapter_gguf_file,
    check_folder,
    checkpoint_dir,
    claim_folder,
    gguf_file,
    lock_out_dir,
    lock_work_dir,
    mark_owned,
    owner_info,
    prune_checkpoints,
    real_folder,
    remove_owned,
    remove_stale_tmp,
    restore_interrupted_swap,
    run_outputs,
)
from . import tensorboard_log
from .costs import fmt_bytes, print_costs
from .interrupt import StopAfterIteration
from .monitor import Monitor
from .options import (
    MATH,
    OUTPUT,
    PATHS,
    RESUME_MAY_CHANGE,
    SAVED_EXTRAS,
    SESSION,
    RunOptions,
    parse_commit_every,
    parse_size,
)
from .schedule import lr_at

log = logging.getLogger("slowllama")
LOG_NAME = "train_log.jsonl"
KEEP_ON_EXPORT = (LOG_NAME, "loss.png", REPORT_FILE)
ADAPTERS_NAME = "lora_adapters.blk"


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


def _bar(it, **kw):
    return tqdm(it, dynamic_ncols=True, mininterval=0.5, **kw)


def resolve_options(given: dict, resume: bool) -> tuple[RunOptions, dict]:
    """The run's options from what the caller gave and, on resume, the saved run.

    Returns (options, saved run.json or {}). A resume refuses any MATH option given with
    another value than the run has, listing every difference.
    """
    unknown = sorted(set(given) - set(RunOptions.names(MATH, OUTPUT, SESSION)))
    if unknown:
        raise TypeError(f"finetune() got unknown options {unknown}")
    if not given.get("model_dir"):
        raise ConfigError("MODEL_DIR is required: the folder of the checkpoint to fine-tune")
    given = {k: str(Path(v).absolute()) if k in PATHS and v is not None else v for k, v in given.items()}
    model_dir = Path(given["model_dir"])
    out, work_dir = default_dirs(model_dir, given.get("out"), given.get("work_dir"))
    if given.get("out"):
        given["out"] = str(out)  # through its symlinks, as default_dirs resolved it
    if not resume:
        if not given.get("data"):
            raise ConfigError("--data is required with a model directory")
        o = RunOptions(**{**given, "out": str(out), "work_dir": str(work_dir)})
        o.validate()
        o.check_effective()
        return o, {}
    run_path = work_dir / "run.json"
    o, saved = RunOptions.from_saved(run_path)
    diffs = []
    for name in RunOptions.names(MATH):
        if name in given and name not in RESUME_MAY_CHANGE and given[name] != getattr(o, name):
            diffs.append(f"{RunOptions.flag(name)} {given[name]} (the run has {getattr(o, name)})")
    for name in ("data", "val_data"):
        # The saved hash, not the path, names the data: a file edited in place since the run began
        # would silently change the batches of the steps still to come.
        path = given.get(name) or getattr(o, name)
        if not path or saved.get(f"{name}_sha256") is None:
            continue
        if not Path(path).exists():
            raise ConfigError(f"--resume: {RunOptions.flag(name)} {path} not found; the run trains on it. "
                              f"Put it back or pass {RunOptions.flag(name)} with the same content")
        check_regular(path, RunOptions.flag(name))
        if sha256_file(path) != saved[f"{name}_sha256"]:
            what = f"its content differs from the run's {getattr(o, name)}" if given.get(name) else \
                "the file changed since the run began"
            diffs.append(f"{RunOptions.flag(name)} {path} ({what})")
    if diffs:
        raise ConfigError("--resume: options differ from the saved run, which an exact resume must repeat: "
                          + "; ".join(diffs) + ". Start a new run with another --work-dir to change them")
    updates = {k: v for k, v in given.items() if k in ("model_dir", "data", "val_data") or RunOptions.kind(k) != MATH}
    o = dataclasses.replace(o, **{**updates, "work_dir": str(work_dir), "iters": given.get("iters", o.iters)})
    if "out" not in given:
        o.out = saved.get("out", str(out))
    o.validate()
    return o, saved


def finetune(*, resume: bool = False, **given) -> dict:
    """Fine-tune a Meta or Hugging Face checkpoint; returns a summary. Everything is checked before any write.

    given are RunOptions' fields, as a user gave them; on resume, the saved run supplies the rest.
    """
    o, saved = resolve_options(given, resume)
    model_dir, out, work_dir = Path(o.model_dir), Path(o.out), Path(o.work_dir)
    check_paths(model_dir, out, work_dir)
    check_folder(out, "export", "--out")
    check_folder(work_dir, "work", "--work-dir")
    tensorboard_log.check(o.tensorboard, ("--out", o.out), ("--work-dir", o.work_dir), ("MODEL_DIR", o.model_dir))
    if resume and not (work_dir / "run.json").is_file():
        raise ConfigError(f"--resume: {work_dir / 'run.json'} not found, there is no run to resume in {work_dir}")
    optim = OptimConfig(o.optimizer, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    lora = LoraConfig(o.lora_rank, o.lora_alpha, tuple(t.strip() for t in o.lora_targets.split(","))) \
        if o.lora_rank else None
    torch_device, why = dev.choose_device(o.device)
    print(f"device: {torch_device} ({why})")
    if "unavailable" in why:
        log.warning(why)
    dev.check_torch_for_device(torch_device)
    dev.check_compute_dtype(torch_device, DTYPES[o.compute_dtype])
    dev.check_dtypes(torch_device, compute=DTYPES[o.compute_dtype], store=DTYPES[o.store_dtype],
                     act=DTYPES[o.act_dtype], optim_state=DTYPES[o.optim_state_dtype])
    if o.deterministic:
        dev.use_deterministic(torch_device)  # before the first kernel runs on the device
    ckpt = open_checkpoint(model_dir)
    export_format = o.export_format or ("meta" if isinstance(ckpt, MetaCheckpoint) else "hf")
    if export_format == "meta" and not isinstance(ckpt, MetaCheckpoint):
        raise ConfigError(f"--export-format meta: {model_dir} is a Hugging Face folder; it exports as one")
    if o.shards is not None:
        if export_format != "meta":
            raise ConfigError("--shards: a Hugging Face export is sharded by size (5 GB), not by count")
        check_shard_count(ckpt.args, o.shards)
    if o.gguf:
        if export_format != "hf" or not isinstance(ckpt, HFCheckpoint):
            raise ConfigError("--gguf: writes the GGUF of a Hugging Face folder's run (its export, or a LoRA run's "
                              "adapter); convert other exports with tools/export_gguf.py")
        if lora and not o.merge:  # the adapter alone, for llama.cpp's --lora over the base model's GGUF
            check_adapter_request(ckpt.config_path, out / adapter_gguf_file(o.gguf), o.gguf)
        else:  # the architecture, the tokenizer, the GGUF and its Modelfile
            check_gguf(ckpt, out / gguf_file(o.gguf), o.gguf)
    if o.base_quant:
        check_quantizable(o.base_quant, ckpt.shapes)
    tokenizer = load_tokenizer(model_dir)
    if o.prompt:
        try:
            check_context(ckpt.args, len(tokenizer.encode(o.prompt)), o.gen_tokens)
        except ConfigError as e:
            raise ConfigError(f"--prompt and --gen-tokens: {e}") from e
    if o.method != "sft":
        windows, data_sha = read_hashed(o.data, "--data", lambda p: load_pairs(p, tokenizer, o.seq_len, o.method))
    else:
        windows, data_sha = read_hashed(o.data, "--data",
                                        lambda p: load_data(p, tokenizer, o.seq_len, o.train_on_prompt))
    check_vocab(tokenizer, windows.max_id(), ckpt.args.vocab_size)
    print(f"data: {windows.summary}")
    val, val_sha = None, None
    if o.val_data:
        val, val_sha = read_hashed(o.val_data, "--val-data",
                                   lambda p: load_data(p, tokenizer, o.seq_len, o.train_on_prompt))
        check_vocab(tokenizer, val.max_id(), ckpt.args.vocab_size)
        print(f"validation data: {val.summary}")
    elif o.val_fraction:
        windows, val = windows.split(o.val_fraction)
    for name, sha in (("data", data_sha), ("val_data", val_sha)):  # resolve_options compared an earlier read
        if saved.get(f"{name}_sha256") not in (None, sha):
            raise ConfigError(f"--resume: {RunOptions.flag(name)} {getattr(o, name)} changed since the run began")
    val_batches = eval_batches(val, o.batch_size) if val is not None else []  # every held-out token once

    # -- from here on, files are written: first the locks, so that no other process is writing --
    # Under torchrun one rank per host takes the work dir's and writes it, the others read what it
    # wrote; rank 0 alone takes the output folder's (distributed.py).
    ranks, torch_device = distributed.setup(torch_device)
    new_work = not work_dir.exists()
    locks = []
    try:
        if resume and saved.get("ranks", 1) != ranks.world:
            raise ConfigError(f"--resume: the run in {work_dir} trains over {saved.get('ranks', 1)} process(es) "
                              f"(torchrun's --nnodes x --nproc-per-node), this one has {ranks.world}: the global "
                              f"batch would change. Resume it under the same torchrun command")
        if ranks.writer:
            claim_folder(work_dir, "work", "--work-dir")
            locks.append(lock_work_dir(work_dir))
        if ranks.leader:
            locks.append(lock_out_dir(out))
            # Under the lock: a run still going is refused above with its pid; none can export here meanwhile.
            check_out_run(out, work_dir, o)
            for name in KEEP_ON_EXPORT:  # a run killed mid-rewrite of its log, plot or page left a temp file
                remove_stale_tmp(out / name)
        prepared = Prepared(ckpt, tokenizer, windows, val_batches, optim, lora, torch_device, (data_sha, val_sha))
        return Run(o, resume, saved, prepared, ranks).train()
    except BaseException:
        if ranks.writer and new_work and not (work_dir / "run.json").exists():
            # Preparation found the checkpoint damaged: leave nothing of the run behind.
            remove_owned(work_dir, "work")
        raise
    finally:
        for lock in locks:
            lock.close()
        distributed.teardown(ranks)


@dataclasses.dataclass
class Prepared:
    """What finetune() read and checked before writing anything."""
    ckpt: object
    tokenizer: object
    windows: object
    val_batches: list
    optim: OptimConfig
    lora: LoraConfig | None
    device: torch.device
    data_sha256: tuple[str, str | None]  # of the bytes --data and --val-data were tokenized from


def train_config(o: RunOptions, optim: OptimConfig, lora: LoraConfig | None, world: int = 1) -> TrainConfig:
    micro = o.micro_batch or (o.batch_size if o.grad_accum > 1 else None)
    # The trainer counts rows: a preference micro-batch is its pairs' chosen and rejected rows.
    micro = micro * o.rows_per_example if micro else None
    return TrainConfig(optim=optim, seed=o.seed, dropout=o.dropout, micro_batch=micro,
                       compute_dtype=DTYPES[o.compute_dtype], act_dtype=DTYPES[o.act_dtype],
                       ram_budget=parse_size(o.ram_budget), prefetch=not o.no_prefetch, verify=not o.no_verify,
                       stop_on_nonfinite_loss=o.stop_on_nan, lora=lora,
                       optim_state_dtype=DTYPES[o.optim_state_dtype], clip_grad_norm=o.clip_grad_norm,
                       # Data parallel runs commit every step (distributed.DataParallelTrainer.holds_state).
                       commit_every=parse_commit_every(o.commit_every) if world == 1 else 1,
                       lr_at=lambda step: lr_at(step, o.iters, o.lr, o.lr_schedule, o.warmup_iters, o.min_lr),
                       preference=PreferenceConfig(o.method, o.beta) if o.method != "sft" else None)


class Run:
    """One run once its folders are locked: its store and trainer, and the loop's pieces, one concern each
    (the store, the batches, evaluation, saving, the log, the loop)."""

    def __init__(self, o: RunOptions, resume: bool, saved: dict, p: Prepared, ranks: distributed.Ranks):
        self.o, self.resume, self.p, self.ranks = o, resume, p, ranks
        self.out, self.work_dir = Path(o.out), Path(o.work_dir)
        self.log_path = self.out / LOG_NAME
        self.store, self.saved = self._open_store(saved)
        self.tcfg = train_config(o, p.optim, p.lora, ranks.world)
        self.summary = {"out": str(self.out), "work_dir": str(self.work_dir), "losses": [], "rank": ranks.rank}
        self.trainer = self.monitor = None
        self.reference: torch.Tensor | None = None  # DPO/IPO: (2, pairs) the starting model's log-probabilities

    def _open_store(self, saved: dict) -> tuple[BlockStore, dict]:
        """The run's block store, prepared from the checkpoint on a new run; and what run.json is to hold."""
        o, ranks, ckpt = self.o, self.ranks, self.p.ckpt
        # LoRA reads a store that is never written, in the checkpoint's own dtype.
        root = self.work_dir / ("base" if self.p.lora else "store")
        if not ranks.writer:
            ranks.wait("the preparation of the stores")
        if self.resume:
            if not (root / "manifest.json").exists():
                raise ConfigError(f"--resume: {root} is missing; the run in {self.work_dir} cannot continue")
            store = BlockStore(root)
            if not store.matches(ckpt):
                raise StoreError(f"--resume: {o.model_dir} is not the checkpoint {root} was prepared from "
                                 f"(its config, tokenizer or weights differ)")
        else:
            progress = _progress(self.work_dir) if ranks.writer else ""
            if progress:
                raise ConfigError(f"--work-dir {self.work_dir} holds a run {progress}: pass --resume to continue "
                                  f"it, or delete the folder to start over")
            if ranks.writer:
                dtype = ckpt.checkpoint_dtype() if self.p.lora else DTYPES[o.store_dtype]
                store, prepared = open_or_prepare(ckpt, root, dtype,
                                                  progress=lambda it: _bar(it, desc="prepare", unit="module"),
                                                  base_quant=o.base_quant)
                log.info("%s store at %s", "prepared" if prepared else "reusing", root)
            else:
                store = BlockStore(root)
            hashes = self.p.data_sha256
            saved = {**o.saved(), **dict(zip(SAVED_EXTRAS, (*hashes, ranks.world) if ranks.world > 1 else hashes))}
        if ranks.writer:
            ranks.wait("the preparation of the stores")
        return store, saved

    def _finished(self) -> bool:
        """Whether a resumed run has nothing left to do; refuses --iters below the run's step."""
        o, trainer = self.o, self.trainer
        trainer.update.resume_point()  # reads every module's header: a swapped or stale file stops here
        if trainer.step > o.iters:
            raise ConfigError(f"--iters {o.iters}: the run in {self.work_dir} is already at iteration {trainer.step}")
        return (self.resume and trainer.step == o.iters and trainer.journal().get("phase", "idle") == "idle"
                and _export_step(self.out, self.store.model_id) == o.iters
                and not (o.gguf and not (self.out / self._gguf_name()).is_file()))

    def _gguf_name(self) -> str:
        """The GGUF --gguf writes into out: the model's, or a LoRA run's adapter without --merge."""
        o = self.o
        return adapter_gguf_file(o.gguf) if self.p.lora and not o.merge else gguf_file(o.gguf)

    def _claim_out(self):
        """run.json, then the output folder: this run's, its log started afresh on a new run."""
        o, ranks = self.o, self.ranks
        if ranks.writer and (not self.resume or o.iters != self.saved["iters"]):
            atomic_write_json(self.work_dir / "run.json", {**self.saved, **o.saved()})
        if ranks.leader:
            restore_interrupted_swap(self.out)
            claim_folder(self.out, "export", "--out")
            if not owner_info(self.out).get("run"):  # a new output folder: its log is this run's before any export
                mark_owned(self.out, "export", run=self.store.model_id, work_dir=str(self.work_dir))
            if not self.resume:
                self.log_path.unlink(missing_ok=True)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Gradient accumulation: the iteration's batches all pass through each block in one
        # layer-major pass, so no gradient is kept between them, on disk or in RAM.
        # Under torchrun: the global batch, the one a single process with --batch-size B×N draws;
        # each rank computes its own rows of it (distributed.DataParallelTrainer).
        o = self.o
        if o.method != "sft":
            return self.pair_batch(step)
        parts = [self.p.windows.batch(step * o.grad_accum + k, o.batch_size * self.ranks.world, o.seed)
                 for k in range(o.grad_accum)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def pair_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A preference iteration's rows, as batch() lays them out for the ranks, with (side, reference
        log-probability) per row. Each rank's B pairs go in micro-batch groups (data/preference.py)."""
        o, pairs, b = self.o, self.p.windows, self.o.batch_size
        group = o.micro_batch or b
        rows = []
        for k in range(o.grad_accum):
            idx = pairs.indices(step * o.grad_accum + k, b * self.ranks.world, o.seed)
            rows += [pairs.rows(idx[r * b: (r + 1) * b], group) for r in range(self.ranks.world)]
        inputs, targets, side, pair = (torch.cat(t) for t in zip(*rows))
        ref = self.reference[side, pair].double() if self.reference is not None else torch.zeros(len(side))
        return inputs, targets, torch.stack([side.double(), ref.double()], dim=1)

    def prepare_reference(self):
        """DPO and IPO: the starting model's log-probabilities of every pair, from one layer-major pass over
        the untouched store before step 0 (or as that pass saved them). A host's writer computes them."""
        o, pairs, ranks = self.o, self.p.windows, self.ranks
        if o.method not in NEEDS_REFERENCE:
            return
        inputs, targets = pairs.inputs.flatten(0, 1), pairs.targets.flatten(0, 1)  # every chosen row, then rejected
        if not ranks.writer:
            ranks.wait("the reference pass")
        chunk = 2 * (o.micro_batch or o.batch_size)
        saved = reference_path(self.work_dir).exists()
        if ranks.leader and not saved:
            # Every row's hidden state goes to disk once per module below the output layer, in atomic chunk files.
            acts = inputs.numel() * self.store.args.dim * 4
            print(f"reference pass: reads the store once ({fmt_bytes(self.store.nbytes())}) and writes "
                  f"~{fmt_bytes(acts * (len(self.store.trainable) - 1))} of activations in chunks of {chunk} rows "
                  f"(~{fmt_bytes(acts)} on disk at a time)")
        logps = reference_logps(self.store, self.work_dir, inputs, targets, self.p.device, DTYPES[o.compute_dtype],
                                chunk_rows=chunk, progress=_bar)
        if ranks.writer:
            ranks.wait("the reference pass")
        self.reference = logps.view(2, len(pairs))
        if ranks.leader:
            how = "as its pass saved them" if saved else "from one layer-major pass"
            print(f"reference: the starting model's log-probabilities of {len(pairs)} pairs, {how} "
                  f"({reference_path(self.work_dir)})")

    def read_tuned(self, name: str) -> dict:
        params = self.store.module_tensors(name)
        return self.trainer.adapters.merge(name, params) if self.trainer.adapters else params

    def evaluate(self, step: int) -> str | None:
        """Validation loss and the sample completion at iteration step (rank 0 only); returns the completion."""
        o, p = self.o, self.p
        self.trainer.commit()  # the evaluation reads the store: the steps held in RAM go there first
        if not self.ranks.leader:
            return None
        if p.val_batches:
            self.trainer.streamer.flush()
            v, ppl = perplexity(*evaluate_layer_major(self.read_tuned, self.store.args, p.val_batches, p.device,
                                                      DTYPES[o.compute_dtype]))
            tqdm.write(f"[iter {step}] validation loss {v:.4f} (perplexity {ppl:.2f})")
            _append(self.log_path, self.monitor.record({"iter": step, "val_loss": v, "val_ppl": ppl}))
            self.summary.setdefault("val_losses", []).append(v)
        if not o.prompt:
            return None
        self.trainer.streamer.flush()
        cache = ModuleCache(self.store.args, self.read_tuned, p.device, torch.float32)
        text = complete(cache, p.tokenizer, o.prompt, o.gen_tokens)
        tqdm.write(f"[iter {step}] {o.prompt}{text}")
        _append(self.log_path, self.monitor.record({"iter": step, "completion": o.prompt + text}))
        return text

    def save(self, final: bool = True):
        """The export: into out at the end, into out/checkpoint-NNNNNN every --save-every iterations."""
        o, store, trainer, out = self.o, self.store, self.trainer, self.out
        trainer.commit()  # an export reads the store: the steps held in RAM go there first
        if not self.ranks.leader:
            return
        trainer.streamer.flush()
        marker = {"run": store.model_id, "step": trainer.step, "work_dir": str(self.work_dir)}
        target = out if final else checkpoint_dir(out, trainer.step)
        logs = {n: (out / n).read_bytes() for n in KEEP_ON_EXPORT if final and (out / n).exists()}
        if not self.p.lora:
            export(store, Path(o.model_dir), target, o, marker, extra=logs)
        else:
            files = {ADAPTERS_NAME: trainer.adapters_path.read_bytes()}
            if store.source_format == "hf":  # PEFT's files, which peft.PeftModel.from_pretrained(base, out) reads
                files.update(peft_files(trainer.adapters, store.args, o.model_dir))
            if o.merge:
                # Onto the original weights: a quantized base's merge reads them from the checkpoint.
                source = self.p.ckpt.read_module if store.base_quant else None
                if source:
                    log.info("--merge: the adapters go onto %s's original weights, not the %s base they trained on",
                             o.model_dir, store.base_quant)
                export(store, Path(o.model_dir), target, o, marker, transform=trainer.adapters.merge,
                       extra={**files, **logs}, read_params=source)
            else:
                claim_folder(target, "export", "--out")
                for name, data in files.items():
                    atomic_write_bytes(target / name, [data])
                mark_owned(target, "export", **marker)
        if final and o.gguf and self.p.lora and not o.merge:
            export_adapter_gguf(trainer.adapters, store.args, Path(o.model_dir) / "config.json",
                                out / self._gguf_name(), o.gguf, name=Path(o.model_dir).name)
        elif final and o.gguf:
            export_gguf(out, out / self._gguf_name(), o.gguf)
        if not final:
            prune_checkpoints(out, o.keep)

    def _recover(self) -> int:
        """Finish an interrupted step, log it if the crash came before its record; returns the first step."""
        o, trainer = self.o, self.trainer
        rec = trainer.recover(self.batch)
        if self.resume and self.ranks.leader:
            _drop_records_from(self.log_path, trainer.step, self._evaluates_at_start(trainer.step))
        if rec is not None and self.ranks.leader:
            tqdm.write(f"resumed: finished iteration {rec.step} (loss {rec.loss:.4f})")
        last = (dict(iter=rec.step, loss=rec.loss, tokens=rec.tokens,
                     **({"grad_norm": rec.grad_norm} if rec.grad_norm is not None else {}), **(rec.metrics or {}))
                if rec is not None
                else trainer.journal().get("last") if self.resume else None)
        if self.ranks.leader and last and last["iter"] not in _logged_iters(self.log_path):
            _append(self.log_path, self.monitor.record({**last, "resumed": True}))
        start = trainer.step
        if o.save_every and 0 < start < o.iters and start % o.save_every == 0 \
                and _export_step(checkpoint_dir(self.out, start), self.store.model_id) != start:
            self.save(final=False)  # the run was stopped while it saved this checkpoint
        return start

    def _evaluates_at_start(self, start: int) -> bool:
        """Whether the run evaluates before its first iteration: a new run, for the baseline; a resume that
        evaluates at all, to show where it picks up. The end of the run evaluates at --iters anyway."""
        return start == 0 or bool(self.o.eval_every and self.resume and start < self.o.iters)

    def _step(self, step: int, proc: psutil.Process):
        """One iteration and its log record."""
        ranks = self.ranks
        batch = self.batch(step)
        r0, w0 = IO.snapshot()
        c0, s0 = ranks.comm_bytes, ranks.comm_seconds
        t0 = time.perf_counter()
        res = self.trainer.train_step(*batch)
        self.trainer.streamer.flush()
        dt = time.perf_counter() - t0
        r1, w1 = IO.snapshot()
        rec = {"iter": step, "loss": res.loss, "seconds": round(dt, 4), "tokens": res.tokens,
               "peak_rss_bytes": _peak_rss(proc), "bytes_read": r1 - r0, "bytes_written": w1 - w0,
               "lr": self.tcfg.optim_at(step).lr}
        if res.skipped:
            rec["skipped"] = True
        if ranks.world > 1:  # the disk figures above are rank 0's own
            rec.update(ranks=ranks.world, comm_bytes=ranks.comm_bytes - c0,
                       comm_seconds=round(ranks.comm_seconds - s0, 4))
        if res.grad_norm is not None:
            rec["grad_norm"] = res.grad_norm  # before clipping
        rec.update(res.metrics or {})  # a preference step's rewards
        self.summary["losses"].append(res.loss)
        if ranks.leader:
            _append(self.log_path, self.monitor.record(rec))
            rewards = (f"  reward acc {res.metrics['rewards/accuracies']:.2f} margin {res.metrics['rewards/margins']:.4f}"
                       if res.metrics else "")
            tqdm.write(f"iter {step:5d}  loss {res.loss:.4f}{rewards}  {dt:.2f}s  {res.tokens / dt:.0f} tok/s")

    def train(self) -> dict:
        """From the store to the export: the costs, the iterations with their evals and checkpoints."""
        o, p, ranks = self.o, self.p, self.ranks
        self.trainer = distributed.make_trainer(self.store, self.work_dir, p.device, self.tcfg, progress=_bar,
                                                ranks=ranks, rows_per_rank=o.batch_size * o.rows_per_example)
        try:
            if self._finished():
                print(f"nothing to do: the run finished its {o.iters} iterations and {self.out} holds its export "
                      f"(pass --iters N to train further)")
                return {"out": str(self.out), "work_dir": str(self.work_dir), "losses": [], "nothing_to_do": True}
            self._claim_out()
            est = estimate_io(self.store, self.tcfg, (o.batch_size * o.grad_accum * o.rows_per_example, o.seq_len))
            plan = print_costs(o, self.store, p.ckpt, self.tcfg, est, self.trainer.step, p.lora, self.resume,
                               self.saved, bool(p.val_batches), p.device, ranks.world) if ranks.leader else []
            self.monitor = Monitor(self, est, plan, ranks.leader)  # one copy of the costs, however many ranks
            self.prepare_reference()
            start = self._recover()
            if self._evaluates_at_start(start):
                self.summary["before"] = self.evaluate(start)
            proc = psutil.Process()
            bar = _bar(range(start, o.iters), desc="iterations", unit="it", initial=start, total=o.iters)
            self.monitor.started(bar)
            with StopAfterIteration(lambda: self.trainer.steps_held() > 0) as stop:
                for step in bar:
                    self._step(step, proc)
                    done = step + 1
                    evaluated = bool(o.eval_every and done % o.eval_every == 0 and done < o.iters)
                    if evaluated:
                        self.evaluate(done)
                    if o.save_every and done % o.save_every == 0 and done < o.iters:
                        self.save(final=False)
                    self.monitor.iteration_done(done, bar, evaluated)
                    if stop.requested and done < o.iters:
                        self.trainer.commit()
                        raise KeyboardInterrupt
            self.trainer.commit()
            if ranks.world > 1:  # every store holds the last step before the followers drop their boundaries
                self.trainer.settle("the end of the run")
            self.summary["after"] = self.evaluate(o.iters)
            self.save()
            self.monitor.close(finished=True)
        except BaseException:
            if self.monitor:  # the page says the run stopped; the error itself goes on up
                self.monitor.close(finished=False)
            raise
        finally:
            self.trainer.close()
        self.summary["estimate"] = est
        return self.summary


def default_dirs(model_dir: Path, out: str | Path | None, work_dir: str | Path | None) -> tuple[Path, Path]:
    out = real_folder(out or model_dir.absolute().with_name(model_dir.absolute().name + "-tuned"))
    return out, real_folder(work_dir or out.with_name(out.name + ".work"))


def verify_store(*, model_dir: str | Path, out: str | Path | None = None, work_dir: str | Path | None = None) -> list[str]:
    """Check every module of the run's block store (and a LoRA run's base and adapters); returns the problems."""
    _, work_dir = default_dirs(Path(model_dir), out, work_dir)
    check_folder(work_dir, "work", "--work-dir")
    roots = [r for r in (work_dir / "store", work_dir / "base") if (r / "manifest.json").exists()]
    if not roots:
        raise ConfigError(f"--work-dir {work_dir}: holds no block store to verify")
    lock = lock_work_dir(work_dir, shared=True)
    try:
        problems = []
        for root in roots:
            problems += BlockStore(root).verify(progress=lambda it: _bar(it, desc="verify", unit="module"))
        if (work_dir / ADAPTERS_NAME).exists():
            try:
                Adapters.load(work_dir / ADAPTERS_NAME)
            except ConfigError as e:
                problems.append(str(e))
        return problems
    finally:
        lock.close()


def export(store: BlockStore, source_dir: Path, out: Path, o: RunOptions, marker: dict, transform=None,
           extra: dict | None = None, read_params=None):
    export_store(store, source_dir, out, n_shards=o.shards, progress=lambda it: _bar(it, desc="export", unit="module"),
                 extra_files=extra, transform=transform, marker=marker, export_format=o.export_format,
                 read_params=read_params)


def _progress(work_dir: Path) -> str:
    """What training a work dir holds, full or LoRA ('at step N', 'inside step 0'); '' if none."""
    journal, adapters = work_dir / "store" / "journal.json", work_dir / ADAPTERS_NAME
    if journal.exists():
        try:
            j = json.loads(journal.read_text())
            step, phase = j.get("step", 0), j.get("phase", "idle")
        except (ValueError, OSError, AttributeError):
            return "with a damaged journal"
        if step or phase != "idle":
            return f"at step {step}" if phase == "idle" else f"inside step {step}"
    if adapters.exists():
        try:
            step = Adapters.load(adapters).step
        except ConfigError:
            return "with a damaged adapter file"
        if step:
            return f"at step {step} (LoRA)"
    return ""


def this_run_id(work_dir: Path, lora: bool) -> str | None:
    """The id of the run in work_dir (its store's), or None before its store is prepared. A damaged store is
    refused here, naming its file: taken for no run, its own export would look like another run's."""
    root = work_dir / ("base" if lora else "store")
    if not (root / "manifest.json").exists():
        return None
    try:
        return BlockStore(root).model_id
    except OSError as e:
        raise ConfigError(f"--work-dir {work_dir}: cannot read its store ({e.strerror})") from e


def check_out_run(out: Path, work_dir: Path, o: RunOptions):
    """Refuse an --out that holds another run's export, checkpoints or log: the export at this run's end
    would replace them. A resume, or a rerun of the same work dir, writes over its own output."""
    run = this_run_id(work_dir, bool(o.lora_rank))
    other = [(f, info) for f, info in run_outputs(out) if info["run"] != run]
    if not other or o.overwrite_out:
        return
    folder, info = other[0]
    what = (f"its export at iteration {info['step']}" if folder == out and "step" in info else
            f"its checkpoint {folder.name}" if folder != out else "its training log, no export yet")
    where = info.get("work_dir")
    resume = f"resume it with --resume --work-dir {where}" if where else "resume it with --resume and its --work-dir"
    raise ConfigError(f"--out {out}: holds the output of another run (run {info['run']}: {what}); choose another "
                      f"--out, {resume}, or pass {RunOptions.flag('overwrite_out')} to replace it")


def _export_step(out: Path, run_id: str) -> int | None:
    """The step of the export in out if this run wrote it."""
    info = owner_info(out)
    return info.get("step") if info.get("run") == run_id else None


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


def _drop_records_from(path: Path, step: int, reevaluates: bool):
    """On resume: the log as of the store's last commit. The records of iterations from `step` on (and of
    evaluations after it) belong to steps a crash lost after that commit (--commit-every held them in
    RAM); the resume replays those steps and logs them again, so the log holds each iteration once.
    reevaluates: the resume evaluates at `step` itself, so an evaluation logged there goes too."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None  # a line a crash tore: dropped, or the next record would be appended onto it
        if not isinstance(rec, dict) or not isinstance(rec.get("iter"), int):
            if rec is not None:
                keep.append(line)
            continue
        if rec["iter"] > step or (rec["iter"] == step and ("loss" in rec or reevaluates)):
            continue
        keep.append(line)
    if len(keep) != len(lines):
        atomic_write_bytes(path, [line.rstrip("\n").encode("utf-8") + b"\n" for line in keep])


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
