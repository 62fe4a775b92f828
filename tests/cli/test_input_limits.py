"""Inputs past what the model or the disk can hold: one error line, early, and nothing written or lost."""
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import test_gen
from slowllama.cli import merge_lora
from slowllama.cli.finetune import DEMO_MODEL
from slowllama.formats.meta import MetaCheckpoint, export_meta, split_key
from slowllama.model.lora import ADAPTERS, Adapters, LoraConfig
from slowllama.model.transformer import ModelArgs

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TINY = DEMO_MODEL
LORA = LoraConfig(rank=2, alpha=4.0, targets=("wq", "w2"))


def _tree(folder: Path) -> dict[str, str]:
    """Every file under folder (names relative to it) -> sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


def _adapters(tmp_path, name, **change) -> Path:
    """An adapter file made for the demo's tiny model with some of its params.json changed."""
    params = json.loads((TINY / "params.json").read_text())
    args = ModelArgs(**{**params, "vocab_size": 320, **change})
    path = tmp_path / f"{name}.blk"
    Adapters.init(args, LORA, seed=0).save(path, durable=False)
    return path


# ---- params.json that promises more than the shards hold ----

_MEASURE = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from slowllama.formats.meta import MetaCheckpoint
from slowllama.errors import ConfigError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
try:
    MetaCheckpoint({model!r})
    err = None
except ConfigError as e:
    err = str(e)
