"""--commit-every: with every module in the RAM budget, the store is written once per N steps, and a run
killed inside a commit, between commits or right after one resumes bit-identical, with each iteration
logged once; a budget that does not hold the modules commits every step, and the cost line says so."""
from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import threading

import pytest
import torch

from slowllama.engine.optim import OptimConfig
from slowllama.engine.store import BlockStore, prepare
from slowllama.engine.plan import holds_trained_state, plan_step
from slowllama.engine.trainer import TrainConfig, Trainer, estimate_io
from slowllama.errors import ConfigError
from slowllama.formats import open_checkpoint
from slowllama.fsutil import IO
from slowllama.run.loop import finetune
from tests.engine.test_crash import CORPUS, ROOT, _env, run_finetune
from tests.reference import random_batch

CPU = torch.device("cpu")
STEPS = 10
# Six iterations, commits every 3, a checkpoint at 4 (which commits first): commits after steps 2 and 3, then
# at the end (before the export); dropout over micro-batches and AdamW, so that the RNG states and the optimizer
# state must replay.
ARGS = ["--seq-len", "16", "--iters", "6", "--batch-size", "4", "--micro-batch", "2", "--dropout", "0.1",
        "--optimizer", "adamw",
        "--lr", "0.01", "--seed", "5", "--device", "cpu", "--ram-budget", "none", "--save-every", "4", "--keep", "5"]
# finetune.py with faults.point recording every event and the file it concerns, in order.
TRACING = (
    "import atexit, json, runpy, sys\n"
    "import slowllama.faults as f\n"
    "seen = []\n"
    "def point(e):\n"
    "    seen.append((e, getattr(sys._getframe(1).f_locals.get('path'), 'name', '')))\n"
    "f.point = point\n"
    "atexit.register(lambda: print('TRACE ' + json.dumps(seen), file=sys.stderr))\n"
    "sys.argv = ['finetune.py', *sys.argv[1:]]\n"
    "runpy.run_path('finetune.py', run_name='__main__')\n"
)


@pytest.fixture(scope="module")
def small_model(model_factory):
    return model_factory("commit-every", dim=32, n_layers=2, n_heads=4, n_kv_heads=2)


def _batches(vocab: int) -> list:
    return [random_batch(vocab, 2, 16, seed) for seed in range(STEPS)]


def _train(model, root, every: int) -> tuple[int, BlockStore, dict]:
    """STEPS steps at --commit-every `every` and the closing commit: (bytes written, the store, the estimate)."""
    cfg = TrainConfig(optim=OptimConfig("adamw", lr=1e-2), ram_budget=None, dropout=0.1, commit_every=every)
    store = prepare(open_checkpoint(model), root / "store")
    est = estimate_io(store, cfg, (2, 16))
    tr = Trainer(store, root / "work", CPU, cfg)
    w0 = IO.snapshot()[1]
    for inputs, targets in _batches(store.args.vocab_size):
        tr.train_step(inputs, targets)
    tr.commit()
    tr.streamer.flush()
    written = IO.snapshot()[1] - w0
    assert tr.commit_interval == every
    tr.close()
    return written, BlockStore(root / "store"), est


def test_commit_every_10_writes_a_tenth_and_the_same_bits(small_model, tmp_path):
    every_step, s1, est1 = _train(small_model, tmp_path / "one", 1)
    tenth, s10, est10 = _train(small_model, tmp_path / "ten", 10)
    assert tenth <= every_step / 10, (tenth, every_step)
    module_files = sum(s10.path(n).stat().st_size for n in s10.trainable)
    # One commit: every module once, two journals, nothing else (no boundary gradients, no scratch).
    assert module_files <= tenth <= module_files + 20_000, (tenth, module_files)
    assert tenth / STEPS == pytest.approx(est10["written"], rel=0.05)
    assert every_step / STEPS == pytest.approx(est1["written"], rel=0.05)
    assert est10["commit_every"] == 10 and est1["commit_every"] == 1
    for s in (s1, s10):
        assert s.journal()["step"] == STEPS and s.journal()["phase"] == "idle"
    for n in s1.trainable:
        a, b = s1.read(n), s10.read(n)
        assert a.step == b.step == STEPS
        for k in a.params:
            assert torch.equal(a.params[k], b.params[k]), (n, k)
        for k, st in a.optim.items():
            for key, t in st.items():
                assert torch.equal(t, b.optim[k][key]), (n, k, key)
    assert not list((tmp_path / "ten" / "store").glob("*.commit.blk"))


