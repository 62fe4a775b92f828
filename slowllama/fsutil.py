"""Durable file operations: every write is a temp file, fsync, rename, fsync of the directory."""
from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import threading
import time
from pathlib import Path

from . import faults
from .errors import ConfigError

TMP_MARK = ".slowllama-tmp"  # in every temp name: `.NAME.slowllama-tmp.PID`


class ByteCounter:
    """Thread-safe byte counts under fixed names; snapshot() returns them in that order."""

    def __init__(self, *names: str):
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(names, 0)

    def add(self, **nbytes: int):
        with self._lock:
            for k, n in nbytes.items():
                self._counts[k] += n

    def snapshot(self) -> tuple[int, ...]:
        with self._lock:
            return tuple(self._counts.values())


def tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}.{os.getpid()}")


IO = ByteCounter("read", "written")  # disk: store modules, activations, gradients, exports


def fsync_file(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# On POSIX a directory is opened and synced like a file; syncing it makes renames in it durable.
fsync_dir = fsync_file


class WriteError(OSError):
    """A write that failed, as one line naming the file (the errno is kept). Export and merge-lora start over;
    finetune adds "with --resume" where a run exists to resume (cli/finetune.py)."""


def write_error(path: Path, e: OSError) -> WriteError:
    err = WriteError(f"{path}: write failed ({e.strerror or e}); is the disk full? Free space, then run the "
                     f"command again")
    err.errno = e.errno
    return err


# Writes past the page cache (cached=False) go through an aligned staging buffer: O_DIRECT wants offsets,
# lengths and addresses that are multiples of the logical block size (4 KiB covers 512-byte and 4K disks).
DIRECT_ALIGN = 4096
DIRECT_CHUNK = 8 << 20
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


def _write_all(fd: int, mv: memoryview):
    while len(mv):
        mv = mv[os.write(fd, mv):]


def _write_direct(fd: int, chunks: list) -> int:
    """chunks through a page-aligned buffer to an O_DIRECT fd; the zeros padding the last block are cut off."""
    # Not closed on an error: the traceback still holds views of it, and closing would replace the error.
    buf = mmap.mmap(-1, DIRECT_CHUNK)
    view, fill, n = memoryview(buf), 0, 0
    for c in chunks:
        mv = memoryview(c).cast("B")
        while len(mv):
            k = min(len(mv), DIRECT_CHUNK - fill)
            view[fill:fill + k] = mv[:k]
            fill, n, mv = fill + k, n + k, mv[k:]
            if fill == DIRECT_CHUNK:
                _write_all(fd, view)
                fill = 0
    if fill:
        end = fill + -fill % DIRECT_ALIGN
        view[fill:end] = bytes(end - fill)
        _write_all(fd, view[:end])
        os.ftruncate(fd, n)
    view.release()
    buf.close()
    return n


def _write_chunks(tmp: Path, chunks, cached: bool) -> tuple[int, int]:
    """Write chunks to a new file tmp; returns its open fd (for the caller's fsync) and the byte count.

    cached=False keeps the bytes out of the page cache, for a file whose contents stay in RAM anyway: copying
    them into the cache and writing the dirty pages back cost a 2-core VM 1.9-2.6 s of CPU per 836 MB at the
    fsync, against 0.02 s with O_DIRECT (issue 28). Linux uses O_DIRECT, falling back to a cached write where
    the filesystem has none (tmpfs); macOS marks the file F_NOCACHE."""
    chunks = list(chunks)
    if not cached and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(tmp, _CREATE | os.O_DIRECT, 0o666)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
        else:
            try:
                return fd, _write_direct(fd, chunks)
            except OSError as e:
                os.close(fd)
                if e.errno != errno.EINVAL:  # a block size beyond DIRECT_ALIGN: write it cached instead
                    raise
    fd = os.open(tmp, _CREATE, 0o666)
    try:
        if not cached and hasattr(fcntl, "F_NOCACHE"):
            fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
        n = 0
        for c in chunks:
            mv = memoryview(c).cast("B")
            _write_all(fd, mv)
            n += len(mv)
    except BaseException:
        os.close(fd)
        raise
    return fd, n


def atomic_write_bytes(path: Path, chunks, durable: bool = True, cached: bool = True):
    """Write an iterable of byte buffers to path atomically; returns the byte count.

    durable=False skips the fsyncs, for scratch files that a crash may lose; cached=False writes past the
    page cache (_write_chunks).
    """
    path = Path(path)
    tmp = tmp_path(path)
    try:
        fd, n = _write_chunks(tmp, chunks, cached)
        try:
            faults.point("before_fsync")
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        faults.point("before_rename")
        os.replace(tmp, path)
        faults.point("after_rename")
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    IO.add(written=n)
    return n


def timed_scratch_write(path: Path, chunks, cached: bool = True) -> float:
    """Seconds to write chunks durably the way atomic_write_bytes writes (the file and its folder synced), into
    path's temp file, removed after: the ETA's probe of this disk. Not counted in IO: the run writes nothing."""
    tmp = tmp_path(path)
    t0 = time.perf_counter()
    try:
        fd, _ = _write_chunks(tmp, chunks, cached)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path.parent)
        return time.perf_counter() - t0
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, obj):
    atomic_write_bytes(path, [json.dumps(obj, indent=1, sort_keys=True).encode()])


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold one object; any problem is one ConfigError line naming the file."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: missing") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return raw
