"""torch's private APIs behind self-checks: each works, each can fail its check, each fallback is safe."""
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from slowllama import compat
from slowllama.engine.streamer import BufferPool
from slowllama.formats.meta import ShardWriter

ROOT = Path(__file__).resolve().parents[1]

TENSORS = {
    "tok_embeddings.weight": torch.randn(10, 6),
    "layers.0.attention.wq.weight": torch.randn(6, 6).to(torch.bfloat16),
    "layers.0.ffn_norm.weight": torch.randn(6).to(torch.float16),
    "norm.weight": torch.tensor([1.0, float("-0.0"), 3.5, -7.25]),
    "empty": torch.empty(0, 6),
}


@pytest.fixture(params=["torch", "zipfile"])
def backend(request, monkeypatch):
    """Each zip writer in turn, as open_torch_zip would pick it."""
    monkeypatch.setattr(compat, "zip_writer_class", lambda: compat.WRITERS[request.param])
    return request.param


def _write(path, tensors, order=None):
    w = ShardWriter(path, [(k, tuple(t.shape), t.dtype) for k, t in tensors.items()])
    for k in order or reversed(list(tensors)):  # any order: records need not follow the pickle
        w.write(k, tensors[k])
    w.close()


def _bits(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("computed_offsets", [False, True])
def test_both_writers_write_files_torch_load_reads_bit_exactly(tmp_path, backend, mmap, computed_offsets, monkeypatch):
    from torch.utils.serialization import config

    # torch.load may compute offsets instead of reading them; records written out of order must still load
    monkeypatch.setattr(config.load, "calculate_storage_offsets", computed_offsets)
    path = tmp_path / "consolidated.00.pth"
    _write(path, TENSORS)
    got = torch.load(path, mmap=mmap, weights_only=True, map_location="cpu")
    assert list(got) == list(TENSORS)
    for k, want in TENSORS.items():
        assert got[k].dtype == want.dtype and got[k].shape == want.shape
        assert torch.equal(_bits(got[k]), _bits(want)), k
        if mmap and want.numel():
            assert got[k].data_ptr() % compat.ALIGNMENT == 0  # mapped at an aligned offset in the file


def test_the_zipfile_writer_stores_records_uncompressed_and_aligned(tmp_path, backend):
    path = tmp_path / "x.pth"
    _write(path, TENSORS)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # every record's CRC is right
        data = [i for i in z.infolist() if "/data/" in i.filename]
        assert len(data) == len(TENSORS) and all(i.compress_type == zipfile.ZIP_STORED for i in data)
        with open(path, "rb") as f:
            for i in data:
                f.seek(i.header_offset + 26)
                name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
                assert (i.header_offset + 30 + name_len + extra_len) % 64 == 0, i.filename


def test_the_private_writer_passes_its_check_on_this_torch():
    assert compat.zip_writer_class() is compat.WRITERS["torch"]


def test_a_private_writer_that_fails_its_check_is_not_used(tmp_path, monkeypatch):
    class Broken:
        """Writes records whose bytes torch then cannot read back."""

        def __init__(self, f, *a):
            self.f = f

        def write_record(self, name, data, size):
            self.f.write(b"junk")

        def write_end_of_file(self):
            pass

    monkeypatch.setattr(torch._C, "PyTorchFileWriter", Broken)
    assert compat.zip_writer_class() is compat.WRITERS["zipfile"]
    _write(tmp_path / "x.pth", TENSORS)
    got = torch.load(tmp_path / "x.pth", mmap=True, weights_only=True)
    assert all(torch.equal(_bits(got[k]), _bits(t)) for k, t in TENSORS.items())
    monkeypatch.delattr(torch._C, "PyTorchFileWriter")
    assert compat.zip_writer_class() is compat.WRITERS["zipfile"]


def test_the_use_count_passes_its_check_on_this_torch():
    count = compat.storage_use_count()
    t = torch.empty(8)
    before = count(t)
    v = t[2:]
    assert count(t) == before + 1
    del v
    assert count(t) == before


@pytest.mark.parametrize("fake", [lambda cdata: 1, lambda cdata: 1 / 0], ids=["constant", "raises"])
def test_a_use_count_that_fails_its_check_means_no_buffer_is_reused(monkeypatch, fake):
    monkeypatch.setattr(torch._C, "_storage_Use_Count", fake)
    assert compat.storage_use_count() is None
    pool = BufferPool()
    a = pool(256)
    b = pool(256)
    assert a.data_ptr() != b.data_ptr()  # a is still live: never handed out twice
    assert pool._held == []  # nothing is kept for reuse


_FULL_DISK = """
import resource, signal, sys, torch
sys.path.insert(0, {root!r})
from slowllama import compat
from slowllama.formats.meta import ShardWriter
compat.zip_writer_class = lambda: compat.WRITERS[{backend!r}]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
w = ShardWriter(__import__("pathlib").Path({path!r}), [("a", (100_000,), torch.float32), ("b", (4,), torch.float32)])
try:
    w.write("a", torch.zeros(100_000))
except OSError as e:
    print("OSError", e.errno, e)
    del w
    import gc; gc.collect()
    sys.exit(3)
"""


def test_a_full_disk_is_an_oserror_and_a_clean_close_with_either_writer(tmp_path, backend):
    path = tmp_path / "consolidated.00.pth"
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(_FULL_DISK.format(
        root=str(ROOT), backend=backend, path=str(path)))], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr  # not 134: no C++ exception escaped a destructor
    assert r.stdout.startswith(f"OSError 27 {path}: write failed") and str(path) in r.stdout and "disk full" in r.stdout
    assert r.stderr == ""
