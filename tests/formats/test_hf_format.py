"""Hugging Face format: config.json parsing, the name table, the RoPE permutation, reading and export.

Every model here is a tiny one that transformers builds and saves locally; transformers
and safetensors are the references.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from slowllama.errors import ConfigError
from slowllama.formats import open_checkpoint
from slowllama.formats.hf import (
    HF_TO_META,
    HFCheckpoint,
    args_from_config,
    export_hf,
    from_meta,
    plan_shards,
    to_hf_name,
    to_meta,
    to_meta_name,
)
from slowllama.model.transformer import module_names

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
             max_position_embeddings=128, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
# name -> (config class, config kwargs, dtype on disk, max_shard_size for save_pretrained, config style)
VARIANTS = {
    "llama2": ("llama", dict(num_key_value_heads=4), torch.float32, None, "5.x"),
    "llama31_gqa": ("llama", dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE), torch.float32, None, "5.x"),
    "tied_head_dim": ("llama", dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
                                    rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
                      torch.float32, None, "5.x"),
    "mistral": ("mistral", dict(num_key_value_heads=2, sliding_window=None), torch.float32, None, "5.x"),
    "sharded_bf16": ("llama", dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE), torch.bfloat16, "40KB", "5.x"),
    "config_4x": ("llama", dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE), torch.float32, None, "4.x"),
}


# kind -> transformers' config and model class names
HF_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
              "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
HF_CLASSES.update(gemma2=("Gemma2Config", "Gemma2ForCausalLM"), gemma3=("Gemma3TextConfig", "Gemma3ForCausalLM"),
                  olmo2=("Olmo2Config", "Olmo2ForCausalLM"), phi3=("Phi3Config", "Phi3ForCausalLM"),
                  smollm3=("SmolLM3Config", "SmolLM3ForCausalLM"))


def make_config(kind: str, **kw):
    return getattr(transformers, HF_CLASSES[kind][0])(**{**SMALL, **kw})


def model_class(kind: str):
    return getattr(transformers, HF_CLASSES[kind][1])


def to_4x_style(config_path: Path):
    """Rewrite a transformers 5 config.json as transformers 4.x wrote it: rope_theta + rope_scaling, torch_dtype."""
    raw = json.loads(config_path.read_text())
    rope = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = rope.pop("rope_theta")
    raw["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    raw["torch_dtype"] = raw.pop("dtype")
    config_path.write_text(json.dumps(raw, indent=2))


def make_hf_model(folder: Path, variant: str, seed: int = 0) -> Path:
    kind, kw, dtype, shard, style = VARIANTS[variant]
    torch.manual_seed(seed)
    model = model_class(kind)(make_config(kind, **kw))
    with torch.no_grad():  # move every weight off its init (norms off 1) so no mapping error can hide
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.to(dtype).save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    if style == "4.x":
        to_4x_style(folder / "config.json")
    return folder


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    cache = {}

    def get(variant: str) -> Path:
        if variant not in cache:
            cache[variant] = make_hf_model(tmp_path_factory.mktemp(variant), variant)
        return cache[variant]
    return get


def export_folder(ckpt: HFCheckpoint, out: Path, **kw) -> Path:
    tensors = [(k, ckpt.shapes[k], ckpt.dtypes[k]) for k in ckpt.key_order]
    work = export_hf(out, args=ckpt.args, config_src=ckpt.config_path, tensors=tensors, modules=module_names(ckpt.args),
                     read_module=ckpt.read_module, side_files=ckpt.side_files, **kw)
    assert work.parent == out.parent and not out.exists()
    work.rename(out)
    return out


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


# ---- names and layouts -------------------------------------------------------

def test_name_table_reads_both_ways():
    for hf, meta in HF_TO_META.items():
        assert to_meta_name(hf.format(7)) == meta.format(7)
        assert to_hf_name(meta.format(7)) == hf.format(7)
    assert to_meta_name("model.layers.12.mlp.up_proj.weight") == "layers.12.feed_forward.w3.weight"
    assert to_hf_name("layers.0.feed_forward.w2.weight") == "model.layers.0.mlp.down_proj.weight"
    with pytest.raises(ConfigError, match="model.layers.0.mlp.gate_proj.bias"):
        to_meta_name("model.layers.0.mlp.gate_proj.bias")
    with pytest.raises(ConfigError, match="rope.freqs"):
        to_hf_name("rope.freqs")


@pytest.mark.parametrize("heads,head_dim,dim,dtype", [(4, 16, 64, torch.float32), (2, 32, 64, torch.bfloat16),
                                                      (8, 8, 48, torch.float16)])
def test_rope_permutation_round_trips_bit_identically(heads, head_dim, dim, dtype):
    w = torch.randn(heads * head_dim, dim).to(dtype)
    meta = to_meta(w, heads, head_dim)
    assert not torch.equal(meta, w)
    assert torch.equal(from_meta(meta, heads, head_dim), w)
    assert torch.equal(to_meta(from_meta(w, heads, head_dim), heads, head_dim), w)
    # Hugging Face row i (first half of a head) pairs with row i + head_dim/2; Meta puts them side by side
    assert torch.equal(meta[0], w[0]) and torch.equal(meta[1], w[head_dim // 2])


# ---- config.json -------------------------------------------------------------

def test_transformers_writes_rope_parameters_and_4x_style_reads_the_same(hf_models):
    cfg5 = json.loads((hf_models("llama31_gqa") / "config.json").read_text())
    assert "rope_parameters" in cfg5 and "rope_scaling" not in cfg5 and "rope_theta" not in cfg5
    cfg4 = json.loads((hf_models("config_4x") / "config.json").read_text())
    assert cfg4["rope_scaling"]["rope_type"] == "llama3" and "rope_parameters" not in cfg4
    a5 = args_from_config(hf_models("llama31_gqa") / "config.json")
    a4 = args_from_config(hf_models("config_4x") / "config.json")
    assert a5 == a4
    assert a5.rope_theta == 500000.0 and a5.n_kv_heads == 2 and a5.max_seq_len == 128 and a5.intermediate_size == 96
    assert a5.rope_scaling == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}


def test_config_fields(hf_models):
    tied = args_from_config(hf_models("tied_head_dim") / "config.json")
    assert tied.tie_word_embeddings and tied.head_dim == 32 and tied.dim == 64
    assert tied.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    mistral = args_from_config(hf_models("mistral") / "config.json")
    assert mistral.sliding_window is None and mistral.rope_scaling is None and mistral.norm_eps == 1e-5
    assert mistral.window(0) is None and mistral.window(1) is None  # no window: full causal


def _write_config(tmp_path, kind="llama", edit=None, **kw) -> Path:
    make_config(kind, **kw).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    if edit:
        raw = json.loads(path.read_text())
        edit(raw)
        path.write_text(json.dumps(raw))
    return path


def _set(key, value):
    return lambda raw: raw.__setitem__(key, value)


@pytest.mark.parametrize("edit,key", [
    (_set("attention_bias", True), "attention_bias"),
    (_set("mlp_bias", True), "mlp_bias"),
    (_set("model_type", "gemma"), "model_type"),
    (_set("architectures", ["GemmaForCausalLM"]), "architectures"),
    (_set("hidden_act", "gelu"), "hidden_act"),
    (lambda raw: raw["rope_parameters"].update(rope_type="yarn", factor=4.0), "rope_parameters.rope_type 'yarn'"),
    (lambda raw: raw.update(rope_parameters=None, rope_theta=1e4, rope_scaling={"type": "dynamic", "factor": 2.0}),
     "rope_scaling.rope_type 'dynamic'"),
    (lambda raw: raw["rope_parameters"].update(rope_type="linear"), "lacks ['factor']"),
    (lambda raw: raw["rope_parameters"].update(attention_factor=2.0), "rope_parameters.attention_factor"),
    (lambda raw: raw.pop("hidden_size"), "hidden_size"),
])
def test_unsupported_configs_are_refused_by_name(tmp_path, edit, key):
    path = _write_config(tmp_path, edit=edit)
    with pytest.raises(ConfigError) as e:
        args_from_config(path)
    msg = str(e.value)
    assert str(path) in msg and key in msg and "\n" not in msg


def test_mistral_sliding_window_applies_to_every_layer(tmp_path):
    args = args_from_config(_write_config(tmp_path, "mistral", sliding_window=8, num_key_value_heads=2))
    assert args.sliding_window == 8 and args.layer_windows is None
    assert [args.window(i) for i in range(args.n_layers)] == [8, 8]


# ---- reading -----------------------------------------------------------------

def test_reads_meta_names_and_metadata(hf_models):
    ckpt = open_checkpoint(hf_models("sharded_bf16"))
    assert isinstance(ckpt, HFCheckpoint) and len(ckpt.shards) > 1 and ckpt.index_path is not None
    assert ckpt.checkpoint_dtype() == torch.bfloat16 and set(ckpt.dtypes.values()) == {torch.bfloat16}
    assert ckpt.key_order[:2] == ["tok_embeddings.weight", "layers.0.attention.wq.weight"]
    assert ckpt.key_order[-2:] == ["norm.weight", "output.weight"]
    assert set(ckpt.files) >= {ckpt.config_path, ckpt.index_path, *ckpt.shards}
    layer = ckpt.read_module("layers.1")
    assert layer["attention.wk.weight"].shape == (2 * 16, 64) and layer["feed_forward.w2.weight"].shape == (64, 96)
    tied = HFCheckpoint(hf_models("tied_head_dim"))
    assert "output.weight" not in tied.key_order and tied.read_module("output") == {}
    assert tied.read_module("layers.0")["attention.wq.weight"].shape == (4 * 32, 64)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("edit,match", [
    (lambda sd: sd.__setitem__("model.layers.1.mlp.up_proj.weight", torch.zeros(95, 64)),
     r"model.layers.1.mlp.up_proj.weight has shape \[95, 64\]"),
    (lambda sd: sd.pop("model.layers.1.post_attention_layernorm.weight"),
     "missing tensor 'model.layers.1.post_attention_layernorm.weight'"),
    (lambda sd: sd.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.zeros(64)),
     "model.layers.0.self_attn.q_proj.bias"),
    (lambda sd: sd.__setitem__("model.layers.2.input_layernorm.weight", torch.zeros(64)),
     "unexpected tensor 'model.layers.2.input_layernorm.weight'"),
    (lambda sd: sd.__setitem__("model.norm.weight", torch.zeros(64, dtype=torch.int32)), "model.norm.weight has dtype I32"),
])
def test_header_validation_names_the_tensor(hf_models, tmp_path, edit, match):
    folder = _rewrite(hf_models("llama2"), tmp_path / "bad", edit)
    with pytest.raises(ConfigError, match=match):
        HFCheckpoint(folder)


def test_index_naming_a_missing_shard_is_refused(hf_models, tmp_path):
    folder = shutil.copytree(hf_models("sharded_bf16"), tmp_path / "m")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ConfigError, match=shard.name):
        HFCheckpoint(folder)


def test_pickle_weights_are_refused(tmp_path):
    _write_config(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ConfigError, match="safetensors"):
        HFCheckpoint(tmp_path)


RSS_SCRIPT = """
import re, sys
from slowllama.formats.hf import HFCheckpoint
from slowllama.model.transformer import module_names