print(json.dumps({{"seconds": time.perf_counter() - t, "error": err,
                  "extra_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}}))
"""


@pytest.mark.parametrize("change", [{"n_layers": 1_000_000}, {"dim": 2 ** 30}, {"n_layers": 3}],
                         ids=["a million layers", "huge dim", "one layer fewer"])
def test_a_params_json_bigger_than_the_shards_fails_at_once(tmp_path, change):
    model = tmp_path / "m"
    shutil.copytree(TINY, model)
    params = json.loads((model / "params.json").read_text())
    (model / "params.json").write_text(json.dumps({**params, **change}))
    r = subprocess.run([sys.executable, "-c", _MEASURE.format(root=str(ROOT), model=str(model))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["error"] and got["error"].startswith(str(model / "params.json") + ":"), got
    assert "\n" not in got["error"]
    assert got["seconds"] < 1.0 and got["extra_kb"] < 100_000, got


# ---- test_gen.py ----

def test_test_gen_refuses_more_tokens_than_the_context(capsys, monkeypatch):
    read = []
    monkeypatch.setattr(MetaCheckpoint, "read_module", lambda self, m: read.append(m))
    rc = test_gen.main([str(TINY), "cpu", "--prompt", "On Monday", "--max-new-tokens", "1000000"])
    assert rc == 2
    line = _error_line(capsys)
    assert "--max-new-tokens 1000000" in line and "4096" in line and "context" in line
    assert read == [] and capsys.readouterr().out == ""


def test_max_seq_len_comes_from_params_json(tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(TINY, model)
    params = json.loads((model / "params.json").read_text())
    (model / "params.json").write_text(json.dumps({**params, "max_seq_len": 8}))
    assert MetaCheckpoint(model).args.max_seq_len == 8
    # "On Monday" is a few tokens plus bos: with 8 new ones it no longer fits in 8
    assert test_gen.main([str(model), "cpu", "--prompt", "On Monday", "--max-new-tokens", "8"]) == 2
    assert "context of 8 tokens" in _error_line(capsys)
    for bad in (0, -1, "4096"):
        (model / "params.json").write_text(json.dumps({**params, "max_seq_len": bad}))
        with pytest.raises(ValueError, match="params.json: max_seq_len must be a positive integer"):
            MetaCheckpoint(model)


@pytest.mark.parametrize("change,what", [({"n_layers": 3}, "adapters on 3 layers"),
                                          ({"dim": 64}, "adapter layers.0.wq has A [2, 64]")],
                         ids=["layer count", "shapes"])
def test_test_gen_refuses_an_adapter_file_of_another_model(tmp_path, capsys, change, what):
    path = _adapters(tmp_path, "other", **change)
    rc = test_gen.main([str(TINY), "cpu", "--max-new-tokens", "2", "--lora", str(path)])
    assert rc == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: {path}: ") and what in line
    assert capsys.readouterr().out == ""


def test_adapters_must_cover_the_file_s_targets_on_every_layer(tmp_path):
    args = MetaCheckpoint(TINY).args
    ad = Adapters.init(args, LORA, seed=0)
    ad.check_args(args, Path("x.blk"))  # the adapters made for this model fit it
    del ad.params["layers.2"]["w2"]
    with pytest.raises(ValueError, match=r"^x.blk: layers.2 has adapters on wq, the file's targets are wq,w2$"):
        ad.check_args(args, Path("x.blk"))


def test_a_damaged_adapter_file_is_one_error(tmp_path):
    args = MetaCheckpoint(TINY).args
    ad = Adapters.init(args, LORA, seed=0)
    block = ad.to_block()
    block.params["layers.0.wq.C"] = block.params.pop("layers.0.wq.B")
    from slowllama.blockfile import write_block

    write_block(tmp_path / "bad.blk", block, ADAPTERS, durable=False)
    with pytest.raises(ValueError, match=r"bad.blk: unexpected tensor 'layers.0.wq.C'"):
        Adapters.load(tmp_path / "bad.blk")


# ---- tools/merge_lora.py ----

def test_merge_lora_refuses_an_adapter_file_of_another_model(tmp_path, capsys):
    path = _adapters(tmp_path, "other", n_layers=5)
    out = tmp_path / "merged"
    assert merge_lora.main([str(TINY), str(path), str(out)]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: {path}: ") and "adapters on 5 layers" in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["other.blk"]


def test_merge_lora_refuses_an_out_folder_that_holds_files(tmp_path, capsys):
    path = _adapters(tmp_path, "ad")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = _tree(tmp_path)
    assert merge_lora.main([str(TINY), str(path), str(out)]) == 2
    assert "holds files slowllama did not write" in _error_line(capsys)
    assert _tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ad.blk", "merged"]


def test_merge_lora_refuses_out_inside_or_equal_to_base(tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(TINY, base)
    path = _adapters(tmp_path, "ad")
    before = _tree(base)
    for out in (base, base / "merged", base / "." / "x" / ".."):
        assert merge_lora.main([str(base), str(path), str(out)]) == 2
        assert "must not be the model directory" in _error_line(capsys)
    assert _tree(base) == before


def test_merge_lora_writes_into_a_new_folder(tmp_path, capsys):
    path = _adapters(tmp_path, "ad")
    out = tmp_path / "merged"
    assert merge_lora.main([str(TINY), str(path), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".slowllama", "consolidated.00.pth", "params.json",
                                                      "tokenizer.model"]
    # the merged weight is the base plus scale * B @ A, from the files alone
    base = torch.load(TINY / "consolidated.00.pth", weights_only=True)
    merged = torch.load(out / "consolidated.00.pth", weights_only=True, mmap=True)
    a, b = (t.detach() for t in Adapters.load(path).params["layers.1"]["w2"])
    want = base["layers.1.feed_forward.w2.weight"].float() + LORA.scale * b @ a
    torch.testing.assert_close(merged["layers.1.feed_forward.w2.weight"], want.to(merged["norm.weight"].dtype))


# ---- a full disk during export ----

_LIMITED = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""

_EXPORT = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
from slowllama.formats.meta import MetaCheckpoint, export_meta, split_key
from slowllama.errors import ConfigError
ckpt = MetaCheckpoint(sys.argv[1])
try:
    export_meta(Path(sys.argv[2]), args=ckpt.args, params_src=ckpt.params_path, tokenizer_src=ckpt.tokenizer,
                tensors=[(k, ckpt.shapes[k], ckpt.dtypes[k]) for k in ckpt.key_order], n_shards=1,
                modules=list(dict.fromkeys(split_key(k)[0] for k in ckpt.key_order)), read_module=ckpt.read_module)
except (ConfigError, OSError) as e:
    print(f"error: {{e}}", file=sys.stderr)
    sys.exit(2)
"""


def _run_limited(argv, limit):
    code = _LIMITED.format(limit=limit, argv=argv)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("backend", ["torch", "zipfile"])
def test_a_full_disk_during_export_keeps_the_previous_export(tmp_path, backend):
    out = tmp_path / "export"
    ckpt = MetaCheckpoint(TINY)
    modules = list(dict.fromkeys(split_key(k)[0] for k in ckpt.key_order))
    export_meta(out, args=ckpt.args, params_src=ckpt.params_path, tokenizer_src=ckpt.tokenizer,
                tensors=[(k, ckpt.shapes[k], ckpt.dtypes[k]) for k in ckpt.key_order], n_shards=1,
                modules=modules, read_module=ckpt.read_module)
    before = _tree(tmp_path)
    script = tmp_path.parent / f"export_{backend}.py"
    pick = f"from slowllama import compat\ncompat.zip_writer_class = lambda: compat.WRITERS[{backend!r}]\n"
    script.write_text(_EXPORT.format(root=str(ROOT)).replace("ckpt = MetaCheckpoint", pick + "ckpt = MetaCheckpoint"))
    r = _run_limited([str(script), str(TINY), str(out)], limit=1_000_000)  # the shard is 1.75 MB
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "consolidated.00.pth" in last and "disk full" in last, r.stderr
    assert _tree(tmp_path) == before  # the previous export as it was, and no temp folder left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_merge_lora_on_a_full_disk_is_one_error_line_and_leaves_nothing(tmp_path):
    path = _adapters(tmp_path, "ad")
    out = tmp_path / "merged"
    r = _run_limited([str(ROOT / "tools" / "merge_lora.py"), str(TINY), str(path), str(out)], limit=1_000_000)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "disk full" in last and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad.blk"]
