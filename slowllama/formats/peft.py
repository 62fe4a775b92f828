"""LoRA adapters in PEFT's format: adapter_config.json and adapter_model.safetensors.

`peft.PeftModel.from_pretrained(hf_model, folder)` loads what export_peft writes. Module
names come from hf.py's name table; B's rows for wq and wk take the same rotate-half
permutation as the Hugging Face weights, so that B @ A is the permuted delta (A's columns
index the layer's input, which no permutation touches).

Phi-3's fused modules (qkv_proj, gate_up_proj) hold several of slowllama's targets. Their adapter
is exact with the parts' ranks summed: A stacks the parts' A's, B is block-diagonal in the parts'
B's, so B @ A stacks each part's own B @ A by rows; rank_pattern and alpha_pattern give those
modules rank k*r and alpha k*alpha, which keeps peft's scale alpha / r, and the weights file's metadata
names the parts stacked (FUSED_METADATA), so that load_peft splits them back. A plain fused adapter
(peft's own, one rank) reads back as each part sharing A with its rows of B, which is exact too.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from ..errors import ConfigError
from ..fsutil import read_json_object
from ..model.lora import TARGETS, Adapters, LoraConfig, _shape
from ..model.transformer import ModelArgs
from ..paths import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE
from .hf import _rope_heads, from_meta, fused_parts, to_hf_name, to_meta, to_meta_name

log = logging.getLogger(__name__)

CONFIG_FILE, WEIGHTS_FILE = PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE
PREFIX = "base_model.model."  # PeftModel wraps the causal LM, whose own names start with "model."
_AB = {"A": "lora_A", "B": "lora_B"}
FUSED_METADATA = "slowllama_fused_parts"  # {"qkv_proj": ["wq", "wv"], ...}: the parts each fused adapter stacks
_PATTERNS = ("rank_pattern", "alpha_pattern")  # allowed only as export_peft writes them for fused modules
# Config values that change what the adapter computes: load_peft reads only adapters with these.
_PLAIN = {"peft_type": "LORA", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": "none",
          "lora_bias": False, "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {},
          "alpha_pattern": {}, "target_parameters": None, "trainable_token_indices": None}


def _hf_module(layer: str, target: str, args: ModelArgs | None = None) -> str:
    """('layers.3', 'wq') -> 'model.layers.3.self_attn.q_proj' (Phi-3: ...qkv_proj), through hf.py's name table."""
    return to_hf_name(f"{layer}.{TARGETS[target]}.weight", args).removesuffix(".weight")


def _meta_targets(hf_module: str, args: ModelArgs) -> tuple[str, list[str]]:
    """'model.layers.3.self_attn.q_proj' -> ('layers.3', ['wq']) (Phi-3's qkv_proj: ['wq', 'wk', 'wv']);
    ConfigError for anything else."""
    metas = fused_parts(hf_module + ".weight", args) or [to_meta_name(hf_module + ".weight", args)]
    by_module = {m: t for t, m in TARGETS.items()}
    out = []
    for meta in metas:  # 'layers.3.attention.wq.weight'
        layer, _, inner = meta.removesuffix(".weight").partition(".")[2].partition(".")
        if not meta.startswith("layers.") or inner not in by_module:
            raise ConfigError(f"{hf_module} is not a layer slowllama puts adapters on")
        out.append(by_module[inner])
    return f"layers.{layer}", out


def _rope(args: ModelArgs, layer: str, target: str, b: torch.Tensor, convert) -> torch.Tensor:
    heads = _rope_heads(args, f"{layer}.{TARGETS[target]}.weight")
    return b if heads is None else convert(b, heads, args.head_dim, args.rotary_dim)


def _peft_tensors(adapters: Adapters, args: ModelArgs) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """PEFT's lora_A / lora_B tensors, and for each fused module name the parts its adapter stacks."""
    tensors, stacked = {}, {}
    for layer in sorted(adapters.params, key=lambda m: int(m.split(".")[1])):
        held = adapters.params[layer]
        for module in dict.fromkeys(_hf_module(layer, t, args) for t in held):
            _, parts = _meta_targets(module, args)
            present = [t for t in parts if t in held]
            a = torch.cat([held[t][0].detach().to("cpu", torch.float32) for t in present])
            rank = held[present[0]][0].shape[0]
            b = torch.zeros(sum(_shape(args, t)[0] for t in parts), rank * len(present))
            row = col = 0
            for t in parts:  # B block-diagonal: part t's rows see only its own A's rows
                rows = _shape(args, t)[0]
                if t in held:
                    b[row:row + rows, col:col + rank] = _rope(args, layer, t, held[t][1].detach().to("cpu", torch.float32),
                                                              from_meta)
                    col += rank
                row += rows
            name = PREFIX + module
            tensors[f"{name}.lora_A.weight"] = a.contiguous()
            tensors[f"{name}.lora_B.weight"] = b.contiguous()
            if len(parts) > 1:
                stacked[module.rsplit(".", 1)[1]] = present
    return tensors, stacked