def _same_store(a: BlockStore, b: BlockStore):
    for n in a.trainable:
        x, y = a.read(n), b.read(n)
        assert x.step == y.step
        for k in x.params:
            assert torch.equal(x.params[k], y.params[k]), (n, k)
        for k, st in x.optim.items():
            for key, t in st.items():
                assert torch.equal(t, y.optim[k][key]), (n, k, key)


def test_an_interval_commit_is_written_while_the_next_step_runs(small_model, tmp_path, monkeypatch):
    """The commit after step 1 is still being written when step 2's forward begins (its last staged write,
    the embedding's, waits for that forward); step 2 ends only once that commit is on disk; and the run
    ends in the bits of every-step commits."""
    import slowllama.faults as faults

    _, every_step, _ = _train(small_model, tmp_path / "one", 1)
    cfg = TrainConfig(optim=OptimConfig("adamw", lr=1e-2), ram_budget=None, dropout=0.1, commit_every=2)
    store = prepare(open_checkpoint(small_model), tmp_path / "two" / "store")
    tr = Trainer(store, tmp_path / "two" / "work", CPU, cfg)
    forward_2, waited = threading.Event(), []
    point, write = faults.point, store.write

    def watching(event):
        if event == "forward" and tr.update.step == 2:
            forward_2.set()
        point(event)

    def gated(name, block, path=None):
        if path is not None and name == store.trainable[0] and not waited:
            waited.append(forward_2.wait(10))
        return write(name, block, path)

    monkeypatch.setattr(faults, "point", watching)
    monkeypatch.setattr(store, "write", gated)
    journals = []
    try:
        for inputs, targets in _batches(store.args.vocab_size):
            tr.train_step(inputs, targets)
            journals.append(BlockStore(store.root).journal()["step"])
        tr.commit()
    finally:
        tr.close()
    assert waited == [True]  # the embedding's staged write went on only once step 2 had begun
    # On disk when a step ends: the commit before the one just queued (steps 2, 4, ...: commits after 1, 3, ...).
    assert journals == [0, 0, 2, 2, 4, 4, 6, 6, 8, 8], journals
    assert BlockStore(store.root).journal()["step"] == STEPS
    _same_store(every_step, BlockStore(store.root))
    assert not list(store.root.glob("*.commit.blk"))


