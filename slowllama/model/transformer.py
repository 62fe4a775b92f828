"""The Llama architecture and its relatives (Llama 2, Code Llama, Llama 3.x, Mistral, TinyLlama, SmolLM2,
Qwen2, Qwen3, Gemma 2, Gemma 3 text, OLMo 2, Phi-3, Phi-4-mini, SmolLM3), with Meta's parameter names.

Every piece that the block store streams (embedding, each block, the final
norm, the output layer) is a module of its own, so that `Transformer` is only
their composition and the streamed and in-memory paths run the same code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..errors import ConfigError
from ..fsutil import read_json_object


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # The context the model was trained for (Llama 2: 4096 tokens); params.json may set it.
    max_seq_len: int = 4096
    # Later Llamas. Meta's params.json for Llama 3.1+ says use_scaled_rope; the fields
    # below it come from Hugging Face configs (see slowllama/formats/hf.py).
    use_scaled_rope: bool = False
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", ...}, see ROPE_SCALING_KEYS
    head_dim: int | None = None  # None: dim // n_heads
    intermediate_size: int | None = None  # None: Meta's multiple_of rule
    # The output layer multiplies by the embedding matrix and has no weight of its own.
    tie_word_embeddings: bool = False
    # Mistral's attention window, for every layer unless layer_windows says otherwise (see window()).
    sliding_window: int | None = None
    # Qwen's attention. qkv_bias: wq, wk, wv add a bias (Qwen2 always; Qwen3's attention_bias);
    # o_bias: wo adds one too (Qwen3's attention_bias); qk_norm: each head of q and k passes an
    # RMSNorm over head_dim before RoPE (Qwen3). The model, the block tables and the export read these.
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    # ---- Per-layer attention windows, Gemma 2 / Gemma 3 and OLMo 2 (see _check_layer_fields) ----
    # layer_windows: each layer's window (None: full causal), as transformers' layer_types decide it
    # (Qwen's max_window_layers, Gemma's alternating local/global layers); None: sliding_window everywhere.
    # A query at t sees the keys at s with t - window < s <= t: the window counts the query itself.
    layer_windows: list[int | None] | None = None
    local_rope_theta: float | None = None  # the windowed layers' RoPE base, unscaled (Gemma 3's local layers)
    norm_plus_one: bool = False  # every RMSNorm scales by 1 + weight, in fp32 before the cast (Gemma)
    norm_weight_fp32: bool = False  # every RMSNorm scales by weight in fp32 before the cast (OLMo 2)
    pre_norms: bool = True  # attention_norm and ffn_norm on each sublayer's input (OLMo 2 has none)
    post_norms: bool = False  # post_attention_norm, post_ffn_norm on each sublayer's output, before the residual
    qk_norm_whole: bool = False  # qk_norm over the whole q and k projections, not per head (OLMo 2)
    hidden_act: str = "silu"  # the FFN gate's activation, a key of ACTIVATIONS
    embed_scale: bool = False  # the embedding's output times sqrt(dim), the factor rounded to the weight's dtype
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 power rather than head_dim's
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) before the mask (Gemma 2)
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    pad_id: int | None = None  # the embedding row that never takes a gradient (nn.Embedding's padding_idx)
    # ---- Phi-3 / Phi-4-mini and SmolLM3 ----
    rope_dim: int | None = None  # RoPE turns only each head's first rope_dim entries (partial_rotary_factor); None: all
    rope_layers: list[bool] | None = None  # False where a layer applies no RoPE at all (SmolLM3); None: every layer
    # The files hold wq/wk/wv as one qkv_proj and w1/w3 as one gate_up_proj (Phi-3): a storage layout only,
    # split on import and fused on export (formats/hf.py); the model always holds them split.
    fused_proj: bool = False

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len"):
            _check_positive_int(name, getattr(self, name))
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        _check_positive_int("head_dim", self.head_dim)
        for name in ("intermediate_size", "sliding_window"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        for name in ("use_scaled_rope", "tie_word_embeddings", "qkv_bias", "o_bias", "qk_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.use_scaled_rope:
            if self.rope_scaling is None:
                self.rope_scaling = dict(META_LLAMA3_SCALING)
            elif self.rope_scaling != META_LLAMA3_SCALING:
                raise ConfigError(f"use_scaled_rope is true but rope_scaling is {self.rope_scaling!r}, not Meta's {META_LLAMA3_SCALING!r}")
        if self.rope_dim is not None and (not isinstance(self.rope_dim, int) or isinstance(self.rope_dim, bool)
                                          or not 0 < self.rope_dim <= self.head_dim or self.rope_dim % 2):
            raise ConfigError(f"rope_dim must be a positive even integer up to head_dim {self.head_dim}, got {self.rope_dim!r}")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling, self.rotary_dim)
        if not isinstance(self.vocab_size, int) or isinstance(self.vocab_size, bool) or self.vocab_size < 1 and self.vocab_size != -1:
            raise ConfigError(f"vocab_size must be a positive integer or -1, got {self.vocab_size!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        for name in ("norm_eps", "rope_theta"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name} must be a positive number, got {v!r}")
        m = self.ffn_dim_multiplier
        if m is not None and (not isinstance(m, (int, float)) or isinstance(m, bool) or not math.isfinite(m) or m <= 0):
            raise ConfigError(f"ffn_dim_multiplier must be a positive number, got {m!r}")
        _check_layer_fields(self)

    def window(self, layer: int) -> int | None:
        """Layer's attention window in tokens (the query included), None where it attends to every earlier token."""
        return self.sliding_window if self.layer_windows is None else self.layer_windows[layer]

    def rope_of(self, layer: int) -> tuple[float, dict | None]:
        """Layer's RoPE base and scaling: Gemma 3's windowed layers have a base of their own and no scaling."""
        if self.local_rope_theta is not None and self.window(layer) is not None:
            return self.local_rope_theta, None
        return self.rope_theta, self.rope_scaling

    @property
    def rotary_dim(self) -> int:
        """How many of each head's entries RoPE turns (the first ones)."""
        return self.head_dim if self.rope_dim is None else self.rope_dim

    def ropes(self, layer: int) -> bool:
        return self.rope_layers is None or self.rope_layers[layer]

    @property
    def ffn_hidden_dim(self) -> int:
        if self.intermediate_size is not None:  # Hugging Face configs give the width directly
            return self.intermediate_size
        # Meta's rule: 2/3 of 4*dim, scaled, rounded up to a multiple of multiple_of.
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelArgs:
        path = Path(path)
        raw = read_json_object(path)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{path}: unsupported keys {unknown}")
        missing = [k for k in ("dim", "n_layers", "n_heads") if k not in raw]
        if missing:
            raise ConfigError(f"{path}: missing keys {missing}")
        raw.setdefault("vocab_size", -1)
        try:
            return cls(**raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _check_layer_fields(a: ModelArgs):
    """ModelArgs' per-layer windows and Gemma fields, refused by name when out of range."""
    if a.layer_windows is not None:
        if not isinstance(a.layer_windows, list) or len(a.layer_windows) != a.n_layers:
            raise ConfigError(f"layer_windows must list one window (or null) per layer, {a.n_layers} in all, got {a.layer_windows!r}")
        for w in a.layer_windows:
            if w is not None:
                _check_positive_int("layer_windows", w)
    if a.rope_layers is not None and (not isinstance(a.rope_layers, list) or len(a.rope_layers) != a.n_layers
                                      or any(not isinstance(r, bool) for r in a.rope_layers)):
        raise ConfigError(f"rope_layers must list true or false per layer, {a.n_layers} in all, got {a.rope_layers!r}")
    for name in ("norm_plus_one", "norm_weight_fp32", "pre_norms", "post_norms", "qk_norm_whole", "embed_scale",
                 "fused_proj"):
        if not isinstance(getattr(a, name), bool):
            raise ConfigError(f"{name} must be true or false, got {getattr(a, name)!r}")
    if a.hidden_act not in ACTIVATIONS:
        raise ConfigError(f"hidden_act {a.hidden_act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    for name in ("local_rope_theta", "query_pre_attn_scalar", "attn_softcap", "final_softcap"):
        v = getattr(a, name)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0):
            raise ConfigError(f"{name} must be a positive number or null, got {v!r}")
    # nn.Embedding's range for padding_idx (a negative one counts from the end), which transformers passes on
    if a.pad_id is not None and (not isinstance(a.pad_id, int) or isinstance(a.pad_id, bool)
                                 or a.vocab_size > 0 and not -a.vocab_size <= a.pad_id < a.vocab_size):
        raise ConfigError(f"pad_id must be a token id within vocab_size {a.vocab_size} or null, got {a.pad_id!r}")


def window_mask(n_q: int, n_k: int, window: int, device) -> torch.Tensor:
    """(n_q, n_k) bool, True where query row r (key column n_k - n_q + r) may see a key: causal, within the window."""
    q = torch.arange(n_k - n_q, n_k, device=device)[:, None]
    k = torch.arange(n_k, device=device)[None, :]
    return (k <= q) & (k > q - window)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap), Gemma 2's bound on attention scores and logits; x itself when cap is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


