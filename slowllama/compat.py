"""The one home of torch's private APIs, each behind a start-up self-check and a public fallback.

- `storage_use_count()`: how many holders share a tensor's storage (torch._C._storage_Use_Count).
  Without it the buffer pool never reuses a buffer.
- `open_torch_zip(path)`: a writer of torch.save's zip format, one record at a time. The private
  torch._C.PyTorchFileWriter is used when it passes its check; otherwise Python's zipfile writes
  stored (uncompressed) records aligned to 64 bytes, which torch.load(mmap=True) maps the same way.
  Either way the bytes go through a Python file object, so a full disk is a plain OSError.
- `torch_pickle(tensors)`: the data.pkl record that rebuilds tensors from storage records.

Each check runs once per private function object, so a test that swaps the function is checked again.
"""
from __future__ import annotations

import collections
import io
import logging
import os
import pickle
import struct
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

ALIGNMENT = 64  # torch.save's storage alignment; mmapped tensors start on it
_checked: dict[str, tuple[object, bool]] = {}  # API name -> (the function checked, passed)


def _passes(name: str, fn, check: Callable[[object], None]) -> bool:
    """Run check(fn) once per function object; a failure is logged and means: use the fallback."""
    if fn is None:
        return False
    seen = _checked.get(name)
    if seen is not None and seen[0] is fn:
        return seen[1]
    try:
        check(fn)
        ok = True
    except Exception as e:  # any failure of a private API means it is not what we think it is
        log.warning("torch's %s failed its self-check (%s: %s); using the public fallback", name, type(e).__name__, e)
        ok = False
    _checked[name] = (fn, ok)
    return ok


# ---- storage use counts --------------------------------------------------------

def _check_use_count(count):
    t = torch.empty(16, dtype=torch.uint8)
    idle = count(t.untyped_storage()._cdata)
    view = t[4:]
    held = count(t.untyped_storage()._cdata)
    del view
    after = count(t.untyped_storage()._cdata)
    if not (isinstance(idle, int) and held == idle + 1 and after == idle):
        raise RuntimeError(f"counts {idle}, {held}, {after}: a view must add one use and dropping it remove one")


def storage_use_count() -> Callable[[torch.Tensor], int] | None:
    """count(t): the holders of t's storage, or None when torch's private counter is missing or wrong."""
    fn = getattr(torch._C, "_storage_Use_Count", None)
    if not _passes("_storage_Use_Count", fn, _check_use_count):
        return None
    return lambda t: fn(t.untyped_storage()._cdata)


# ---- torch.save's zip format -----------------------------------------------------

_STORAGE_TYPES = {torch.float32: "FloatStorage", torch.bfloat16: "BFloat16Storage", torch.float16: "HalfStorage"}


class _StorageRef:
    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles as the tensor torch.save would write, without holding its data."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce_ex__(self, protocol):
        stride, acc = [], 1
        for s in reversed(self.shape):
            stride.append(acc)
            acc *= s
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, tuple(reversed(stride)), False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", getattr(torch, _STORAGE_TYPES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


def torch_pickle(tensors: dict[str, tuple[str, tuple[int, ...], torch.dtype]]) -> bytes:
    """data.pkl for {name: (record key, shape, dtype)}: tensor `name` is record data/<key>, contiguous."""
    refs = {}
    for name, (key, shape, dtype) in tensors.items():
        numel = 1
        for s in shape:
            numel *= s
        refs[name] = _TensorRef(_StorageRef(key, dtype, numel), shape)
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(refs)
    return buf.getvalue()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A contiguous cpu tensor's bytes, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class _TorchWriter:
    """torch._C.PyTorchFileWriter, fed through a Python file so that write errors are Python OSErrors."""

    backend = "torch"

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "wb")
        ser = torch.serialization
        try:
            self._zip = torch._C.PyTorchFileWriter(self._file, ser.get_crc32_options(), ser._get_storage_alignment())
        except BaseException:
            self._file.close()
            raise
        # No .format_version record, unlike torch.save: with it, torch.load may compute each record's
        # offset assuming records follow the pickle's order, and ours are written in any order.

    def write_record(self, name: str, data: bytes | torch.Tensor):
        if isinstance(data, torch.Tensor):
            self._zip.write_record(name, data.untyped_storage(), data.nbytes)
        else:
            self._zip.write_record(name, data, len(data))

    def finish(self):
        self._zip.write_end_of_file()  # adds the version and serialization_id records
        del self._zip
        self._file.close()

    def abort(self):
        # Finalizing marks the C++ writer done even when it fails, so its destructor writes nothing
        # more: a second failure there would be a C++ exception in a destructor (std::terminate).
        zf = self.__dict__.pop("_zip", None)
        if zf is not None:
            try:
                zf.write_end_of_file()
            except Exception:  # the file is being thrown away; its first error is the one reported
                pass
            del zf
        try:
            self._file.close()
        except OSError:
            pass