def status(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

ckpt = HFCheckpoint(sys.argv[1])
ckpt.read_module("layers.0")  # allocator and import warm-up
open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from the current RSS
before = status("VmRSS")
biggest = 0
for m in module_names(ckpt.args):
    biggest = max(biggest, sum(t.nbytes for t in ckpt.read_module(m).values()))
growth = status("VmHWM") - before
# the control: what holding the whole shard looks like to this measurement
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
from safetensors.torch import load_file
sum(float(t.sum()) for t in load_file(sys.argv[1] + "/model.safetensors").values())
print(growth, biggest, status("VmHWM") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_reading_never_holds_a_whole_shard(tmp_path):
    """One 95 MB shard, modules of about 2.6 MB: reading them all raises peak RSS by a few modules only."""
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=36, num_attention_heads=4,
                                   vocab_size=256)
    cfg.save_pretrained(tmp_path)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.LlamaForCausalLM(cfg).state_dict().items()}
    save_file({k: torch.randn(s) for k, s in shapes.items()}, tmp_path / "model.safetensors")
    shard = (tmp_path / "model.safetensors").stat().st_size
    assert shard > 90e6
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split()
    growth, biggest, whole = map(int, out)
    assert biggest < shard / 30
    assert growth < 4 * biggest, (growth, biggest, shard)
    assert whole > shard * 0.9  # the measurement does see a whole shard when one is held


