"""A .safetensors file written one tensor at a time, so that a shard is never whole in RAM.

The format: an 8-byte little-endian header length, a JSON header (per tensor its
dtype, shape and [begin, end) byte offsets into the data, plus "__metadata__"),
padded with spaces to a multiple of 8, then the tensors' raw little-endian bytes.
All shapes are known before the first byte, so the header is written first.
"""
from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import torch

DTYPE_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


class SafetensorsWriter:
    """Writes one safetensors file; tensors must come in the order of `specs`."""

    def __init__(self, path: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        if sys.byteorder != "little":  # the format is little-endian and we copy raw bytes
            raise RuntimeError("writing safetensors needs a little-endian machine")
        self.path = Path(path)
        self.specs = [(name, tuple(shape), dtype) for name, shape, dtype in specs]
        entries, offset = {}, 0
        for name, shape, dtype in self.specs:
            end = offset + _nbytes(shape, dtype)
            entries[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        # Names sorted as safetensors writes them; the offsets keep our write order.
        header = {"__metadata__": metadata or {"format": "pt"}, **dict(sorted(entries.items()))}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.f = open(self.path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor):
        want, shape, dtype = self.specs[self.next]
        if name != want or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"{self.path}: got {name} {tuple(tensor.shape)} {tensor.dtype}, "
                               f"expected {want} {shape} {dtype} next")
        t = tensor.detach().to("cpu").contiguous()
        self.f.write(t.view(-1).view(torch.uint8).numpy().data)
        self.next += 1

    @property
    def done(self) -> bool:
        return self.next == len(self.specs)

    def close(self):
        if not self.done:
            raise RuntimeError(f"{self.path}: tensors never written: {[n for n, _, _ in self.specs[self.next:]][:5]}")
        self.f.close()

    def abort(self):
        self.f.close()
