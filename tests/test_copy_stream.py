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

from slowllama import blackbox
from slowllama.checkpoint import MetaCheckpoint
from slowllama.store import prepare


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
    s.buffers.pin_memory = False  # page-locked memory needs a real GPU
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
        assert block.buffer.data_ptr() in s.buffers._fences  # the read buffer waits for the copy
        # Not staged any more: a second use copies on the compute stream.
        s.to_device(block, torch.bfloat16)
        assert len(copies) == 2 * len(block.params)
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
