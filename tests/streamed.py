"""Helpers for tests that drive the streamed Trainer itself: a simulated kill, a run through one,
and one step's disk bytes."""
from __future__ import annotations

import pytest
import torch

from slowllama import faults
from slowllama.engine.store import BlockStore, prepare
from slowllama.engine.trainer import Trainer
from slowllama.fsutil import IO

CPU = torch.device("cpu")


def crash_at(trainer, monkeypatch, event: str, n: int):
    """Stop the n-th time `event` is reached, as a kill would, the writes queued so far flushed."""
    seen = [0]

    def point(e):
        if e == event:
            seen[0] += 1
            if seen[0] == n:
                trainer.streamer.flush()
                raise KeyboardInterrupt
    monkeypatch.setattr(faults, "point", point)


def steady_step_io(trainer, batches) -> tuple[int, int]:
    """(bytes read, bytes written) by the step on batches[2], after two steps have filled the caches."""
    for b in batches[:2]:
        trainer.train_step(*b)
    trainer.streamer.flush()
    r0, w0 = IO.snapshot()
    trainer.train_step(*batches[2])
    trainer.streamer.flush()
    r1, w1 = IO.snapshot()
    return r1 - r0, w1 - w0


def train_through_a_crash(root, checkpoint, cfg, batches, monkeypatch, crash=None, **prepare_kw):
    """Train on batches from a store prepared in root (prepare_kw: prepare's options); with crash (event, n),
    stop there as a kill would, then finish in a new Trainer (a new process) after its recover(). Returns
    (the store, the resume point's first updated module or None, what recover returned)."""
    tr = Trainer(prepare(checkpoint, root / "s", **prepare_kw), root / "w", CPU, cfg)
    point = rec = None
    if crash is not None:
        with monkeypatch.context() as mp:
            crash_at(tr, mp, *crash)
            with pytest.raises(KeyboardInterrupt):
                for b in batches:
                    tr.train_step(*b)
        tr.close()
        tr = Trainer(BlockStore(root / "s"), root / "w", CPU, cfg)
        point = tr.update.resume_point()
        rec = tr.recover(lambda s: batches[s])
    for b in batches[tr.step:]:
        tr.train_step(*b)
    tr.close()
    return BlockStore(root / "s"), point and point.first_updated, rec


def assert_cut_short_step_resumes_bit_identically(folder, tmp_path, monkeypatch, vocab: int, crash=("backward", 7)):
    """An AdamW run with dropout on folder's model, killed at crash (mid reverse pass of its second step by default)
    and resumed in a new Trainer, holds the bits of a run never cut short: weights, optimizer state, journal."""
    from slowllama.engine.optim import OptimConfig
    from slowllama.engine.trainer import TrainConfig
    from slowllama.formats import open_checkpoint
    from tests.engine.test_turn import _diff
    from tests.reference import random_batch, whole_store

    batches = [random_batch(vocab, 2, 16, i) for i in range(3)]
    cfg = TrainConfig(optim=OptimConfig("adamw", lr=1e-3), seed=2, dropout=0.1, micro_batch=1)
    want = whole_store(train_through_a_crash(tmp_path / "straight", open_checkpoint(folder), cfg, batches,
                                             monkeypatch)[0])
    store, first_updated, _ = train_through_a_crash(tmp_path / "crash", open_checkpoint(folder), cfg, batches,
                                                    monkeypatch, crash)
    assert first_updated is not None  # the kill came after a module of the step was committed
    assert _diff(whole_store(store), want) is None