# ---- export ------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_export_is_bit_identical_and_loads_in_transformers(hf_models, tmp_path, variant):
    src = hf_models(variant)
    ckpt = HFCheckpoint(src)
    out = export_folder(ckpt, tmp_path / "out", max_shard_size=40_000 if variant == "sharded_bf16" else 5 * 10**9)
    want, got = all_tensors(src), all_tensors(out)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert json.loads((out / "generation_config.json").read_text()) == json.loads((src / "generation_config.json").read_text())
    if variant == "tied_head_dim":
        assert "lm_head.weight" not in got
    sharded = len(list(out.glob("*.safetensors"))) > 1
    assert sharded == (variant == "sharded_bf16") == (out / "model.safetensors.index.json").exists()
    if sharded:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        # transformers' own split of the same tensors at the same max_shard_size ("40KB")
        assert index["weight_map"] == json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
        assert index["metadata"]["total_size"] == sum(t.nbytes for t in want.values())
        for f in out.glob("model-*.safetensors"):
            assert f.stat().st_size < 40_000 + 4096
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)


def test_shard_plan_equals_huggingface_hub():
    from huggingface_hub import split_torch_state_dict_into_shards

    shapes = [(10, 10), (30, 10), (5,), (100, 10), (20, 10), (20, 10), (7, 3), (50, 10)]
    sd = {f"t{i}": torch.zeros(s) for i, s in enumerate(shapes)}  # 400 B per 10 x 10
    for limit in (1000, 1600, 4000, 10**6):
        want = split_torch_state_dict_into_shards(sd, max_shard_size=limit).filename_to_tensors
        got = plan_shards([(k, t.shape, t.dtype) for k, t in sd.items()], limit)
        assert sorted(sorted(f"t{i}" for i in s) for s in got) == sorted(sorted(v) for v in want.values()), limit


def test_export_streams_one_tensor_at_a_time_into_valid_safetensors(hf_models, tmp_path):
    """A module whose tensors come in any dict order still lands in transformers' order; a failed export leaves nothing."""
    ckpt = HFCheckpoint(hf_models("llama2"))

    def reversed_read(m):
        return dict(reversed(list(ckpt.read_module(m).items())))
    tensors = [(k, ckpt.shapes[k], ckpt.dtypes[k]) for k in ckpt.key_order]
    work = export_hf(tmp_path / "a", args=ckpt.args, config_src=ckpt.config_path, tensors=tensors,
                     modules=module_names(ckpt.args), read_module=reversed_read)
    got = load_file(work / "model.safetensors")
    assert all(torch.equal(got[k], v) for k, v in load_file(hf_models("llama2") / "model.safetensors").items())

    def failing(m):
        if m == "layers.1":
            raise OSError("disk gone")
        return ckpt.read_module(m)
    with pytest.raises(OSError):
        export_hf(tmp_path / "b", args=ckpt.args, config_src=ckpt.config_path, tensors=tensors,
                  modules=module_names(ckpt.args), read_module=failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == [work.name]