def test_a_commit_keeps_the_modules_the_budget_holds_for_the_next_step(small_model, tmp_path, monkeypatch):
    """At the smallest budget that holds the trained state (the module cache alone is smaller than the model), no
    module is read after the first step: a commit's files, written past the page cache, are never read back
    (that the cache keeps a committed module is test_write_queue's), and the bits are every-step commits'."""
    cfg = TrainConfig(optim=OptimConfig("adamw", lr=1e-2), dropout=0.1, commit_every=2)
    store = prepare(open_checkpoint(small_model), tmp_path / "store")
    probe = Trainer(store, tmp_path / "probe", CPU, dataclasses.replace(cfg, ram_budget=None))
    ram = sum(s.ram for s in probe.sizes)

    def plan(budget):
        return plan_step(dataclasses.replace(cfg, ram_budget=budget), probe.args, probe.sizes, 2, 2, 16,
                         probe.device_budget)
    budget = next(b for b in range(ram // 50, 8 * ram, ram // 50)
                  if holds_trained_state(cfg, plan(b), probe.sizes))
    probe.close()
    assert plan(budget).cache_budget < ram  # the cache alone cannot keep every module
    _, every_step, _ = _train(small_model, tmp_path / "one", 1)
    tr = Trainer(store, tmp_path / "work", CPU, dataclasses.replace(cfg, ram_budget=budget))
    reads, read = [], store.read
    monkeypatch.setattr(store, "read", lambda name, *a, **kw: reads.append((tr.update.step, name)) or
                        read(name, *a, **kw))
    try:
        for inputs, targets in _batches(store.args.vocab_size):
            tr.train_step(inputs, targets)
        tr.commit()
        assert tr.commit_interval == 2
    finally:
        tr.close()
    assert reads and all(step == 0 for step, _ in reads), reads
    _same_store(every_step, BlockStore(store.root))


def _data(tmp_path):
    p = tmp_path / "data.txt"
    p.write_text(CORPUS.read_text(encoding="utf-8")[:4000], encoding="utf-8")
    return p


def _args(model, data, base, every) -> list[str]:
    return [str(model), "--data", str(data), "--out", str(base / "out"), "--work-dir", str(base / "work"), *ARGS,
            "--commit-every", str(every)]


def _tensors(folder) -> dict:
    return {p.name: torch.load(p, map_location="cpu", weights_only=True) for p in sorted(folder.glob("*.pth"))}


def _assert_same(got: dict, want: dict, what: str):
    assert sorted(got) == sorted(want) and want, what
    for f, tensors in want.items():
        assert list(got[f]) == list(tensors), what
        for k, t in tensors.items():
            assert torch.equal(got[f][k], t), f"{what}: {f}:{k} is not bit-identical"


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(small_model, tmp_path_factory):
    """An uninterrupted run committing every step (the reference), and the same run at --commit-every 3
    traced: every fault point it passes, in order, with the file it concerns."""
    data = _data(tmp_path_factory.mktemp("ce-data"))
    ref = tmp_path_factory.mktemp("ce-ref")
    r = run_finetune(_args(small_model, data, ref, 1))
    assert r.returncode == 0, r.stderr[-3000:]
    traced = tmp_path_factory.mktemp("ce-traced")
    t = _run_traced(_args(small_model, data, traced, 3))
    assert t.returncode == 0, t.stderr[-3000:]
    assert "every 3 iterations (--commit-every 3)" in t.stdout, t.stdout
    trace = [tuple(x) for x in json.loads(next(ln for ln in t.stderr.splitlines() if ln.startswith("TRACE "))[6:])]
    want = {"out": _tensors(ref / "out"), "ckpt": _tensors(ref / "out" / "checkpoint-000004"),
            "losses": [x["loss"] for x in _log(ref / "out") if "loss" in x]}
    _assert_same(_tensors(traced / "out"), want["out"], "--commit-every 3, uninterrupted")
    _assert_same(_tensors(traced / "out" / "checkpoint-000004"), want["ckpt"], "--commit-every 3's checkpoint")
    return small_model, data, want, trace


def _run_traced(args):
    return subprocess.run([sys.executable, "-c", TRACING, *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=180, check=False)


def _nth(trace, i: int) -> str:
    """The kill point "event:n" that stops a run at trace[i]: the n-th time its event is reached."""
    event = trace[i][0]
    return f"{event}:{sum(1 for e, _ in trace[:i + 1] if e == event)}"


def kill_point(trace, where: str) -> str:
    staged = [i for i, (e, f) in enumerate(trace) if f.endswith(".commit.blk")]
    first = staged[0]
    installs = [i for i, (e, f) in enumerate(trace) if i > first and e == "after_rename"
                and f.endswith(".blk") and not f.endswith(".commit.blk")]
    if where == "inside a commit, before its commit point":  # the second module being staged
        return _nth(trace, [i for i in staged if trace[i][0] == "before_rename"][1])
    if where == "inside a commit, after its commit point":  # the first staged file renamed into place
        return _nth(trace, installs[0])
    idle = next(i for i in range(installs[0], len(trace)) if trace[i] == ("after_rename", "journal.json"))
    if where == "right after a commit":  # the "idle" journal that ends the first commit
        return _nth(trace, idle)
    # between commits: the last module of a held step going down, after the checkpoint's commit (which waits
    # until it is on disk) and before the closing one. An interval commit is written while the next step
    # runs, so the steps right after it could pass this point with it still in flight.
    starts = [i for i in staged if trace[i] == ("before_fsync", trace[first][1])]
    return _nth(trace, max(i for i in range(starts[1], starts[2]) if trace[i][0] == "backward"))


KILLS = {  # where -> (the journal's phase after the kill, the step it names, staged files left)
    "inside a commit, before its commit point": ("idle", 0, True),
    "inside a commit, after its commit point": ("commit", 3, True),
    "between commits": ("idle", 4, False),
    "right after a commit": ("idle", 3, False),
}


@pytest.mark.crash
@pytest.mark.parametrize("where", list(KILLS))
def test_kill_and_resume_is_bit_identical(runs, where, tmp_path):
    model, data, want, trace = runs
    kill = kill_point(trace, where)
    args = _args(model, data, tmp_path, 3) + ["--tensorboard", str(tmp_path / "tb")]
    r = run_finetune(args, kill=kill)
    assert r.returncode == -signal.SIGKILL, f"{kill}: rc {r.returncode}\n{r.stderr[-3000:]}"
    store = tmp_path / "work" / "store"
    j = json.loads((store / "journal.json").read_text()) if (store / "journal.json").exists() else \
        {"phase": "idle", "step": 0}
    phase, step, staged = KILLS[where]
    assert (j["phase"], j["step"], bool(list(store.glob("*.commit.blk")))) == (phase, step, staged), (kill, j)
    r2 = run_finetune(args + ["--resume"])
    assert r2.returncode == 0, f"{kill}: resume failed\n{r2.stderr[-3000:]}"
    _assert_same(_tensors(tmp_path / "out"), want["out"], f"{where} ({kill})")
    _assert_same(_tensors(tmp_path / "out" / "checkpoint-000004"), want["ckpt"], f"{where} ({kill}): checkpoint")
    recs = [x for x in _log(tmp_path / "out") if "loss" in x]
    assert [x["iter"] for x in recs] == list(range(6)), f"{kill}: each iteration logged once, in order"
    assert [x["loss"] for x in recs] == want["losses"]
    # TensorBoard's reader too sees each iteration once: the resume purged the replayed steps' first events.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == \
        [(x["iter"], pytest.approx(x["loss"], rel=1e-6)) for x in recs], kill
    assert not list(store.glob("*.commit.blk"))
    assert json.loads((store / "journal.json").read_text())["phase"] == "idle"


def test_a_budget_too_small_commits_every_step_and_says_so(small_model, tmp_path, capsys):
    data = _data(tmp_path)
    kw = {"model_dir": small_model, "data": data, "iters": 3, "batch_size": 2, "seq_len": 16, "lr": 1e-2,
          "device": "cpu", "commit_every": "10"}
    finetune(out=tmp_path / "small", ram_budget="0", **kw)
    printed = capsys.readouterr().out
    assert "commits: every iteration (--commit-every 10 needs a --ram-budget that holds every module" in printed
    store = BlockStore(tmp_path / "small.work" / "store")
    modules = sum(store.path(n).stat().st_size for n in store.trainable)
    recs = [x for x in _log(tmp_path / "small") if "loss" in x]
    assert len(recs) == 3 and all(x["bytes_written"] >= modules for x in recs), (modules, recs)
    # The same run with room for the modules: nothing written in an iteration, one commit before the export.
    finetune(out=tmp_path / "room", ram_budget="none", **kw)
    assert "every 10 iterations (--commit-every 10)" in capsys.readouterr().out
    recs = [x for x in _log(tmp_path / "room") if "loss" in x]
    assert len(recs) == 3 and all(x["bytes_written"] < modules / 100 for x in recs), recs
    assert BlockStore(tmp_path / "room.work" / "store").journal()["step"] == 3
    with pytest.raises(ConfigError, match="--commit-every '0'"):
        finetune(out=tmp_path / "bad", ram_budget="none", **{**kw, "commit_every": "0"})


@pytest.mark.parametrize("reevaluates", [False, True])
def test_a_resume_cuts_the_log_back_to_the_last_commit(tmp_path, reevaluates):
    """The records of the steps a crash lost (and a line it tore) go; evaluations at the commit stay unless the
    resume evaluates there again."""
    from slowllama.run.loop import _drop_records_from

    log = tmp_path / "train_log.jsonl"
    recs = [{"iter": i, "loss": 1.0 / (i + 1)} for i in range(5)] + [{"iter": 3, "val_loss": 0.5}]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"iter": 5, "lo')
    _drop_records_from(log, 3, reevaluates)
    assert _log(tmp_path) == recs[:3] + ([] if reevaluates else [recs[5]])
    before = log.read_bytes()
    _drop_records_from(log, 3, reevaluates)  # nothing more to drop: the file is left as it is
    assert log.read_bytes() == before


@pytest.mark.parametrize("variant", ["clipped", "tied", "bf16 store"])
def test_held_steps_give_the_bits_of_every_step_commits(variant, small_model, tied_hf, tmp_path):
    """The paths a held step takes differently (the norm-only pass's journal, the tied output's gradient kept
    in RAM instead of tied.blk, stochastic rounding into a 16-bit store) end in the same bits."""
    model = tied_hf if variant == "tied" else small_model
    dtype = torch.bfloat16 if variant == "bf16 store" else torch.float32
    stores = []
    for every in (1, 2):
        cfg = TrainConfig(optim=OptimConfig("sgd", lr=1e-2, momentum=0.9), ram_budget=None, dropout=0.1,
                          clip_grad_norm=0.05 if variant == "clipped" else 0.0, commit_every=every)
        store = prepare(open_checkpoint(model), tmp_path / f"s{every}", dtype=dtype)
        tr = Trainer(store, tmp_path / f"w{every}", CPU, cfg)
        norms = [tr.train_step(*b).grad_norm for b in _batches(store.args.vocab_size)[:5]]
        tr.commit()
        assert tr.commit_interval == every
        tr.close()
        stores.append((BlockStore(tmp_path / f"s{every}"), norms))
    (a, norms_a), (b, norms_b) = stores
    assert norms_a == norms_b and (variant != "clipped" or all(n is not None for n in norms_a))
    assert a.journal()["step"] == b.journal()["step"] == 5
    assert a.args.tie_word_embeddings == (variant == "tied")
    for n in a.trainable:
        x, y = a.read(n), b.read(n)
        assert x.step == y.step == 5
        for k in x.params:
            assert x.params[k].dtype == dtype
            assert torch.equal(x.params[k], y.params[k]), (variant, n, k)
        for k, st in x.optim.items():
            for key, t in st.items():
                assert torch.equal(t, y.optim[k][key]), (variant, n, k, key)
    assert not list((tmp_path / "s2").glob("tied*.blk")) and not list((tmp_path / "s2").glob("grad_in*"))


def test_ctrl_c_with_steps_held_commits_them_before_it_stops(small_model, tmp_path):
    """The first Ctrl-C of an interval run stops it when the iteration ends, its held steps committed: the store's
    journal is at the last logged iteration, not at the last interval commit, and a resume replays nothing."""
    import time

    data, base = _data(tmp_path), tmp_path
    args = [str(small_model), "--data", str(data), "--out", str(base / "out"), "--work-dir", str(base / "work"),
            "--seq-len", "16", "--batch-size", "2", "--lr", "0.01", "--iters", "100000", "--commit-every", "100000"]
    p = subprocess.Popen([sys.executable, "finetune.py", *args], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    log = base / "out" / "train_log.jsonl"
    deadline = time.monotonic() + 120
    while p.poll() is None and time.monotonic() < deadline and \
            sum(1 for line in (log.read_text().splitlines() if log.exists() else []) if '"loss"' in line) < 3:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "Ctrl-C: stopping when this iteration ends" in err and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted"), err[-2000:]
    logged = [r["iter"] for r in _log(base / "out") if "loss" in r]
    assert len(logged) >= 3 and logged == list(range(len(logged)))
    assert BlockStore(base / "work" / "store").journal()["step"] == len(logged)


def test_a_second_ctrl_c_or_nothing_held_stops_at_once():
    from slowllama.run.interrupt import StopAfterIteration

    with StopAfterIteration(lambda: False) as stop, pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    assert not stop.requested
    with StopAfterIteration(lambda: True) as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
