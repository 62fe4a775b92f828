"""Benchmark phases, each meant to run in a fresh Python process of its own.

    python benchmarks/_phases.py PHASE '{"json": "config"}'

prints the phase's result as one JSON object on the last line of stdout. The
bench_*.py scripts start one such process per phase, so that each phase's peak
resident memory is its own: the peak is read from /proc/self/status (VmHWM, the
high-water mark of this process's address space, which exec starts afresh), or
from getrusage's ru_maxrss where there is no /proc. ru_maxrss alone is not used
on Linux because after exec it keeps the high-water mark of the (v)forked
parent, which would charge the orchestrating process's memory to the child.

Phases: generate (write a random Meta checkpoint), prepare (checkpoint -> block
store), stream (slowllama's streamed Trainer; with "phase_peaks" its peak RSS per
part of the step), inmem (the whole model in memory with torch.optim (SGD or AdamW), the
reference), export (store -> Meta checkpoint).
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


@contextlib.contextmanager
def bench_dir(path: str | None, prefix: str):
    """The benchmark's work folder: `path` kept afterwards, else a temp dir removed at the end."""
    if path:
        work = Path(path).resolve()
        work.mkdir(parents=True, exist_ok=True)
        yield work
        return
    tmp = tempfile.mkdtemp(prefix=prefix)
    try:
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "test_data" / "corpus.txt"
DTYPE_NAMES = ("float32", "bfloat16", "float16")


# ---- memory ----------------------------------------------------------------

def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes."""
    hwm = _proc_status("VmHWM")
    if hwm is not None:
        return hwm
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, kB elsewhere


def rss_bytes() -> int:
    rss = _proc_status("VmRSS")
    if rss is not None:
        return rss
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return peak_rss_bytes()


def reset_peak() -> bool:
    """Start a new high-water mark (Linux: "5" to /proc/self/clear_refs resets VmHWM); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PhasePeaks:
    """Peak RSS per named part of a run. The high-water mark is reset when a part begins and read when
    it ends or a nested part begins, so a part's peak is its own, not its children's. Where VmHWM
    cannot be reset (no /proc), the peaks are the process's so far: `exact` says which."""

    def __init__(self):
        self.peaks: dict[str, int] = {}
        self.exact = reset_peak()
        self._stack: list[str] = []
        self._tail: str | None = None  # a part that ended but whose memory its caller still holds

    def _close_segment(self):
        name = self._tail or (self._stack[-1] if self._stack else None)
        if name is not None:
            self.peaks[name] = max(self.peaks.get(name, 0), peak_rss_bytes())
        self._tail = None
        reset_peak()

    @contextlib.contextmanager
    def part(self, name: str, tail: bool = False):
        """Charge the RSS peak while the block runs to `name`. A reset starts the new mark at the RSS of
        the moment, so with tail=True the caller's time until its next boundary is charged to this part
        (what the part returns is still held then), not to the caller."""
        self._close_segment()
        self._stack.append(name)
        try:
            yield
        finally:
            if tail:
                self._stack.pop()
                self._tail = name
            else:
                self._close_segment()
                self._stack.pop()

    def wrap(self, obj, attr: str, name: str, tail: bool = False):
        """Count every call of obj.attr as part `name` (an instance attribute shadows the method)."""
        fn = getattr(obj, attr)

        def wrapped(*args, **kwargs):
            with self.part(name, tail):
                return fn(*args, **kwargs)

        setattr(obj, attr, wrapped)


# ---- running a phase in a child process -------------------------------------

