"""The step benchmark runs end to end at a tiny size, and its two runs agree."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_bench_step_reports_both_runs_with_equal_losses(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--dim", "64", "--n-layers", "2",
                          "--n-heads", "4", "--batch", "2", "--seq", "16", "--steps", "1", "--bw-mb", "8",
                          "--ram-budget", "0", "--cold-reads", "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=600, check=True)
    r = json.loads(out.stdout)
    assert r["loss_max_abs_diff"] == 0.0  # fp32 store: streamed and in-memory losses are identical
    assert len(r["streamed"]["losses"]) == len(r["in_memory"]["losses"]) == 2
    # ordinary transformers training from the same weights: the same losses up to fp32 summation order
    assert len(r["transformers"]["losses"]) == 2 and r["loss_max_abs_diff_transformers"] < 1e-5
    assert r["ratio_streamed_over_transformers"] > 0
    s = r["streamed"]
    assert s["plan"]["turn_blocks_K"] == 0 and s["plan"]["top"] == 2  # budget 0: the minimal turn of 5 modules
    assert s["bytes_read_per_step"] > 0 and s["bytes_written_per_step"] >= r["model"]["store_bytes"]
    assert s["useful_TFLOPS"] > 0 and r["ratio_streamed_over_in_memory"] > 0
    assert set(r["floors"]) >= {"io_s_per_step", "compute_s_per_step", "streamed_over_max_floor"}
    # --cold-reads: every module read (each of the 5 once, the 2 below the turn again in the reverse pass)
    # follows a drop of its file's cached pages; the step's time splits into compute and the waits.
    calls, t = s["timer_calls_per_step"], s["timers_s_per_step"]
    assert calls["read"] == calls["fadvise"] == 7 and s["cold_reads"]
    waits = sum(t.get(k, 0.0) for k in ("get", "put", "wait_written", "flush"))
    assert 0 < t["compute_thread_busy"] and abs(t["compute_thread_busy"] + waits - s["s_per_step"]) < 1e-6
    b = r["floors"]["between"]
    assert b["max_floor_s"] == max(r["floors"]["compute_s_per_step"], r["floors"]["io_s_per_step"])
    assert b["wait_read_s"] == t["get"] and b["writer_write_s"] == t["write"] > 0



def test_bench_step_trains_both_sides_with_adamw(tmp_path):
    """--optimizer adamw: both sides step with AdamW; its moments in the chunked step make the same losses
    as torch.optim.AdamW on the whole model (a dim of 320 puts more than one chunk in each projection)."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--dim", "320", "--n-layers", "2",
                          "--n-heads", "4", "--batch", "2", "--seq", "16", "--steps", "2", "--bw-mb", "8",
                          "--optimizer", "adamw", "--lr", "1e-2", "--no-transformers", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, check=True)
    r = json.loads(out.stdout)
    losses = r["streamed"]["losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]  # AdamW at lr 1e-2 on one batch: the loss falls
    assert r["loss_max_abs_diff"] == 0.0

def _phases():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _phases

    return _phases


def test_transfer_floor_counts_copies_back_at_the_pageable_rate():
    """slowllama copies back into pageable memory (device.to_host): the floor must not assume pinned rates."""
    rates = {"pinned": {"h2d_GBps": 50.0, "d2h_GBps": 50.0}, "pageable": {"h2d_GBps": 20.0, "d2h_GBps": 10.0}}
    floor = _phases().transfer_floor
    assert floor(0, 10e9, rates, prefetch=True) == 1.0  # 10 GB back at 10 GB/s, not 50
    assert floor(10e9, 0, rates, prefetch=True) == 0.2  # prefetched modules cross from pinned staging
    assert floor(10e9, 0, rates, prefetch=False) == 0.5  # direct copies come from pageable read buffers


def test_copy_bandwidth_times_each_direction_from_pinned_and_from_pageable_memory():
    copies = []

    class Buf:
        def __init__(self, where):
            self.where = where

        def fill_(self, v):
            return self

        def copy_(self, src, non_blocking=False):
            copies.append((src.where, self.where, non_blocking))

    class FakeTorch:
        uint8 = None

        @staticmethod
        def empty(n, dtype=None, device=None, pin_memory=False):
            return Buf("gpu" if device is not None else ("pinned" if pin_memory else "pageable"))

        class cuda:
            @staticmethod
            def synchronize(device):
                pass

    r = _phases().copy_bandwidth(FakeTorch, "cuda", nbytes=1 << 20)
    assert set(r) == {"pinned", "pageable"} and all(set(v) == {"h2d_GBps", "d2h_GBps"} for v in r.values())
    for kind in ("pinned", "pageable"):
        assert (kind, "gpu", kind == "pinned") in copies and ("gpu", kind, kind == "pinned") in copies


def test_bench_step_counts_one_commit_per_period_with_commit_every(tmp_path):
    """--commit-every 2 over 2 timed steps: one commit's writes (every module once, the warm-up's, written
    while the first timed step runs), not two; the closing commit belongs to the next period."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--dim", "64", "--n-layers", "2",
                          "--n-heads", "4", "--batch", "2", "--seq", "16", "--steps", "2", "--bw-mb", "8",
                          "--ram-budget", "none", "--commit-every", "2", "--skip-in-memory", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, check=True)
    s = json.loads(out.stdout)["streamed"]
    assert s["plan"]["commit_every"] == 2 and len(s["step_s"]) == 2
    store = json.loads(out.stdout)["model"]["store_bytes"]
    written = s["bytes_written_per_step"] * 2
    assert store <= written < store + 50_000, (written, store)  # the modules and two journals
    # Nothing timed after the last step: the writer wrote one commit's 5 modules in the window, and the compute
    # thread waited once, for the warm-up's commit (a closing commit would add 5 writes and a wait of its own).
    calls = s["timer_calls_per_step"]
    assert calls["write"] * 2 == 5 and calls["flush"] * 2 == 1, calls


def test_bench_block_times_eager_and_compiled_and_says_how_far_apart_they_are():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_block.py"), "--dim", "64", "--n-heads", "4",
                          "--batch", "2", "--seq", "16", "--reps", "2", "--warmup", "1", "--threads", "1", "--compile"],
                         capture_output=True, text=True, timeout=600, check=True)
    r = json.loads(out.stdout)
    e, c = r["eager"], r["compiled"]
    assert e["s_per_step"] > 0 and 0 < e["mm_share"] < 1 and r["threads"] == 1
    assert c["first_call_s"] > c["s_per_step"] > 0
    assert r["ratio_compiled_over_eager"] == c["s_per_step"] / e["s_per_step"]
    diffs = [c[k] for k in ("output_max_abs_diff", "input_grad_max_abs_diff", "weight_grad_max_abs_diff")]
    assert all(0 <= d < 1e-4 for d in diffs)  # the same block: at most a few ulps from fused kernels
    assert c["bit_identical"] == all(d == 0 for d in diffs)


# A device kind this machine lacks (no machine has both a CUDA GPU and MPS).
MISSING = "cuda" if not torch.cuda.is_available() else "mps"


@pytest.mark.parametrize("args, message", [
    (["--device", MISSING], f"--device {MISSING}: not available on this machine"),
    (["--device", "gpu"], "--device 'gpu': expected one of"),
    (["--dim", "100", "--n-heads", "16"], "dim 100 is not divisible by n_heads 16"),
], ids=["missing-device", "unknown-device", "bad-shape"])
def test_bench_block_refuses_a_bad_device_or_shape_in_one_line(args, message):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_block.py"), *args, "--reps", "1"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines()[-1].startswith("bench_block.py: error: ") and message in out.stderr
    assert "Traceback" not in out.stderr
