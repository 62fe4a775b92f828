"""Writes queue past the step while the RAM budget holds them, so that the last commits of a step are
written while the next step's forward runs; a module is never stepped in place while its last version
still waits for the writer (Streamer.wait_written)."""
import threading
import time

import torch

from slowllama.blockfile import Block
from slowllama.engine.distributed import digest
from slowllama.engine.optim import OptimConfig
from slowllama.engine.store import prepare
from slowllama.engine.streamer import Streamer
from slowllama.engine.trainer import TrainConfig, Trainer
from slowllama.engine.update import FullUpdate
from slowllama.formats.meta import MetaCheckpoint
from tests.reference import random_batch, reference_model, reference_step, stored_params

SGD = OptimConfig("sgd", lr=0.05, momentum=0.9)  # momentum: the optimizer state is stepped in place too


def test_put_queues_past_one_write_only_within_the_budget(gqa_model, tmp_path, monkeypatch):
    store = prepare(MetaCheckpoint(gqa_model), tmp_path / "store")
    release = threading.Event()
    write = store.write
    monkeypatch.setattr(store, "write", lambda name, block: release.wait(5) and write(name, block))
    names = store.trainable[1:4]
    for budget, queued in ((0, 1), (1 << 30, 3)):
        release.clear()
        s = Streamer(store, ram_budget=budget)
        try:
            blocks = {n: s.get(n) for n in names}
            done = threading.Event()

            def put_all():
                for n in names:
                    s.put(n, Block(blocks[n].step + 1, {k: v.clone() for k, v in blocks[n].params.items()}))
                done.set()

            threading.Thread(target=put_all, daemon=True).start()
            time.sleep(0.3)
            assert done.is_set() == (queued == len(names)) and s._queued == queued, (budget, s._queued)
            release.set()
            assert done.wait(5)
            s.wait_written(names[-1])
            assert names[-1] not in s._pending
        finally:
            release.set()
            s.close()


def test_a_module_is_stepped_only_once_its_last_version_is_written(gqa_model, tmp_path, monkeypatch):
    """The writes of step 0 are held until step 1's backward begins: step 1 must wait for each module's
    step-0 write before stepping it in place, so every file holds the bytes its version was put with,
    and the weights are autograd's. Without wait_written the writer stores step 1's bytes as step 0's."""
    args = MetaCheckpoint(gqa_model).args
    batches = [random_batch(args.vocab_size, 4, 12, 40 + i) for i in range(2)]
    model = reference_model(gqa_model)
    opt = SGD.make(list(model.parameters()))
    ref_losses = [reference_step(model, opt, *b, seed=5, step=i) for i, b in enumerate(batches)]
    store = prepare(MetaCheckpoint(gqa_model), tmp_path / "store")
    tr = Trainer(store, tmp_path / "work", torch.device("cpu"), TrainConfig(optim=SGD, seed=5, ram_budget=None))
    backward_1 = threading.Event()  # step 1's first commit has begun
    put_as, wrong, most_queued = {}, [], []
    commit = FullUpdate.commit

    def watched_commit(self, step, *a, **kw):
        if step == 1:
            most_queued.append(tr.streamer._queued)
            backward_1.set()
        return commit(self, step, *a, **kw)

    put = tr.streamer.put

    def recording_put(name, block, on_commit=None):
        put_as[name, block.step] = digest(block)
        return put(name, block, on_commit)

    write = store.write

    def held_write(name, block):
        if block.step == 1:
            backward_1.wait(5)
            time.sleep(0.02)  # and let the trainer run into its optimizer step, if nothing stops it
        if digest(block) != put_as[name, block.step]:
            wrong.append((name, block.step))
        return write(name, block)

    monkeypatch.setattr(FullUpdate, "commit", watched_commit)
    monkeypatch.setattr(tr.streamer, "put", recording_put)
    monkeypatch.setattr(store, "write", held_write)
    try:
        losses = [tr.train_step(*b).loss for b in batches]
        tr.streamer.flush()
    finally:
        tr.close()
    assert most_queued[0] == len(store.trainable)  # every step-0 write still queued as step 1's backward began
    assert wrong == []
    assert losses == ref_losses
    got, want = stored_params(store), model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert store.verify() == []


def test_a_staged_module_stays_cached_until_its_file_is_renamed(gqa_model, tmp_path):
    """An interval commit writes a module beside its file and renames it later (journal.py, a-c); between the
    two its own file holds the version before, so the cache keeps it whatever the budget says, and lets it
    go only once installed() is told the rename is done (and not at that call: the next step holds it again)."""
    store = prepare(MetaCheckpoint(gqa_model), tmp_path / "store")
    name = store.trainable[1]
    s = Streamer(store, ram_budget=1 << 30)
    try:
        old = s.get(name)
        new = Block(old.step + 1, {k: v.clone() + 1 for k, v in old.params.items()})
        s.put(name, new, path=store.root / "staged.blk")
        s.wait_written(name)
        s.set_budget(0)
        s.release(name)
        s._evict(keep_newest=False)
        assert s.get(name) is new  # not read back from its own file, still at the version before
        s.installed([name])
        assert s.get(name) is new  # kept for the next step, which holds it again
        s._evict(keep_newest=False)
        back = s.get(name)  # now the cache let it go: this read is the file's (not renamed here)
        assert back is not new and back.step == old.step
    finally:
        s.close()