# Meta's Llama 3.1 constants (use_scaled_rope in params.json), from llama-models' apply_scaling.
META_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}
ROPE_SCALING_KEYS = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "linear": ("factor",),
    # Phi-3's LongRoPE: per-frequency divisors, short_factor up to original_max_position_embeddings tokens and
    # long_factor beyond, cos and sin times attention_factor (resolved on import as transformers resolves it).
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings", "attention_factor"),
}
LONGROPE_LISTS = ("short_factor", "long_factor")


def _check_positive_int(name: str, v):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {v!r}")


def _check_rope_scaling(s, rotary_dim: int):
    if not isinstance(s, dict) or s.get("rope_type") not in ROPE_SCALING_KEYS:
        raise ConfigError(f"rope_scaling must be a dict with rope_type one of {sorted(ROPE_SCALING_KEYS)}, got {s!r}")
    want = {"rope_type", *ROPE_SCALING_KEYS[s["rope_type"]]}
    if set(s) != want:
        raise ConfigError(f"rope_scaling of type {s['rope_type']} needs exactly the keys {sorted(want)}, got {sorted(s)}")
    for k in want - {"rope_type"}:
        if k in LONGROPE_LISTS:
            v = s[k]
            if not isinstance(v, list) or len(v) != rotary_dim // 2 or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in v):
                raise ConfigError(f"rope_scaling.{k} must list {rotary_dim // 2} positive numbers, got {v!r}")
            continue
        v = s[k]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"rope_scaling.{k} must be a positive number, got {v!r}")
    if s["rope_type"] == "llama3" and s["high_freq_factor"] <= s["low_freq_factor"]:
        raise ConfigError(f"rope_scaling: high_freq_factor {s['high_freq_factor']} must exceed low_freq_factor {s['low_freq_factor']}")


