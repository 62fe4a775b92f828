"""The read-buffer pool: a buffer is handed out again only when no tensor still uses it."""
import torch

from slowllama.engine.streamer import BufferPool


def test_a_buffer_is_reused_only_after_every_view_is_gone():
    pool = BufferPool()
    a = pool(1000)
    ptr = a.data_ptr()
    weight = a[64:128].view(torch.float32)  # what a module's parameter is
    del a
    b = pool(1000)
    assert b.data_ptr() != ptr  # the parameter still lives in the first buffer
    del b, weight
    assert pool(1000).data_ptr() == ptr


def test_an_autograd_reference_keeps_a_buffer_busy():
    pool = BufferPool()
    a = pool(4096)
    ptr = a.data_ptr()
    w = torch.nn.Parameter(a.view(torch.float32)[:16].view(4, 4))
    y = (torch.ones(2, 4) @ w).sum()  # the graph saves w for the backward
    del a, w
    assert pool(4096).data_ptr() != ptr
    y.backward()
    del y
    assert pool(4096).data_ptr() == ptr


def test_free_buffers_kept_are_bounded():
    pool = BufferPool(keep_free=1)
    bufs = [pool(1000) for _ in range(4)]
    assert len(pool._held) == 4
    del bufs
    pool(500)  # no free buffer of this size: a new one, and only one free buffer is kept
    assert len(pool._held) == 2


def test_a_buffer_waits_for_its_asynchronous_copy():
    class Event:
        waited = 0

        def synchronize(self):
            Event.waited += 1

    pool = BufferPool()
    a = pool(100)
    ptr = a.data_ptr()
    pool.fence(a, Event())
    del a
    assert pool(100).data_ptr() == ptr and Event.waited == 1
    pool.fence(torch.empty(100, dtype=torch.uint8), Event())  # not the pool's: ignored
    assert len(pool._fences) == 0


def test_without_reference_counts_every_read_gets_a_new_buffer(monkeypatch):
    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    pool = BufferPool()
    a = pool(100)
    assert pool._held == [] and a.numel() == 100


def test_a_buffer_keeps_every_pending_copy():
    waited = []

    class Event:
        def __init__(self, n):
            self.n = n

        def synchronize(self):
            waited.append(self.n)

    pool = BufferPool()
    a = pool(100)
    ptr = a.data_ptr()
    pool.fence(a, Event(1))
    pool.fence(a, Event(2))  # a second copy out of the same buffer, on another stream
    assert pool.pending(a) == 2
    del a
    assert pool(100).data_ptr() == ptr and waited == [1, 2]


def test_a_sized_pool_serves_any_request_from_one_buffer():
    pool = BufferPool(size=4096)
    a = pool(1000)
    ptr = a.data_ptr()
    assert a.numel() == 1000
    del a
    b = pool(3000)
    assert b.data_ptr() == ptr and b.numel() == 3000 and len(pool._held) == 1


def test_the_free_buffer_kept_is_the_largest():
    """At budget 0 a small module's free buffer (the embedding's) was kept instead of a block's, and
    every read of the reverse pass faulted in a new block-sized buffer."""
    pool = BufferPool(keep_free=1)
    small, large = pool(100), pool(10_000)
    ptr = large.data_ptr()
    del small, large
    pool.trim()
    assert [b.numel() for b in pool._held] == [10_000]
    assert pool(10_000).data_ptr() == ptr
    small = pool(100)
    del small
    other = pool(50)  # a read of another size: the free buffer it leaves is the smallest, not a block's
    assert sorted(b.numel() for b in pool._held) == [50, 100] and other.numel() == 50
