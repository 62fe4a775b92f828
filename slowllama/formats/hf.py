"""Hugging Face's format: config.json and model*.safetensors, for Llama, Mistral, Qwen2, Qwen3, Gemma 2,
Gemma 3 (text), OLMo 2, Phi-3 (and Phi-4-mini) and SmolLM3 models.

Names and layouts map onto Meta's (the names model.py uses) through one table read in
both directions; wq and wk rows are permuted between Hugging Face's rotate-half RoPE
layout and Meta's interleaved one. Phi-3's fused qkv_proj and gate_up_proj are split into
their parts on reading and concatenated again on writing (FUSED). Reading and writing stream
one tensor at a time.
"""
from __future__ import annotations

import json
import logging
import math
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .. import faults
from ..device import all_finite
from ..errors import ConfigError
from ..model.transformer import ROPE_SCALING_KEYS, ModelArgs, module_names
from ..paths import HF_INDEX_FILE, HF_SIDE_FILES, HF_SINGLE_FILE
from .safetensors_writer import DTYPE_CODES, SafetensorsWriter

log = logging.getLogger(__name__)

# Hugging Face name <-> Meta name; "{}" stands for a layer index. The order is
# transformers' state_dict order, which export follows.
HF_TO_META: dict[str, str] = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.attention.wq.weight",
    "model.layers.{}.self_attn.q_proj.bias": "layers.{}.attention.wq.bias",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.attention.wk.weight",
    "model.layers.{}.self_attn.k_proj.bias": "layers.{}.attention.wk.bias",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.attention.wv.weight",
    "model.layers.{}.self_attn.v_proj.bias": "layers.{}.attention.wv.bias",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.attention.wo.weight",
    "model.layers.{}.self_attn.o_proj.bias": "layers.{}.attention.wo.bias",
    "model.layers.{}.self_attn.q_norm.weight": "layers.{}.attention.q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "layers.{}.attention.k_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.feed_forward.w1.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.feed_forward.w3.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.feed_forward.w2.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.attention_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
META_TO_HF = {m: h for h, m in HF_TO_META.items()}
# A block with post-norms (ModelArgs.post_norms, Gemma, OLMo 2): post_attention_layernorm follows the attention there,
# where Llama's is the FFN's pre-norm, and pre_feedforward_layernorm is the FFN's pre-norm. Layers' order
# (transformers'): these three after input_layernorm.
POST_NORM_NAMES = {
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.post_attention_norm.weight",
    "model.layers.{}.pre_feedforward_layernorm.weight": "layers.{}.ffn_norm.weight",
    "model.layers.{}.post_feedforward_layernorm.weight": "layers.{}.post_ffn_norm.weight",
}
POST_NORM_HF_TO_META = {**{h: m for h, m in HF_TO_META.items() if h not in POST_NORM_NAMES}, **POST_NORM_NAMES}
POST_NORM_META_TO_HF = {m: h for h, m in POST_NORM_HF_TO_META.items()}


# Phi-3 (ModelArgs.fused_proj): one Hugging Face tensor holds several Meta ones, stacked by rows in this order
# (transformers' Phi3Attention slices q, k, v and Phi3MLP chunks gate, up the same way).
FUSED = {
    "model.layers.{}.self_attn.qkv_proj.weight": ("layers.{}.attention.wq.weight", "layers.{}.attention.wk.weight",
                                                  "layers.{}.attention.wv.weight"),
    "model.layers.{}.mlp.gate_up_proj.weight": ("layers.{}.feed_forward.w1.weight", "layers.{}.feed_forward.w3.weight"),
}
# Phi-3's layer in transformers' order: o_proj is declared before qkv_proj.
_PHI3_ORDER = ["model.embed_tokens.weight", "model.layers.{}.self_attn.o_proj.weight",
               "model.layers.{}.self_attn.qkv_proj.weight", "model.layers.{}.mlp.gate_up_proj.weight",
               "model.layers.{}.mlp.down_proj.weight", "model.layers.{}.input_layernorm.weight",
               "model.layers.{}.post_attention_layernorm.weight", "model.norm.weight", "lm_head.weight"]
FUSED_META_TO_HF = {m: h for h in _PHI3_ORDER for m in (FUSED[h] if h in FUSED else (HF_TO_META[h],))}
FUSED_HF_TO_META = {h: m for m, h in FUSED_META_TO_HF.items() if h not in FUSED}


def name_tables(args: ModelArgs | None) -> tuple[dict[str, str], dict[str, str]]:
    """(Hugging Face -> Meta, Meta -> Hugging Face) names for args' blocks; a fused tensor's parts all name it in the
    second, and it is absent from the first (see FUSED)."""
    if args is not None and args.fused_proj:
        return FUSED_HF_TO_META, FUSED_META_TO_HF
    if args is not None and args.post_norms:
        return POST_NORM_HF_TO_META, POST_NORM_META_TO_HF
    return HF_TO_META, META_TO_HF
# Tensors some checkpoints carry that the model recomputes or ignores: skipped on read.
IGNORED = {"model.layers.{}.self_attn.rotary_emb.inv_freq"}