def peft_files(adapters: Adapters, args: ModelArgs, base_model_name_or_path: str) -> dict[str, bytes]:
    """{file name: bytes} of a PEFT LoRA folder holding these adapters (small: rank x layer width)."""
    from safetensors.torch import save

    cfg = adapters.cfg
    tensors, stacked = _peft_tensors(adapters, args)

    def number(x: float):
        return int(x) if float(x).is_integer() else x

    config = {
        **_PLAIN, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path, "revision": None,
        "inference_mode": True, "r": cfg.rank, "lora_alpha": number(cfg.alpha), "lora_dropout": 0.0,
        "target_modules": sorted({_hf_module("layers.0", t, args).rsplit(".", 1)[1] for t in cfg.targets}),
        "init_lora_weights": True, "layers_pattern": None, "exclude_modules": None,
    }
    metadata = {"format": "pt"}
    if stacked:  # Phi-3's fused modules: rank and alpha times the parts stacked, so alpha / r stays cfg.scale
        config.update(_fused_patterns(stacked, cfg.rank, cfg.alpha))
        metadata[FUSED_METADATA] = json.dumps(stacked, sort_keys=True)
    return {CONFIG_FILE: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
            WEIGHTS_FILE: save(tensors, metadata=metadata)}


def _fused_patterns(stacked: dict[str, list[str]], rank: int, alpha: float) -> dict[str, dict]:
    def number(x: float):
        return int(x) if float(x).is_integer() else x

    return {"rank_pattern": {m: len(p) * rank for m, p in sorted(stacked.items())},
            "alpha_pattern": {m: number(len(p) * alpha) for m, p in sorted(stacked.items())}}


