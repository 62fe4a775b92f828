"""Issue 20: data-parallel runs under torchrun (gloo on 127.0.0.1), driven as a user runs them.

The reference for 2 processes x batch 2 is 1 process x batch 4: the issue defines the layouts to
be equal, and the single-process step is checked against plain autograd elsewhere (test_backprop).
Each case combines several features (dropout with --micro-batch 1, clipping, gradient
accumulation, LoRA, stores on two simulated hosts, a rank killed mid-backward) to keep the number
of runs small: about 12 process starts in all.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from slowllama.engine.distributed import DataParallelTrainer, Ranks, comm_group, rank_device
from slowllama.engine.store import BlockStore
from slowllama.errors import ConfigError
from slowllama.model.lora import Adapters
from tests.cli_helpers import FINETUNE, ROOT, env, run_cli, train

pytestmark = [pytest.mark.slow, pytest.mark.distributed]  # each test starts several Python processes
TIMEOUT = 120  # a run that outlives this hangs
COMMON = ["--seq-len", "16", "--device", "cpu", "--iters", "3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, script: Path, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(script), *map(str, args)]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=dist_env(), capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"torchrun still running after {TIMEOUT}s\n{(err.stderr or b'')[-3000:]!r}")


def dist_env(kill: str | None = None) -> dict:
    return {**env(kill), "SLOWLLAMA_DIST_TIMEOUT": "30"}


def assert_same(got: dict, want: dict, atol: float, what: str):
    assert got.keys() == want.keys(), what
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol, msg=lambda m: f"{what}, {k}: {m}")


def log_records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r]


def exported(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "consolidated.00.pth", map_location="cpu", weights_only=True)


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in log_records(out)]


def test_rank_rows_split_each_accumulation_part_in_rank_order():
    t = torch.arange(8).unsqueeze(1)  # 2 accumulation parts of 2 ranks x 2 rows
    rows = [DataParallelTrainer.rows_of(SimpleNamespace(rows=2, ranks=Ranks(r, 2)), t).flatten().tolist()
            for r in range(2)]
    assert rows == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_each_rank_of_a_host_takes_its_own_gpu_and_sums_gpu_gradients_over_nccl():
    """CUDA paths that cannot run here, in their logic: cuda:LOCAL_RANK per rank, and only
    tensors that all live on a GPU go to the NCCL group (gloo takes everything else)."""
    assert rank_device(torch.device("cuda"), 1, 2) == torch.device("cuda", 1)
    assert rank_device(torch.device("cuda:0"), 1, 2) == torch.device("cuda", 0)  # named: as given
    assert rank_device(torch.device("cpu"), 3, 0) == torch.device("cpu")
    with pytest.raises(ConfigError, match="LOCAL_RANK 2 but this host has 2 GPU"):
        rank_device(torch.device("cuda"), 2, 2)
    nccl, gpu, host = object(), SimpleNamespace(is_cuda=True), torch.zeros(1)
    assert comm_group([gpu, gpu], nccl) is nccl
    assert comm_group([gpu, host], nccl) is None  # the loss sum and fences are host tensors: gloo
    assert comm_group([gpu], None) is None  # no NCCL: gloo




def test_sgd_two_ranks_equal_one_process_and_a_rank_killed_mid_backward_resumes(probe_model, probe_data, tmp_path):
    """SGD with momentum, dropout on micro-batches of 1 (seeded by their global index) and an
    active --clip-grad-norm (its norm over the summed gradients); --ram-budget 0, so rank 1
    reads rank 0's files at each step. Then the same run with rank 1 SIGKILLed in step 1's
    backward pass, after three modules committed: rank 0 stops with one line, a one-process
    --resume is refused by name, and a 2-rank --resume ends bit-identical to the uninterrupted run."""
    opts = [*COMMON, "--lr", "0.05", "--momentum", "0.9", "--dropout", "0.1", "--micro-batch", "1",
            "--clip-grad-norm", "0.05", "--ram-budget", "0", "--seed", "3"]
    run = [probe_model, "--data", probe_data, *opts, "--batch-size", "2"]
    train(probe_model, probe_data, tmp_path / "o1", tmp_path / "w1", *opts, "--batch-size", "4")
    r = torchrun(2, FINETUNE, *run, "--out", tmp_path / "o2", "--work-dir", tmp_path / "w2")
    assert r.returncode == 0, r.stderr[-3000:]
    one, two, base = exported(tmp_path / "o1"), exported(tmp_path / "o2"), exported(probe_model)
    assert_same(two, one, 1e-6, "2 ranks x batch 2 against 1 x batch 4")
    assert max((one[k] - base[k]).abs().max().item() for k in one) > 1e-4, "the runs did not train"
    assert losses(tmp_path / "o2") == pytest.approx(losses(tmp_path / "o1"), abs=1e-6)
    norms = [rec["grad_norm"] for rec in log_records(tmp_path / "o2")]
    assert min(norms) > 0.05, f"clipping was not active: {norms}"
    assert norms == pytest.approx([rec["grad_norm"] for rec in log_records(tmp_path / "o1")], rel=1e-6)
    assert (tmp_path / "w2" / "acts" / "rank1").is_dir()

    # Without torchrun's agent (which would stop the survivor itself), rank 0's own check must.
    # Rank 1's 9th backward module is step 1's layers.0: output and norm are committed, and layers.1
    # too when its all-reduce, which rank 1 started, was done before rank 1 died.
    port, procs = free_port(), []
    for rank in range(2):
        e = {**dist_env("backward:9" if rank == 1 else None), "RANK": str(rank), "LOCAL_RANK": str(rank),
             "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        err = open(tmp_path / f"stderr{rank}.txt", "w")
        cmd = [sys.executable, FINETUNE, *run, "--out", tmp_path / "o3", "--work-dir", tmp_path / "w3"]
        procs.append(subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=e, stdout=subprocess.DEVNULL, stderr=err))
    t0 = time.monotonic()
    try:
        rcs = [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert rcs == [2, -signal.SIGKILL], rcs
    lines = [ln for ln in (tmp_path / "stderr0.txt").read_text().splitlines() if ln.strip()]
    assert lines[-1].startswith("error: rank 0: another rank stopped"), lines[-5:]
    assert time.monotonic() - t0 < 60  # the peer's death is noticed, not waited out
    journal = json.loads((tmp_path / "w3" / "store" / "journal.json").read_text())
    assert (journal["step"], journal["phase"]) == (1, "backward"), journal
    store = BlockStore(tmp_path / "w3" / "store")
    versions = [store.step_of(n) for n in store.trainable]
    k = versions.index(2)  # layers.1 is committed or not, as rank 1 died before or after its sum travelled
    assert k in (2, 3) and versions == [1] * k + [2] * (5 - k), f"not cut short where intended: {versions}"
    assert (tmp_path / "w3" / "store" / f"grad_in.{k}.rank1.blk").exists(), "rank 1's boundary was not kept"

    alone = run_cli(probe_model, "--resume", "--work-dir", tmp_path / "w3", "--iters", "3")
    assert alone.returncode == 2 and "trains over 2 process(es)" in alone.stderr.strip().splitlines()[-1], \
        alone.stderr[-2000:]
    r = torchrun(2, FINETUNE, probe_model, "--resume", "--work-dir", tmp_path / "w3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed: finished iteration 1" in r.stdout
    assert_same(exported(tmp_path / "o3"), two, 0, "resumed against uninterrupted")
    assert losses(tmp_path / "o3") == losses(tmp_path / "o2")
    assert not list((tmp_path / "w3" / "store").glob("grad_in.*")), "boundary files left behind"


# Host 1's writer dies as it is about to commit layers.1 in step 1 (update 2): its store stops at
# least a module behind host 0's, which committed layers.1 before an all-reduce of a lower module failed.
DIE_BEHIND = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import slowllama.engine.store as store
write = store.BlockStore.write
def write_or_die(self, name, block):
    if name == "layers.1" and block.step == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return write(self, name, block)
if os.environ["GROUP_RANK"] == "1":
    store.BlockStore.write = write_or_die
import finetune
sys.exit(finetune.main())
"""