# model_type -> its one architecture and transformers' defaults for keys a config.json may leave out.
# The attention flags (ModelArgs.qkv_bias, o_bias, qk_norm) are fixed per model_type except where a
# config key ("attention_bias") sets them; see _attention_flags.
MODEL_TYPES = {
    "llama": dict(arch="LlamaForCausalLM", max_seq_len=2048, head_dim=None),
    "mistral": dict(arch="MistralForCausalLM", max_seq_len=131072, head_dim=None),
    "qwen2": dict(arch="Qwen2ForCausalLM", max_seq_len=32768, head_dim=None),
    "qwen3": dict(arch="Qwen3ForCausalLM", max_seq_len=32768, head_dim=128),
    # Gemma: tied and pad_token_id 0 by default; the rest of their config is read by _gemma_args.
    "gemma2": dict(arch="Gemma2ForCausalLM", max_seq_len=8192, head_dim=256, tied=True, pad_id=0),
    "gemma3_text": dict(arch="Gemma3ForCausalLM", max_seq_len=131072, head_dim=256, tied=True, pad_id=0),
}
GEMMA_TYPES = ("gemma2", "gemma3_text")
# OLMo 2: norms after each sublayer only, q/k norms over the whole projections, rms_norm_eps 1e-5 unless said.
MODEL_TYPES["olmo2"] = dict(arch="Olmo2ForCausalLM", max_seq_len=2048, head_dim=None, pad_id=1, norm_eps=1e-5)
OLMO2_ARGS = dict(qk_norm=True, qk_norm_whole=True, norm_weight_fp32=True, pre_norms=False, post_norms=True)
# Phi-3 and Phi-4-mini: fused projections, partial rotary, LongRoPE, every layer's window (_phi3_args).
MODEL_TYPES["phi3"] = dict(arch="Phi3ForCausalLM", max_seq_len=4096, head_dim=None, pad_id=32000, norm_eps=1e-5)
# SmolLM3: Llama's layers, every no_rope_layer_interval-th without RoPE (_smollm3_args), tied by default.
MODEL_TYPES["smollm3"] = dict(arch="SmolLM3ForCausalLM", max_seq_len=32768, head_dim=None, tied=True, pad_id=128004)
SUPPORTED = {t: d["arch"] for t, d in MODEL_TYPES.items()}
SAFETENSORS_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
SINGLE_FILE, INDEX_FILE, SIDE_FILES = HF_SINGLE_FILE, HF_INDEX_FILE, HF_SIDE_FILES
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # transformers' "5GB"
_LAYER = re.compile(r"^(model\.layers\.|layers\.)(\d+)\.(.+)$")


def _keys(path: Path) -> list[str]:
    with _safe_open(path) as f:
        return list(f.keys())


def _template(key: str) -> tuple[str, int | None]:
    m = _LAYER.match(key)
    return (f"{m.group(1)}{{}}.{m.group(3)}", int(m.group(2))) if m else (key, None)


def _rename(key: str, table: dict[str, str]) -> str:
    t, i = _template(key)
    if t not in table:
        raise ConfigError(f"unknown tensor name {key!r}")
    return table[t].format(i) if i is not None else table[t]


def fused_parts(hf_key: str, args: ModelArgs | None) -> list[str] | None:
    """The Meta keys a fused Hugging Face tensor holds, in row order; None for an unfused one."""
    t, i = _template(hf_key)
    if args is None or not args.fused_proj or t not in FUSED:
        return None
    return [p.format(i) for p in FUSED[t]]


def to_meta_name(hf_key: str, args: ModelArgs | None = None) -> str:
    """'model.layers.3.mlp.gate_proj.weight' -> 'layers.3.feed_forward.w1.weight'; args picks the norms' names."""
    return _rename(hf_key, name_tables(args)[0])


def to_hf_name(meta_key: str, args: ModelArgs | None = None) -> str:
    return _rename(meta_key, name_tables(args)[1])


# ---- the RoPE layout ---------------------------------------------------------
# Meta rotates adjacent pairs (2i, 2i+1) of each head; Hugging Face rotates (i, i + head_dim/2).
# Both are row permutations of wq/wk within each head, exact in any dtype.