class _ZipfileWriter:
    """torch.save's format from Python's zipfile: stored records, data aligned through the extra field."""

    backend = "zipfile"
    _PAD_ID = 0x4246  # "FB", the extra-field id torch's own writer pads with

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self._zip = zipfile.ZipFile(self._file, "w", zipfile.ZIP_STORED, allowZip64=True)
        self._prefix = "archive/"  # torch's reader wants every record in one folder
        self._record = None  # the record being written

    def write_record(self, name: str, data: bytes | torch.Tensor):
        view = tensor_bytes(data) if isinstance(data, torch.Tensor) else memoryview(data)
        info = zipfile.ZipInfo(self._prefix + name, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        info.file_size = view.nbytes
        # Local header: 30 bytes, the name, our padding field (4 + pad) and, with force_zip64, a
        # 20-byte zip64 field; forcing zip64 makes the header's length the same for every size.
        start = self._file.tell()
        fixed = 30 + len(info.filename.encode()) + 4 + 20
        pad = -(start + fixed) % ALIGNMENT
        info.extra = struct.pack("<HH", self._PAD_ID, pad) + b"\0" * pad
        self._record = self._zip.open(info, "w", force_zip64=True)
        if self._file.tell() % ALIGNMENT:
            raise RuntimeError(f"{self.path}: record {name} is not aligned (zipfile's header layout changed)")
        self._record.write(view)
        self._record.close()
        self._record = None

    def finish(self):
        self.write_record("version", b"3\n")
        self._zip.close()
        self._file.close()

    def abort(self):
        # Closing the file first makes zipfile's own closing (a record's header, the central
        # directory) fail at once instead of writing more into a file that is thrown away.
        try:
            self._file.close()
        except OSError:
            pass
        for closing in (self._record, self._zip):
            try:
                if closing is not None:
                    closing.close()
            except (OSError, ValueError):
                pass


WRITERS = {w.backend: w for w in (_TorchWriter, _ZipfileWriter)}


def _check_writer(cls):
    """A file the writer made must load with torch.load(mmap=True, weights_only=True), bit for bit."""
    want = {"a": torch.arange(-3.0, 9.0).view(3, 4), "b": torch.tensor([1.5, -2.25, 3.0]).to(torch.bfloat16)}
    with tempfile.TemporaryDirectory(prefix="slowllama-compat-") as tmp:
        path = Path(tmp) / "check.pth"
        w = cls(path)
        try:
            w.write_record("data.pkl", torch_pickle({k: (str(i), tuple(t.shape), t.dtype)
                                                      for i, (k, t) in enumerate(want.items())}))
            w.write_record("byteorder", sys.byteorder.encode())
            for i, t in enumerate(want.values()):
                w.write_record(f"data/{i}", t)
            w.finish()
        except BaseException:
            w.abort()
            raise
        got = torch.load(path, mmap=True, weights_only=True)
        if list(got) != list(want) or not all(
                got[k].dtype == t.dtype and got[k].shape == t.shape and bytes(tensor_bytes(got[k])) == bytes(tensor_bytes(t))
                for k, t in want.items()):
            raise RuntimeError("the written file did not load back bit-exactly")
        del got


def zip_writer_class():
    """The writer open_torch_zip uses: torch's own when it passes its check, else the zipfile one."""
    private = getattr(torch._C, "PyTorchFileWriter", None)
    if private is not None and _passes("PyTorchFileWriter", private, lambda _: _check_writer(_TorchWriter)):
        return _TorchWriter
    return _ZipfileWriter


def open_torch_zip(path: str | os.PathLike):
    """A writer with write_record(name, bytes | contiguous cpu tensor), finish() and abort()."""
    return zip_writer_class()(Path(path))
