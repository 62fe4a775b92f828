"""Atomic writes past the page cache (fsutil, cached=False): the same bytes as a cached write at every size
around the alignment and staging-buffer bounds, a cached write where the filesystem refuses O_DIRECT, and
the one-line error of any other write failure, with no temp file left."""
import errno
import os

import pytest

from slowllama import fsutil
from slowllama.fsutil import DIRECT_ALIGN, DIRECT_CHUNK, IO, atomic_write_bytes

SIZES = [0, 1, DIRECT_ALIGN - 1, DIRECT_ALIGN, DIRECT_ALIGN + 1, DIRECT_CHUNK - 1, DIRECT_CHUNK,
         DIRECT_CHUNK + DIRECT_ALIGN + 3]


def _chunks(n: int) -> list[bytes]:
    """n bytes in pieces of uneven sizes, so that pieces straddle the staging buffer's end."""
    data = os.urandom(n)
    cuts = [0, *sorted({min(n, c) for c in (5, 4093, 1 << 20, DIRECT_CHUNK - 7)}), n]
    return [data[a:b] for a, b in zip(cuts, cuts[1:])]


def _spy_open(monkeypatch, refuse_direct: bool = False) -> list[bool]:
    """Record, for each file opened for writing, whether O_DIRECT was asked for and granted."""
    direct = getattr(os, "O_DIRECT", 0)
    real, seen = os.open, []

    def spying(path, flags, mode=0o777):
        asked = bool(direct and flags & direct)
        if asked and refuse_direct:
            seen.append(False)
            raise OSError(errno.EINVAL, "Invalid argument")
        fd = real(path, flags, mode)
        if flags & os.O_WRONLY:
            seen.append(asked)
        return fd

    monkeypatch.setattr(fsutil.os, "open", spying)
    return seen


@pytest.mark.parametrize("n", SIZES)
def test_an_uncached_write_holds_the_same_bytes(n, tmp_path, monkeypatch):
    chunks = _chunks(n)
    seen = _spy_open(monkeypatch)
    w0 = IO.snapshot()[1]
    assert atomic_write_bytes(tmp_path / "a.bin", chunks, cached=False) == n
    assert (tmp_path / "a.bin").read_bytes() == b"".join(chunks)
    assert IO.snapshot()[1] - w0 == n
    assert os.listdir(tmp_path) == ["a.bin"]
    if hasattr(os, "O_DIRECT"):
        assert seen[0] is True  # asked for; a filesystem without it falls back (the next test)
    atomic_write_bytes(tmp_path / "b.bin", chunks)
    assert seen[-1] is False  # a cached write never asks for O_DIRECT
    assert (tmp_path / "b.bin").read_bytes() == (tmp_path / "a.bin").read_bytes()


def test_a_filesystem_without_o_direct_gets_a_cached_write(tmp_path, monkeypatch):
    chunks = _chunks(DIRECT_CHUNK + 5)
    seen = _spy_open(monkeypatch, refuse_direct=True)
    atomic_write_bytes(tmp_path / "a.bin", chunks, cached=False)
    assert (tmp_path / "a.bin").read_bytes() == b"".join(chunks)
    assert seen == ([False, False] if hasattr(os, "O_DIRECT") else [False])


def test_a_failed_uncached_write_is_one_line_and_leaves_no_temp(tmp_path, monkeypatch):
    (tmp_path / "a.bin").write_bytes(b"before")
    writes = []

    def full(fd, data):  # half of the first write goes through (a slice of the buffer is then alive), then none
        writes.append(len(data))
        if len(writes) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data[:len(data) // 2])

    monkeypatch.setattr(fsutil.os, "write", full)
    with pytest.raises(OSError) as e:
        atomic_write_bytes(tmp_path / "a.bin", _chunks(2 * DIRECT_CHUNK + 1), cached=False)
    msg = str(e.value)
    assert e.value.errno == errno.ENOSPC and "\n" not in msg and str(tmp_path / "a.bin") in msg
    assert "is the disk full?" in msg
    assert os.listdir(tmp_path) == ["a.bin"] and (tmp_path / "a.bin").read_bytes() == b"before"


def test_only_an_interval_commits_staged_files_skip_the_page_cache(gqa_model, tmp_path, monkeypatch):
    """A staged module stays in RAM after its commit (the budget holds the trained state); a module written
    over its own file may be evicted and read back, from the page cache."""
    from slowllama import blockfile
    from slowllama.engine.store import prepare
    from slowllama.formats.meta import MetaCheckpoint

    store = prepare(MetaCheckpoint(gqa_model), tmp_path / "store")
    name = store.trainable[1]
    block = store.read(name)
    calls, write = [], blockfile.atomic_write_bytes
    monkeypatch.setattr(blockfile, "atomic_write_bytes",
                        lambda path, chunks, durable, cached: calls.append((path.name, cached)) or
                        write(path, chunks, durable, cached))
    store.write(name, block)
    store.write(name, block, tmp_path / "store" / "staged.blk")
    assert calls == [(store.path(name).name, True), ("staged.blk", False)]
    assert store.read(name).params.keys() == block.params.keys()
