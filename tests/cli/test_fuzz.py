"""Fuzzing the readers: damaged checkpoints and block stores fail with ConfigError/StoreError, or read right.

Checkpoint variants (consolidated.00.pth truncated or with flipped bytes, params.json truncated or
flipped): MetaCheckpoint(dir) and read_module of every module either work or raise ConfigError, never
a raw RuntimeError/UnpicklingError/KeyError... A flip inside a tensor's data cannot be seen by torch
(Meta's format has no checksum), so a load that succeeds may differ from the original, but only in
as many elements as bytes were flipped, and every tensor it returns is finite.

Block store variants (a .blk file truncated, a byte flipped in its header or its data, manifest.json
truncated or flipped): BlockStore(root) and store.read(name) raise StoreError naming the module, or
return exactly the original data; a flip in the data area is always caught by the data checksum.

Variants tried: 130 checkpoints, 125 block stores (pytest -s prints the counts and outcomes).
"""
from __future__ import annotations

import json
import random
import shutil
from collections import Counter

import pytest
import torch

from slowllama.blockfile import StoreError
from slowllama.engine.store import BlockStore, file_stem, prepare
from slowllama.errors import ConfigError
from slowllama.formats.meta import MetaCheckpoint, split_key

SEED = 20240611
N_CKPT = {"shard-truncate": 20, "shard-flip": 40, "shard-flip-structure": 40, "params-truncate": 10,
          "params-flip": 20}
N_STORE = {"blk-truncate": 20, "blk-flip-header": 25, "blk-flip-data": 35, "manifest-truncate": 5,
           "manifest-flip": 40}


@pytest.fixture(scope="module")
def fuzz_model(model_factory):
    return model_factory("fuzz", dim=32, n_layers=2, n_heads=4, n_kv_heads=2, rope_freqs=True)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).reshape(t.numel(), -1)


def _differing(a: torch.Tensor, b: torch.Tensor) -> int:
    """Elements whose bytes differ."""
    return int((_bits(a) != _bits(b)).any(dim=1).sum())


def _flip(raw: bytearray, rng: random.Random, n: int, lo: int = 0, hi: int | None = None) -> list[int]:
    hi = len(raw) if hi is None else hi
    where = [rng.randrange(lo, hi) for _ in range(n)]
    for pos in where:
        raw[pos] ^= rng.randrange(1, 256)
    return where


def _read_all(ckpt: MetaCheckpoint) -> dict[str, dict[str, torch.Tensor]]:
    modules = dict.fromkeys(split_key(k)[0] for k in ckpt.key_order)
    return {m: ckpt.read_module(m) for m in modules}


def test_damaged_checkpoints_raise_config_error_or_read_right(fuzz_model, tmp_path):
    original = _read_all(MetaCheckpoint(fuzz_model))
    shard = (fuzz_model / "consolidated.00.pth").read_bytes()
    params = (fuzz_model / "params.json").read_bytes()
    pkl_end = shard.index(b"PK", 64)  # the first zip record, data.pkl, ends where the next one starts
    rng = random.Random(SEED)
    outcomes: Counter = Counter()
    problems = []
    i = 0
    for kind, n in N_CKPT.items():
        for _ in range(n):
            i += 1
            d = tmp_path / f"v{i}"
            d.mkdir()
            (d / "tokenizer.model").symlink_to(fuzz_model / "tokenizer.model")
            s, p = bytearray(shard), bytearray(params)
            flipped = 0
            if kind == "shard-truncate":
                s = s[: rng.randrange(0, len(s))]
            elif kind == "shard-flip":
                flipped = rng.choice([1, 1, 2, 3])
                _flip(s, rng, flipped)
            elif kind == "shard-flip-structure":  # the pickle at the start, or the zip directory at the end
                flipped = 1
                _flip(s, rng, 1, *rng.choice([(0, pkl_end), (len(s) - 2048, len(s))]))
            elif kind == "params-truncate":
                p = p[: rng.randrange(0, len(p))]
            else:
                _flip(p, rng, rng.choice([1, 2]))
            (d / "consolidated.00.pth").write_bytes(bytes(s))
            (d / "params.json").write_bytes(bytes(p))
            what = f"{kind} #{i}"
            try:
                ckpt = MetaCheckpoint(d)
                got = _read_all(ckpt)
            except ConfigError as e:
                outcomes[kind, "refused"] += 1
                assert str(e), what
                continue
            except Exception as e:  # noqa: BLE001 - the point of the test
                problems.append(f"{what}: raised {type(e).__name__}: {e}")
                continue
            outcomes[kind, "read"] += 1
            if list(got) != list(original):
                problems.append(f"{what}: modules {list(got)} instead of {list(original)}")
                continue
            diff = 0
            for m, tensors in original.items():
                for k, t in tensors.items():
                    g = got[m].get(k)
                    if g is None or g.shape != t.shape or g.dtype != t.dtype:
                        problems.append(f"{what}: {m}.{k} read as {None if g is None else (g.shape, g.dtype)}")
                        continue
                    assert torch.isfinite(g).all(), what
                    diff += _differing(g, t)
            if diff > flipped:
                problems.append(f"{what}: {diff} elements differ from the original after {flipped} flipped bytes")
    print(f"\ntest_fuzz: {i} checkpoint variants: {dict(sorted(outcomes.items()))}")
    assert not problems, "\n".join(problems[:20])
    assert outcomes["shard-truncate", "refused"] == N_CKPT["shard-truncate"]


