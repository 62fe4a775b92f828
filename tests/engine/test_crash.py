"""Crash consistency: finetune.py killed (SIGKILL) at deterministic points, then resumed, ends bit-identical.

Each trial runs finetune.py as a subprocess with SLOWLLAMA_KILL_AT="event:n", checks that it died by
SIGKILL, then runs it again (with --resume once W/run.json exists, plainly before that, as a user
would) and compares every tensor of the exported model and every logged loss with an uninterrupted
run of the same arguments.

Kill points tried: 35 (25 with config A, 6 with config B, 4 with config C; pytest -s prints the count),
plus 6 power-cut trials (after a kill, the newest module file truncated to half or a byte flipped in it).
The three configs run the step's turn (plan.py) at its three extents: A's budget 0 holds only the
minimal turn (K = 0), B's unlimited one the whole model (no recompute at all), C's one block more (K = 1).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from slowllama.engine.store import BlockStore, file_stem

pytestmark = [pytest.mark.slow, pytest.mark.crash]

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "test_data" / "corpus.txt"
EVENTS = ["forward", "backward", "before_fsync", "before_rename", "after_rename", "prepare_module",
          "export_module", "export_swap"]
COMMON = ["--seq-len", "16", "--iters", "3", "--dropout", "0.1", "--device", "cpu", "--seed", "5"]
CONFIGS = {
    # SGD with momentum (optimizer state in each module file), activations in scratch files.
    "A": ["--batch-size", "2", "--lr", "0.02", "--momentum", "0.9", "--ram-budget", "0"],
    # AdamW, micro-batches, activations in RAM.
    "B": ["--batch-size", "4", "--micro-batch", "1", "--optimizer", "adamw", "--lr", "0.01",
          "--ram-budget", "none"],
    # A with a budget that holds the activations and one block more in the turn (turn1_budget).
    "C": ["--batch-size", "2", "--lr", "0.02", "--momentum", "0.9", "--ram-budget", "TURN1"],
}
TURN_K = {"A": 0, "B": 2, "C": 1}  # the crash model has 2 blocks: B's turn is the whole model, embedding too
# n per event for each config (trimmed to the number of times the event occurs). Config A also
# gets every after_rename of journal.json (the window between a step's commit and its log record)
# and the last occurrence of every event.
SAMPLES = {
    "A": {"forward": [1, 5, 13], "backward": [1, 5, 8], "before_fsync": [1, 13, 34], "before_rename": [9, 30],
          "after_rename": [8], "prepare_module": [1], "export_module": [1], "export_swap": [1]},
    "B": {"forward": [11], "backward": [9], "before_fsync": [40], "before_rename": [61], "after_rename": [29],
          "prepare_module": [4], "export_module": [3], "export_swap": []},
    # The second step: forward 7 reads layers.0 into the turn; backward 6..10 commit output down to the
    # embedding (8: layers.1, inside the turn; 10: the embedding, below it).
    "C": {"forward": [7], "backward": [8, 10], "before_fsync": [], "before_rename": [], "after_rename": [14],
          "prepare_module": [], "export_module": [], "export_swap": []},
}
# The counting wrapper: finetune.py with faults.point replaced by a counter; it prints the counts,
# and the file each after_rename belongs to, at exit.
COUNTING = (
    "import atexit, collections, json, runpy, sys\n"
    "import slowllama.faults as f\n"
    "c = collections.Counter()\n"
    "renamed = []\n"
    "def point(e):\n"
    "    c.update([e])\n"
    "    if e == 'after_rename':\n"
    "        renamed.append(getattr(sys._getframe(1).f_locals.get('path'), 'name', '?'))\n"
    "f.point = point\n"
    "atexit.register(lambda: print('FAULT_COUNTS ' + json.dumps([c, renamed]), file=sys.stderr))\n"
    "sys.argv = ['finetune.py', *sys.argv[1:]]\n"
    "runpy.run_path('finetune.py', run_name='__main__')\n"
)
TRIED = {"kill": 0, "power_cut": 0, "power_cut_refused": 0}


def _env(kill: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "SLOWLLAMA_KILL_AT"}
    # One thread each: trials run two at a time on 2 cores, and every run (reference included)
    # must use the same thread count for bit-identical sums.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONHASHSEED="0")
    if kill:
        env["SLOWLLAMA_KILL_AT"] = kill
    return env


def run_finetune(args: list[str], kill: str | None = None, counting: bool = False, timeout: int = 180):
    cmd = [sys.executable, *(["-c", COUNTING] if counting else ["finetune.py"]), *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(kill), capture_output=True, text=True, timeout=timeout)


def run_args(model: Path, data: Path, base: Path, config: str) -> list[str]:
    args = [a if a != "TURN1" else str(turn1_budget(model)) for a in CONFIGS[config]]
    return [str(model), "--data", str(data), "--out", str(base / "out"), "--work-dir", str(base / "work"),
            *COMMON, *args]


@functools.cache
def turn1_budget(model: Path) -> int:
    """A --ram-budget for config C: halfway between what a turn of one block more needs (with the
    activations below it) and what a turn of two would."""
    from slowllama.engine.optim import OptimConfig
    from slowllama.engine.plan import module_sizes, plan_step
    from slowllama.engine.store import prepare
    from slowllama.engine.trainer import TrainConfig
    from slowllama.formats import open_checkpoint

    with tempfile.TemporaryDirectory() as d:
        store = prepare(open_checkpoint(model), Path(d) / "store")
        need = []
        for k in (1, 2):
            cfg = TrainConfig(optim=OptimConfig("sgd", lr=0.02, momentum=0.9), dropout=0.1, turn_blocks=k)
            p = plan_step(cfg, store.args, module_sizes(store, cfg), 2, 2, 16)
            need.append(p.turn_bytes + p.act_bytes)
    return (need[0] + need[1]) // 2


def load_export(out: Path) -> dict:
    """Every tensor of every shard, plus the bytes of the other files except the log and the report page."""
    got = {}
    for p in sorted(out.iterdir()):
        if p.name.endswith(".pth"):
            got[p.name] = torch.load(p, map_location="cpu", weights_only=True)
        elif p.name not in ("train_log.jsonl", ".slowllama", "report.html"):  # the marker names the run that wrote it
            got[p.name] = p.read_bytes()
    return got


def losses(out: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return {r["iter"]: r["loss"] for r in recs if "loss" in r}


def assert_same_export(got: dict, ref: dict, what: str):
    assert sorted(got) == sorted(ref), f"{what}: files {sorted(got)} != {sorted(ref)}"
    for name, r in ref.items():
        g = got[name]
        if isinstance(r, bytes):
            assert g == r, f"{what}: {name} differs"
            continue
        assert list(g) == list(r), f"{what}: {name} keys differ"
        for k in r:
            assert g[k].dtype == r[k].dtype and g[k].shape == r[k].shape, f"{what}: {name}:{k} dtype/shape"
            assert torch.equal(g[k], r[k]), f"{what}: {name}:{k} is not bit-identical " \
                                            f"(max diff {(g[k].float() - r[k].float()).abs().max()})"


def resume(args: list[str], base: Path):
    """What a user does after a crash: --resume once the run exists, a plain rerun before."""
    started = (base / "work" / "run.json").exists()
    return run_finetune(args + (["--resume"] if started else []))


def sha_tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def crash_model(model_factory):
    # 2 shards and rope.freqs, so that the store has an extras module and export slices tensors.
    return model_factory("crash", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, n_shards=2, rope_freqs=True)


@pytest.fixture(scope="module")
def crash_data(tmp_path_factory):
    p = tmp_path_factory.mktemp("crash-data") / "data.txt"
    p.write_text(CORPUS.read_text(encoding="utf-8")[:4000], encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def reference(crash_model, crash_data, tmp_path_factory):
    """config -> (export, losses, event counts) of an uninterrupted run."""
    refs = {}
    for config in CONFIGS:
        base = tmp_path_factory.mktemp(f"crash-ref-{config}")
        r = run_finetune(run_args(crash_model, crash_data, base, config), counting=True)
        assert r.returncode == 0, r.stderr[-3000:]
        line = next(ln for ln in r.stderr.splitlines() if ln.startswith("FAULT_COUNTS "))
        counts, renamed = json.loads(line.split(" ", 1)[1])
        assert set(counts) == set(EVENTS), counts
        assert len(renamed) == counts["after_rename"]
        ref_losses = losses(base / "out")
        assert sorted(ref_losses) == [0, 1, 2]
        assert f"(K = {TURN_K[config]} beyond" in r.stdout, r.stdout  # the turn each config is meant to run
        refs[config] = (load_export(base / "out"), ref_losses, counts, renamed)
    return refs


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    print(f"\ntest_crash: {TRIED['kill']} kill points tried, {TRIED['power_cut']} power-cut trials "
          f"({TRIED['power_cut_refused']} stopped with an error naming the module, the rest finished bit-identical)")


def kill_and_resume(model, data, base: Path, config: str, kill: str, corrupt=None):
    """Kill at `kill`, optionally damage the store, resume; returns the resume's CompletedProcess and what
    corrupt() returned (the damaged module)."""
    args = run_args(model, data, base, config)
    r = run_finetune(args, kill=kill)
    assert r.returncode == -signal.SIGKILL, \
        f"{config} {kill}: expected death by SIGKILL, got rc {r.returncode}\n{r.stderr[-3000:]}"
    detail = corrupt(base) if corrupt else None
    r2 = resume(args, base)
    return r2, detail


def _trial(model, data, base, config, event, n, ref):
    kill = f"{event}:{n}"
    r2, _ = kill_and_resume(model, data, base, config, kill)
    assert r2.returncode == 0, f"{config} {kill}: resume failed rc {r2.returncode}\n{r2.stderr[-3000:]}"
    assert "Traceback" not in r2.stderr
    ref_export, ref_losses = ref[:2]
    assert_same_export(load_export(base / "out"), ref_export, f"{config} {kill}")
    got = losses(base / "out")
    assert got == ref_losses, f"{config} {kill}: logged losses {got} != uninterrupted {ref_losses}"
    leftovers = sorted(p.name for p in base.iterdir() if p.name not in ("out", "work"))
    assert not leftovers, f"{config} {kill}: left behind {leftovers}"
    return kill


WORKERS = 3  # runs spend much of their time in fsync, so 3 at a time keep 2 cores busy


@pytest.fixture(scope="module")
def kill_results(crash_model, crash_data, reference, tmp_path_factory):
    """(config, event, n) -> None or the failure, for every sampled kill point, run WORKERS at a time."""
    jobs = []
    for config in CONFIGS:
        counts, renamed = reference[config][2], reference[config][3]
        journal = [i + 1 for i, name in enumerate(renamed) if name == "journal.json"]
        for event in EVENTS:
            ns = {n for n in SAMPLES[config][event] if n <= counts[event]}
            if config == "A":
                ns.add(counts[event])
                if event == "after_rename":
                    ns |= {*journal[:2], *journal[-1:]}  # step 0 entering backward and committing; the last commit
            for n in sorted(ns):
                base = tmp_path_factory.mktemp(f"kill-{config}-{event}-{n}")
                jobs.append((config, event, n, base))
    results = {}
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures = {(c, e, n): pool.submit(_trial, crash_model, crash_data, base, c, e, n, reference[c])
                   for c, e, n, base in jobs}
        for key, f in futures.items():
            try:
                f.result()
                results[key] = None
            except Exception as e:  # noqa: BLE001 - every trial reports, then its event's test fails
                results[key] = f"{type(e).__name__}: {e}"[:2000]
    TRIED["kill"] = len(results)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("event", EVENTS)
def test_kill_and_resume_is_bit_identical(event, kill_results):
    mine = {k: v for k, v in kill_results.items() if k[1] == event}
    assert mine
    errors = [v for v in mine.values() if v]
    assert not errors, f"{len(errors)} of {len(mine)} kill points failed:\n" + "\n\n".join(errors)


def newest_module_file(base: Path) -> tuple[str, Path]:
    store = BlockStore(base / "work" / "store")
    paths = {store.path(m): m for m in store.modules}
    p = max(paths, key=lambda q: q.stat().st_mtime_ns)
    return paths[p], p


def truncate_half(base: Path):
    name, p = newest_module_file(base)
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.truncate(size // 2)
    return name


def flip_byte(where: str, seed: int):
    def corrupt(base: Path):
        name, p = newest_module_file(base)
        raw = bytearray(p.read_bytes())
        rng = random.Random(seed)
        hlen = int.from_bytes(raw[8:12], "little")
        head = 16 + hlen
        pos = rng.randrange(8, head) if where == "header" else rng.randrange(head + (-head) % 64, len(raw))
        raw[pos] ^= 1 << rng.randrange(8)
        p.write_bytes(bytes(raw))
        return name
    return corrupt


@pytest.mark.slow
@pytest.mark.parametrize("config,kill,corrupt", [
    ("A", "backward:4", truncate_half),
    ("A", "after_rename:25", truncate_half),
    ("A", "backward:12", flip_byte("data", 1)),
    ("A", "before_rename:33", flip_byte("header", 3)),
    ("B", "backward:8", flip_byte("data", 4)),
    ("B", "export_module:2", truncate_half),
], ids=lambda v: v.__name__ if callable(v) else str(v))
def test_power_cut_damage_is_detected_or_harmless(config, kill, corrupt, crash_model, crash_data, reference,
                                                  tmp_path):
    """A damaged module file after a crash: finish bit-identical, or stop with one error line naming it."""
    r2, name = kill_and_resume(crash_model, crash_data, tmp_path, config, kill, corrupt)
    TRIED["power_cut"] += 1
    assert "Traceback" not in r2.stderr, r2.stderr[-3000:]
    if r2.returncode == 0:
        assert_same_export(load_export(tmp_path / "out"), reference[config][0], f"{config} {kill} damaged {name}")
        return
    TRIED["power_cut_refused"] += 1
    errors = [ln for ln in r2.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r2.stderr[-3000:]
    assert name in errors[0] or file_stem(name) in errors[0], errors[0]
    out = tmp_path / "out"
    if (out / "consolidated.00.pth").exists():  # only an export from before the damage may be there
        assert_same_export(load_export(out), reference[config][0], f"{config} {kill} leftover export")


@pytest.mark.slow
def test_source_checkpoint_is_never_modified(crash_model, crash_data, tmp_path):
    before = sha_tree(crash_model)
    r = run_finetune(run_args(crash_model, crash_data, tmp_path / "full", "A"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sha_tree(crash_model) == before
    base = tmp_path / "killed"
    r2, _ = kill_and_resume(crash_model, crash_data, base, "A", "backward:7")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert sha_tree(crash_model) == before
    r3 = run_finetune(run_args(crash_model, crash_data, base, "A") + ["--resume", "--iters", "4"])
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert sha_tree(crash_model) == before
