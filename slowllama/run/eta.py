"""How long a run will take: a probe before iteration 0, and the ETA as iterations go by.

The probe measures what an iteration is made of on this machine, in about the time of one block's share
of it: the read of one block file (with its checksum, from the disk rather than the page cache where
the OS lets us drop it), a durable write of as many bytes with the store's writer (what a full fine-tuning
step writes per module; past the page cache, as the run writes them, for interval commits) and of 4 KB
(what each durable file costs in fsyncs, whatever its size), and one block's forward, and forward with
backward, on a micro-batch. The per-iteration estimate adds the plan's bytes at those
speeds and its durable files at that latency, and the compute scaled to every block and the output layer.
Prefetching and the writer overlap I/O with compute, though not wholly: an iteration is taken as the larger of
the two plus a third of the smaller (OVERLAP), which the benchmarks' steps bear out (0.7-1.0 of measured
where the plain sum said 1.0-1.45: benchmarks/README.md, "Larger than the budget"); without prefetching, their sum.
Once an iteration is done the measured wall time per iteration (evaluations and checkpoints included)
replaces the probe.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import statistics
import time

import torch

from .. import device as dev
from ..engine.quant import dequantize_module
from ..engine.store import BlockStore
from ..engine.streamer import materialize
from ..engine.trainer import TrainConfig
from ..fsutil import timed_scratch_write

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Probe:
    """What one block costs on this machine: bytes/s read and written, and seconds of compute."""
    module: str
    read_bps: float
    write_bps: float
    sync_s: float  # what each durable file costs beyond its bytes: the fsyncs of the file and its folder
    forward_s: float  # one micro-batch through the block, without autograd
    backward_s: float  # one micro-batch forward and backward, as the reverse pass recomputes it


def fmt_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    if s < 90 * 60:
        return f"{s / 60:.1f} min"
    if s < 48 * 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def _drop_cached(path) -> None:
    """Ask the OS to forget the file's cached pages, so that the read probe reads the disk (Linux; elsewhere a
    probe may read the page cache and come out fast, which the measured ETA corrects after one iteration)."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _write_probe(path, data: memoryview, cached: bool) -> tuple[float, float]:
    """Seconds of the fsyncs each durable file costs and of writing data beyond them, with the store's writer
    into a temp file beside path (fsutil.timed_scratch_write): a small write is all latency (the faster of
    two 4 KB ones), the large one's time beyond it bandwidth."""
    scratch = path.with_name("write-probe")
    sync_s = min(timed_scratch_write(scratch, [data[:4096]], cached) for _ in range(2))
    return sync_s, max(timed_scratch_write(scratch, [data], cached) - sync_s, 1e-9)


def probe(store: BlockStore, tcfg: TrainConfig, mb_rows: int, seq: int, device: torch.device,
          write_bytes: int, staged: bool = False) -> Probe:
    """Time the first block: its file read, a write of min(its size, write_bytes), its forward and backward.
    staged: the run's writes are interval commits, written past the page cache (fsutil), and so is the probe's."""
    name = next(n for n in store.trainable if n.startswith("layers."))
    path = store.path(name)
    size = path.stat().st_size
    _drop_cached(path)
    t0 = time.perf_counter()
    block = store.read(name, verify=tcfg.verify)
    read_s = time.perf_counter() - t0
    wrote = min(block.buffer.numel(), write_bytes)
    try:  # the block's own bytes; the view goes with the call, so that del block below frees them
        sync_s, write_s = _write_probe(path, memoryview(block.buffer.numpy())[:wrote], cached=not staged) \
            if wrote > 0 else (0.0, 0.0)
    except OSError as e:  # a full disk: the run's own writes say so, as one line, when they fail
        log.warning("%s: the write probe failed (%s); the time estimate leaves out writes", path.parent,
                    e.strerror or e)
        wrote, sync_s, write_s = 0, 0.0, 0.0
    if store.base_quant:  # a quantized base's parts go to the device as stored and are dequantized there
        params = dequantize_module({k: t.to(device) for k, t in block.params.items()}, tcfg.compute_dtype)
    else:
        params = {k: t.to(device, tcfg.compute_dtype) if t.is_floating_point() else t.to(device)
                  for k, t in block.params.items()}
    del block
    module = materialize(name, store.args, params)
    module.requires_grad_(tcfg.lora is None)  # LoRA's base gets no weight gradients
    x = torch.randn(mb_rows, seq, store.args.dim, device=device, dtype=tcfg.compute_dtype)

    def forward():
        with torch.no_grad():
            module(x)

    def backward():
        out = module(x.detach().requires_grad_())
        out.backward(torch.ones_like(out))

    forward_s, backward_s = _timed(forward, device), _timed(backward, device)
    return Probe(name, size / max(read_s, 1e-9), wrote / write_s if wrote else math.inf, sync_s,
                 forward_s, backward_s)


