"""Does peak RAM stay flat as the model gets deeper? A shallow vs a deep model of the same width.

    python benchmarks/bench_memory.py [--dim 1024 --n-heads 16 --layers 4 32 --batch 1 --seq 128]

For each depth (default 4 and 32 layers) it generates a bfloat16 Meta checkpoint
with random weights (in a process of its own: the generator holds the whole
model in RAM, which is not what is measured), then measures, each in a fresh
process:
  (a) preparing the block store from the checkpoint, and
  (b) one streamed training step (SGD) with ram_budget 0, i.e. only the current
      and the prefetched module (plus queued writes) in RAM, activations in
      scratch files.
The peak RSS of a phase is its process's high-water mark (VmHWM from
/proc/self/status; ru_maxrss where there is no /proc), which includes the
interpreter and torch: "rss_baseline_bytes" is the RSS right after the imports,
and the *_above_baseline figures subtract it.

Prints one JSON object: per depth the peaks, seconds of preparation, seconds per
step, store and checkpoint sizes; the deep/shallow ratios of the peaks; and the
deepest model's store size on disk against its checkpoint's. A vocabulary of ~320
keeps the embedding and output layers small next to the blocks, so the blocks
decide the peak.
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
from _phases import bench_dir, dir_bytes, parse_bytes, run_phase  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--n-heads", type=int, default=16)
    p.add_argument("--n-kv-heads", type=int, default=None)
    p.add_argument("--layers", type=int, nargs="+", default=[4, 32], help="depths to compare (first vs last)")
    p.add_argument("--vocab-size", type=int, default=320)
    p.add_argument("--multiple-of", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=1, help="training steps in the measured process")
    p.add_argument("--ram-budget", type=parse_bytes, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16",
                   help="dtype of the generated checkpoint")
    p.add_argument("--store-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", default=None, help="keep the checkpoints and stores here (default: a temp dir)")
    a = p.parse_args()

    with bench_dir(a.workdir, "slowllama-benchmem-") as work:
        print(json.dumps(run(a, work), indent=1))


def run(a, work: Path) -> dict:
    t_all = time.perf_counter()
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    runs = {}
    for n_layers in a.layers:
        d = work / f"L{n_layers}"
        if d.exists():
            shutil.rmtree(d)
        ckpt, store = d / "ckpt", d / "store"
        gen = run_phase("generate", {
            "out": str(ckpt), "dim": a.dim, "n_layers": n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
            "vocab_size": a.vocab_size, "multiple_of": a.multiple_of, "dtype": a.dtype, "seed": 0})
        prep = run_phase("prepare", {"ckpt": str(ckpt), "store": str(store), "store_dtype": a.store_dtype,
                                     "threads": a.threads})
        step = run_phase("stream", {
            "store": str(store), "train_dir": str(d / "train"), "device": a.device, "batch": a.batch, "seq": a.seq,
            "micro_batch": None, "compute_dtype": a.compute_dtype, "lr": 1e-3, "seed": 0, "threads": a.threads,
            "warmup": 0, "steps": a.steps, "ram_budget": a.ram_budget, "prefetch": True, "phase_peaks": True})
        exp = run_phase("export", {"store": str(store), "ckpt": str(ckpt), "out": str(d / "export"),
                                   "threads": a.threads})
        runs[str(n_layers)] = {
            "n_params": prep["n_params"],
            "checkpoint_bytes": gen["shard_bytes"],
            "store_bytes": prep["store_bytes"],
            "store_dir_bytes": dir_bytes(store),
            "generate_peak_rss_bytes": gen["peak_rss_bytes"],
            "prepare_s": prep["seconds"],
            "prepare_peak_rss_bytes": prep["peak_rss_bytes"],
            "prepare_rss_baseline_bytes": prep["rss_baseline_bytes"],
            "prepare_peak_above_baseline_bytes": prep["peak_rss_bytes"] - prep["rss_baseline_bytes"],
            "s_per_step": step["s_per_step"],
            "step_s": step["step_s"],
            "loss": step["losses"],
            "step_peak_rss_bytes": step["peak_rss_bytes"],
            "step_rss_baseline_bytes": step["rss_baseline_bytes"],
            "step_peak_above_baseline_bytes": step["peak_rss_bytes"] - step["rss_baseline_bytes"],
            "step_phase_peak_rss_bytes": step["phase_peak_rss_bytes"],
            "step_phase_peaks_exact": step["phase_peaks_exact"],
            "step_at_peak": step["at_peak"],
            "export_s": exp["seconds"],
            "export_peak_rss_bytes": exp["peak_rss_bytes"],
            "export_peak_above_baseline_bytes": exp["peak_rss_bytes"] - exp["rss_baseline_bytes"],
            "bytes_read_per_step": step["bytes_read_per_step"],
            "bytes_written_per_step": step["bytes_written_per_step"],
            **{k: v for k, v in step.items() if k.startswith("peak_gpu")},
        }
        shutil.rmtree(d, ignore_errors=True)  # free the disk before the next depth
    lo, hi = runs[str(a.layers[0])], runs[str(a.layers[-1])]

    def ratio(key):
        return hi[key] / lo[key] if lo[key] else None

    return {
        "config": {k: v for k, v in vars(a).items() if k != "workdir"},
        "runs": runs,
        f"ratio_{a.layers[-1]}_over_{a.layers[0]}": {
            "prepare_peak_rss": ratio("prepare_peak_rss_bytes"),
            "step_peak_rss": ratio("step_peak_rss_bytes"),
            "prepare_peak_above_baseline": ratio("prepare_peak_above_baseline_bytes"),
            "step_peak_above_baseline": ratio("step_peak_above_baseline_bytes"),
            "n_params": ratio("n_params"),
            "s_per_step": ratio("s_per_step"),
        },
        f"store_vs_checkpoint_{a.layers[-1]}": {
            "store_bytes": hi["store_bytes"], "checkpoint_bytes": hi["checkpoint_bytes"],
            "ratio": hi["store_bytes"] / hi["checkpoint_bytes"]},
        "wall_s": time.perf_counter() - t_all,
        "loadavg_1m_before_after": [load0, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
    }


if __name__ == "__main__":
    main()
