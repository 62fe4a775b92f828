"""What a step at --ram-budget 0 keeps in RAM: the module computing and one being read or written,
no free read buffers left behind, no copies on the way to the disk; a 16-bit store widened once per read."""
import threading
import time

import numpy as np
import torch

from slowllama.blockfile import Block, encode_block
from slowllama.engine.optim import OptimConfig
from slowllama.engine.store import prepare
from slowllama.engine.streamer import BufferPool, Streamer, widen_params
from slowllama.engine.trainer import TrainConfig, Trainer
from slowllama.formats.meta import MetaCheckpoint
from tests.reference import random_batch

SHAPE = dict(dim=64, n_layers=3, n_heads=4)


def _address(chunk) -> int:
    return np.asarray(memoryview(chunk).cast("B")).__array_interface__["data"][0]


def test_encode_block_hands_the_tensors_own_bytes_to_the_writer():
    w = torch.randn(64, 32)
    state = torch.randn(64, 32)
    chunks, _ = encode_block(Block(1, {"w": w}, {"w": {"momentum_buffer": state}}), "layers.0")
    addresses = {_address(c) for c in chunks if len(memoryview(c).cast("B"))}
    assert w.data_ptr() in addresses and state.data_ptr() in addresses


def _in_use(pool: BufferPool) -> int:
    """Bytes of the pool's buffers that some tensor still points into."""
    return sum(b.numel() for b in pool._held if pool._refs(b) != pool._idle)


def test_budget_0_reads_a_module_only_once_the_one_written_has_committed(model_factory, tmp_path, monkeypatch):
    src = model_factory("mem-phases", **SHAPE)
    store = prepare(MetaCheckpoint(src), tmp_path / "store")
    size = {n: store.path(n).stat().st_size for n in store.trainable}  # the data plus a header
    layer = max(size[n] for n in store.trainable if n.startswith("layers."))
    # At the turn: the last block, the norm and the output layer, and the next block being read.
    bound = 2 * layer + size["norm"] + size["output"]
    write = store.write

    def slow_write(name, block):
        time.sleep(0.05)  # a disk slower than the compute: the next read would overlap the write
        return write(name, block)

    monkeypatch.setattr(store, "write", slow_write)
    tr = Trainer(store, tmp_path / "work", torch.device("cpu"),
                 TrainConfig(optim=OptimConfig("sgd", lr=1e-3), ram_budget=0))
    seen = []

    class CountingPool(BufferPool):
        def __call__(self, nbytes):  # what is in use when a read asks for its buffer, the new one included
            buf = super().__call__(nbytes)
            seen.append(_in_use(self))
            return buf

    tr.streamer.buffers.__class__ = CountingPool
    try:
        vocab = store.args.vocab_size
        for step in range(2):
            tr.train_step(*random_batch(vocab, 2, 8, step))
        tr.streamer.flush()
        # the module computing and the one being read; never a third block (the one being written)
        assert max(seen) <= bound, (max(seen), bound, layer)
        # after the step no free buffer beyond the one kept for the next read holds RAM
        pool = tr.streamer.buffers
        free = [b.numel() for b in pool._held if pool._refs(b) == pool._idle]
        assert len(free) <= pool.keep_free, free
    finally:
        tr.close()


def test_the_reader_waits_for_a_write_the_budget_cannot_hold(model_factory, tmp_path, monkeypatch):
    src = model_factory("mem-phases", **SHAPE)
    store = prepare(MetaCheckpoint(src), tmp_path / "store")
    release, writing = threading.Event(), threading.Event()
    write = store.write

    def held_write(name, block):
        writing.set()
        release.wait(5)
        return write(name, block)

    monkeypatch.setattr(store, "write", held_write)
    for budget, waits in ((0, True), (1 << 30, False)):
        release.clear()
        writing.clear()
        s = Streamer(store, ram_budget=budget)
        try:
            b = s.get("layers.0")
            s.put("layers.0", Block(b.step + 1, {k: v.clone() for k, v in b.params.items()}))
            assert writing.wait(5)
            s.prefetch(["layers.1"])
            time.sleep(0.2)
            assert ("layers.1" in s._reads and not s._reads["layers.1"].done()) == waits
            release.set()
            assert s.get("layers.1").params
        finally:
            release.set()
            s.close()


def test_a_16_bit_store_is_widened_once_per_read_into_a_reused_buffer():
    pool = BufferPool()
    params = {"w": torch.randn(8, 16).to(torch.bfloat16), "n": torch.randn(16).to(torch.bfloat16)}
    block = Block(0, dict(params))
    assert widen_params(block, torch.float32, pool) > 0
    assert all(block.params[k].dtype == torch.float32 and torch.equal(block.params[k], params[k].float())
               for k in params)
    ptr = block.params["w"].data_ptr()
    del block
    again = Block(0, dict(params))
    widen_params(again, torch.float32, pool)
    assert again.params["w"].data_ptr() == ptr  # the first cast's buffer, free again, is reused
    narrow = Block(0, {"w": torch.randn(4)})
    assert widen_params(narrow, torch.bfloat16, pool) == 0 and narrow.params["w"].dtype == torch.float32


def test_the_benchmarks_phase_peaks_charge_each_part_its_own_peak():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from _phases import PhasePeaks

    split = PhasePeaks()
    if not split.exact:
        import pytest

        pytest.skip("VmHWM cannot be reset here")
    big = 256 << 20
    with split.part("outer"):
        with split.part("inner"):
            x = np.ones(big // 8)  # touched: resident
            del x
        y = np.zeros(1)
    with split.part("after"):
        del y
    assert split.peaks["inner"] >= split.peaks["outer"] + big * 0.9
    assert split.peaks["after"] < split.peaks["inner"] - big * 0.9