def to_meta(w: torch.Tensor, n_heads: int, head_dim: int, rot: int | None = None) -> torch.Tensor:
    """wq or wk rows from Hugging Face's rotate-half layout to Meta's interleaved one; rot < head_dim: only each
    head's first rot rows turn (partial rotary) and take the permutation, the rest keep their place."""
    rot = head_dim if rot is None else rot
    h = w.reshape(n_heads, head_dim, -1)
    turned = h[:, :rot].reshape(n_heads, 2, rot // 2, -1).transpose(1, 2).reshape(n_heads, rot, -1)
    return torch.cat((turned, h[:, rot:]), 1).reshape(w.shape)


def from_meta(w: torch.Tensor, n_heads: int, head_dim: int, rot: int | None = None) -> torch.Tensor:
    """The inverse of to_meta."""
    rot = head_dim if rot is None else rot
    h = w.reshape(n_heads, head_dim, -1)
    turned = h[:, :rot].reshape(n_heads, rot // 2, 2, -1).transpose(1, 2).reshape(n_heads, rot, -1)
    return torch.cat((turned, h[:, rot:]), 1).reshape(w.shape)


def meta_layout(args: ModelArgs, meta_key: str, t: torch.Tensor) -> torch.Tensor:
    """One tensor read from a Hugging Face file, in Meta's layout (RoPE's rows permuted where it has them)."""
    heads = _rope_heads(args, meta_key)
    return t if heads is None else to_meta(t, heads, args.head_dim, args.rotary_dim)


def hf_layout(args: ModelArgs, meta_key: str, t: torch.Tensor) -> torch.Tensor:
    """The inverse of meta_layout."""
    heads = _rope_heads(args, meta_key)
    return t if heads is None else from_meta(t, heads, args.head_dim, args.rotary_dim)


def _rope_heads(args: ModelArgs, meta_key: str) -> int | None:
    """The head count whose rows a Meta key's RoPE permutation acts on, None if it has none.

    Biases of wq and wk move with their rows; q_norm and k_norm scale one head's head_dim
    entries, which RoPE's layout orders too, so they permute as a single head (OLMo 2's, over the
    whole projection, as its rows do).
    """
    if meta_key.endswith(("attention.wq.weight", "attention.wq.bias")):
        return args.n_heads
    if meta_key.endswith(("attention.wk.weight", "attention.wk.bias")):
        return args.n_kv_heads
    if meta_key.endswith(("attention.q_norm.weight", "attention.k_norm.weight")):
        if args.qk_norm_whole:
            return args.n_heads if "q_norm" in meta_key else args.n_kv_heads
        return 1
    return None


# ---- config.json -------------------------------------------------------------

def _read_json(path: Path) -> dict:
    from ..fsutil import read_json_object

    return read_json_object(path)


def _rope(path: Path, raw: dict) -> tuple[float, dict | None]:
    """rope_theta and ModelArgs.rope_scaling from transformers 5's rope_parameters or 4's rope_theta/rope_scaling."""
    if raw.get("rope_parameters") is not None:
        if raw.get("rope_scaling") is not None:
            raise ConfigError(f"{path}: both rope_parameters and rope_scaling are set; keep one")
        key, params = "rope_parameters", raw["rope_parameters"]
        if not isinstance(params, dict) or "rope_theta" not in params:
            raise ConfigError(f"{path}: rope_parameters must be one object with rope_theta, got {params!r}")
        theta = params["rope_theta"]
    else:
        key, params = "rope_scaling", raw.get("rope_scaling") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{path}: rope_scaling must be an object or null, got {params!r}")
        theta = raw.get("rope_theta", 10000.0)
    params = dict(params)
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in ("default", *ROPE_SCALING_KEYS):
        raise ConfigError(f"{path}: {key}.rope_type {rope_type!r} is not supported "
                          f"(supported: default, {', '.join(ROPE_SCALING_KEYS)})")
    params.pop("rope_theta", None)
    if params.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{path}: {key}.partial_rotary_factor is not supported")
    needed = ROPE_SCALING_KEYS.get(rope_type, ())
    missing = [k for k in needed if k not in params]
    if missing:
        raise ConfigError(f"{path}: {key} of type {rope_type} lacks {missing}")
    extra = sorted(set(params) - set(needed))
    if extra:
        raise ConfigError(f"{path}: {key}.{extra[0]} is not supported for rope_type {rope_type}")
    scaling = {"rope_type": rope_type, **{k: params[k] for k in needed}} if needed else None
    return theta, scaling


# ModelArgs' field -> the config.json key it is read from: args_from_config reads through it, and its error
# lines name the user's key rather than ours.
HF_KEY_OF = {"dim": "hidden_size", "intermediate_size": "intermediate_size", "n_layers": "num_hidden_layers",
             "n_heads": "num_attention_heads", "vocab_size": "vocab_size", "n_kv_heads": "num_key_value_heads",
             "head_dim": "head_dim", "norm_eps": "rms_norm_eps", "max_seq_len": "max_position_embeddings",
             "pad_id": "pad_token_id"}
REQUIRED = ("dim", "intermediate_size", "n_layers", "n_heads", "vocab_size")  # no default in transformers either


def _attention_flags(model_type: str, raw: dict, refuse) -> dict:
    """ModelArgs' qkv_bias, o_bias, qk_norm as transformers builds each model_type's attention."""
    if model_type in (*GEMMA_TYPES, "olmo2", "smollm3"):  # attention_bias on all four projections; q/k norms per type
        bias = raw.get("attention_bias", False)
        if not isinstance(bias, bool):
            refuse("attention_bias", f"must be true or false, got {bias!r}")
        return dict(qkv_bias=bias, o_bias=bias, qk_norm=model_type not in ("gemma2", "smollm3"))
    if model_type == "qwen2":  # q/k/v biases always, none on o_proj; Qwen2 ignores attention_bias
        return dict(qkv_bias=True, o_bias=False, qk_norm=False)
    bias = raw.get("attention_bias", False)
    if model_type == "qwen3":  # attention_bias puts a bias on all four projections; q_norm/k_norm always
        if not isinstance(bias, bool):
            refuse("attention_bias", f"must be true or false, got {bias!r}")
        return dict(qkv_bias=bias, o_bias=bias, qk_norm=True)
    if bias is not False:
        refuse("attention_bias", f"{bias!r} is not supported for model_type {model_type!r} (slowllama implements False)")
    return dict(qkv_bias=False, o_bias=False, qk_norm=False)


def _layer_windows(raw: dict, window, default_types: Callable[[int], list[str]], refuse) -> list | None:
    """ModelArgs.layer_windows from layer_types (or, where a config has none, the rule transformers' config
    class applies); None where no layer slides."""
    n = raw["num_hidden_layers"]
    types = raw.get("layer_types")
    if types is None:
        types = default_types(n)
    if not isinstance(types, list) or len(types) != n or any(t not in ("full_attention", "sliding_attention") for t in types):
        refuse("layer_types", f"{types!r} is not supported (one of full_attention, sliding_attention per layer, {n} in all)")
    if "sliding_attention" not in types:
        return None
    if window is None:  # transformers cannot build these layers either
        refuse("layer_types", "has sliding_attention layers but no sliding_window applies to them")
    return [window if t == "sliding_attention" else None for t in types]


def _qwen_windows(raw: dict, refuse) -> list | None:
    """Qwen's sliding layers as transformers decides them: sliding_window counts only with use_sliding_window,
    and without layer_types the layers from max_window_layers on slide."""
    use = raw.get("use_sliding_window", False)
    if not isinstance(use, bool):
        refuse("use_sliding_window", f"must be true or false, got {use!r}")
    window = raw.get("sliding_window", 4096) if use else None
    first = raw.get("max_window_layers", 28)
    if not isinstance(first, int) or isinstance(first, bool):
        refuse("max_window_layers", f"must be an integer, got {first!r}")
    return _layer_windows(raw, window, lambda n: ["sliding_attention" if window is not None and i >= first
                                                  else "full_attention" for i in range(n)], refuse)


def _gemma_rope(path: Path, model_type: str, raw: dict) -> dict:
    """ModelArgs' rope_theta, rope_scaling and local_rope_theta of a Gemma config, transformers 5's or 4's."""
    if model_type == "gemma2":
        theta, scaling = _rope(path, raw)
        return dict(rope_theta=theta, rope_scaling=scaling)
    params = raw.get("rope_parameters")
    if params is not None and set(params) <= {"full_attention", "sliding_attention"}:
        # transformers 5: one rope_parameters per layer type, rope_theta defaulting as Gemma3TextConfig's do
        theta, scaling = _rope(path, {"rope_parameters": {"rope_theta": 1e6, **(params.get("full_attention") or {})}})
        local, local_scaling = _rope(path, {"rope_parameters": {"rope_theta": raw.get("rope_local_base_freq", 1e4),
                                                                **(params.get("sliding_attention") or {})}})
        if local_scaling is not None:
            raise ConfigError(f"{path}: rope_parameters.sliding_attention.rope_type {local_scaling['rope_type']!r} "
                              f"is not supported (slowllama implements default)")
    else:  # transformers 4: rope_theta and rope_scaling for the full layers, rope_local_base_freq for the others
        theta, scaling = _rope(path, {**raw, "rope_theta": raw.get("rope_theta", 1e6)})
        local = raw.get("rope_local_base_freq", 1e4)
    return dict(rope_theta=theta, rope_scaling=scaling, local_rope_theta=local)


def _gemma_args(path: Path, model_type: str, raw: dict, refuse) -> dict:
    """The ModelArgs fields of a Gemma 2 or Gemma 3 (text) config.json beyond Llama's, with transformers' defaults."""
    if raw.get("use_bidirectional_attention"):
        refuse("use_bidirectional_attention", "true is not supported (slowllama implements causal attention)")
    act = raw.get("hidden_activation", "gelu_pytorch_tanh")  # transformers' Gemma ignores hidden_act
    if act != "gelu_pytorch_tanh":
        refuse("hidden_activation", f"{act!r} is not supported (slowllama implements 'gelu_pytorch_tanh')")
    every = 2 if model_type == "gemma2" else raw.get("sliding_window_pattern", 6)  # layer i slides unless (i + 1) % every == 0
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        refuse("sliding_window_pattern", f"must be a positive integer, got {every!r}")
    windows = _layer_windows(raw, raw.get("sliding_window", 4096),
                             lambda n: ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)], refuse)
    return dict(
        **_gemma_rope(path, model_type, raw),
        layer_windows=windows, norm_plus_one=True, post_norms=True, hidden_act=act, embed_scale=True,
        query_pre_attn_scalar=raw.get("query_pre_attn_scalar", 256),
        # Gemma 3's attention never passes attn_logit_softcapping on in transformers: ignored there, and here.
        attn_softcap=raw.get("attn_logit_softcapping", 50.0) if model_type == "gemma2" else None,
        final_softcap=raw.get("final_logit_softcapping", 30.0 if model_type == "gemma2" else None),
    )