class RMSNorm(nn.Module):
    """Meta's RMSNorm: normalised in fp32 whatever the compute dtype, cast back, then scaled by weight."""

    offset: float | None = None  # see CastLastRMSNorm

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return _RMSNormFn.apply(x, self.weight, self.eps, self.offset)


class CastLastRMSNorm(RMSNorm):
    """An RMSNorm that scales in fp32 and casts last: by 1 + weight (Gemma, weights stored around 0) or by
    weight (OLMo 2), as transformers computes them."""

    def __init__(self, dim: int, eps: float, offset: float):
        super().__init__(dim, eps)
        self.offset = offset


class _RMSNormFn(torch.autograd.Function):
    """Both norms with a backward of their own. Autograd through their ops keeps up to five intermediates a
    call, fp32 ones among them, and walks them back one op at a time; this keeps x and the (rows, 1) scale r
    and recomputes the rest: 1.7x faster forward and backward (a Llama-2 block's norm, 2 cpu threads), and
    a bf16 model keeps no fp32 copy of its hidden states. The forward is the plain ops' own, bit for bit;
    the gradients differ from autograd's chain in rounding only (tests/model/test_norm.py).
    offset None: Meta's order (cast, then scale in the compute dtype); else scale by offset + weight in fp32,
    then cast."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float | None) -> torch.Tensor:
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        ctx.offset = offset
        if offset is None:
            return (xf * r).type_as(x) * weight
        return (xf * r * (offset + weight.float())).type_as(x)

    @staticmethod
    @once_differentiable  # r is saved as a constant: a second derivative through this would be wrong
    def backward(ctx, g: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        xf, offset = x.float(), ctx.offset
        gx = gw = None
        if offset is not None:
            g = g.float()
        if ctx.needs_input_grad[1]:  # g times the normalised input (as cast, in Meta's order), over every row
            n = xf * r if offset is not None else (xf * r).type_as(x)
            gw = (g * n).sum(dim=tuple(range(g.dim() - 1))).to(weight.dtype)
        if ctx.needs_input_grad[0]:  # d(x r)/dx with r = mean(x^2)^-1/2: r (gn - x r^2 mean(gn x))
            gn = (g * weight).float() if offset is None else g * (offset + weight.float())
            gx = (r * (gn - xf * (r * r) * (gn * xf).mean(-1, keepdim=True))).type_as(x)
        return gx, gw, None, None


def make_norm(args: ModelArgs, dim: int) -> RMSNorm:
    if args.norm_plus_one or args.norm_weight_fp32:
        return CastLastRMSNorm(dim, args.norm_eps, 1.0 if args.norm_plus_one else 0.0)
    return RMSNorm(dim, args.norm_eps)


def longrope_is_long(scaling: dict | None, seqlen: int) -> bool:
    """Whether LongRoPE takes its long factors for a pass whose furthest position is seqlen - 1, as transformers
    chooses them (per forward call, by the largest position in it)."""
    return scaling is not None and scaling["rope_type"] == "longrope" and seqlen > scaling["original_max_position_embeddings"]


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None, device=None, long: bool = False) -> torch.Tensor:
    """The rotary frequencies, (head_dim // 2,) in fp32, with Llama 3's, linear or LongRoPE scaling applied
    (long: LongRoPE's long factors rather than its short ones). head_dim: the entries RoPE turns."""
    if scaling is not None and scaling["rope_type"] == "longrope":
        ext = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32, device=device)
        # transformers' _compute_longrope_parameters, in its order of operations
        return 1.0 / (ext * theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    if scaling is None:
        return freqs
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":  # positions divided by factor
        return freqs / factor
    # llama3: keep short wavelengths, divide long ones by factor, blend in between
    # (Meta's apply_scaling; transformers' _compute_llama3_parameters).
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    out = torch.where(wavelen > old_len / low, freqs / factor, freqs)
    return torch.where((wavelen >= old_len / high) & (wavelen <= old_len / low), blended, out)


def rope_tables(seqlen: int, head_dim: int, theta: float, device, scaling: dict | None = None,
                long: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of Meta's rotary angles, (seqlen, head_dim // 2), in fp32. long: LongRoPE's choice of factors
    (None: as a pass of seqlen tokens chooses them)."""
    long = longrope_is_long(scaling, seqlen) if long is None else long
    freqs = rope_frequencies(head_dim, theta, scaling, device, long)
    angles = torch.outer(torch.arange(seqlen, device=device, dtype=torch.float32), freqs)
    if scaling is not None and scaling["rope_type"] == "longrope":  # transformers scales both, even by 1.0
        return angles.cos() * scaling["attention_factor"], angles.sin() * scaling["attention_factor"]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Meta's rotation of each adjacent pair (x[2i], x[2i+1]) as one complex number, in fp32.

    x: (bs, seqlen, heads, head_dim); cos, sin: (seqlen, rot // 2) shared by the batch, or (bs, seqlen, rot // 2)
    per sequence; rot < head_dim turns only the first rot entries of each head (partial rotary) and passes the
    rest through. One complex multiply does it in a single pass over contiguous pairs: 8x faster forward, 4.5x
    forward and backward, than the same products taken on strided halves (q of a block with 64-wide heads, 2 cpu
    threads; the same bits there, within an ulp where a kernel fuses a multiply-add). MPS has no complex
    kernels: there the rotation is spelled out in real arithmetic."""
    rot = 2 * cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    xf = x.float().unflatten(-1, (-1, 2))
    cos, sin = (cos[None, :, None, :], sin[None, :, None, :]) if cos.dim() == 2 else (cos[:, :, None], sin[:, :, None])
    if x.device.type != "mps":
        return torch.view_as_real(torch.view_as_complex(xf) * torch.complex(cos, sin)).flatten(-2).type_as(x)
    return rope_real(xf, cos, sin).type_as(x)


def rope_real(xf: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope's rotation in real arithmetic: xf (..., rot // 2, 2) in fp32, cos and sin broadcast to its pairs."""
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.rope_theta, self.rope_scaling = args.rope_of(layer)
        self.rope_dim, self.ropes = args.rotary_dim, args.ropes(layer)
        self.window, self.softcap = args.window(layer), args.attn_softcap
        self.scale = args.query_pre_attn_scalar ** -0.5 if args.query_pre_attn_scalar is not None else None
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        self.qk_norm, self.qk_norm_whole = args.qk_norm, args.qk_norm_whole
        if args.qk_norm:
            q_dim, k_dim = (args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim) if args.qk_norm_whole \
                else (args.head_dim, args.head_dim)
            self.q_norm = make_norm(args, q_dim)
            self.k_norm = make_norm(args, k_dim)

    def _qkv(self, x):
        """q, k, v of x as (bs, seqlen, heads, head_dim), not yet roped; q and k normed per head (Qwen3, Gemma 3)
        or over the whole projection (OLMo 2)."""
        bs, seqlen, _ = x.shape
        q, k = self.wq(x), self.wk(x)
        if self.qk_norm_whole:  # OLMo 2: over all heads at once
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(bs, seqlen, self.n_heads, self.head_dim)
        k = k.view(bs, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bs, seqlen, self.n_kv_heads, self.head_dim)
        if self.qk_norm and not self.qk_norm_whole:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x, kv: KVCache | None = None, layer: int = 0):
        if kv is not None:
            return self._cached(x, kv, layer)
        bs, seqlen, _ = x.shape
        q, k, v = self._qkv(x)
        if self.ropes:
            cos, sin = rope_tables(seqlen, self.rope_dim, self.rope_theta, x.device, self.rope_scaling)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:  # grouped-query attention: each kv head serves `rep` query heads
            k = k.repeat_interleave(rep, dim=2)
            v = v.repeat_interleave(rep, dim=2)
        mask = None if self.window is None else window_mask(seqlen, seqlen, self.window, x.device)
        out = self._attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        return self.wo(out.transpose(1, 2).reshape(bs, seqlen, -1))

    def _attend(self, q, k, v, mask):
        """softmax(q k^T * scale) v, all (bs, heads, seqlen, head_dim); mask (bool, True: seen) None means causal."""
        if self.softcap is None:
            if mask is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        # Soft-capping sits between the product and the softmax, where SDPA has no hook: written out,
        # as transformers' eager attention does it (softmax in fp32).
        scale = self.scale if self.scale is not None else self.head_dim ** -0.5
        scores = softcap(q @ k.transpose(-1, -2) * scale, self.softcap)
        if mask is None:
            mask = window_mask(q.shape[-2], k.shape[-2], k.shape[-2], q.device)
        scores = scores.masked_fill(~mask, -math.inf)
        return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v

    def _cached(self, x, kv: KVCache, layer: int):
        """x's queries against the keys and values of every token so far; x's own are added to the cache."""
        bs, seqlen, _ = x.shape
        q, k, v = self._qkv(x)
        if self.ropes:
            cos, sin = kv.rope(self.rope_theta, self.rope_scaling)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = kv.store(layer, k, v)  # (bs, tokens so far, n_kv_heads, head_dim)
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=2)
            v = v.repeat_interleave(rep, dim=2)
        out = self._attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), kv.mask_of(self.window))
        return self.wo(out.transpose(1, 2).reshape(bs, seqlen, -1))


