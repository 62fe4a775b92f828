"""The files a run trains on: regular files only, each named by the SHA-256 of the bytes it was read from.

A resume compares that hash, not the path, so it must be the hash of what was tokenized. A pipe or a
process substitution (`<(...)`) can be read once: hashing it would hang or name empty input, so it is refused.
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Callable, TypeVar

from ..errors import ConfigError

T = TypeVar("T")


def check_regular(path: str | Path, flag: str) -> os.stat_result:
    """path's stat, refusing what is missing or is not a regular file."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot read data file ({e.strerror})") from e
    if not stat.S_ISREG(st.st_mode):
        what = "is a folder" if stat.S_ISDIR(st.st_mode) else "is not a regular file (a pipe or device reads only once)"
        raise ConfigError(f"{flag} {path}: {what}; give the path of a data file")
    return st


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _version(st: os.stat_result) -> tuple:
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def read_hashed(path: str | Path, flag: str, load: Callable[[str | Path], T]) -> tuple[T, str]:
    """load(path) and the SHA-256 of the file it read. A file written or replaced while this reads it (its
    inode, size or times moved) is refused: the hash might not be of the bytes that were tokenized."""
    before = _version(check_regular(path, flag))
    digest = sha256_file(path)
    loaded = load(path)
    if _version(check_regular(path, flag)) != before:
        raise ConfigError(f"{flag} {path}: changed while it was read; run again once nothing is writing it")
    return loaded, digest