@pytest.fixture(scope="module")
def fuzz_store(fuzz_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-store") / "store"
    store = prepare(MetaCheckpoint(fuzz_model), root)
    return root, {m: store.read(m) for m in store.modules}


def _content(manifest: dict) -> dict:
    """A manifest without its own checksum."""
    return {k: v for k, v in manifest.items() if k != "manifest_crc32"}


def _same_block(a, b) -> bool:
    return (a.step == b.step and list(a.params) == list(b.params)
            and all(torch.equal(_bits(a.params[k]), _bits(b.params[k])) for k in a.params))


def test_damaged_block_stores_raise_store_error_naming_the_module(fuzz_store, tmp_path):
    src, original = fuzz_store
    manifest = _content(json.loads((src / "manifest.json").read_text()))
    modules = list(original)
    rng = random.Random(SEED + 1)
    outcomes: Counter = Counter()
    problems = []
    i = 0
    for kind, n in N_STORE.items():
        for _ in range(n):
            i += 1
            root = tmp_path / f"v{i}" / "store"
            shutil.copytree(src, root)
            victim = None
            if kind.startswith("blk"):
                victim = rng.choice(modules)
                path = root / f"{file_stem(victim)}.blk"
                raw = bytearray(path.read_bytes())
                head = 16 + int.from_bytes(raw[8:12], "little")
                data_start = head + (-head) % 64
                if kind == "blk-truncate":
                    raw = raw[: rng.randrange(0, len(raw))]
                elif kind == "blk-flip-header":
                    _flip(raw, rng, 1, 0, head)
                else:
                    _flip(raw, rng, 1, data_start, len(raw))
                path.write_bytes(bytes(raw))
            else:
                path = root / "manifest.json"
                raw = bytearray(path.read_bytes())
                if kind == "manifest-truncate":
                    raw = raw[: rng.randrange(0, len(raw))]
                else:
                    _flip(raw, rng, 1)
                path.write_bytes(bytes(raw))
            what = f"{kind} #{i}" + (f" ({victim})" if victim else "")
            try:
                store = BlockStore(root)
            except StoreError as e:
                outcomes[kind, "refused manifest"] += 1
                if "manifest" not in str(e):
                    problems.append(f"{what}: BlockStore error does not name the manifest: {e}")
                continue
            except Exception as e:  # noqa: BLE001
                problems.append(f"{what}: BlockStore raised {type(e).__name__}: {e}")
                continue
            if _content(store.manifest) != manifest:
                changed = sorted(k for k in manifest if manifest[k] != store.manifest.get(k))
                problems.append(f"{what}: damaged manifest accepted, changed {changed}")
                continue
            for m in store.modules:
                try:
                    step = store.step_of(m)
                    b = store.read(m)
                except StoreError as e:
                    outcomes[kind, "refused module"] += 1
                    if m not in str(e):
                        problems.append(f"{what}: error for {m} does not name it: {e}")
                    if victim is not None and m != victim:
                        problems.append(f"{what}: undamaged module {m} refused: {e}")
                    continue
                except Exception as e:  # noqa: BLE001
                    problems.append(f"{what}: read of {m} raised {type(e).__name__}: {e}")
                    continue
                if m not in original or not _same_block(b, original[m]) or step != original[m].step:
                    problems.append(f"{what}: {m} read without an error but differs from what was written")
                    continue
                if m == victim:
                    outcomes[kind, "read intact"] += 1  # e.g. a flip in the padding after the header
                    if kind == "blk-flip-data":
                        problems.append(f"{what}: a flipped data byte went unnoticed")
            try:
                found = store.verify()
            except Exception as e:  # noqa: BLE001
                problems.append(f"{what}: verify raised {type(e).__name__}: {e}")
                continue
            if kind in ("blk-truncate", "blk-flip-data") and not any(victim in p for p in found):
                problems.append(f"{what}: verify did not report {victim}: {found}")
    print(f"\ntest_fuzz: {i} block store variants: {dict(sorted(outcomes.items()))}")
    assert not problems, "\n".join(problems[:20])