def export_peft(out_dir: Path, adapters: Adapters, args: ModelArgs, base_model_name_or_path: str,
                marker: dict | None = None) -> Path:
    """Write a PEFT folder at out_dir, replacing an earlier slowllama export there atomically."""
    from ..fsutil import atomic_write_bytes, fsync_dir, tmp_path
    from ..paths import check_folder, mark_owned, remove_stale_tmp, replace_dir

    out_dir = Path(out_dir)
    check_folder(out_dir, "export", "--out")
    files = peft_files(adapters, args, base_model_name_or_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = tmp_path(out_dir)
    remove_stale_tmp(out_dir)
    work.mkdir()
    try:
        mark_owned(work, "export", **(marker or {}))
        for name, data in files.items():
            atomic_write_bytes(work / name, [data])
        fsync_dir(work)
        replace_dir(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("exported PEFT adapters to %s", out_dir)
    return out_dir


def _read_config(path: Path) -> dict:
    raw = read_json_object(path)
    for key, want in _PLAIN.items():
        if key in _PATTERNS:  # load_peft checks them against the weights' fused parts
            continue
        value = raw.get(key, want)
        if value != want and not (want in (None, {}) and not value):  # null, {} and [] all mean "none"
            raise ConfigError(f"{path}: {key} {raw[key]!r} is not supported (slowllama reads {want!r})")
    return raw


def load_peft(folder: str | Path, args: ModelArgs) -> Adapters:
    """The adapters of a PEFT LoRA folder, in slowllama's layout, checked against args."""
    from safetensors import safe_open

    folder = Path(folder)
    config_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    raw = _read_config(config_path)
    try:
        cfg_rank, cfg_alpha = raw["r"], raw["lora_alpha"]
    except KeyError as e:
        raise ConfigError(f"{config_path}: {e.args[0]} is missing") from e
    if not weights.is_file():
        raise ConfigError(f"{weights}: missing (slowllama reads safetensors adapters only)")
    params: dict[str, dict[str, list]] = {}
    try:
        f = safe_open(str(weights), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError
        raise ConfigError(f"{weights}: unreadable safetensors file ({type(e).__name__}: {e})") from e
    with f:
        try:
            stacked = json.loads((f.metadata() or {}).get(FUSED_METADATA, "{}"))
        except ValueError as e:
            raise ConfigError(f"{weights}: metadata {FUSED_METADATA} is not JSON") from e
        want = _fused_patterns(stacked, cfg_rank, cfg_alpha) if stacked else {k: {} for k in _PATTERNS}
        for k in _PATTERNS:
            if (raw.get(k) or {}) != want[k]:
                raise ConfigError(f"{config_path}: {k} {raw.get(k)!r} is not supported "
                                  f"(slowllama reads {want[k]!r}, from the fused parts its weights name)")
        for key in f.keys():
            name, _, ab = key.removeprefix(PREFIX).removesuffix(".weight").rpartition(".")
            which = {v: k for k, v in _AB.items()}.get(ab)
            try:
                if not key.startswith(PREFIX) or not key.endswith(".weight") or which is None:
                    raise ConfigError("not a LoRA A or B weight")
                layer, targets = _meta_targets(name, args)
            except ConfigError as e:
                raise ConfigError(f"{weights}: unexpected tensor {key!r} ({e})") from e
            t = f.get_tensor(key)
            if t.dim() != 2:
                raise ConfigError(f"{weights}: {key} has shape {list(t.shape)}, expected a matrix")
            parts = stacked.get(name.rsplit(".", 1)[1]) if len(targets) > 1 else None
            if parts is not None:  # export_peft's stacked layout: split A by rank, B into its diagonal blocks
                targets, pieces = _unstack(t, which, parts, targets, cfg_rank, args, f"{weights}: {key}")
            elif len(targets) > 1 and which == "B":  # a fused module: each part takes its rows of B, and all of A
                rows = [_shape(args, p)[0] for p in targets]
                if t.shape[0] != sum(rows):
                    raise ConfigError(f"{weights}: {key} has {t.shape[0]} rows, this model's {name} has {sum(rows)}")
                pieces = t.split(rows)
            else:
                pieces = [t] * len(targets)
            for target, piece in zip(targets, pieces, strict=True):
                slot = params.setdefault(layer, {}).setdefault(target, [None, None])
                slot["AB".index(which)] = piece.clone() if len(targets) > 1 else piece
    targets = tuple(t for t in TARGETS if any(t in layer for layer in params.values()))
    try:
        cfg = LoraConfig(rank=cfg_rank, alpha=float(cfg_alpha), targets=targets)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"{folder}: {e}") from e
    out = {}
    for layer, by_target in params.items():
        out[layer] = {}
        for t, (a, b) in by_target.items():
            if a is None or b is None:
                raise ConfigError(f"{weights}: {_hf_module(layer, t, args)} lacks its {'lora_A' if a is None else 'lora_B'}")
            out_f, in_f = _shape(args, t)
            if tuple(a.shape) != (cfg.rank, in_f) or tuple(b.shape) != (out_f, cfg.rank):
                raise ConfigError(f"{weights}: {_hf_module(layer, t, args)} has lora_A {list(a.shape)} and lora_B "
                                  f"{list(b.shape)}, this model with r={cfg.rank} needs {[cfg.rank, in_f]} and "
                                  f"{[out_f, cfg.rank]}")
            out[layer][t] = (a.float().requires_grad_(), _rope(args, layer, t, b.float(), to_meta).requires_grad_())
    adapters = Adapters(cfg, out)
    adapters.check_args(args, folder)
    return adapters


def _unstack(t: torch.Tensor, which: str, parts: list[str], targets: list[str], rank: int, args: ModelArgs,
             where: str) -> tuple[list[str], list[torch.Tensor]]:
    """(parts, each part's A or B) of a fused module's adapter as export_peft stacks them; refused unless B is
    block-diagonal (zero outside the parts' blocks), which is all this layout can hold."""
    if not isinstance(parts, list) or not parts or any(p not in targets for p in parts) or len(set(parts)) < len(parts):
        raise ConfigError(f"{where}: {FUSED_METADATA} names parts {parts!r}, not among {targets}")
    parts = [p for p in targets if p in parts]
    if which == "A":
        if t.shape[0] != rank * len(parts):
            raise ConfigError(f"{where} has {t.shape[0]} rows, {len(parts)} stacked parts of rank {rank} need {rank * len(parts)}")
        return parts, [p.clone() for p in t.split(rank)]
    rows = [_shape(args, p)[0] for p in targets]
    if tuple(t.shape) != (sum(rows), rank * len(parts)):
        raise ConfigError(f"{where} has shape {list(t.shape)}, expected {[sum(rows), rank * len(parts)]}")
    rest, pieces = t.clone(), []
    for block, target in zip(rest.split(rows), targets, strict=True):
        if target in parts:
            j = parts.index(target) * rank
            pieces.append(block[:, j:j + rank].clone())
            block[:, j:j + rank] = 0
    if rest.any():
        raise ConfigError(f"{where}: lora_B is not block-diagonal in its parts {parts}; slowllama cannot split it")
    return parts, pieces


def load_adapters(path: Path, args: ModelArgs) -> Adapters:
    """lora_adapters.blk, or a PEFT folder (adapter_config.json), checked against the model."""
    path = Path(path)
    if path.is_dir():
        return load_peft(path, args)
    adapters = Adapters.load(path)
    adapters.check_args(args, path)
    return adapters