def run_phase(phase: str, cfg: dict) -> dict:
    """Run one phase in a fresh interpreter; its stderr passes through, its result comes back."""
    cmd = [sys.executable, str(Path(__file__).resolve()), phase, json.dumps(cfg)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-20:])
        raise SystemExit(f"benchmark phase {phase!r} failed with exit status {proc.returncode}\n{tail}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return json.loads(lines[-1])


def dir_bytes(path: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def disk_bandwidth(directory: str | Path, nbytes: int = 512 << 20, chunk: int = 8 << 20) -> dict:
    """Write nbytes to a file in directory and fsync it, then read it back twice.

    Caches cannot be dropped without root, so the first read is "warm" (served
    from the page cache the write just filled: a memory-speed upper bound). The
    second read follows posix_fadvise(DONTNEED), which evicts the file's clean
    pages without root; a VM's host may still cache them, so it is an estimate
    of cold reads, not a guarantee.
    """
    path = Path(directory) / f".bench_bw.{os.getpid()}"
    block = os.urandom(chunk)
    out = {"test_bytes": nbytes}
    try:
        t0 = time.perf_counter()
        with open(path, "wb", buffering=0) as f:
            left = nbytes
            while left > 0:
                n = f.write(block[: min(chunk, left)])
                left -= n
            os.fsync(f.fileno())
        out["write_fsync_GBps"] = nbytes / (time.perf_counter() - t0) / 1e9
        buf = bytearray(chunk)

        def read_all() -> float:
            t = time.perf_counter()
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
            return nbytes / (time.perf_counter() - t) / 1e9

        out["read_warm_GBps"] = read_all()
        if hasattr(os, "posix_fadvise"):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            out["read_after_fadvise_dontneed_GBps"] = read_all()
        else:
            out["read_after_fadvise_dontneed_GBps"] = None
    finally:
        path.unlink(missing_ok=True)
    return out


def parse_bytes(s: str) -> int | str | None:
    """'none' -> None; 'auto' stays 'auto' (the streamed phase takes slowllama's share of the memory
    available then); '0', '4096', '512M', '2G' -> bytes."""
    s = s.strip().lower()
    if s in ("none", "inf", "unlimited"):
        return None
    if s == "auto":
        return s
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    if s.endswith("b") and len(s) > 1 and s[-2] in mult:
        return int(float(s[:-2]) * mult[s[-2]])
    return int(s)


# ---- the phases (run in the child) -----------------------------------------

def _imports():
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tools"))


def _set_threads(torch, cfg: dict):
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))


