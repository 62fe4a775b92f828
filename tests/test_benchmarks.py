"""The step benchmark runs end to end at a tiny size, and its two runs agree."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_step_reports_both_runs_with_equal_losses(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--dim", "64", "--n-layers", "2",
                          "--n-heads", "4", "--batch", "2", "--seq", "16", "--steps", "1", "--bw-mb", "8",
                          "--ram-budget", "0", "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=600, check=True)
    r = json.loads(out.stdout)
    assert r["loss_max_abs_diff"] == 0.0  # fp32 store: streamed and in-memory losses are identical
    assert len(r["streamed"]["losses"]) == len(r["in_memory"]["losses"]) == 2
    s = r["streamed"]
    assert s["plan"]["turn_blocks_K"] == 0 and s["plan"]["top"] == 2  # budget 0: the minimal turn of 5 modules
    assert s["bytes_read_per_step"] > 0 and s["bytes_written_per_step"] >= r["model"]["store_bytes"]
    assert s["useful_TFLOPS"] > 0 and r["ratio_streamed_over_in_memory"] > 0
    assert set(r["floors"]) >= {"io_s_per_step", "compute_s_per_step", "streamed_over_max_floor"}
