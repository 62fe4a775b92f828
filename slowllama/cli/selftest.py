"""Whether streamed training is exact, crash-safe and fast on this device, in a minute or two.

    python -m slowllama.cli.selftest [--device auto|cpu|cuda|mps] [--out report.json]

Builds a small random model in a temp folder (removed afterwards), runs each check on the
device, prints a table and writes the report as JSON. The exit status is 0 only if every
check passed. Attach the report to any bug about a device.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import device as dev
from ..data.windows import IGNORE
from ..engine import streamer as blackbox
from ..engine.optim import OptimConfig, stochastic_round
from ..engine.store import BlockStore, prepare
from ..engine.trainer import TrainConfig, Trainer
from ..errors import ConfigError
from ..formats.meta import MetaCheckpoint, save_meta
from ..fsutil import atomic_write_bytes
from ..model.transformer import ModelArgs, Transformer, TransformerBlock
from ..paths import check_not_under_a_file

log = logging.getLogger(__name__)

# The model: GQA, three blocks, micro-batches of two; small enough for CI's CPU.
PARAMS = {"dim": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "norm_eps": 1e-5,
          "vocab_size": 256}
BATCH, SEQ, MICRO, STEPS, SEED, DROPOUT = 4, 16, 2, 2, 11, 0.1
OPTIMS = {"sgd": OptimConfig("sgd", lr=0.05, momentum=0.9), "adamw": OptimConfig("adamw", lr=1e-3, weight_decay=0.1)}
MEMORY_SLACK = 64 << 20  # allocator granularity, thread stacks, kernels loaded late: not the model's bytes


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


class InjectedFault(RuntimeError):
    """Raised on purpose mid-backward by the recovery check."""


# ---- the model and the two ways to train it -------------------------------------------------

def make_model(folder: Path, seed: int = 0) -> Path:
    """A Meta checkpoint with random weights (norms not all ones, so their updates show)."""
    args = ModelArgs(**PARAMS)
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    sd = {}
    for k, shape in shapes.items():
        t = torch.randn(shape, generator=gen)
        sd[k] = 1.0 + 0.1 * t if k.endswith("norm.weight") else t * (1.0 if k.startswith("tok_") else 0.02)
    save_meta(folder, PARAMS, sd)
    return folder


def batches(n: int, seed: int = SEED) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        toks = torch.randint(0, PARAMS["vocab_size"], (BATCH, SEQ + 1), generator=gen)
        x, y = toks[:, :-1], toks[:, 1:].clone()
        y[0, : 2 + i] = IGNORE  # a masked prefix: the loss divides by the target count
        out.append((x, y))
    return out


def reference(model_dir: Path, device: torch.device, dropout: float = 0.0) -> Transformer:
    """The whole model as one plain nn.Module on the device."""
    ckpt = MetaCheckpoint(model_dir)
    model = Transformer(ckpt.args, dropout=dropout)
    sd = torch.load(ckpt.shards[0], weights_only=True, mmap=True)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.to(device)


def reference_step(model, opt, x, y, device: torch.device, step: int) -> float:
    """One step of plain autograd with the trainer's RNG convention: micro-batch m starts from seed (SEED, step, m)."""
    n_tok = int((y != IGNORE).sum())
    loss = 0.0
    for m, (xm, ym) in enumerate(zip(x.split(MICRO), y.split(MICRO))):
        torch.manual_seed(dev.derive_seed(SEED, step, m))
        logits = model(xm.to(device))
        part = F.cross_entropy(logits.float().flatten(0, 1), ym.to(device).flatten(), ignore_index=IGNORE,
                               reduction="sum") / n_tok
        part.backward()
        loss += part.item()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def train_config(optim: OptimConfig, ram_budget: int | None = 0) -> TrainConfig:
    return TrainConfig(optim=optim, seed=SEED, dropout=DROPOUT, micro_batch=MICRO, ram_budget=ram_budget)