# Phi3Config's rope parameters: what transformers reads of them (the rest is refused by name).
_PHI3_ROPE_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor", "short_factor", "long_factor",
                   "original_max_position_embeddings", "factor", "attention_factor"}


def _phi3_args(raw: dict, refuse) -> dict:
    """The ModelArgs fields of a Phi-3 / Phi-4-mini config.json beyond Llama's, resolved as transformers 5 resolves
    them: partial rotary (rope_parameters' or the top-level partial_rotary_factor), LongRoPE with its attention
    factor, and sliding_window on every layer."""
    for key in ("resid_pdrop", "embd_pdrop"):
        if raw.get(key, 0.0) != 0.0:
            refuse(key, f"{raw[key]!r} is not supported (slowllama implements 0.0; its --dropout is its own)")
    key = "rope_parameters" if raw.get("rope_parameters") is not None else "rope_scaling"
    params = raw.get(key) or {}
    if not isinstance(params, dict):
        refuse(key, f"must be an object or null, got {params!r}")
    extra = sorted(set(params) - _PHI3_ROPE_KEYS)
    if extra:
        refuse(f"{key}.{extra[0]}", "is not supported for Phi-3")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    head_dim = raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if not isinstance(partial, (int, float)) or isinstance(partial, bool) or not 0 < partial <= 1:
        refuse("partial_rotary_factor", f"must be a number in (0, 1], got {partial!r}")
    rope_dim = int(head_dim * partial)  # transformers' rounding
    rope_type = params.get("rope_type", params.get("type", "default"))
    rope_type = "longrope" if rope_type in ("su", "yarn") else rope_type  # Phi3Config's old names for it
    if rope_type not in ("default", "longrope"):
        refuse(f"{key}.rope_type", f"{rope_type!r} is not supported for Phi-3 (supported: default, longrope)")
    scaling = None
    if rope_type == "longrope":
        missing = [k for k in ("short_factor", "long_factor") if k not in params]
        if missing:
            refuse(key, f"of type longrope lacks {missing}")
        # Phi3Config always has original_max_position_embeddings (4096 by default) and it wins over rope_parameters'
        original = raw.get("original_max_position_embeddings", 4096)
        if not isinstance(original, int) or isinstance(original, bool) or original < 2:
            refuse("original_max_position_embeddings", f"must be an integer above 1, got {original!r}")
        factor = params.get("factor") or raw.get("max_position_embeddings", 4096) / original
        attention = params.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        scaling = {"rope_type": "longrope", "short_factor": params["short_factor"], "long_factor": params["long_factor"],
                   "original_max_position_embeddings": original, "attention_factor": attention}
    return dict(rope_theta=theta, rope_scaling=scaling, rope_dim=None if rope_dim == head_dim else rope_dim,
                fused_proj=True, sliding_window=raw.get("sliding_window"))


