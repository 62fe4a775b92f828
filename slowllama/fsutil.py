"""Durable file operations: every write is a temp file, fsync, rename, fsync of the directory."""
from __future__ import annotations

import json
import os
import threading
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


def write_error(path: Path, e: OSError) -> OSError:
    """A failed write as one line naming the file; the errno is kept. The advice holds for every command that
    writes (finetune resumes, export and merge-lora start over), so it names --resume for finetune only."""
    err = OSError(f"{path}: write failed ({e.strerror or e}); is the disk full? Free space, then run the command "
                  f"again (finetune: with --resume)")
    err.errno = e.errno
    return err


def atomic_write_bytes(path: Path, chunks, durable: bool = True):
    """Write an iterable of byte buffers to path atomically; returns the byte count.

    durable=False skips the fsyncs, for scratch files that a crash may lose.
    """
    path = Path(path)
    tmp = tmp_path(path)
    n = 0
    try:
        with open(tmp, "wb") as f:
            for c in chunks:
                f.write(c)
                n += len(memoryview(c).cast("B"))
            f.flush()
            faults.point("before_fsync")
            if durable:
                os.fsync(f.fileno())
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