def streamed(model_dir: Path, work: Path, device: torch.device, optim: OptimConfig, data, *,
             fault: tuple[int, int] | None = None) -> tuple[BlockStore, list[float]]:
    """Train len(data) streamed steps in work; fault=(step, k) raises after k modules of that step committed."""
    store = prepare(MetaCheckpoint(model_dir), work / "store")
    trainer = Trainer(store, work, device, train_config(optim))
    losses = []
    try:
        for i, batch in enumerate(data):
            if fault is not None and i == fault[0]:
                _fail_after(trainer, fault[1])
            losses.append(trainer.train_step(*batch).loss)
    finally:
        trainer.close()
    return store, losses


def _fail_after(trainer: Trainer, k: int):
    commit, done = trainer.update.commit, [0]

    def failing(*a, **kw):
        if done[0] == k:
            raise InjectedFault(f"injected after {k} modules committed")
        done[0] += 1
        return commit(*a, **kw)

    trainer.update.commit = failing


def max_param_diff(store: BlockStore, model: Transformer) -> float:
    want = model.state_dict()
    worst = 0.0
    for m in store.trainable:
        for p, t in store.read(m).params.items():
            worst = max(worst, (t.float() - want[f"{m}.{p}"].float().cpu()).abs().max().item())
    return worst


def store_diff(a: BlockStore, b: BlockStore) -> float:
    worst = 0.0
    for m in a.trainable:
        pa, pb = a.read(m).params, b.read(m).params
        worst = max([worst] + [(pa[k].float() - pb[k].float()).abs().max().item() for k in pa])
    return worst


# ---- the checks ------------------------------------------------------------------------------

def check_device(device: torch.device, why: str) -> Check:
    dev.check_torch_for_device(device)
    return Check("device", True, f"{device} ({why})")


def check_dropout_replay(device: torch.device) -> Check:
    """A block under no_grad, then again with grad from the restored RNG state: the same bits, and the
    state after both is the same and not the one before."""
    torch.manual_seed(1)
    block = TransformerBlock(ModelArgs(**PARAMS), dropout=0.5).to(device)
    x = torch.randn(2, SEQ, PARAMS["dim"], device=device)
    dev.seed_device(device, dev.derive_seed(SEED, 0, 0))
    before = dev.get_rng_state(device)
    with torch.no_grad():
        first = block(x)
    after_first = dev.get_rng_state(device)
    dev.set_rng_state(device, before)
    xg = x.clone().requires_grad_()
    again = block(xg)
    again.sum().backward()
    after_again = dev.get_rng_state(device)
    same = torch.equal(first.view(torch.int32), again.detach().view(torch.int32))
    advanced = not torch.equal(before, after_first)
    consistent = torch.equal(after_first, after_again)
    differing = int((first != again.detach()).sum())
    return Check("dropout_replay", same and advanced and consistent,
                 f"replayed bits {'equal' if same else f'differ in {differing} values'}; state "
                 f"{'advances' if advanced else 'does not advance'}, "
                 f"{'the same' if consistent else 'different'} after both")


def check_copy_safety(device: torch.device, n: int = 1 << 20) -> Check:
    """A non_blocking copy out of a pooled buffer that is refilled at once must still deliver the old bytes."""
    pool = blackbox.BufferPool(pin_memory=device.type == "cuda")
    want = torch.arange(n, dtype=torch.float32)
    buf = pool(n * 4)
    ptr = buf.data_ptr()
    src = buf.view(torch.float32)
    src.copy_(want)
    out = dev.to_device(src, device, non_blocking=True)
    pool.fence(buf, dev.copy_fence(device))
    del src, buf
    refill = pool(n * 4)  # the next module's read, at once
    reused = refill.data_ptr() == ptr
    refill.view(torch.float32).fill_(-1.0)
    dev.synchronize(device)
    got = out.to("cpu")
    bad = int((got != want).sum())
    return Check("copy_safety", bad == 0,
                 f"{n * 4 >> 20} MiB copied non_blocking; buffer {'refilled' if reused else 'not reused (in use)'} "
                 f"at once; {bad} values wrong")


