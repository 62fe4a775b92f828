"""The CUDA copy-stream logic of the Streamer, run here with CUDA's stream and event API faked.

No GPU is needed: the fakes record which copies were issued, on which stream, and what
the compute stream waited for. What is checked is the bookkeeping that real hardware
relies on: a prefetched module is copied ahead on the copy stream, the compute stream
waits for that copy, the copy is not issued twice, its pinned buffer is fenced, and
only a bounded number of modules is staged on the device.
"""
import contextlib

import pytest
import torch

from slowllama.engine import streamer as blackbox
from slowllama.engine.store import prepare
from slowllama.formats.meta import MetaCheckpoint


class FakeEvent:
    def __init__(self):
        self.stream = "unrecorded"

    def record(self, stream=None):
        self.stream = stream

    def synchronize(self):
        pass


class FakeStream:
    def __init__(self, device=None):
        self.waited = []

    def wait_event(self, event):
        self.waited.append(event)


@pytest.fixture
def fake_cuda(monkeypatch):
    compute = FakeStream()
    copies = []

    def copy_to_device(t, device, non_blocking=False):
        copies.append(t.data_ptr())
        return t.clone()

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None)
    monkeypatch.setattr(blackbox.dev, "to_device", copy_to_device)
    return compute, copies


def _streamer(model_dir, tmp_path, **kw):
    store = prepare(MetaCheckpoint(model_dir), tmp_path / "store")
    s = blackbox.Streamer(store, device=torch.device("cuda"), **kw)
    s.staging.pin_memory = False  # page-locked memory needs a real GPU
    return s


def test_a_prefetched_module_is_copied_ahead_and_waited_for(gqa_model, tmp_path, fake_cuda):
    compute, copies = fake_cuda
    s = _streamer(gqa_model, tmp_path)
    try:
        s.prefetch(["layers.0"])
        block = s.get("layers.0")
        assert len(copies) == len(block.params)  # issued by the reader, on the copy stream
        staged_event = next(iter(s._staged.values()))[2]
        assert staged_event.stream is s._copy_stream
        params = s.to_device(block)
        assert len(copies) == len(block.params)  # the staged copy was used, not a second one
        assert compute.waited == [staged_event]
        assert all(torch.equal(params[k], block.params[k]) for k in block.params)
        assert not s.buffers.pin_memory and not s.buffers._fences  # the read buffer is pageable and never copied from
        (stage,) = s.staging._held
        assert s.staging.pending(stage) == 1  # the staging buffer waits for the copy
        largest = max(sum(t.nbytes for t in s.store.read(n).params.values()) for n in s.store.trainable)
        assert largest <= stage.numel() < largest + 64 * 16  # sized for the largest module's parameters
        # Not staged any more: a second use copies directly, blocking, from the read buffer.
        s.to_device(block, torch.bfloat16)
        assert len(copies) == 2 * len(block.params)
        assert copies[-1] == block.params[list(block.params)[-1]].data_ptr()
    finally:
        s.close()


def test_resident_modules_are_staged_on_prefetch_and_staging_is_bounded(gqa_model, tmp_path, fake_cuda):
    s = _streamer(gqa_model, tmp_path, ram_budget=float("inf"))
    try:
        names = s.store.trainable
        for n in names:
            s.get(n)  # all resident in the cache, none staged
        assert not s._staged
        s.prefetch(names[:1])
        assert [b for b, _, _ in s._staged.values()] == [s.get(names[0])]
        s.prefetch(names[1:4])
        assert len(s._staged) == 2  # the device holds at most two modules ahead
    finally:
        s.close()


def test_cpu_stages_nothing(gqa_model, tmp_path):
    store = prepare(MetaCheckpoint(gqa_model), tmp_path / "store")
    s = blackbox.Streamer(store)
    try:
        s.prefetch(["layers.0"])
        block = s.get("layers.0")
        params = s.to_device(block)
        assert not s._staged and all(params[k] is block.params[k] for k in block.params)
    finally:
        s.close()


def test_only_parameters_are_staged_and_the_staging_buffers_are_reused(gqa_model, tmp_path, fake_cuda):
    _, copies = fake_cuda
    store = prepare(MetaCheckpoint(gqa_model), tmp_path / "store")
    block = store.read("layers.0")
    block.optim = {k: {"exp_avg": torch.zeros_like(t), "exp_avg_sq": torch.zeros_like(t)}
                   for k, t in block.params.items()}  # AdamW state: three times the parameters' bytes
    s = blackbox.Streamer(store, device=torch.device("cuda"))
    s.staging.pin_memory = False
    try:
        for _ in range(5):
            s._stage(block)
            params = s.to_device(block)
            assert len(copies) % len(block.params) == 0 and not s._staged  # the staged copy was used
        assert all(torch.equal(params[k], block.params[k]) for k in block.params)
        staged_bytes = sum(b.numel() for b in s.staging._held)
        assert len(s.staging._held) <= 2  # reused, not one per copy
        assert staged_bytes < 2 * block.nbytes / 3  # no optimizer state crosses
    finally:
        s.close()


def test_out_of_memory_while_staging_falls_back_to_the_direct_copy(gqa_model, tmp_path, fake_cuda, monkeypatch,
                                                                   caplog):
    _, copies = fake_cuda
    s = _streamer(gqa_model, tmp_path)
    real = blackbox.dev.to_device
    full = [True]

    def oom_on_copy_stream(t, device, non_blocking=False):
        if non_blocking and full[0]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
        return real(t, device, non_blocking)

    monkeypatch.setattr(blackbox.dev, "to_device", oom_on_copy_stream)
    try:
        with caplog.at_level("WARNING", logger="slowllama.engine.streamer"):
            s.prefetch(["layers.0"])
            block = s.get("layers.0")  # the reader's staging failed; the read itself did not
        assert not s._staged and "copying it when needed" in caplog.text
        params = s.to_device(block)
        assert all(torch.equal(params[k], block.params[k]) for k in block.params)
    finally:
        s.close()


def test_mps_copies_are_fenced_and_its_device_copy_counts_against_the_budget(gqa_model, tmp_path, monkeypatch):
    events = []

    class Event:
        def record(self, stream=None):
            events.append(self)

        def synchronize(self):
            events.remove(self)

    monkeypatch.setattr(torch.mps.event, "Event", Event)
    seen = []
    monkeypatch.setattr(blackbox.dev, "to_device", lambda t, d, non_blocking=False: seen.append(non_blocking) or t.clone())
    store = prepare(MetaCheckpoint(gqa_model), tmp_path / "store")
    budget = 10 << 20
    s = blackbox.Streamer(store, ram_budget=budget, device=torch.device("mps"))
    try:
        block = s.get("layers.0")
        s.to_device(block)
        assert seen and all(seen) and len(events) == 1  # non_blocking, then one fence
        assert s.buffers.pending(block.buffer) == 1
        biggest, biggest_params = blackbox.module_sizes(store)
        assert biggest == max(store.read(n).nbytes for n in store.trainable)
        assert s.budget == budget - biggest - biggest_params
    finally:
        s.close()
    cpu = blackbox.Streamer(store, ram_budget=budget)
    assert cpu.budget == budget
    cpu.close()