class KVCache:
    """Keys and values of every block for a batch of sequences, filled as tokens arrive.

    Sequences are left-padded to a common length: `advance(valid)` takes the next
    columns' padding mask, gives each real token its position in its own sequence
    (so a padded prompt ropes as it would alone) and builds the attention mask, which
    hides padding from every query. Buffers: (bs, max_len, n_kv_heads, head_dim) per block.
    """

    def __init__(self, args: ModelArgs, bs: int, max_len: int, device, dtype: torch.dtype):
        shape = (bs, max_len, args.n_kv_heads, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.valid = torch.zeros(bs, max_len, dtype=torch.bool, device=device)
        # One table per distinct (base, scaling) among the layers (two for Gemma 3), keyed by rope_key; LongRoPE
        # keeps its short and its long table and takes one per pass (advance), as transformers does.
        self.tables, self.scalings = {}, {}
        for i in range(args.n_layers):
            theta, scaling = args.rope_of(i)
            key = rope_key(theta, scaling)
            if key not in self.tables:
                self.scalings[key] = scaling
                self.tables[key] = {long: rope_tables(max_len, args.rotary_dim, theta, device, scaling, long)
                                    for long in ((False, True) if scaling and scaling["rope_type"] == "longrope"
                                                 else (False,))}
        self.len = 0  # columns filled
        self.start = 0  # the first column of the tokens now passing through

    @staticmethod
    def nbytes(args: ModelArgs, bs: int, max_len: int, dtype: torch.dtype) -> int:
        return 2 * args.n_layers * bs * max_len * args.n_kv_heads * args.head_dim * dtype.itemsize

    def advance(self, valid: torch.Tensor):
        """Make room for the next columns; valid (bs, seqlen) is False where a column is padding."""
        seqlen = valid.shape[1]
        self.start, end = self.len, self.len + seqlen
        self.valid[:, self.start:end] = valid
        pos = (self.valid[:, :end].long().cumsum(1) - 1).clamp(min=0)[:, self.start:end]
        furthest = int(pos.max()) + 1
        # (bs, seqlen, rotary_dim // 2) per table
        self.cos_sin = {}
        for key, by_long in self.tables.items():
            cos, sin = by_long[longrope_is_long(self.scalings[key], furthest)]
            self.cos_sin[key] = cos[pos], sin[pos]
        self.masks = {}  # per window, made on first use
        self.len = end

    def stale(self, seqlen: int) -> bool:
        """Whether the next seqlen columns take a LongRoPE table to its long factors while the cache holds keys
        turned with its short ones. transformers' Phi-3 then drops its cache and recomputes every token, with the
        long factors; generation does the same (reset, then all the columns again)."""
        return any(s is not None and s["rope_type"] == "longrope"
                   and 0 < self.len <= s["original_max_position_embeddings"] < self.len + seqlen
                   for s in self.scalings.values())

    def reset(self):
        """Forget every column: the next advance starts from the first."""
        self.valid.zero_()
        self.len = self.start = 0

    def rope(self, theta: float, scaling: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at the positions of the tokens now passing through, for one layer's RoPE."""
        return self.cos_sin[rope_key(theta, scaling)]

    def mask_of(self, window: int | None) -> torch.Tensor:
        """(bs, 1, seqlen, len) bool: what each query now passing through sees, causal and within window.

        Padding is on the left and hidden from every query, so a window of columns is one of positions.
        """
        if window not in self.masks:
            seqlen, end = self.len - self.start, self.len
            seen = window_mask(seqlen, end, end if window is None else window, self.valid.device)
            # A padding query sees only itself, so that its row is finite and no NaN reaches real tokens.
            itself = torch.zeros_like(seen)
            itself[:, self.start:] = torch.eye(seqlen, dtype=torch.bool, device=self.valid.device)
            self.masks[window] = ((seen[None] & self.valid[:, None, :end]) | itself[None])[:, None]
        return self.masks[window]

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer][:, self.start:self.len] = k
        self.v[layer][:, self.start:self.len] = v
        return self.k[layer][:, :self.len], self.v[layer][:, :self.len]


def rope_key(theta: float, scaling: dict | None) -> tuple:
    # LongRoPE's factor lists become tuples, so that the key hashes
    return (theta, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in scaling.items()))
            if scaling else None)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)
        self.act = ACTIVATIONS[args.hidden_act]

    def forward(self, x):
        return self.w2(self.act(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, dropout: float = 0.0, layer: int = 0):
        """layer: the block's index, which picks its attention window and RoPE."""
        super().__init__()
        self.attention = Attention(args, layer)
        self.feed_forward = FeedForward(args)
        # OLMo 2 norms only the sublayers' outputs: Identity holds no weight, so the block's tensors stay its own.
        self.attention_norm = make_norm(args, args.dim) if args.pre_norms else nn.Identity()
        self.ffn_norm = make_norm(args, args.dim) if args.pre_norms else nn.Identity()
        self.post_norms = args.post_norms
        if args.post_norms:  # Gemma: each sublayer's output is normed too, before it joins the residual
            self.post_attention_norm = make_norm(args, args.dim)
            self.post_ffn_norm = make_norm(args, args.dim)
        # Residual dropout draws from the device's global RNG, which the trainer
        # saves before the forward pass and restores before the recompute.
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, kv: KVCache | None = None, layer: int = 0):
        """kv (generation only): attend to the cached tokens too; layer is this block's index in it."""
        a = self.attention(self.attention_norm(x), kv, layer)
        h = x + self.dropout(self.post_attention_norm(a) if self.post_norms else a)
        f = self.feed_forward(self.ffn_norm(h))
        return h + self.dropout(self.post_ffn_norm(f) if self.post_norms else f)


