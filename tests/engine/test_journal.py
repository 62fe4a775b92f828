"""The commit protocol's contract: one ordered writer, the order of a module's commit, the batch a
resume must finish on, and block files that say which module of which store they hold."""
from __future__ import annotations

import shutil

import pytest
import torch

from slowllama import faults
from slowllama.blockfile import StoreError
from slowllama.engine.journal import Journal, batch_hash
from slowllama.engine.optim import OptimConfig
from slowllama.engine.store import BlockStore, prepare
from slowllama.engine.trainer import TrainConfig, Trainer
from slowllama.formats.meta import MetaCheckpoint
from tests.reference import random_batch


class Recorder:
    """A writer that runs jobs at once and records them: the order the protocol asks for."""

    ORDERED_WRITER = True

    def __init__(self):
        self.jobs = []

    def run_in_order(self, fn):
        self.jobs.append(("call", fn))

    def put(self, name, block, on_commit=None):
        self.jobs.append(("module", name))


class Unordered:
    def run_in_order(self, fn):
        fn()


@pytest.fixture
def store(gqa_model, tmp_path):
    return prepare(MetaCheckpoint(gqa_model), tmp_path / "store")


def test_the_protocol_refuses_a_writer_that_does_not_promise_order(store):
    with pytest.raises(TypeError, match="submission order"):
        Journal(store, Unordered())


def test_a_module_commit_is_gradient_then_module_then_stale_gradient(store):
    rec = Recorder()
    j = Journal(store, rec)
    block = store.read("layers.1")
    j.commit(2, "layers.1", 0, block, [torch.zeros(1, 2, store.args.dim)])
    kinds = [k for k, *_ in rec.jobs]
    assert kinds == ["call", "module", "call"]
    # The first call writes grad_in.2 (durable before the module is replaced), the last removes grad_in.3.
    rec.jobs[0][1]()
    assert j.grad_path(2).exists()
    j.grad_path(3).write_bytes(b"stale")
    rec.jobs[2][1]()
    assert not j.grad_path(3).exists() and j.grad_path(2).exists()


def _crash_in_backward(store, work, batch, at: int):
    """Run a step that dies at the at-th backward event, as a kill would, with its writes flushed."""
    tr = Trainer(store, work, torch.device("cpu"), TrainConfig(optim=OptimConfig("sgd", lr=0.1)))
    real = faults.point
    seen = {"n": 0}

    def point(event):
        if event == "backward":
            seen["n"] += 1
            if seen["n"] == at:
                tr.streamer.flush()
                raise KeyboardInterrupt
        real(event)

    faults.point = point
    try:
        with pytest.raises(KeyboardInterrupt):
            tr.train_step(*batch)
    finally:
        faults.point = real
        tr.close()


def test_a_resume_on_another_batch_is_refused(store, tmp_path):
    batch = random_batch(store.args.vocab_size, 2, 8, 0)
    other = random_batch(store.args.vocab_size, 2, 8, 1)
    _crash_in_backward(store, tmp_path, batch, at=4)
    assert BlockStore(store.root).journal()["batch"] == batch_hash(*batch)
    tr = Trainer(BlockStore(store.root), tmp_path, torch.device("cpu"), TrainConfig(optim=OptimConfig("sgd", lr=0.1)))
    try:
        with pytest.raises(StoreError, match="another batch"):
            tr.recover(lambda step: other)
        assert tr.recover(lambda step: batch).step == 0  # the right batch finishes the step
    finally:
        tr.close()


def test_a_block_read_as_another_module_or_from_another_store_is_refused(gqa_model, store, tmp_path):
    shutil.copyfile(store.path("layers.0"), store.path("layers.1"))
    with pytest.raises(StoreError, match=r"layers\.001\.blk: holds 'layers\.0', not 'layers\.1'"):
        store.read("layers.1")
    other = prepare(MetaCheckpoint(gqa_model), tmp_path / "other")
    shutil.copyfile(other.path("layers.2"), store.path("layers.2"))
    with pytest.raises(StoreError, match=r"layers\.002\.blk: module layers\.2 of another model or store"):
        store.read("layers.2")


def test_an_older_copy_of_a_module_is_caught_by_the_journal_checksum(store, tmp_path):
    old = tmp_path / "old.blk"
    shutil.copyfile(store.path("norm"), old)
    tr = Trainer(store, tmp_path, torch.device("cpu"), TrainConfig(optim=OptimConfig("sgd", lr=0.1)))
    tr.train_step(*random_batch(store.args.vocab_size, 2, 8, 0))
    tr.close()
    fresh = BlockStore(store.root)
    # Same version as recorded, other bytes: a copy from another run at the same step.
    block = fresh.read("norm")
    block.params["weight"] = block.params["weight"] + 1
    from slowllama.blockfile import write_block

    write_block(fresh.path("norm"), block, "norm", model=fresh.model_id)
    with pytest.raises(StoreError, match=r"norm\.blk: module norm at version 1 has checksum .* the journal recorded"):
        BlockStore(store.root).read("norm")
    shutil.copyfile(old, fresh.path("norm"))  # the version before the step
    tr = Trainer(BlockStore(store.root), tmp_path, torch.device("cpu"), TrainConfig(optim=OptimConfig("sgd", lr=0.1)))
    try:
        with pytest.raises(StoreError, match=r"norm\.blk: module norm is at version 0 but the journal says 1"):
            tr.update.resume_point()
    finally:
        tr.close()
