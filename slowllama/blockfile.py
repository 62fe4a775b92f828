"""The block file: one module's tensors (and optimizer state) in one checksummed, self-describing file.

    b"SLLMBLK1" | u32 header length | u32 crc32(header) | header JSON | pad to 64 | data

The header names each tensor (dtype, shape, offset), the module the file holds and
the model it belongs to (so a swapped or foreign file is caught on read, not trained on),
the training step the module belongs to and a 64-bit xxh3 checksum of the data. A file is only
ever replaced whole (temp file, fsync, rename), so a reader sees the old or the new module, never a mix.

Parameters are stored under their names inside the module; optimizer state under
"param#key" beside them, so a module and its optimizer state commit together.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import xxhash

from .errors import ConfigError
from .fsutil import IO, atomic_write_bytes

MAGIC = b"SLLMBLK1"
ALIGN = 64
FORMAT = 3  # 3: blocks name their module and model; 2: xxh3_64 data checksums (crc32 in 1)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "uint8": torch.uint8, "int8": torch.int8, "int64": torch.int64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class StoreError(ConfigError):
    """A block store that is damaged or does not belong to this run."""


class StoreFormatError(StoreError):
    """A block store written by another version of slowllama."""


@dataclass
class Block:
    """One module as stored: parameters, optimizer state beside them, the step it belongs to."""

    step: int
    params: dict[str, torch.Tensor]
    optim: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    checksum: int = 0
    buffer: torch.Tensor | None = field(default=None, repr=False, compare=False)  # what a read put the data in
    # The dtype the file keeps the floating parameters in where RAM holds them wider, as exact casts of
    # its values (a 16-bit store's modules, widened on read or rounded in place): written narrowed back.
    narrow: torch.dtype | None = field(default=None, compare=False)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.params.values()) + sum(
            t.nbytes for s in self.optim.values() for t in s.values())


def _flat(block: Block) -> list[tuple[str, torch.Tensor]]:
    nd = block.narrow
    items = [(k, t.to(nd) if nd is not None and t.is_floating_point() and t.element_size() > nd.itemsize else t)
             for k, t in block.params.items()]
    for p, state in block.optim.items():
        items += [(f"{p}#{k}", t) for k, t in state.items()]
    return items


def _pad(n: int) -> int:
    return (-n) % ALIGN


def encode_block(block: Block, name: str, model: str = "") -> tuple[list, int]:
    """The file's byte chunks, and the data checksum. name is what the file holds, model whose it is."""
    tensors, offset, digest = [], 0, xxhash.xxh3_64()
    views = []
    for key, t in _flat(block):
        t = t.detach().to("cpu").contiguous()
        if t.dtype not in DTYPE_NAMES:
            raise TypeError(f"cannot store {key} of dtype {t.dtype}")
        raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
        tensors.append([key, DTYPE_NAMES[t.dtype], list(t.shape), offset])
        views.append(raw)
        digest.update(raw)
        pad = _pad(t.nbytes)
        if pad:
            views.append(bytes(pad))
            digest.update(bytes(pad))
        offset += t.nbytes + pad
    checksum = digest.intdigest()
    header = json.dumps({"module": name, "model": model, "step": block.step, "xxh3_64": checksum,
                         "data_bytes": offset, "tensors": tensors, "meta": block.meta}).encode()
    prefix = MAGIC + struct.pack("<II", len(header), zlib.crc32(header))
    head = prefix + header
    return [head + bytes(_pad(len(head))), *views], checksum


def write_block(path: Path, block: Block, name: str, durable: bool = True, model: str = "",
                cached: bool = True) -> int:
    """Atomically replace path with block, recorded as module name of model; returns the data checksum.
    cached=False writes it past the page cache (fsutil), for a block that stays in RAM."""
    chunks, checksum = encode_block(block, name, model)
    atomic_write_bytes(path, chunks, durable, cached)
    return checksum


def _read_header(f, path: Path, name: str) -> tuple[dict, int]:
    prefix = f.read(len(MAGIC) + 8)
    if len(prefix) < len(MAGIC) + 8 or prefix[: len(MAGIC)] != MAGIC:
        raise StoreError(f"module {name} ({path}): not a block file or truncated")
    hlen, hcrc = struct.unpack("<II", prefix[len(MAGIC):])
    raw = f.read(hlen)
    if len(raw) != hlen or zlib.crc32(raw) != hcrc:
        raise StoreError(f"module {name} ({path}): header is corrupt or truncated")
    header = json.loads(raw)
    if header.get("module") != name:
        raise StoreError(f"{path}: holds {header.get('module')!r}, not {name!r}: the file was swapped or copied "
                         f"from elsewhere")
    start = len(prefix) + hlen
    return header, start + _pad(start)


def read_header(path: Path, name: str) -> dict:
    """A block file's header (step, tensor names, dtypes and shapes), without reading its data."""
    try:
        with open(path, "rb") as f:
            return _read_header(f, path, name)[0]
    except FileNotFoundError as e:
        raise StoreError(f"module {name}: file {path} is missing") from e


def read_block(path: Path, name: str, verify: bool = True,
               alloc: Callable[[int], torch.Tensor] | None = None, model: str | None = None) -> Block:
    """Read a whole block file, which must hold module name (of model, if given), with one large
    read; tensors are views into one buffer.

    alloc(nbytes) supplies that uint8 buffer (a reused or page-locked one); by default it is new.
    """
    try:
        f = open(path, "rb")
    except FileNotFoundError as e:
        raise StoreError(f"module {name}: file {path} is missing") from e
    with f:
        header, start = _read_header(f, path, name)
        if model is not None and header.get("model") != model:
            raise StoreError(f"{path}: module {name} of another model or store, not this one's")
        size = os.fstat(f.fileno()).st_size
        if size != start + header["data_bytes"]:
            raise StoreError(f"module {name} ({path}): {size} bytes, expected {start + header['data_bytes']} (truncated?)")
        f.seek(start)
        buf = (alloc or _new_buffer)(header["data_bytes"])
        view = memoryview(buf.numpy())
        got = 0
        while got < len(view):
            n = f.readinto(view[got:])
            if not n:
                raise StoreError(f"module {name} ({path}): truncated")
            got += n
    IO.add(read=start + header["data_bytes"])
    if verify and xxhash.xxh3_64_intdigest(view) != header["xxh3_64"]:
        raise StoreError(f"module {name} ({path}): checksum mismatch, the file is corrupt")
    block = Block(step=header["step"], params={}, meta=header.get("meta", {}), checksum=header["xxh3_64"],
                  buffer=buf)
    for tname, dtype, shape, offset in header["tensors"]:
        dt = DTYPES[dtype]
        n = dt.itemsize
        for s in shape:
            n *= s
        t = buf[offset: offset + n].view(dt).view(shape)
        if "#" in tname:
            p, k = tname.split("#", 1)
            block.optim.setdefault(p, {})[k] = t
        else:
            block.params[tname] = t
    return block


def _new_buffer(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)