class Embedding(nn.Embedding):
    """The token embedding, its output scaled by sqrt(dim) for Gemma, in the weight's dtype as transformers does
    (bf16 rounds sqrt(3072) = 55.43 to 55.5). padding_idx's row takes no gradient, as in transformers."""

    def __init__(self, args: ModelArgs, weight: torch.Tensor | None = None):
        super().__init__(args.vocab_size, args.dim, args.pad_id, _weight=weight)
        self.scale = args.dim ** 0.5 if args.embed_scale else None

    def forward(self, tokens):
        h = super().forward(tokens)
        return h if self.scale is None else h * torch.tensor(self.scale).to(self.weight.dtype)


class Output(nn.Linear):
    """The output layer, its logits soft-capped where the model says so (Gemma 2)."""

    def __init__(self, args: ModelArgs):
        super().__init__(args.dim, args.vocab_size, bias=False)
        self.softcap = args.final_softcap

    def forward(self, h):
        return softcap(super().forward(h), self.softcap)


class TiedOutput(nn.Module):
    """The output layer of a tied model: no weight of its own, it multiplies by the embedding matrix.

    A store keeps it as an "output" module with no tensors; its caller passes the
    embedding's weight, and the gradient that reaches that weight belongs to the embedding.
    """

    def __init__(self, final_softcap: float | None = None):
        super().__init__()
        self.softcap = final_softcap

    def forward(self, h: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        return softcap(F.linear(h, embedding_weight), self.softcap)


def module_names(args: ModelArgs) -> list[str]:
    """The streamed modules in forward order; names are Meta's key prefixes."""
    return ["tok_embeddings", *(f"layers.{i}" for i in range(args.n_layers)), "norm", "output"]


def build_module(name: str, args: ModelArgs, dropout: float = 0.0) -> nn.Module:
    """An empty (meta-device) module for one stored name, to be filled with load_state_dict(assign=True)."""
    with torch.device("meta"):
        if name == "tok_embeddings":
            # An explicit weight skips nn.Embedding's init, which costs a second of imports.
            return Embedding(args, torch.empty(args.vocab_size, args.dim))
        if name == "norm":
            return make_norm(args, args.dim)
        if name == "output":
            return TiedOutput(args.final_softcap) if args.tie_word_embeddings else Output(args)
        if name.startswith("layers."):
            return TransformerBlock(args, dropout, int(name.split(".")[1]))
    raise ConfigError(f"unknown module name {name!r}")


class Transformer(nn.Module):
    """The whole model in memory: the reference that streamed training must equal."""

    def __init__(self, args: ModelArgs, dropout: float = 0.0):
        super().__init__()
        self.args = args
        self.tok_embeddings = Embedding(args)
        self.layers = nn.ModuleList(TransformerBlock(args, dropout, i) for i in range(args.n_layers))
        self.norm = make_norm(args, args.dim)
        self.output = TiedOutput(args.final_softcap) if args.tie_word_embeddings else Output(args)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        h = self.norm(h)
        if self.args.tie_word_embeddings:
            return self.output(h, self.tok_embeddings.weight)
        return self.output(h)