def check_exact(device: torch.device, model_dir: Path, work: Path, optim_name: str, tol: float,
                name: str | None = None) -> Check:
    """Streamed steps with dropout and micro-batches against whole-model autograd on the same device."""
    optim = OptimConfig(**vars(OPTIMS[optim_name]))
    data = batches(STEPS)
    store, losses = streamed(model_dir, work, device, optim, data)
    model = reference(model_dir, device, DROPOUT)
    opt = optim.make(list(model.parameters()))
    ref = [reference_step(model, opt, *data[i], device, i) for i in range(STEPS)]
    worst = max_param_diff(store, model)
    loss_diff = max(abs(a - b) for a, b in zip(losses, ref))
    ok = worst <= tol and loss_diff <= max(tol, 1e-6) and all(store.step_of(m) == STEPS for m in store.trainable)
    return Check(name or f"exact_{optim_name}", ok,
                 f"{STEPS} steps, dropout {DROPOUT}, micro-batch {MICRO}: max |param diff| {worst:.3g}, "
                 f"max |loss diff| {loss_diff:.3g} (tolerance {tol:g})")


def check_recovery(device: torch.device, model_dir: Path, work: Path) -> Check:
    """A fault mid-backward, then Trainer.recover, against an uninterrupted run."""
    optim, data = OPTIMS["sgd"], batches(STEPS)
    clean, clean_losses = streamed(model_dir, work / "clean", device, optim, data)
    k = 2  # the output layer and the norm committed; the blocks and the embedding not yet
    try:
        streamed(model_dir, work / "cut", device, optim, data, fault=(STEPS - 1, k))
        return Check("recovery", False, "the injected fault did not stop the step")
    except InjectedFault:
        pass
    store = BlockStore(work / "cut" / "store")
    partial = sorted({store.step_of(m) for m in store.trainable})
    trainer = Trainer(store, work / "cut", device, train_config(optim))
    try:
        result = trainer.recover(lambda step: data[step])
    finally:
        trainer.close()
    diff = store_diff(clean, store)
    steps = {store.step_of(m) for m in store.trainable}
    loss_ok = result is not None and result.loss == clean_losses[-1]
    ok = diff == 0 and steps == {STEPS} and loss_ok and partial == [STEPS - 1, STEPS]
    return Check("recovery", ok,
                 f"fault after {k} of {len(store.trainable)} modules of step {STEPS - 1} (store at steps {partial}); "
                 f"recovered {'step %d' % result.step if result else 'nothing'}; max |param diff| vs uninterrupted "
                 f"{diff:.3g}; modules at steps {sorted(steps)}")


def check_rounding(device: torch.device, reps: int = 256) -> Check:
    """Stochastic rounding to bf16: finite, unbiased per value, and a seed gives the same bits."""
    ulp = 2.0 ** -7  # bf16's spacing in [1, 2)
    gen = torch.Generator().manual_seed(3)
    frac = torch.rand(512, generator=gen) * 0.98 + 0.01  # strictly between two bf16 values
    base = 1.0 + torch.randint(0, 127, (512,), generator=gen) * ulp
    x = (torch.cat([base + frac * ulp, -(base + frac * ulp)])).to(device)
    many = x.repeat(reps)
    r1 = stochastic_round(many, torch.bfloat16, 42)
    r2 = stochastic_round(many, torch.bfloat16, 42)
    same = torch.equal(r1.view(torch.int16), r2.view(torch.int16))
    finite = bool(torch.isfinite(r1.float()).all())
    mean = r1.float().view(reps, -1).mean(0)
    # Each draw is x rounded up or down by at most one ulp: its spread is at most ulp/2, so the mean
    # over reps draws lies within 6 standard errors of x unless the rounding is biased.
    tol = 6 * 0.5 * ulp / math.sqrt(reps)
    worst = ((mean - x).abs().max() / ulp).item()
    return Check("stochastic_rounding", same and finite and worst * ulp <= tol,
                 f"{x.numel()} values x {reps} draws: max |mean - x| = {worst:.3f} ulp (tolerance {tol / ulp:.3f}); "
                 f"{'finite' if finite else 'NOT finite'}; same seed {'same' if same else 'DIFFERENT'} bits")


class _PeakRss:
    """The process's resident set, sampled every few ms (Linux /proc; elsewhere the lifetime high-water mark)."""

    def __init__(self):
        self.peak, self._stop = self.now(), threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def now() -> int:
        with contextlib.suppress(OSError):
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024

    def _loop(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.now())

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.now())


