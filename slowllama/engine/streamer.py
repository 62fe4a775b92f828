"""Moving stored modules between disk, host RAM and the compute device.

`Streamer` sits in front of the block store: a reader thread prefetches the
modules the trainer will want next, a writer thread commits updated modules in
order, and an LRU cache keeps as many modules in RAM as the budget allows. LRU
is the right policy because the trainer alternates direction: the blocks used
last in one pass are the first the next pass needs.
"""
from __future__ import annotations

import collections
import logging
import math
import queue
import threading
from concurrent.futures import Future
from typing import Callable

import torch
from torch import nn

from .. import compat
from .. import device as dev
from ..blockfile import DTYPES, Block
from ..model.transformer import ModelArgs, build_module
from .store import BlockStore

log = logging.getLogger(__name__)


class WriteError(OSError):
    """A background write failed; nothing after it was committed."""


class BufferPool:
    """Read buffers, handed out again once no tensor uses them.

    Reading into a new buffer costs a page fault and a zeroed page per 4 KB: a warm
    read of a 50 MB module ran at 2.0 GB/s into new buffers and 5.1 GB/s into a
    reused one, with a third of the CPU time. A buffer is free when nothing else holds
    its storage, which the storage's reference count says exactly. Torch exposes that
    count only privately (compat.storage_use_count); without it, or when it fails its
    self-check, every read gets a new buffer: a buffer still in use is never handed out.

    With size set, every buffer has at least that many bytes and any free one serves any
    request up to it: the page-locked staging buffers, sized once for the largest module,
    since the pinned allocator rounds each allocation up to a power of two and caches it.
    """

    def __init__(self, pin_memory: bool = False, keep_free: int = 1, size: int = 0):
        self.pin_memory = pin_memory
        self.keep_free = keep_free  # free buffers kept beyond those in use: RAM that holds no module
        self.size = size
        self._refs = compat.storage_use_count()  # None: every read gets a new buffer
        self._held: list[torch.Tensor] = []
        # buffer data_ptr -> events after the asynchronous copies out of it that may still run
        self._fences: dict[int, list] = {}
        self._lock = threading.Lock()
        self._idle = self._refs(torch.empty(1)) if self._refs is not None else None

    def _fits(self, b: torch.Tensor, nbytes: int) -> bool:
        return b.numel() >= nbytes if self.size else b.numel() == nbytes

    def _drop_free(self, keep: torch.Tensor | None = None, largest: bool = False) -> list[torch.Tensor]:
        """Let go of the free buffers beyond keep_free (keep, if given, is not counted); returns the free ones.
        The smallest are kept (the least RAM holding no module), or with largest the largest. Called with
        the lock held."""
        free = [b for b in self._held if self._refs(b) == self._idle]
        drop = sorted((b for b in free if b is not keep), key=lambda b: b.numel(), reverse=largest)[self.keep_free:]
        self._held = [b for b in self._held if all(b is not d for d in drop)]
        for b in drop:
            for event in self._fences.pop(b.data_ptr(), []):
                event.synchronize()  # freed memory could be reused by the allocator at once
        return free

    def trim(self):
        """Free the buffers no tensor uses beyond keep_free now, not at the next read: a buffer freed
        by a write that just committed would otherwise hold a module's worth of RAM until then.
        The largest free one stays: at budget 0 a read waits for that commit and wants a block's
        buffer (keeping the embedding's instead made every read of the reverse pass fault in a new one).
        A read that then asks for another size drops it (__call__ keeps the smallest)."""
        if self._refs is None:
            return
        with self._lock:
            self._drop_free(largest=True)

    def __call__(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            buf = None
            if self._refs is not None:
                free = [b for b in self._held if self._refs(b) == self._idle]
                buf = next((b for b in free if self._fits(b, nbytes)), None)
                self._drop_free(keep=buf)
            if buf is None:
                buf = torch.empty(max(nbytes, self.size), dtype=torch.uint8, pin_memory=self.pin_memory)
                if self._refs is not None:
                    self._held.append(buf)
            fences = self._fences.pop(buf.data_ptr(), [])
        for event in fences:
            event.synchronize()  # an asynchronous copy out of this buffer may still be running
        # A view, not the pool's own tensor: holding the returned tensor must count as a use.
        return buf[:nbytes]

    def fence(self, buffer: torch.Tensor, event):
        """The buffer must not be refilled before event, which follows a non_blocking copy out of it."""
        if event is None:
            return
        with self._lock:
            held = next((b for b in self._held if b.data_ptr() == buffer.data_ptr()), None)
        if held is None:
            # Not a pooled buffer (no reference counts): it is freed, never refilled, but the allocator
            # could hand its memory out again, so wait here instead.
            event.synchronize()
            return
        with self._lock:
            self._fences.setdefault(buffer.data_ptr(), []).append(event)

    def pending(self, buffer: torch.Tensor) -> int:
        """How many copies out of this buffer may still be running."""
        with self._lock:
            return len(self._fences.get(buffer.data_ptr(), []))


def _oom_errors() -> tuple[type[BaseException], ...]:
    return tuple(e for e in (getattr(torch, "OutOfMemoryError", None),
                             getattr(torch.cuda, "OutOfMemoryError", None)) if e is not None) or (RuntimeError,)


def module_sizes(store: BlockStore) -> tuple[int, int]:
    """(bytes of the largest module with its optimizer state, bytes of the largest module's parameters),
    from the headers alone."""
    block = params = 0
    for name in store.trainable:
        sizes = [(key, DTYPES[dt].itemsize * math.prod(shape)) for key, dt, shape, _ in store.header(name)["tensors"]]
        block = max(block, sum(n for _, n in sizes))
        params = max(params, sum(n for k, n in sizes if "#" not in k))
    return block, params


class Streamer:
    # One writer thread runs every write and call in the order queued: the commit protocol
    # (journal.py) relies on it, and checks for this promise.
    ORDERED_WRITER = True

    def __init__(self, store: BlockStore, ram_budget: int = 0, prefetch: bool = True, verify: bool = True,
                 max_pending_writes: int = 1, device: torch.device = torch.device("cpu"),
                 params_dtype: torch.dtype | None = None):
        self.store = store
        self.prefetch_enabled = prefetch
        self.verify = verify
        self.device = device
        sizes = module_sizes(store) if device.type != "cpu" else (0, 0)
        self._device_copy = sizes[0] + sizes[1] if dev.unified_memory(device) else 0
        self.set_budget(ram_budget)
        # Bytes beyond the cache's budget that queued writes and the reads waiting on them may take:
        # once the turn's modules are committed, the trainer lends them the RAM the turn held.
        self.write_allowance = 0.0
        # Read buffers are pageable. On CUDA, a prefetched module's parameters (not its optimizer
        # state) go through a page-locked staging buffer, sized once for the largest module, so
        # that the copy is asynchronous on a stream of its own while the current module computes.
        self.buffers = BufferPool()
        # A 16-bit store's parameters, widened as they are read (in the reader thread, into reused
        # buffers) to the dtype the trainer computes its master in; if not given, the dtype the
        # first to_device asks for.
        self.params_dtype = params_dtype
        self.casts = BufferPool()
        self.staging = BufferPool(pin_memory=True, keep_free=2, size=sizes[1]) if device.type == "cuda" else None
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._staged: collections.OrderedDict[int, tuple[Block, dict, object]] = collections.OrderedDict()
        # Modules this process wrote: a re-read mostly comes from the page cache, where a checksum
        # would only check RAM, so only modules that came from an earlier run are verified.
        self._written: set[str] = set()
        self._lock = threading.Lock()
        self._committed = threading.Condition(self._lock)  # notified when a queued module write commits
        self._cache: collections.OrderedDict[str, Block] = collections.OrderedDict()
        self._pending: dict[str, Block] = {}  # written, not yet committed: readers see these
        # Updated modules kept in RAM between interval commits (--commit-every): never evicted, never
        # written until the journal puts them (journal.py); readers see these first.
        self._kept: dict[str, Block] = {}
        # Modules an interval commit wrote to a staged file that is not yet renamed over their own: their
        # own file still holds the version before, so the cache keeps them until installed() says so.
        self._unrenamed: set[str] = set()
        self._reads: dict[str, Future] = {}
        self._read_q: queue.Queue = queue.Queue()
        self._write_q: queue.Queue = queue.Queue()
        # Module writes queued or running (small jobs like journals are not counted). Beyond
        # max_pending_writes, put() waits unless the budget holds every pending module beside the
        # cache: at budget 0 RAM holds the module computing, the one prefetched and the one being
        # written; with a budget, the writes of a step's last commits overlap the next step's forward.
        self.max_pending_writes = max_pending_writes
        self._queued = 0
        self._write_error: BaseException | None = None
        self._reader = threading.Thread(target=self._read_loop, name="slowllama-reader", daemon=True)
        self._writer = threading.Thread(target=self._write_loop, name="slowllama-writer", daemon=True)
        self._reader.start()
        self._writer.start()

    def set_budget(self, ram_budget: float):
        """The bytes of modules the cache may keep (the trainer's plan gives it what the step leaves)."""
        # On unified memory the module computing lives a second time in the same RAM: its parameters,
        # their compute cast and its optimizer state on the device. The cache gets what is left.
        self.budget = max(0, ram_budget - self._device_copy) if self._device_copy else ram_budget

    # ---- reading ----
    def get(self, name: str) -> Block:
        """The module's newest version: cached, pending write, prefetched, or read now."""
        self._raise_write_error()
        with self._lock:
            if name in self._kept:
                return self._kept[name]
            if name in self._pending:
                return self._pending[name]
            if name in self._cache:
                self._cache.move_to_end(name)
                return self._cache[name]
            fut = self._reads.pop(name, None)
        block = fut.result() if fut is not None else self._read(name)
        self._remember(name, block)
        return block

    def prefetch(self, names: list[str]):
        """Start reading these modules in the background, in order (and copying them to the device)."""
        if not self.prefetch_enabled:
            return
        resident = []
        with self._lock:
            for name in names:
                if name in self._kept or name in self._pending or name in self._cache:
                    resident.append(self._kept.get(name) or self._pending.get(name) or self._cache[name])
                elif name not in self._reads:
                    fut: Future = Future()
                    self._reads[name] = fut
                    self._read_q.put((name, fut))
        for block in resident:
            self._stage(block)

    def _read_loop(self):
        while True:
            item = self._read_q.get()
            if item is None:
                return
            name, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                self._wait_for_room()
                block = self._read(name)
                self._stage(block)
                fut.set_result(block)
            except BaseException as e:  # handed to the trainer through the future
                fut.set_exception(e)
            # Hold no module while waiting for the next: its buffer is free once the trainer is done with it.
            item = fut = block = None

    def _resident_bytes(self) -> int:
        """Bytes of the modules held, pending a write and cached; called with the lock held."""
        return sum(b.nbytes for b in [*self._kept.values(), *self._pending.values(), *self._cache.values()])

    def _wait_for_room(self):
        """Before a prefetch: wait until the modules queued for writing have committed, unless the budget
        holds them beside the cache. With budget 0, RAM then holds three modules (the one computing with
        its gradients, and one being written or read), not four; a read and a write share the disk anyway."""
        with self._lock:
            while (self._pending and self._write_error is None
                   and self._resident_bytes() > self.budget + self.write_allowance):
                self._committed.wait(0.1)

    def _read(self, name: str) -> Block:
        block = self.store.read(name, self.verify and name not in self._written, self.buffers)
        want = self.params_dtype
        if want is not None and self.device.type == "cpu":
            widen_params(block, want, self.casts)
        return block

    def _remember(self, name: str, block: Block):
        with self._lock:
            self._cache[name] = block
            self._cache.move_to_end(name)
            self._evict()

    def _evict(self, keep_newest: bool = True):
        # Keep the most recently used modules within budget. The newest is the one the
        # trainer just asked for and stays; a module just written is only kept if it fits.
        total = sum(b.nbytes for b in self._cache.values())
        oldest_first = list(self._cache)[:len(self._cache) - keep_newest]
        for name in (n for n in oldest_first if n not in self._unrenamed):
            if total <= self.budget:
                break
            total -= self._cache.pop(name).nbytes

    def release(self, name: str):
        """The caller is done with the module; drop it unless the budget keeps it."""
        with self._lock:
            if name in self._cache and self._cache[name].nbytes > self.budget and name not in self._unrenamed:
                del self._cache[name]
        self.buffers.trim()
        self.casts.trim()

    # ---- writing ----
    def hold(self, name: str, block: Block):
        """Keep the module's new version in RAM, unwritten, until a put of it (an interval commit)."""
        self._raise_write_error()
        with self._lock:
            self._kept[name] = block
            stale = self._reads.pop(name, None)
            self._cache.pop(name, None)
        if stale is not None:
            stale.cancel()

    def held(self) -> dict[str, Block]:
        """The modules held since the last interval commit, in the order they were first held."""
        with self._lock:
            return dict(self._kept)

    def put(self, name: str, block: Block, on_commit: Callable[[int], None] | None = None, path=None):
        """Queue the module's new version for an atomic write (to path, else its own file); readers see it
        at once."""
        self._raise_write_error()
        with self._lock:
            if self._kept.get(name) is block:
                del self._kept[name]
            self._pending[name] = block
            stale = self._reads.pop(name, None)
            self._cache.pop(name, None)
        if stale is not None:
            stale.cancel()
        with self._lock:
            while (self._queued >= self.max_pending_writes and self._write_error is None
                   and self._resident_bytes() > self.budget + self.write_allowance):
                self._committed.wait(0.1)
            if self._write_error is None:
                self._queued += 1
        self._raise_write_error()
        self._write_q.put(("module", name, block, (on_commit, path)))

    def wait_written(self, name: str):
        """Wait until no write of the module is queued or running.

        A module's new version usually shares its storage with the one it was computed from (on cpu
        the fp32 master is the read buffer itself, and the optimizer steps it in place). Once put()
        lets writes queue past the step, the next step could update a module whose last version is
        still waiting for the writer, which would then store (and checksum) the newer bytes under the
        older version. So whoever is about to change a module's tensors in place calls this first."""
        with self._lock:
            while name in self._pending and self._write_error is None:
                self._committed.wait(0.1)
        self._raise_write_error()

    def run_in_order(self, fn: Callable[[], None]):
        """Run fn on the writer thread after every write queued before it has committed."""
        self._raise_write_error()
        self._write_q.put(("call", None, None, fn))

    def _write_loop(self):
        while True:
            item = self._write_q.get()
            if item is None:
                return
            kind, name, block, fn = item
            if self._write_error is not None:
                if kind == "module":
                    self._written_one()
                continue  # after a failure nothing more is committed
            try:
                if kind == "module":
                    fn, path = fn
                    checksum = self.store.write(name, block) if path is None else self.store.write(name, block, path)
                    block.checksum = checksum
                    self._written.add(name)
                    with self._lock:
                        if path is not None:
                            self._unrenamed.add(name)
                        if self._pending.get(name) is block:
                            del self._pending[name]
                            self._cache[name] = block
                            self._cache.move_to_end(name)
                            self._evict(keep_newest=False)
                        kept = self._cache.get(name) is block
                    if kept and self.params_dtype is not None and self.device.type == "cpu":
                        # Kept for the next pass: widen it here, off the compute thread, as a read would.
                        widen_params(block, self.params_dtype, self.casts)
                        with self._lock:
                            self._evict(keep_newest=False)
                    # The module's buffer may be free now: let trim see that, and only then wake a read that
                    # waits for room (_written_one). Woken while this thread still held the block, the read
                    # found no free buffer and faulted in a new one: at budget 0, every read of the reverse pass.
                    del block, item
                    self.buffers.trim()
                    self.casts.trim()
                    if fn is not None:
                        fn(checksum)
                else:
                    fn()
            except BaseException as e:
                log.error("write failed: %s", e)
                self._write_error = e
            finally:
                if kind == "module":
                    self._written_one()

    def _written_one(self):
        """A queued module write is done (committed, or dropped after a failure): a put may go on."""
        with self._lock:
            self._queued -= 1
            self._committed.notify_all()

    def _raise_write_error(self):
        if self._write_error is not None:
            e = self._write_error
            raise WriteError(f"a write to {self.store.root} failed ({e}); the store keeps its last committed "
                             f"state: free space or fix the disk, then resume") from e

    def installed(self, names: list[str]):
        """The staged files of these modules are renamed over their own: the cache may let them go. It does
        not now: held until this commit, they stay in RAM for the next step, which holds them again; a
        module let go here would be read back from a file written past the page cache."""
        with self._lock:
            self._unrenamed.difference_update(names)

    def mark(self) -> threading.Event:
        """An event the writer sets once everything queued before it has committed."""
        done = threading.Event()
        self._write_q.put(("call", None, None, done.set))
        return done

    def wait(self, done: threading.Event):
        """Wait for a mark(); raises the write error that keeps it from ever being set."""
        while not done.wait(0.1):
            if self._write_error is not None:
                break
        self._raise_write_error()

    def flush(self):
        """Wait until every queued write has committed."""
        self.wait(self.mark())

    def close(self):
        try:
            self.flush()
        finally:
            self._read_q.put(None)
            self._write_q.put(None)
            self._reader.join()
            self._writer.join()


    def _stage(self, block: Block):
        """On CUDA, start copying the block's parameters to the device on the copy stream."""
        if self._copy_stream is None:
            return
        with self._lock:
            if id(block) in self._staged:
                return
        try:
            with torch.cuda.device(self.device), torch.cuda.stream(self._copy_stream):
                params, event = self._copy_staged(block)
        except _oom_errors() as e:
            # The device is full of the module computing: the trainer copies this one directly when it needs it.
            log.warning("no device memory to prefetch a module (%s); copying it when needed instead",
                        str(e).splitlines()[0] if str(e) else "out of memory")
            return
        with self._lock:
            self._staged[id(block)] = (block, params, event)
            while len(self._staged) > 2:  # the device holds at most the next module or two ahead
                self._staged.popitem(last=False)

    def to_device(self, block: Block, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The block's parameters on the device; on cpu with a matching dtype they are the block's own tensors.
        The dtype asked for is the one later reads are widened to, so the cast is paid once per read, off
        the compute thread, instead of here."""
        if dtype is not None and self.params_dtype is None:
            self.params_dtype = dtype
        with self._lock:
            staged = self._staged.pop(id(block), None)
        if staged is not None:
            _, params, event = staged
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for t in params.values():
                t.record_stream(stream)  # allocated on the copy stream, used and freed on this one
        else:
            params = self._copy(block)
        return {k: t if dtype is None or t.dtype == dtype else t.to(dtype) for k, t in params.items()}

    def _copy(self, block: Block) -> dict[str, torch.Tensor]:
        """The direct copy. To mps it is non_blocking and fenced: the read buffer waits for it before it is
        refilled. To cuda it is blocking: the read buffer is pageable, where a copy could not overlap anyway."""
        non_blocking = self.device.type == "mps"
        params = {k: dev.to_device(t, self.device, non_blocking=non_blocking) for k, t in block.params.items()}
        if non_blocking and block.buffer is not None:
            self.buffers.fence(block.buffer, dev.copy_fence(self.device))
        return params

    def _copy_staged(self, block: Block) -> tuple[dict[str, torch.Tensor], object]:
        """Copy the block's parameters through a page-locked staging buffer to the device, on the
        current (copy) stream; returns them and the event after the copies, which also fences the
        staging buffer against being refilled while they run."""
        offsets, total = {}, 0
        for k, t in block.params.items():
            offsets[k] = total
            total += t.nbytes + (-t.nbytes) % 64
        stage = self.staging(total)
        params, host = {}, None
        for k, t in block.params.items():
            src = t.contiguous()
            host = stage[offsets[k]: offsets[k] + src.nbytes].view(src.dtype).view(src.shape)
            host.copy_(src)
            params[k] = dev.to_device(host, self.device, non_blocking=True)
        del host
        event = dev.copy_fence(self.device, self._copy_stream)
        self.staging.fence(stage, event)
        return params, event


def widen_params(block: Block, dtype: torch.dtype, alloc: Callable[[int], torch.Tensor]) -> int:
    """Replace the block's parameters narrower than dtype (a 16-bit store's) by exact casts to dtype in
    one buffer from alloc(nbytes); returns the bytes cast. Narrowing is left to the caller: it loses bits."""
    narrow = {k: t for k, t in block.params.items()
              if t.is_floating_point() and t.dtype != dtype and t.element_size() < dtype.itemsize}
    if not narrow:
        return 0
    offsets, total = {}, 0
    for k, t in narrow.items():
        offsets[k] = total
        n = t.numel() * dtype.itemsize
        total += n + (-n) % 64
    buf = alloc(total)
    params = dict(block.params)
    for k, t in narrow.items():
        n = t.numel() * dtype.itemsize
        params[k] = buf[offsets[k]: offsets[k] + n].view(dtype).view(t.shape).copy_(t)
    block.narrow = next(iter(narrow.values())).dtype  # a store keeps one dtype: written back in it
    block.params = params  # at once: a reader of the block sees the old parameters or the new
    if not block.optim:
        block.buffer = buf  # the read buffer is free again: nothing else points into it
    return total


def materialize(name: str, args: ModelArgs, params: dict[str, torch.Tensor], dropout: float = 0.0) -> nn.Module:
    """A module built on the meta device and filled, without a copy, from params."""
    module = build_module(name, args, dropout)
    module.load_state_dict(params, strict=True, assign=True)
    return module