def _timed(fn, device: torch.device, repeats: int = 5, within_s: float = 0.5, at_least: int = 3,
           at_most_s: float = 10.0) -> float:
    """Median seconds of fn's calls after the first, which pays for lazy initialisation (kernels, autograd) once
    a run: at least `at_least` calls (unless they pass at_most_s), up to `repeats` while they stay under
    within_s. The median, not the fastest: on a shared machine the run is slowed as its probe was, but one
    stall is not the rule."""
    fn()
    dev.synchronize(device)
    times: list[float] = []
    while len(times) < repeats and (sum(times) < within_s or len(times) < at_least and sum(times) < at_most_s):
        t0 = time.perf_counter()
        fn()
        dev.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


OVERLAP = 1 / 3  # the share of the smaller of an iteration's disk and compute time that the other does not hide


@dataclasses.dataclass
class TimeEstimate:
    """Seconds per iteration by part, and what the run adds after its last iteration."""
    probe: Probe
    disk_s: float
    compute_s: float
    tail_s: float  # the evaluations' reads and the export, counted once at the end
    overlapped: bool = True  # modules are prefetched and written behind the compute

    @property
    def iteration_s(self) -> float:
        if not self.overlapped:
            return self.disk_s + self.compute_s
        return max(self.disk_s, self.compute_s) + OVERLAP * min(self.disk_s, self.compute_s)


def estimate(p: Probe, store: BlockStore, tcfg: TrainConfig, est: dict, n_micro: int, export_bytes: int,
             eval_bytes: int) -> TimeEstimate:
    """One iteration from the probe: the plan's bytes (est, estimate_io's) at the probed speeds, and the
    probed block's compute for every block and for the output layer, weighted by their weights' size."""
    disk = est["read"] / p.read_bps + est["written"] / p.write_bps + est["durable_files"] * p.sync_s
    args = store.args
    # A matrix's element count stands for its compute: 2 flops per element and token, forward.
    block_weights = sum(math.prod(shape) for key, _, shape, _ in store.header(p.module)["tensors"]
                        if "#" not in key and len(shape) == 2)
    # Every block and the output layer run forward and backward once; the blocks below the turn also run
    # forward first (plan.py), and exact clipping's norm-only pass runs their backward once more.
    below = sum(n.startswith("layers.") for n in store.trainable[:est["plan"].top])
    backward = args.n_layers + args.vocab_size * args.dim / max(block_weights, 1)  # the output layer as blocks
    if tcfg.clip_grad_norm and tcfg.lora is None:
        backward += below
    compute = n_micro * (below * p.forward_s + backward * p.backward_s)
    tail = export_bytes / p.read_bps + export_bytes / p.write_bps + eval_bytes / p.read_bps
    return TimeEstimate(p, disk, compute, tail, overlapped=tcfg.prefetch)


def estimate_line(t: TimeEstimate, remaining: int) -> str:
    p = t.probe
    write = "" if math.isinf(p.write_bps) else f", writes at {p.write_bps / 1e6:.0f} MB/s"
    return (f"time per iteration: ~{fmt_seconds(t.iteration_s)} (disk ~{fmt_seconds(t.disk_s)}: reads at "
            f"{p.read_bps / 1e6:.0f} MB/s{write}; compute ~{fmt_seconds(t.compute_s)}, measured on {p.module}); "
            f"for {remaining} iterations: ~{fmt_seconds(t.iteration_s * remaining)}, "
            f"~{fmt_seconds(t.iteration_s * remaining + t.tail_s)} with the evaluations and the export")


class Eta:
    """Seconds left in the run: the probe's estimate until an iteration is done, then the measured wall time
    per iteration of this process (its evaluations and checkpoints spread over its iterations)."""

    def __init__(self, estimate: TimeEstimate, start: int, iters: int):
        self.estimate, self.start, self.iters = estimate, start, iters
        self.t0 = time.monotonic()

    def per_iteration(self, done: int) -> float:
        if done <= self.start:
            return self.estimate.iteration_s
        return (time.monotonic() - self.t0) / (done - self.start)

    def left(self, done: int) -> float:
        """Seconds from now to the end of the run, once iteration done - 1 is done."""
        return (self.iters - done) * self.per_iteration(done) + self.estimate.tail_s