def _smollm3_args(path: Path, raw: dict, refuse) -> dict:
    """SmolLM3's layers without RoPE (no_rope_layers: 1 where a layer ropes, or every no_rope_layer_interval-th
    layer without) and its windows, as SmolLM3Config derives them; RoPE's base defaults to 2e6."""
    n = raw["num_hidden_layers"]
    flags = raw.get("no_rope_layers")
    if flags is None:
        every = raw.get("no_rope_layer_interval", 4)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            refuse("no_rope_layer_interval", f"must be a positive integer, got {every!r}")
        flags = [int((i + 1) % every != 0) for i in range(n)]
    if not isinstance(flags, list) or len(flags) != n or any(f not in (0, 1) or isinstance(f, float) for f in flags):
        refuse("no_rope_layers", f"must list 0 or 1 per layer, {n} in all, got {flags!r}")
    use = raw.get("use_sliding_window", False)
    window = raw.get("sliding_window")
    windows = _layer_windows(raw, window, lambda n: ["sliding_attention" if use and window is not None and not flags[i]
                                                     else "full_attention" for i in range(n)], refuse)
    theta, scaling = _rope(path, {**raw, "rope_theta": raw.get("rope_theta", 2e6)}
                           if raw.get("rope_parameters") is None else
                           {**raw, "rope_parameters": {"rope_theta": 2e6, **raw["rope_parameters"]}})
    return dict(rope_theta=theta, rope_scaling=scaling, layer_windows=windows,
                rope_layers=None if all(flags) else [bool(f) for f in flags])


def args_from_config(config_json_path: str | Path) -> ModelArgs:
    """The architecture from a Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 (text), OLMo 2, Phi-3 or SmolLM3
    config.json; what changes the math is refused by name."""
    path = Path(config_json_path)
    raw = _read_json(path)

    def refuse(key: str, why: str):
        raise ConfigError(f"{path}: {key} {why}")

    model_type = raw.get("model_type")
    if model_type not in SUPPORTED:
        refuse("model_type", f"{model_type!r} is not supported (supported: {', '.join(SUPPORTED)})")
    archs = raw.get("architectures") or [SUPPORTED[model_type]]
    if archs != [SUPPORTED[model_type]]:
        refuse("architectures", f"{archs!r} is not supported for model_type {model_type!r} (expected [{SUPPORTED[model_type]!r}])")
    checks = [("mlp_bias", False), ("attention_dropout", 0.0), ("quantization_config", None)]
    if model_type not in GEMMA_TYPES:  # Gemma's activation is hidden_activation (_gemma_args)
        checks.insert(0, ("hidden_act", "silu"))
    for key, want in checks:
        if raw.get(key, want) != want:
            refuse(key, f"{raw[key]!r} is not supported (slowllama implements {want!r})")
    for field in REQUIRED:
        if HF_KEY_OF[field] not in raw:
            refuse(HF_KEY_OF[field], "is missing")
    flags = _attention_flags(model_type, raw, refuse)
    if model_type in GEMMA_TYPES:
        flags.update(_gemma_args(path, model_type, raw, refuse))
    elif model_type == "phi3":
        flags.update(_phi3_args(raw, refuse))
    elif model_type == "smollm3":
        flags.update(_smollm3_args(path, raw, refuse))
    else:
        flags.update(zip(("rope_theta", "rope_scaling"), _rope(path, raw)))
    if model_type in ("qwen2", "qwen3"):
        flags["layer_windows"] = _qwen_windows(raw, refuse)
    if model_type == "olmo2":
        flags.update(OLMO2_ARGS)
    if model_type == "mistral":  # every layer slides
        flags["sliding_window"] = raw.get("sliding_window")
    defaults = MODEL_TYPES[model_type]
    dtype = raw.get("dtype", raw.get("torch_dtype"))
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        refuse("dtype" if "dtype" in raw else "torch_dtype", f"{dtype!r} is not supported (float32, bfloat16, float16)")
    try:
        return ModelArgs(
            **{field: raw[HF_KEY_OF[field]] for field in REQUIRED},
            n_kv_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
            head_dim=raw.get("head_dim", MODEL_TYPES[model_type]["head_dim"]),
            norm_eps=raw.get("rms_norm_eps", defaults.get("norm_eps", 1e-6)),
            # transformers' defaults when the key is absent
            max_seq_len=raw.get("max_position_embeddings", defaults["max_seq_len"]),
            tie_word_embeddings=raw.get("tie_word_embeddings", defaults.get("tied", False)),
            pad_id=raw.get("pad_token_id", defaults.get("pad_id")),
            **flags,
        )
    except ConfigError as e:  # ModelArgs names its own fields; the user's file names them as config.json does
        msg = str(e)
        ours = msg.split(" ", 1)[0]
        raise ConfigError(f"{path}: {HF_KEY_OF.get(ours, ours)}{msg[len(ours):]}") from e