def _device_info(torch, device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _optim(cfg: dict):
    """The run's optimizer settings (finetune.py's defaults beside the optimizer and lr), for both sides."""
    from slowllama.engine.optim import OptimConfig

    return OptimConfig(cfg.get("optimizer", "sgd"), lr=cfg["lr"])


def _batch(torch, vocab: int, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _sync(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(torch, device, nbytes: int = 256 << 20) -> dict:
    """Host-to-device and device-to-host copy rates, GB/s, from page-locked ("pinned") and from pageable
    host memory: slowllama's copies to the device go through pinned staging buffers when prefetched,
    and its copies back land in pageable memory (see slowllama.device.to_host)."""
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out = {}
    for kind, pinned in (("pinned", True), ("pageable", False)):
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        host.fill_(1)  # touched: a pageable buffer's first copy would otherwise time page faults
        rates = out[kind] = {}
        for name, dst, src in (("h2d_GBps", gpu, host), ("d2h_GBps", host, gpu)):
            dst.copy_(src, non_blocking=pinned)
            torch.cuda.synchronize(device)
            t = time.perf_counter()
            for _ in range(5):
                dst.copy_(src, non_blocking=pinned)
            torch.cuda.synchronize(device)
            rates[name] = 5 * nbytes / (time.perf_counter() - t) / 1e9
        del host
    return out


def transfer_floor(h2d_bytes: float, d2h_bytes: float, rates: dict, prefetch: bool) -> float:
    """Seconds per step that the bytes crossing each way take at the rates slowllama's copies get: to the
    device from pinned staging when prefetched (pageable when not), back to the host always into pageable
    memory."""
    h2d = rates["pinned" if prefetch else "pageable"]["h2d_GBps"]
    return h2d_bytes / (h2d * 1e9) + d2h_bytes / (rates["pageable"]["d2h_GBps"] * 1e9)


class GpuBusy:
    """Samples the GPU's utilisation (NVML, through torch) while the timed steps run; None without NVML."""

    def __init__(self, torch, device):
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = None
        if device.type == "cuda":
            try:
                torch.cuda.utilization(device)
            except Exception:  # no pynvml: nothing to sample
                return
            self._thread = threading.Thread(target=self._run, args=(torch, device), daemon=True)

    def _run(self, torch, device):
        while not self._stop.wait(0.05):
            self.samples.append(torch.cuda.utilization(device))

    def __enter__(self):
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()

    @property
    def mean_percent(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def _gpu_peak(torch, device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved(device)}


def phase_generate(cfg: dict) -> dict:
    _imports()
    import torch
    from make_test_model import make_test_model

    t0 = time.perf_counter()
    make_test_model(cfg["out"], text=cfg.get("text", str(CORPUS)), dim=cfg["dim"], n_layers=cfg["n_layers"],
                    n_heads=cfg["n_heads"], n_kv_heads=cfg.get("n_kv_heads"), vocab_size=cfg["vocab_size"],
                    multiple_of=cfg["multiple_of"], n_shards=cfg.get("n_shards", 1),
                    dtype=getattr(torch, cfg["dtype"]), seed=cfg.get("seed", 0))
    out = Path(cfg["out"])
    return {"seconds": time.perf_counter() - t0, "checkpoint_bytes": dir_bytes(out),
            "shard_bytes": sum(p.stat().st_size for p in out.glob("consolidated.*.pth")),
            "peak_rss_bytes": peak_rss_bytes()}


def phase_prepare(cfg: dict) -> dict:
    _imports()
    import torch

    from slowllama.engine.store import prepare
    from slowllama.formats.meta import MetaCheckpoint
    from slowllama.fsutil import IO

    _set_threads(torch, cfg)
    base = rss_bytes()
    ckpt = MetaCheckpoint(cfg["ckpt"])
    n_params = sum(_numel(s) for s in ckpt.shapes.values())
    r0, w0 = IO.snapshot()
    t0 = time.perf_counter()
    store = prepare(ckpt, cfg["store"], getattr(torch, cfg["store_dtype"]))
    seconds = time.perf_counter() - t0
    r1, w1 = IO.snapshot()
    store_bytes = store.nbytes()
    return {"seconds": seconds, "store_bytes": store_bytes, "store_GBps": store_bytes / seconds / 1e9,
            "io_bytes_written": w1 - w0, "io_bytes_read": r1 - r0,
            "shard_bytes": sum(p.stat().st_size for p in ckpt.shards), "n_params": n_params,
            "vocab_size": ckpt.args.vocab_size, "ffn_hidden_dim": ckpt.args.ffn_hidden_dim,
            "rss_baseline_bytes": base, "peak_rss_bytes": peak_rss_bytes()}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _start_phase(torch, cfg: dict):
    """Threads, device and peak-memory counters for a timed phase; returns (device, RSS baseline)."""
    _set_threads(torch, cfg)
    device = torch.device(cfg["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return device, rss_bytes()


def phase_stream(cfg: dict) -> dict:
    _imports()
    import torch

    from slowllama.device import TRANSFERS
    from slowllama.engine.store import BlockStore
    from slowllama.engine.trainer import TrainConfig, Trainer
    from slowllama.fsutil import IO
    from slowllama.run.options import parse_size

    device, base = _start_phase(torch, cfg)
    budget = parse_size(cfg["ram_budget"])  # auto: --ram-budget auto's share of the memory available now
    store = BlockStore(cfg["store"])
    inputs, targets = _batch(torch, store.args.vocab_size, cfg["batch"], cfg["seq"], cfg["seed"])
    tc = TrainConfig(optim=_optim(cfg), seed=cfg["seed"], dropout=0.0,
                     micro_batch=cfg.get("micro_batch"), compute_dtype=getattr(torch, cfg["compute_dtype"]),
                     act_dtype=getattr(torch, cfg.get("act_dtype", "float32")), ram_budget=budget,
                     prefetch=cfg["prefetch"], verify=cfg.get("verify", True),
                     clip_grad_norm=cfg.get("clip_grad_norm", 0.0), commit_every=cfg.get("commit_every", 1))
    trainer = Trainer(store, cfg["train_dir"], device, tc)
    losses, warm_s, step_s = [], [], []
    split = _split_step(trainer) if cfg.get("phase_peaks") else None
    timers = StreamTimers(trainer, bool(cfg.get("cold_reads")))
    # --commit-every N with --steps a multiple of N: the timed steps are whole commit periods as a run has them,
    # each commit written while the next step runs (Trainer). The warm-up's commit is queued as the first timed
    # step begins and is counted there; the last timed step's, which the next step of a run would overlap, is
    # counted out: the figures stop just before it is queued.
    steady, last = False, {}
    commit_held = trainer.update.commit_held

    def commit_after_the_last_step():
        if steady and len(step_s) == cfg["steps"] - 1:
            last.update(io=IO.snapshot(), timers=timers.snapshot(), transfers=TRANSFERS.snapshot())
        commit_held()
    trainer.update.commit_held = commit_after_the_last_step
    try:
        for n in range(cfg["warmup"]):
            t = time.perf_counter()
            losses.append(trainer.train_step(inputs, targets).loss)
            every = trainer.commit_interval
            steady = n == cfg["warmup"] - 1 and every > 1 and cfg["steps"] % every == 0
            if not steady:
                trainer.commit()  # --commit-every: the timed steps start from a commit
            _sync(torch, device)
            warm_s.append(time.perf_counter() - t)
        r0, w0 = IO.snapshot()
        h0, d0 = TRANSFERS.snapshot()
        tm0, tc0 = timers.snapshot()
        if steady:
            trainer.commit(wait=False)  # the warm-up's commit, written while the first timed step runs
        t0 = time.perf_counter()
        with GpuBusy(torch, device) as busy:
            for _ in range(cfg["steps"]):
                t = time.perf_counter()
                losses.append(trainer.train_step(inputs, targets).loss)
                step_s.append(time.perf_counter() - t)
            if not last:
                # Writes are queued to a background thread: count them in the timed steps, with the commit of
                # the steps still held under --commit-every (none left when --steps is a multiple of it).
                with split.part("flush") if split else contextlib.nullcontext():
                    trainer.commit()
            _sync(torch, device)
        total = time.perf_counter() - t0
        (r1, w1), (tm1, tc1), (h1, d1) = (last["io"], last["timers"], last["transfers"]) if last else \
            (IO.snapshot(), timers.snapshot(), TRANSFERS.snapshot())
        trainer.commit()
    finally:
        trainer.close()
        if split:
            split.stop()
    k = max(cfg["steps"], 1)
    extra = {}
    if split:
        extra = {"phase_peak_rss_bytes": split.peaks, "phase_peaks_exact": split.exact, "at_peak": split.at_peak}
    if device.type == "cuda":
        extra |= {"h2d_bytes_per_step": (h1 - h0) / k, "d2h_bytes_per_step": (d1 - d0) / k,
                 "gpu_busy_percent": busy.mean_percent, "copy_rates": copy_bandwidth(torch, device)}
    per = {key: (tm1.get(key, 0.0) - tm0.get(key, 0.0)) / k for key in tm1}
    calls = {key: (tc1.get(key, 0) - tc0.get(key, 0)) / k for key in tc1}
    waited = sum(per.get(key, 0.0) for key in StreamTimers.COMPUTE_THREAD)
    extra["timers_s_per_step"] = {**per, "compute_thread_busy": total / k - waited}
    extra["timer_calls_per_step"] = calls
    extra["cold_reads"] = bool(cfg.get("cold_reads"))
    plan = trainer.plan
    extra["plan"] = {"ram_budget": budget, "commit_every": trainer.commit_interval, "top": plan.top, "turn_blocks_K": plan.turn_blocks,
                     "modules": len(trainer.names), "turn_bytes": plan.turn_bytes, "acts_in_ram": plan.acts_in_ram,
                     "act_bytes": plan.act_bytes, "cache_budget": None if plan.cache_budget == float("inf")
                     else plan.cache_budget}
    return {"s_per_step": total / k, "step_s": step_s, "warmup_s": warm_s, "losses": losses,
            "bytes_read_per_step": (r1 - r0) / k, "bytes_written_per_step": (w1 - w0) / k, **extra,
            "store_bytes_after": store.nbytes(), "rss_baseline_bytes": base,
            "peak_rss_bytes": max([peak_rss_bytes(), *(split.peaks.values() if split else [])]),
            **_gpu_peak(torch, device), **_device_info(torch, device)}


class _StepSplit(PhasePeaks):
    """PhasePeaks over a Trainer's step: forward (the modules below the turn), turn, backward (the
    reverse pass, less its commits), commit (gradient checks, the optimizer step, the new block handed
    to the writer) and flush (the writes still queued). A sampling thread notes, at each part's highest
    RSS seen, what the streamer holds, to say which modules make up the peak."""

    def __init__(self, trainer):
        super().__init__()
        self.trainer = trainer
        self.at_peak: dict[str, dict] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._done.wait(0.005):
            part = self._stack[-1] if self._stack else None
            rss = rss_bytes()
            if part is not None and rss > self.at_peak.get(part, {}).get("rss_bytes", 0):
                self.at_peak[part] = {"rss_bytes": rss, **streamer_holdings(self.trainer.streamer)}

    def stop(self):
        self._done.set()
        self._thread.join()


def streamer_holdings(s) -> dict:
    """Which modules a Streamer holds now, and its read buffers' bytes in use and free."""
    from slowllama.compat import storage_use_count

    refs = storage_use_count()
    with s._lock:
        cache, pending, reads = list(s._cache), list(s._pending), list(s._reads)
    held = list(s.buffers._held)
    free = [b for b in held if refs is not None and refs(b) == s.buffers._idle]
    return {"cache": cache, "pending": pending, "reading": reads, "pool_buffers": len(held),
            "pool_bytes": sum(b.numel() for b in held), "pool_free_bytes": sum(b.numel() for b in free)}


class StreamTimers:
    """Where a streamed step's time goes, from wrappers on the streamer and its store (the engine keeps
    no timers; a wrapper costs two clock reads per module). On the compute thread: get (waiting for a
    module: its prefetch, or reading it there), put and wait_written (waiting for room in the write
    queue, or for a module's last write), flush (for queued writes to be on disk: an interval commit's
    before the step after it ends, or the writes still queued at the end); commit (a module's
    gradient checks, optimizer step, finiteness check and hand-over to the writer, its put and
    wait_written included), the rest of the compute thread's time being the modules' passes. On the reader
    thread: read (store.read, the disk and the checksum), room (waiting for a write to commit first,
    at a small budget). On the writer thread: write (store.write, encode, write, fsync, rename).
    With cold_reads each module file's pages are dropped from the page cache (posix_fadvise DONTNEED)
    just before it is read, timed apart as fadvise, so that every read of a module comes from the disk
    (a VM host may still cache it)."""

    COMPUTE_THREAD = ("get", "put", "wait_written", "flush")

    def __init__(self, trainer, cold_reads: bool):
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._lock = threading.Lock()
        s = trainer.streamer
        self._wrap(trainer.update, "commit", "commit")
        for attr in ("get", "put", "wait_written", "wait", "_wait_for_room"):  # flush() waits through wait()
            self._wrap(s, attr, {"_wait_for_room": "room", "wait": "flush"}.get(attr, attr))
        self._wrap(s.store, "write", "write")
        if cold_reads and hasattr(os, "posix_fadvise"):
            read = s.store.read

            def cold_read(name, *args, **kwargs):
                t = time.perf_counter()
                drop_cached(s.store.path(name))
                self._add("fadvise", time.perf_counter() - t)
                return read(name, *args, **kwargs)

            s.store.read = cold_read
        self._wrap(s.store, "read", "read")

    def _add(self, key: str, dt: float):
        with self._lock:
            self.seconds[key] = self.seconds.get(key, 0.0) + dt
            self.calls[key] = self.calls.get(key, 0) + 1

    def _wrap(self, obj, attr: str, key: str):
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._add(key, time.perf_counter() - t)

        setattr(obj, attr, timed)

    def snapshot(self) -> tuple[dict, dict]:
        with self._lock:
            return dict(self.seconds), dict(self.calls)


def drop_cached(path: str | Path):
    """Evict a file's clean pages from the page cache (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _split_step(trainer) -> _StepSplit:
    split = _StepSplit(trainer)
    split.wrap(trainer, "_forward", "forward")
    split.wrap(trainer, "_turn", "turn", tail=True)  # forward returns what the turn holds
    split.wrap(trainer, "_backward", "backward")
    split.wrap(trainer.update, "commit", "commit")
    return split


def phase_export(cfg: dict) -> dict:
    """Export a (trained) store to a Meta checkpoint, as the run does at its end."""
    _imports()
    import torch

    from slowllama.engine.store import BlockStore, export_store

    _set_threads(torch, cfg)
    base = rss_bytes()
    store = BlockStore(cfg["store"])
    t0 = time.perf_counter()
    export_store(store, Path(cfg["ckpt"]), Path(cfg["out"]))
    return {"seconds": time.perf_counter() - t0, "out_bytes": dir_bytes(cfg["out"]),
            "rss_baseline_bytes": base, "peak_rss_bytes": peak_rss_bytes()}


def phase_inmem(cfg: dict) -> dict:
    """The whole model in memory, torch.optim (the run's SGD or AdamW) over all parameters.

    Weights come from the checkpoint, cast to the store's dtype and then to fp32,
    exactly as prepare() and the trainer see them. With bfloat16 compute the model
    is run as the trainer runs each module: a bf16 copy computes, its gradients
    update an fp32 master copy, and the bf16 copy is refreshed from it.
    With a float32 store its losses equal the streamed run's exactly; with a
    bfloat16 store the trainer stochastically rounds each module to bf16 after its
    update while this reference keeps the fp32 master, so the losses part after
    the first step (by design, not a fault).
    """
    _imports()
    import copy

    import torch
    import torch.nn.functional as F

    from slowllama.formats.meta import EXTRAS, MetaCheckpoint
    from slowllama.model.transformer import Transformer, module_names

    device, base = _start_phase(torch, cfg)
    ckpt = MetaCheckpoint(cfg["ckpt"])
    args = ckpt.args
    store_dtype = getattr(torch, cfg["store_dtype"])
    cdt = getattr(torch, cfg["compute_dtype"])
    with torch.device("meta"):
        model = Transformer(args, dropout=0.0)
    sd = {}
    for m in module_names(args):
        if m == EXTRAS:
            continue
        for p, t in ckpt.read_module(m).items():
            sd[f"{m}.{p}"] = t.to(store_dtype).float()
    model.load_state_dict(sd, strict=True, assign=True)
    del sd
    model.to(device)
    master = model
    compute = model if cdt == torch.float32 else copy.deepcopy(model).to(cdt)
    opt = _optim(cfg).make(master.parameters(), foreach=None)
    inputs, targets = _batch(torch, args.vocab_size, cfg["batch"], cfg["seq"], cfg["seed"])
    inputs, targets = inputs.to(device), targets.to(device)
    mb = cfg.get("micro_batch") or inputs.shape[0]
    n_tok = targets.numel()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        if compute is not master:
            compute.zero_grad(set_to_none=True)
        loss = 0.0
        for x, y in zip(inputs.split(mb), targets.split(mb)):
            logits = compute(x)
            part = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum") / n_tok
            part.backward()
            loss += part.item()
        if compute is not master:
            for pm, pc in zip(master.parameters(), compute.parameters()):
                pm.grad = None if pc.grad is None else pc.grad.float()
        opt.step()
        if compute is not master:
            with torch.no_grad():
                for pm, pc in zip(master.parameters(), compute.parameters()):
                    pc.copy_(pm)
        return loss

    return _timed_steps(torch, device, cfg, step, base)


def _timed_steps(torch, device, cfg: dict, step, base: int) -> dict:
    """cfg["warmup"] untimed steps, then cfg["steps"] timed ones of step() -> loss; the in-memory figures."""
    losses, warm_s, step_s = [], [], []
    for _ in range(cfg["warmup"]):
        t = time.perf_counter()
        losses.append(step())
        _sync(torch, device)
        warm_s.append(time.perf_counter() - t)
    t0 = time.perf_counter()
    with GpuBusy(torch, device) as busy:
        for _ in range(cfg["steps"]):
            t = time.perf_counter()
            losses.append(step())
            _sync(torch, device)
            step_s.append(time.perf_counter() - t)
    total = time.perf_counter() - t0
    extra = {"gpu_busy_percent": busy.mean_percent} if device.type == "cuda" else {}
    return {"s_per_step": total / max(cfg["steps"], 1), "step_s": step_s, "warmup_s": warm_s, "losses": losses,
            "rss_baseline_bytes": base, "peak_rss_bytes": peak_rss_bytes(), **extra,
            **_gpu_peak(torch, device), **_device_info(torch, device)}


def phase_transformers(cfg: dict) -> dict:
    """Ordinary training, as a user of transformers runs it: the store exported as a Hugging Face folder (untimed),
    LlamaForCausalLM.from_pretrained in fp32 with its default attention kernel, the run's torch.optim over all parameters,
    the loss as the streamed run's (mean over the batch's tokens, summed over micro-batches)."""
    _imports()
    import torch
    import torch.nn.functional as F
    import transformers

    from slowllama.engine.store import BlockStore, export_store

    if cfg["compute_dtype"] != "float32":
        raise SystemExit("the transformers reference runs in float32 only")
    device, base = _start_phase(torch, cfg)
    folder = Path(cfg["hf_dir"])
    if not folder.exists():
        export_store(BlockStore(cfg["store"]), Path(cfg["ckpt"]), folder, export_format="hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).train()
    opt = _optim(cfg).make(model.parameters(), foreach=None)
    inputs, targets = _batch(torch, model.config.vocab_size, cfg["batch"], cfg["seq"], cfg["seed"])
    inputs, targets = inputs.to(device), targets.to(device)
    mb = cfg.get("micro_batch") or inputs.shape[0]
    n_tok = targets.numel()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for x, y in zip(inputs.split(mb), targets.split(mb)):
            logits = model(x).logits
            part = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum") / n_tok
            part.backward()
            loss += part.item()
        opt.step()
        return loss

    out = _timed_steps(torch, device, cfg, step, base)
    out["attn_implementation"] = model.config._attn_implementation
    return out


PHASES = {"generate": phase_generate, "prepare": phase_prepare, "stream": phase_stream, "inmem": phase_inmem,
          "transformers": phase_transformers, "export": phase_export}


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in PHASES:
        raise SystemExit(f"usage: {sys.argv[0]} {{{','.join(PHASES)}}} JSON_CONFIG")
    result = PHASES[sys.argv[1]](json.loads(sys.argv[2]))
    sys.stdout.flush()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
