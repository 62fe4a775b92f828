"""Streamed training step vs the same step with the whole model in memory.

    python benchmarks/bench_step.py --dim 1024 --n-layers 16 --n-heads 16 --batch 4 --seq 256 --steps 3

Generates a Meta checkpoint with random weights (in a temp dir unless --workdir),
prepares a block store from it, then runs 1 warm-up + K steps of slowllama's
streamed Trainer and 1 warm-up + K steps of the in-memory reference (the same
model, batch, optimizer and learning rate), and prints one JSON object.

Each phase (generate, prepare, in-memory, streamed) runs in a fresh Python
process of its own (see benchmarks/_phases.py), so the peak RSS reported for a
phase is that phase's alone and not the maximum of everything run before it;
the peak is the kernel's high-water mark (VmHWM), so short spikes that a
sampling thread could miss are counted too. Each peak includes the interpreter
and torch themselves; "rss_baseline_bytes" is the RSS measured right after the
imports, for reference.

Figures:
  streamed / in_memory: s_per_step (mean of the K timed steps; for the streamed
    run the background writes are flushed inside the timed region), losses,
    peak RSS, useful_TFLOPS (6 x parameters x tokens / s, the recompute not
    counted); on cuda also peak GPU memory and gpu_busy_percent (NVML, when
    pynvml is installed).
  streamed on cuda: h2d_bytes_per_step / d2h_bytes_per_step (slowllama.device.TRANSFERS)
    and "copy_rates", the host-to-device and device-to-host copy rates measured here from
    pinned and from pageable host memory.
  streamed bytes_read_per_step / bytes_written_per_step: deltas of
    slowllama.fsutil.IO over the timed steps (store modules, activation scratch
    files, gradients handed down, journal). With --commit-every N (when the budget
    holds every module; "plan" says the interval used) the timed steps start from a
    commit and end with one: give --steps a multiple of N for one commit per N steps.
  streamed_clipped (with --clip-grad-norm X): the streamed run again on the same store with
    exact gradient clipping at X (a norm-only reverse pass first), and clipped_over_unclipped:
    its s_per_step and bytes read and written per step over the unclipped run's, measured in
    the same invocation so that the machine's load skews both alike.
  disk: a 512 MB write+fsync and read-back in the work dir. Caches cannot be
    dropped without root, so "read_warm" comes from the page cache; a second read
    after posix_fadvise(DONTNEED) estimates cold reads (a VM host may still cache).
  floors: io_s_per_step = bytes read / read bandwidth (after fadvise, else warm)
    + bytes written / write+fsync bandwidth; compute_s_per_step = in-memory step
    time x (1 + 1/3 of the share of modules below the turn: the streamed step recomputes
    their forward pass; "plan" in the streamed figures says where the turn begins); on cuda
    transfer_s_per_step = bytes to the device / the pinned rate (the pageable one with
    --no-prefetch) + bytes back / the pageable rate, the memory slowllama copies into.
    floors.between: the streamed step against the largest floor, split into the compute thread's own
    work and its waits on reads and writes, beside the reader's and writer's busy times
    (streamed timers_s_per_step, from wrappers around the streamer; see _phases.StreamTimers).
  --cold-reads: each module file is dropped from the page cache just before it is read, so that
    a budget below the store reads from the disk (the larger-than-RAM regime) and not from RAM.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _phases import DTYPE_NAMES, ROOT, bench_dir, disk_bandwidth, parse_bytes, run_phase, transfer_floor  # noqa: E402

sys.path.insert(0, str(ROOT))
from slowllama.engine.optim import OPTIMIZERS  # noqa: E402
from slowllama.errors import ConfigError  # noqa: E402
from slowllama.run.options import RunOptions, parse_commit_every  # noqa: E402

COMMIT_EVERY = RunOptions.__dataclass_fields__["commit_every"].default  # finetune.py's default


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--n-layers", type=int, default=16)
    p.add_argument("--n-heads", type=int, default=16)
    p.add_argument("--n-kv-heads", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=320,
                   help="tokenizer pieces asked for (>= ~300 for byte fallback; may come out smaller)")
    p.add_argument("--multiple-of", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--ram-budget", type=parse_bytes, default="auto",
                   help="bytes (suffix K/M/G allowed) of modules and activations kept in RAM; 'none' = no limit; "
                        "auto (default, as finetune.py): a share of the memory available")
    p.add_argument("--no-prefetch", action="store_true")
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--store-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--ckpt-dtype", choices=list(DTYPE_NAMES), default="bfloat16",
                   help="dtype of the generated checkpoint (real Llama: bfloat16)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads in the phases (default: torch's choice)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd", help="both sides' optimizer (default: sgd)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="keep the checkpoint and store here (default: a temp dir)")
    p.add_argument("--bw-mb", type=int, default=512, help="size of the disk bandwidth test file, MB")
    p.add_argument("--clip-grad-norm", type=float, default=0.0,
                   help="also time the streamed step with exact gradient clipping at this norm (0: not)")
    p.add_argument("--commit-every", default=COMMIT_EVERY,
                   help="finetune.py's --commit-every: steps between commits when the budget holds every module, "
                        f"or auto (default: {COMMIT_EVERY}, as finetune.py's; with --steps a multiple of the interval the "
                        "timed steps are whole commit periods of a long run, else they end with a commit)")
    p.add_argument("--skip-in-memory", action="store_true", help="only the streamed run (no reference)")
    p.add_argument("--no-transformers", action="store_true",
                   help="leave out the transformers reference (LlamaForCausalLM in memory; float32 only)")
    p.add_argument("--cold-reads", action="store_true",
                   help="drop each module file from the page cache (posix_fadvise DONTNEED) before the streamer "
                        "reads it, so that a budget below the store reads from the disk, not from RAM")
    a = p.parse_args()
    if a.steps < 1:
        p.error("--steps must be at least 1")
    try:
        a.commit_every = parse_commit_every(a.commit_every)
    except ConfigError as e:
        p.error(str(e))

    with bench_dir(a.workdir, "slowllama-bench-") as work:
        result = run(a, work)
    print(json.dumps(result, indent=1))
    plan = result["streamed"]["plan"]
    ratio = result.get("ratio_streamed_over_in_memory")
    print(f"plan: ram budget {plan['ram_budget']}, the turn holds {plan['modules'] - plan['top']} of {plan['modules']} "
          f"modules (K = {plan['turn_blocks_K']}), activations {'in RAM' if plan['acts_in_ram'] else 'on disk'}; "
          f"commits every {plan['commit_every']} steps, {result['streamed']['bytes_written_per_step'] / 1e6:.1f} MB "
          f"written per step; streamed {result['streamed']['s_per_step']:.2f} s/step"
          + (f", in memory {result['in_memory']['s_per_step']:.2f} s/step, ratio {ratio:.2f}" if ratio else "")
          + (f"; transformers {result['transformers']['s_per_step']:.2f} s/step, ratio "
             f"{result['ratio_streamed_over_transformers']:.2f}" if result.get("transformers") else ""),
          file=sys.stderr)
    b = result["floors"].get("between")
    if b:
        print(f"floor {b['max_floor_s']:.2f} s/step (compute {result['floors']['compute_s_per_step']:.2f}, disk "
              f"{result['floors']['io_s_per_step']:.2f}), streamed/floor {result['floors']['streamed_over_max_floor']:.2f}; "
              f"compute thread busy {b['compute_thread_busy_s']:.2f}, waiting on reads {b['wait_read_s']:.2f}, "
              f"on writes {b['wait_write_s']:.2f}, committing {b['commit_own_s']:.2f}; reader reading {b['reader_read_s']:.2f} (waiting for a write "
              f"{b['reader_waits_for_write_s']:.2f}), writer writing {b['writer_write_s']:.2f}", file=sys.stderr)


def run(a, work: Path) -> dict:
    ckpt, store, train_dir = work / "ckpt", work / "store", work / "train"
    for d in (ckpt, store, train_dir, work / "hf"):
        if d.exists():
            shutil.rmtree(d)
    t_all = time.perf_counter()
    # Other processes on the machine skew the timings: the load average says how busy it was.
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    gen = run_phase("generate", {
        "out": str(ckpt), "dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
        "vocab_size": a.vocab_size, "multiple_of": a.multiple_of, "dtype": a.ckpt_dtype, "seed": a.seed})
    prep = run_phase("prepare", {"ckpt": str(ckpt), "store": str(store), "store_dtype": a.store_dtype,
                                 "threads": a.threads})
    disk = disk_bandwidth(work, a.bw_mb << 20)
    common = {"ckpt": str(ckpt), "store": str(store), "store_dtype": a.store_dtype, "device": a.device,
              "batch": a.batch, "seq": a.seq, "micro_batch": a.micro_batch, "compute_dtype": a.compute_dtype,
              "optimizer": a.optimizer, "lr": a.lr, "seed": a.seed, "threads": a.threads, "warmup": 1, "steps": a.steps}
    inmem = None if a.skip_in_memory else run_phase("inmem", common)
    # Before the streamed run trains the store: both references start from the same weights.
    hf = None if a.skip_in_memory or a.no_transformers or a.compute_dtype != "float32" else \
        run_phase("transformers", {**common, "hf_dir": str(work / "hf")})
    stream_cfg = {**common, "train_dir": str(train_dir), "ram_budget": a.ram_budget, "prefetch": not a.no_prefetch,
                  "commit_every": a.commit_every, "cold_reads": a.cold_reads}
    stream = run_phase("stream", stream_cfg)
    # The clipped run continues training the same store: a step costs the same at any version.
    clipped = run_phase("stream", {**stream_cfg, "clip_grad_norm": a.clip_grad_norm}) if a.clip_grad_norm else None

    # With --cold-reads every module read comes from the disk: the floor takes the cold rate. Without, a re-read
    # may come from the page cache, and the floor still takes the cold rate (as a larger-than-RAM run would see).
    read_bw = disk.get("read_after_fadvise_dontneed_GBps") or disk["read_warm_GBps"]
    rd, wr = stream["bytes_read_per_step"], stream["bytes_written_per_step"]
    io_floor = rd / (read_bw * 1e9) + wr / (disk["write_fsync_GBps"] * 1e9)
    io_floor_warm = rd / (disk["read_warm_GBps"] * 1e9) + wr / (disk["write_fsync_GBps"] * 1e9)
    # Useful work: 6 x parameters x tokens per step (forward and backward), recompute not counted.
    flop = 6 * prep["n_params"] * a.batch * a.seq
    stream["useful_TFLOPS"] = flop / stream["s_per_step"] / 1e12
    if inmem is not None:
        inmem["useful_TFLOPS"] = flop / inmem["s_per_step"] / 1e12
    out = {
        "config": {k: v for k, v in vars(a).items() if k != "workdir"},
        "model": {"n_params": prep["n_params"], "vocab_size": prep["vocab_size"],
                  "ffn_hidden_dim": prep["ffn_hidden_dim"], "checkpoint_bytes": gen["shard_bytes"],
                  "store_bytes": prep["store_bytes"], "generate_s": gen["seconds"]},
        "prepare": {"seconds": prep["seconds"], "store_GBps_written": prep["store_GBps"],
                    "peak_rss_bytes": prep["peak_rss_bytes"], "rss_baseline_bytes": prep["rss_baseline_bytes"]},
        "streamed": stream,
        **({"streamed_clipped": clipped, "clipped_over_unclipped": {
            k: clipped[k] / stream[k] for k in ("s_per_step", "bytes_read_per_step", "bytes_written_per_step")}}
           if clipped else {}),
        "in_memory": inmem,
        "transformers": hf,
        "disk": disk,
        "floors": {"io_s_per_step": io_floor, "io_s_per_step_warm_read": io_floor_warm},
    }
    if "copy_rates" in stream:  # cuda: bytes crossing to and from the device at the rates its copies get
        out["floors"]["transfer_s_per_step"] = transfer_floor(stream["h2d_bytes_per_step"],
                                                              stream["d2h_bytes_per_step"], stream["copy_rates"],
                                                              prefetch=not a.no_prefetch)
    if inmem is not None:
        # The forward pass again for each module below the turn: a third more compute for those.
        plan = stream["plan"]
        compute_floor = inmem["s_per_step"] * (1 + plan["top"] / plan["modules"] / 3)
        out["ratio_streamed_over_in_memory"] = stream["s_per_step"] / inmem["s_per_step"]
        out["floors"]["compute_s_per_step"] = compute_floor
        out["floors"]["streamed_over_max_floor"] = stream["s_per_step"] / max(
            compute_floor, io_floor, out["floors"].get("transfer_s_per_step", 0.0))
        out["floors"]["between"] = between(stream, out["floors"])
        n = min(len(stream["losses"]), len(inmem["losses"]))
        out["loss_max_abs_diff"] = max(abs(x - y) for x, y in zip(stream["losses"][:n], inmem["losses"][:n]))
    if hf is not None:
        hf["useful_TFLOPS"] = flop / hf["s_per_step"] / 1e12
        out["ratio_streamed_over_transformers"] = stream["s_per_step"] / hf["s_per_step"]
        n = min(len(stream["losses"]), len(hf["losses"]))
        out["loss_max_abs_diff_transformers"] = max(abs(x - y) for x, y in zip(stream["losses"][:n], hf["losses"][:n]))
    out["wall_s"] = time.perf_counter() - t_all
    out["loadavg_1m_before_after"] = [load0, os.getloadavg()[0] if hasattr(os, "getloadavg") else None]
    return out


def between(stream: dict, floors: dict) -> dict:
    """What stands between the streamed step and its floor, in seconds per step: the compute thread's own
    work against the compute floor, and its waits for modules being read (get), for room in the write queue
    (put, wait_written) and for the last writes (flush); beside them, how busy the reader and writer threads
    were (read, write) and how long the reader waited for a write to commit before it could read (room)."""
    t = stream["timers_s_per_step"]
    floor = max(floors["compute_s_per_step"], floors["io_s_per_step"], floors.get("transfer_s_per_step", 0.0))
    return {"s_per_step": stream["s_per_step"], "max_floor_s": floor,
            "over_floor_s": stream["s_per_step"] - floor,
            "compute_thread_busy_s": t["compute_thread_busy"],
            "compute_over_compute_floor_s": t["compute_thread_busy"] - floors["compute_s_per_step"],
            "commit_own_s": t.get("commit", 0.0) - t.get("put", 0.0) - t.get("wait_written", 0.0),
            "wait_read_s": t.get("get", 0.0),
            "wait_write_s": t.get("put", 0.0) + t.get("wait_written", 0.0) + t.get("flush", 0.0),
            "reader_read_s": t.get("read", 0.0), "reader_waits_for_write_s": t.get("room", 0.0),
            "writer_write_s": t.get("write", 0.0), "fadvise_s": t.get("fadvise", 0.0)}


if __name__ == "__main__":
    main()