def check_memory(device: torch.device, model_dir: Path, work: Path) -> Check:
    """Peak memory over two AdamW steps against what the budget allows: the budget, a few modules
    (computing, prefetched, being written) and the step's activations."""
    budget = 0
    store = prepare(MetaCheckpoint(model_dir), work / "store")
    block_bytes, param_bytes = blackbox.module_sizes(store)
    block_bytes *= 3  # AdamW's two moments join each module after its first step
    acts = BATCH * SEQ * PARAMS["dim"] * 4 * len(store.trainable) * 2  # inputs cached, and gradients handed down
    trainer = Trainer(store, work, device, train_config(OPTIMS["adamw"], ram_budget=budget))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base_mps = torch.mps.driver_allocated_memory() if device.type == "mps" else 0
    try:
        with _PeakRss() as rss:
            base = rss.peak
            for batch in batches(2):
                trainer.train_step(*batch)
            trainer.streamer.flush()
    finally:
        trainer.close()
    host_allowed = budget + 4 * block_bytes + acts + MEMORY_SLACK
    figures = [f"RSS grew {(rss.peak - base) / 2**20:.1f} MiB (allowed {host_allowed / 2**20:.1f})"]
    ok = rss.peak - base <= host_allowed
    if device.type == "cuda":
        reserved = torch.cuda.max_memory_reserved(device)
        allowed = 6 * block_bytes + acts + MEMORY_SLACK
        ok &= reserved <= allowed
        figures.append(f"CUDA reserved peak {reserved / 2**20:.1f} MiB (allowed {allowed / 2**20:.1f})")
        with contextlib.suppress(Exception):  # host_memory_stats is newer than some torch versions
            pinned = torch.cuda.host_memory_stats().get("reserved_bytes.current", 0)
            pinned_allowed = 4 * (1 << max(0, param_bytes - 1).bit_length()) + MEMORY_SLACK
            ok &= pinned <= pinned_allowed
            figures.append(f"pinned {pinned / 2**20:.1f} MiB (allowed {pinned_allowed / 2**20:.1f})")
    if device.type == "mps":
        grew = torch.mps.driver_allocated_memory() - base_mps
        allowed = 6 * block_bytes + acts + MEMORY_SLACK
        ok &= grew <= allowed
        figures.append(f"MPS driver allocated grew {grew / 2**20:.1f} MiB (allowed {allowed / 2**20:.1f}, "
                       f"the same RAM as the host's)")
    return Check("memory", ok, f"budget {budget} B, largest module {block_bytes / 2**20:.2f} MiB with AdamW state; "
                 + "; ".join(figures))


def check_benchmark(device: torch.device, model_dir: Path, work: Path, timed: int = 1) -> Check:
    """Seconds per streamed step over seconds per in-memory step (one warm-up step each). Informational:
    on this tiny model the per-module overheads dominate; benchmarks/bench_step.py measures real shapes."""
    optim, data = OPTIMS["sgd"], batches(timed + 1)
    store = prepare(MetaCheckpoint(model_dir), work / "store")
    trainer = Trainer(store, work, device, train_config(optim))
    try:
        trainer.train_step(*data[0])
        trainer.streamer.flush()
        dev.synchronize(device)
        t0 = time.perf_counter()
        for batch in data[1:]:
            trainer.train_step(*batch)
        trainer.streamer.flush()
        dev.synchronize(device)
        streamed_s = (time.perf_counter() - t0) / timed
    finally:
        trainer.close()
    model = reference(model_dir, device, DROPOUT)
    opt = optim.make(list(model.parameters()))
    reference_step(model, opt, *data[0], device, 0)
    dev.synchronize(device)
    t0 = time.perf_counter()
    for i, batch in enumerate(data[1:], 1):
        reference_step(model, opt, *batch, device, i)
    dev.synchronize(device)
    memory_s = (time.perf_counter() - t0) / timed
    return Check("benchmark", True, f"streamed {streamed_s * 1e3:.1f} ms/step, in memory {memory_s * 1e3:.1f} ms/step: "
                 f"ratio {streamed_s / memory_s:.1f}")


# ---- running them ----------------------------------------------------------------------------

