"""Reading a module file: one large read into a buffer (what the store does) against mmap, cold and warm.

    python benchmarks/bench_read.py [--mb 256] [--files 4] [--threads 4]

Writes FILES files of MB megabytes, then for each method reads them all and reports GB/s:
  read:   f.readinto() of the whole file into one preallocated buffer (the store's path);
  pread:  THREADS threads each os.preadv()-ing a slice of the file into the same buffer;
  mmap:   np.memmap of the file, copied into the buffer (touching every page).
"Cold" drops the files from the page cache first with posix_fadvise(DONTNEED); a VM host
may still cache them, so cold figures are an upper bound on what a real cold SSD gives.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def drop_cache(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_whole(path: Path, buf: np.ndarray):
    with open(path, "rb", buffering=0) as f:
        view, got = memoryview(buf), 0
        while got < len(view):
            got += f.readinto(view[got:])


def read_parallel(path: Path, buf: np.ndarray, threads: int):
    n = len(buf)
    step = -(-n // threads)
    fd = os.open(path, os.O_RDONLY)
    try:
        def part(i):
            lo, hi = i * step, min(n, (i + 1) * step)
            view, got = memoryview(buf)[lo:hi], 0
            while got < len(view):
                got += os.preadv(fd, [view[got:]], lo + got)
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(part, range(threads)))
    finally:
        os.close(fd)


def read_mmap(path: Path, buf: np.ndarray):
    m = np.memmap(path, dtype=np.uint8, mode="r")
    buf[:] = m
    del m


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=256)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--dir", type=Path, default=None)
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(dir=a.dir, prefix="slowllama-read-"))
    size = a.mb << 20
    paths = []
    for i in range(a.files):
        path = tmp / f"m{i}.blk"
        with open(path, "wb") as f:
            f.write(np.random.default_rng(i).integers(0, 255, size, dtype=np.uint8).tobytes())
        paths.append(path)
    buf = np.empty(size, dtype=np.uint8)
    methods = {"read": lambda p: read_whole(p, buf), "pread": lambda p: read_parallel(p, buf, a.threads),
               "mmap": lambda p: read_mmap(p, buf)}
    out = {"file_mb": a.mb, "files": a.files}
    for cold in (True, False):
        for name, fn in methods.items():
            for path in paths:
                fn(path)  # warm the page cache (and the code)
                if cold:
                    drop_cache(path)
            t = time.perf_counter()
            for path in paths:
                fn(path)
            out[f"{name}_{'cold' if cold else 'warm'}_GBps"] = round(size * a.files / (time.perf_counter() - t) / 1e9, 2)
    for path in paths:
        path.unlink()
    tmp.rmdir()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