def two_hosts(script: Path, tmp_path: Path, tag: str, *args) -> list[int]:
    """Two torchrun agents as two hosts (--nnodes 2, one process each), each with its own work dir."""
    port, procs = free_port(), []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port), script, *args,
               "--out", tmp_path / f"o{tag}-host{node}", "--work-dir", tmp_path / f"w{tag}-host{node}"]
        err = open(tmp_path / f"{tag}-host{node}.txt", "w")
        procs.append(subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=dist_env(), stdout=err, stderr=err))
    try:
        return [p.wait(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def host_logs(tmp_path: Path, tag: str) -> str:
    return "".join((tmp_path / f"{tag}-host{n}.txt").read_text()[-2000:] for n in range(2))


def test_adamw_on_two_hosts_each_with_its_own_store_and_a_host_behind_catches_up(probe_model, probe_data, tmp_path):
    """Each host's LOCAL_RANK 0 prepares and writes its own work dir, rank 0 alone exports and logs.
    AdamW, gradient accumulation over 2 batches, dropout on micro-batches of 1: equal to one
    process within 1e-6. Then a run whose host 1 dies with its store a module behind host 0's:
    on --resume it copies what host 0 committed, and the run ends bit-identical to the first."""
    # AdamW's m/sqrt(v) turns the rounding of a nearly cancelling gradient sum into a change of up to
    # about 1e-4 of lr, wherever the sum is taken: at lr 0.05 a few elements differed by 2.6e-6.
    opts = [*COMMON, "--optimizer", "adamw", "--lr", "1e-3", "--grad-accum", "2", "--micro-batch", "1",
            "--dropout", "0.1"]
    train(probe_model, probe_data, tmp_path / "o1", tmp_path / "w1", *opts, "--batch-size", "4")
    run = [probe_model, "--data", probe_data, *opts, "--batch-size", "2"]
    assert two_hosts(FINETUNE, tmp_path, "2", *run) == [0, 0], host_logs(tmp_path, "2")
    one, two = exported(tmp_path / "o1"), exported(tmp_path / "o2-host0")
    assert_same(two, one, 1e-6, "2 hosts x batch 2 against 1 x batch 4")
    assert losses(tmp_path / "o2-host0") == pytest.approx(losses(tmp_path / "o1"), abs=1e-6)
    assert not (tmp_path / "o2-host1").exists(), "host 1 wrote an export"
    stores = [BlockStore(tmp_path / f"w2-host{node}" / "store") for node in range(2)]
    for name in stores[0].trainable:
        assert [s.step_of(name) for s in stores] == [3, 3]
        assert_same(stores[1].module_tensors(name), stores[0].module_tensors(name), 0, f"host 1's {name}")

    script = tmp_path / "die_behind.py"
    script.write_text(DIE_BEHIND)
    assert two_hosts(script, tmp_path, "3", *run) != [0, 0]
    stores = [BlockStore(tmp_path / f"w3-host{node}" / "store") for node in range(2)]
    behind, ahead = ([s.step_of(n) for n in s.trainable] for s in stores[::-1])
    # Host 1's writer lags its trainer, which may have summed every gradient with host 0 before it died:
    # host 0 stops one or two modules further, or ends the step.
    assert behind == [1, 1, 1, 2, 2] and ahead in ([1, 1, 2, 2, 2], [1, 2, 2, 2, 2], [2] * 5), (ahead, behind)
    assert two_hosts(FINETUNE, tmp_path, "3", probe_model, "--resume") == [0, 0], host_logs(tmp_path, "3")
    assert "the stores caught up with rank 0's" in (tmp_path / "3-host1.txt").read_text()
    assert_same(exported(tmp_path / "o3-host0"), two, 0, "resumed against uninterrupted")
    assert losses(tmp_path / "o3-host0") == losses(tmp_path / "o2-host0")


def test_lora_two_ranks_equal_one_process(probe_model, probe_data, tmp_path):
    """LoRA with dropout on micro-batches of 1, gradient accumulation and an active clip."""
    opts = [*COMMON, "--lora-rank", "4", "--lr", "0.05", "--grad-accum", "2", "--micro-batch", "1",
            "--dropout", "0.1", "--clip-grad-norm", "0.003"]
    train(probe_model, probe_data, tmp_path / "o1", tmp_path / "w1", *opts, "--batch-size", "4")
    r = torchrun(2, FINETUNE, probe_model, "--data", probe_data, "--out", tmp_path / "o2", "--work-dir",
                 tmp_path / "w2", *opts, "--batch-size", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = (Adapters.load(tmp_path / o / "lora_adapters.blk") for o in ("o1", "o2"))
    assert one.step == two.step == 3
    for m in one.params:
        assert_same(two.named(m), one.named(m), 1e-6, f"adapters of {m}")
    assert losses(tmp_path / "o2") == pytest.approx(losses(tmp_path / "o1"), abs=1e-6)
    norms = [rec["grad_norm"] for rec in log_records(tmp_path / "o2")]
    assert min(norms) > 0.003 and norms == pytest.approx([r["grad_norm"] for r in log_records(tmp_path / "o1")],
                                                        rel=1e-6)

def test_a_rank_whose_update_diverges_is_caught(probe_model, probe_data, tmp_path):
    """Rank 1 nudges every parameter it steps: its copy of a module no longer matches rank 0's."""
    script = tmp_path / "diverge.py"
    script.write_text(f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import torch
import slowllama.engine.update as update
step = update.step_module
def nudged(cfg, params, state):
    new = step(cfg, params, state)
    with torch.no_grad():
        for p in params.values():
            p.add_(1e-4)
    return new
if os.environ["RANK"] == "1":
    update.step_module = nudged
import finetune
sys.exit(finetune.main())
""")
    r = torchrun(2, script, probe_model, "--data", probe_data, "--out", tmp_path / "o", "--work-dir", tmp_path / "w",
                 *COMMON, "--lr", "0.05", "--batch-size", "2")
    assert r.returncode != 0
    assert "error: rank 1's " in r.stderr and "after step 0 differs from rank 0's" in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "o" / "consolidated.00.pth").exists()