def check_out(out: Path):
    """Refuse, before a minute of checks, an --out that the report cannot go to or must not replace: a folder,
    a path below a file or in a missing folder, a file that is not an earlier report (the user's own)."""
    check_not_under_a_file(out, "--out")
    if out.is_dir():
        raise ConfigError(f"--out {out}: is a folder; give the path of the .json report to write")
    if not out.absolute().parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {out.absolute().parent} does not exist")
    if out.exists():
        try:
            earlier = json.loads(out.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            earlier = None
        if not (isinstance(earlier, dict) and isinstance(earlier.get("checks"), list) and "ok" in earlier):
            raise ConfigError(f"--out {out}: exists and is not a self-test report; refusing to overwrite it")


def run_selftest(*, device: str = "auto", out: str | Path | None = None) -> dict:
    """Run every check on the device; returns the report (and writes it to out as JSON, atomically)."""
    if out is not None:
        check_out(Path(out))
    chosen, why = dev.choose_device(device)
    logging.getLogger("slowllama").info("device %s (%s)", chosen, why)
    root = Path(tempfile.mkdtemp(prefix="slowllama-selftest-"))
    checks: list[Check] = []

    def run(name: str, fn, *a, **kw):
        t0 = time.perf_counter()
        try:
            c = fn(*a, **kw)
        except Exception as e:  # a check that crashes has failed; the others still run
            log.debug("check %s failed", name, exc_info=True)
            first = str(e).splitlines()[0] if str(e) else ""
            c = Check(name, False, f"error: {type(e).__name__}: {first}")
        c.detail += f" [{time.perf_counter() - t0:.1f} s]"
        checks.append(c)

    try:
        model_dir = make_model(root / "model")
        run("device", check_device, chosen, why)
        run("dropout_replay", check_dropout_replay, chosen)
        run("copy_safety", check_copy_safety, chosen)
        loose = 1e-4 if chosen.type != "cpu" else 1e-6  # cuda and mps kernels may reassociate sums between runs
        run("exact_sgd", check_exact, chosen, model_dir, root / "sgd", "sgd", loose)
        run("exact_adamw", check_exact, chosen, model_dir, root / "adamw", "adamw", loose)
        run("recovery", check_recovery, chosen, model_dir, root / "recovery")
        run("stochastic_rounding", check_rounding, chosen)
        run("memory", check_memory, chosen, model_dir, root / "memory")
        run("benchmark", check_benchmark, chosen, model_dir, root / "bench")
        if chosen.type == "cuda":  # last: deterministic mode is process-wide
            dev.use_deterministic(chosen)
            run("exact_sgd_deterministic", check_exact, chosen, model_dir, root / "det", "sgd", 0.0,
                "exact_sgd_deterministic")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    versions = {}
    with contextlib.suppress(Exception):
        versions = dev.versions(chosen)
    report = {"device": str(chosen), "why": why, "versions": versions, "checks": [asdict(c) for c in checks],
              "ok": all(c.ok for c in checks)}
    if out is not None:
        atomic_write_bytes(Path(out), [(json.dumps(report, indent=1) + "\n").encode("utf-8")])
    return report


def format_table(report: dict) -> str:
    rows = [(c["name"], "ok" if c["ok"] else "FAIL", c["detail"]) for c in report["checks"]]
    width = max(len(r[0]) for r in rows)
    lines = [f"slowllama self-test on {report['device']}: "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items())]
    lines += [f"{name:<{width}}  {status:<4}  {detail}" for name, status, detail in rows]
    lines.append("all checks passed" if report["ok"] else
                 f"{sum(not c['ok'] for c in report['checks'])} check(s) FAILED: attach the report to a bug")
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str = "python -m slowllama.selftest") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    check = p.add_argument_group("the check")
    check.add_argument("--device", default="auto", choices=dev.DEVICES, help="device to check (default: auto)")
    check.add_argument("--out", default=None, help="write the report as JSON here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = run_selftest(device=a.device, out=a.out)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # its temp folder is removed on the way out; --out was not touched
        print("interrupted: the self-test stopped; no report was written", file=sys.stderr)
        return 130
    print(format_table(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