def config_from_args(args: ModelArgs, dtype: str, bos_id: int | None = None, eos_id: int | None = None) -> dict:
    """A transformers 5 config.json for a Meta checkpoint's architecture (the inverse of args_from_config)."""
    # A Llama config.json cannot say these; Hugging Face folders keep their own config.json.
    qwen = [f for f in ("qkv_bias", "o_bias", "qk_norm") if getattr(args, f)] + non_llama_fields(args)
    if qwen:
        raise ConfigError(f"params.json: {qwen[0]} has no place in a Llama config.json; export in Meta's format")
    rope = {"rope_type": "default", "rope_theta": float(args.rope_theta)}
    if args.rope_scaling:
        rope.update(args.rope_scaling)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "max_position_embeddings": args.max_seq_len,
        "rope_parameters": rope, "tie_word_embeddings": args.tie_word_embeddings, "attention_bias": False,
        "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "dtype": dtype,
    }
    if bos_id is not None:
        config["bos_token_id"] = bos_id
    if eos_id is not None:
        config["eos_token_id"] = eos_id
    return config


def non_llama_fields(args: ModelArgs) -> list[str]:
    """The per-layer window and Gemma fields of args that differ from Llama's."""
    from dataclasses import fields

    names = ("layer_windows", "local_rope_theta", "norm_plus_one", "norm_weight_fp32", "pre_norms", "post_norms",
             "qk_norm_whole", "hidden_act", "embed_scale", "query_pre_attn_scalar", "attn_softcap", "final_softcap",
             "rope_dim", "rope_layers", "fused_proj")
    return [f.name for f in fields(args) if f.name in names and getattr(args, f.name) != f.default]


def expected_shapes(args: ModelArgs, module: str) -> dict[str, tuple[int, ...]]:
    """checkpoint.expected_shapes, less the output weight of a tied model (it has none of its own)."""
    from .meta import expected_shapes as meta_shapes

    if module == "output" and args.tie_word_embeddings:
        return {}
    return meta_shapes(args, module)


def expected_keys(args: ModelArgs) -> list[str]:
    """Every Meta key the model holds, modules in forward order, each in transformers' order."""
    keys = []
    for module in module_names(args):
        shapes = expected_shapes(args, module)
        layer = module.split(".")[1] if module.startswith("layers.") else None
        for meta in name_tables(args)[1]:
            if ("{}" in meta) == (layer is not None):
                key = meta.format(layer)
                owner, param = split_meta_key(key)
                if owner == module and param in shapes:
                    keys.append(key)
    return keys


def fused_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The shape of the tensor that stacks these by rows (one shape: itself)."""
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def hf_tensors(args: ModelArgs, tensors: list[tuple[str, tuple[int, ...], torch.dtype]]
               ) -> list[tuple[str, tuple[int, ...], torch.dtype, list[str]]]:
    """(Hugging Face name, shape, dtype, the Meta keys it holds in row order) for (Meta key, shape, dtype) tensors,
    in the order given; a fused tensor comes where its first part does and needs all its parts."""
    by_key = {k: (shape, dt) for k, shape, dt in tensors}
    out, done = [], set()
    for key, _, _ in tensors:
        name = to_hf_name(key, args)
        if name in done:
            continue
        done.add(name)
        parts = fused_parts(name, args) or [key]
        absent = [p for p in parts if p not in by_key]
        if absent:
            raise ConfigError(f"{name} is written whole, but the export lacks its part {absent[0]!r}")
        dtypes = {by_key[p][1] for p in parts}
        if len(dtypes) > 1:
            raise ConfigError(f"{name}: its parts {parts} do not share one dtype")
        out.append((name, fused_shape([by_key[p][0] for p in parts]), dtypes.pop(), parts))
    return out


def split_meta_key(key: str) -> tuple[str, str]:
    """'layers.3.attention.wq.weight' -> ('layers.3', 'attention.wq.weight')."""
    t, i = _template(key)
    if i is not None:
        return f"layers.{i}", t.split(".{}.", 1)[1]
    module, _, param = key.partition(".")
    return module, param


# ---- reading -----------------------------------------------------------------

def _safe_open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError and OSError
        raise ConfigError(f"{path}: unreadable safetensors file ({type(e).__name__}: {e})") from e


class HFCheckpoint:
    """A validated Hugging Face folder (any of MODEL_TYPES), read one module at a time in Meta's names and layout."""

    def __init__(self, folder: str | Path):
        self.dir = Path(folder)
        if not self.dir.is_dir():
            raise ConfigError(f"{self.dir}: not a directory")
        self.config_path = self.dir / "config.json"
        self.args = args_from_config(self.config_path)
        config = _read_json(self.config_path)
        self.config_dtype: str | None = config.get("dtype", config.get("torch_dtype"))
        self.index_path: Path | None = None
        self._index: dict[str, str] | None = None  # the index's weight_map, when sharded
        self.shards = self._shard_paths()
        self.side_files = [self.dir / n for n in SIDE_FILES if (self.dir / n).is_file()]
        self.key_order: list[str] = []  # Meta keys, transformers' order
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._where: dict[str, tuple[Path, str]] = {}  # Meta key -> (shard, Hugging Face key)
        self._check_layout()

    @property
    def files(self) -> list[Path]:
        """Every file the model is read from (for a fingerprint of the source)."""
        return [self.config_path, *([self.index_path] if self.index_path else []), *self.shards, *self.side_files]

    def _shard_paths(self) -> list[Path]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            self.index_path = index
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConfigError(f"{index}: no weight_map")
            self._index = weight_map
            names = sorted(set(weight_map.values()))
            for n in names:
                if not isinstance(n, str) or "/" in n or not (self.dir / n).is_file():
                    raise ConfigError(f"{index}: names shard {n!r}, which is not in {self.dir}")
            return [self.dir / n for n in names]
        if (self.dir / SINGLE_FILE).is_file():
            return [self.dir / SINGLE_FILE]
        if any(self.dir.glob("*.bin")):
            raise ConfigError(f"{self.dir}: only .bin (pickle) weights; slowllama reads safetensors, "
                              f"convert them with transformers' save_pretrained first")
        raise ConfigError(f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE}")

    def _check_layout(self):
        """Check every tensor's name, dtype and shape against config.json, from the file headers alone."""
        a = self.args
        # The layer count first, from the names alone: a config.json that says 10**9 layers must not make us list
        # 10**9 layers' tensors before finding out.
        held = {i for path in self.shards for k in _keys(path) if (i := _template(k)[1]) is not None}
        if a.n_layers > (max(held) + 1 if held else 0):  # layers beyond these are named by the checks below
            raise ConfigError(f"{self.config_path}: num_hidden_layers is {a.n_layers}, but the weights hold "
                              f"{len(held)} layers" + (f" (numbered {min(held)} to {max(held)})" if held else ""))
        expected = {k: s for m in module_names(a) for k, s in
                    ((f"{m}.{p}", s) for p, s in expected_shapes(a, m).items())}
        seen: dict[str, tuple[Path, str]] = {}
        for path in self.shards:
            with _safe_open(path) as f:
                for hf_key in f.keys():
                    if self._index is not None and self._index.get(hf_key) != path.name:
                        where = self._index.get(hf_key)
                        raise ConfigError(f"{path}: holds {hf_key!r}, which {INDEX_FILE} "
                                          + (f"places in {where}" if where else "does not list"))
                    if _template(hf_key)[0] in IGNORED or (hf_key == "lm_head.weight" and a.tie_word_embeddings):
                        log.info("%s: ignoring %s, which the model does not use", path, hf_key)
                        continue
                    try:
                        parts = fused_parts(hf_key, a) or [to_meta_name(hf_key, a)]
                    except ConfigError as e:
                        raise ConfigError(f"{path}: {e}") from e
                    if any(k not in expected for k in parts):
                        raise ConfigError(f"{path}: unexpected tensor {hf_key!r} for {self.config_path.name}")
                    sl = f.get_slice(hf_key)
                    code, shape = sl.get_dtype(), tuple(sl.get_shape())
                    if code not in SAFETENSORS_DTYPES:
                        raise ConfigError(f"{path}: {hf_key} has dtype {code}, expected F32, BF16 or F16")
                    want = fused_shape([expected[k] for k in parts])
                    if shape != want:
                        raise ConfigError(f"{path}: {hf_key} has shape {list(shape)}, {self.config_path.name} implies {list(want)}")
                    row = 0
                    for k in parts:  # a fused tensor's parts are row ranges of it
                        seen[k] = (path, hf_key, (row, row + expected[k][0]) if len(parts) > 1 else None)
                        row += expected[k][0]
                        self.shapes[k], self.dtypes[k] = expected[k], SAFETENSORS_DTYPES[code]
        if self._index is not None:
            listed = {k for k in self._index if _template(k)[0] not in IGNORED}
            absent = sorted(listed - {w[1] for w in seen.values()} - ({"lm_head.weight"} if a.tie_word_embeddings else set()))
            if absent:
                raise ConfigError(f"{self.index_path}: lists {absent[0]!r}, which no shard holds")
        missing = list(dict.fromkeys(to_hf_name(k, a) for k in expected if k not in seen))
        if missing:
            raise ConfigError(f"{self.dir}: missing tensor {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        self._where = seen
        self.key_order = expected_keys(a)

    def checkpoint_dtype(self) -> torch.dtype:
        return self.dtypes["tok_embeddings.weight"]

    def module_keys(self, module: str) -> list[str]:
        return [k for k in self.key_order if split_meta_key(k)[0] == module]

    def read_module(self, module: str) -> dict[str, torch.Tensor]:
        """One module's tensors in the checkpoint's dtype, Meta's names and layout.

        Tensors are read one at a time and each file is reopened per module, so the
        pages its mapping touched are released: peak RSS stays near one module.
        """
        out = {}
        keys = self.module_keys(module)
        for path in dict.fromkeys(self._where[k][0] for k in keys):
            with _safe_open(path) as f:
                fused = {}  # hf_key -> the whole fused tensor, read once for its parts
                for key in keys:
                    where, hf_key, rows = self._where[key]
                    if where != path:
                        continue
                    if rows is None:
                        t = f.get_tensor(hf_key)
                    else:
                        if hf_key not in fused:
                            fused[hf_key] = f.get_tensor(hf_key)
                        t = fused[hf_key][rows[0]:rows[1]].clone()  # its own storage, not a view of the whole
                    t = meta_layout(self.args, key, t)
                    if not all_finite(t):
                        raise ConfigError(f"{path}: tensor {hf_key} holds NaN or Inf")
                    out[key] = t
                del fused
        return {split_meta_key(k)[1]: out[k] for k in keys}


# ---- writing -----------------------------------------------------------------

def plan_shards(tensors: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_size: int) -> list[list[int]]:
    """Indices of `tensors` per shard, split as huggingface_hub's split_torch_state_dict_into_shards does."""
    shards, current, size = [], [], 0
    for i, (_, shape, dtype) in enumerate(tensors):
        n = dtype.itemsize
        for s in shape:
            n *= s
        if n > max_shard_size:  # alone in a shard of its own
            shards.append([i])
            continue
        if current and size + n > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        shards.append(current)
    return shards


def _generation_config(config: dict) -> dict:
    # What transformers' GenerationConfig.from_model_config keeps when the source had none.
    out = {"_from_model_config": True}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(k) is not None:
            out[k] = config[k]
    return out


def export_hf(
    out_dir: Path,
    *,
    args: ModelArgs,
    config_src: Path | None,
    tensors: list[tuple[str, tuple[int, ...], torch.dtype]],
    modules: list[str],
    read_module: Callable[[str], dict[str, torch.Tensor]],
    side_files: list[Path] = (),
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    progress: Callable[[Iterator], Iterator] = lambda it: it,
    extra_files: dict[str, bytes] | None = None,
    config: dict | None = None,
) -> Path:
    """Write a Hugging Face folder for out_dir into a temp folder beside it and return that folder.

    `tensors` lists (Meta key, shape, dtype) for every tensor to write (a tied model has no
    output.weight); read_module returns one module's tensors in Meta's names and layout.
    Everything in it is fsynced; the caller renames it into place (fsutil.replace_dir).
    config.json is copied unchanged from config_src (or written from `config`, converting a Meta
    checkpoint); side_files (tokenizer, generation_config.json) are copied too.
    """
    from ..fsutil import atomic_write_bytes, fsync_dir, fsync_file, tmp_path

    out_dir = Path(out_dir)
    order = {k: i for i, k in enumerate(expected_keys(args))}
    unknown = [k for k, _, _ in tensors if k not in order]
    if unknown:
        raise ConfigError(f"unknown tensor name {unknown[0]!r} for this model")
    # transformers' order, then one entry per Hugging Face tensor (Phi-3's fused ones hold several Meta keys)
    files = hf_tensors(args, sorted(tensors, key=lambda t: order[t[0]]))
    plan = plan_shards([(name, shape, dt) for name, shape, dt, _ in files], max_shard_size)
    n = len(plan)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    shard_of = {files[i][0]: s for s, idx in enumerate(plan) for i in idx}
    dtypes = {k: dt for k, _, dt in tensors}
    parts_of = {name: parts for name, _, _, parts in files}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = tmp_path(out_dir)
    work.mkdir()
    writers: dict[int, SafetensorsWriter] = {}
    try:
        def writer(s: int) -> SafetensorsWriter:
            if s not in writers:  # opened when first needed, so few are open at once
                specs = [files[i][:3] for i in plan[s]]
                writers[s] = SafetensorsWriter(work / names[s], specs)
            return writers[s]

        for module in progress(modules):
            params = read_module(module)
            held = sorted((f"{module}.{p}" for p in params), key=lambda k: order.get(k, -1))
            for key in held:
                if key not in dtypes:
                    raise ConfigError(f"module {module} holds {key!r}, which the export does not list")
            for name in dict.fromkeys(to_hf_name(k, args) for k in held):
                pieces = []
                for key in parts_of[name]:
                    if not key.startswith(module + ".") or key[len(module) + 1:] not in params:
                        raise ConfigError(f"{name}: its part {key!r} is not in module {module}")
                    t = params[key[len(module) + 1:]].to(dtypes[key])
                    if not all_finite(t):
                        raise ValueError(f"refusing to export {key}: it holds NaN or Inf")
                    pieces.append(hf_layout(args, key, t))
                w = writer(shard_of[name])
                w.write(name, pieces[0] if len(pieces) == 1 else torch.cat(pieces))
                if w.done:
                    w.close()
            del params
            faults.point("export_module")
        unwritten = [names[s] for s in range(n) if s not in writers or not writers[s].done]
        if unwritten:
            raise RuntimeError(f"export: {unwritten[0]} was not completed; `modules` lacks some of `tensors`")
        if n > 1:
            index = {"metadata": {"total_parameters": sum(_numel(s) for _, s, _ in tensors),
                                  "total_size": sum(_numel(s) * dt.itemsize for _, s, dt in tensors)},
                     "weight_map": {name: names[shard_of[name]] for name, _, _, _ in files}}
            atomic_write_bytes(work / INDEX_FILE, [(json.dumps(index, indent=2, sort_keys=True) + "\n").encode()], durable=False)
        if config is None:
            shutil.copyfile(config_src, work / "config.json")
        else:
            atomic_write_bytes(work / "config.json", [(json.dumps(config, indent=2) + "\n").encode()], durable=False)
        for src in side_files:
            shutil.copyfile(src, work / Path(src).name)
        if not (work / "generation_config.json").exists():
            gen = _generation_config(config if config is not None else _read_json(Path(config_src)))
            atomic_write_bytes(work / "generation_config.json", [(json.dumps(gen, indent=2) + "\n").encode()], durable=False)
        for name, data in (extra_files or {}).items():
            atomic_write_bytes(work / name, [data], durable=False)
        for p in work.iterdir():
            fsync_file(p)
        fsync_dir(work)
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(work, ignore_errors=True)
        raise
    log.info("exported %s (rename into place: %s)", work, out_dir)
    return work


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
