"""The Llama architecture (Llama 2, Code Llama, Llama 3.x, Mistral, TinyLlama, SmolLM2, Qwen2, Qwen3),
with Meta's parameter names.

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
    # Mistral's attention window. The attention here is plain causal, which equals the
    # window only for sequences no longer than it: check_sliding_window refuses longer ones.
    sliding_window: int | None = None
    # Qwen's attention. qkv_bias: wq, wk, wv add a bias (Qwen2 always; Qwen3's attention_bias);
    # o_bias: wo adds one too (Qwen3's attention_bias); qk_norm: each head of q and k passes an
    # RMSNorm over head_dim before RoPE (Qwen3). The model, the block tables and the export read these.
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False

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
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
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
    def from_json(cls, path: str | Path) -> "ModelArgs":
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


def check_sliding_window(args: ModelArgs, seq_len: int, option: str = "--seq-len"):
    """Refuse sequences longer than Mistral's attention window: the attention here is full causal."""
    if args.sliding_window is not None and seq_len > args.sliding_window:
        raise ConfigError(f"{option} {seq_len} is longer than the model's sliding_window {args.sliding_window}; "
                          f"slowllama's attention is full causal, exact only up to the window: use {option} {args.sliding_window} or less")


# Meta's Llama 3.1 constants (use_scaled_rope in params.json), from llama-models' apply_scaling.
META_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}
ROPE_SCALING_KEYS = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "linear": ("factor",),
}


def _check_positive_int(name: str, v):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {v!r}")


def _check_rope_scaling(s):
    if not isinstance(s, dict) or s.get("rope_type") not in ROPE_SCALING_KEYS:
        raise ConfigError(f"rope_scaling must be a dict with rope_type one of {sorted(ROPE_SCALING_KEYS)}, got {s!r}")
    want = {"rope_type", *ROPE_SCALING_KEYS[s["rope_type"]]}
    if set(s) != want:
        raise ConfigError(f"rope_scaling of type {s['rope_type']} needs exactly the keys {sorted(want)}, got {sorted(s)}")
    for k in want - {"rope_type"}:
        v = s[k]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"rope_scaling.{k} must be a positive number, got {v!r}")
    if s["rope_type"] == "llama3" and s["high_freq_factor"] <= s["low_freq_factor"]:
        raise ConfigError(f"rope_scaling: high_freq_factor {s['high_freq_factor']} must exceed low_freq_factor {s['low_freq_factor']}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 as Meta does, whatever the compute dtype.
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None, device=None) -> torch.Tensor:
    """The rotary frequencies, (head_dim // 2,) in fp32, with Llama 3's or linear scaling applied."""
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


def rope_tables(seqlen: int, head_dim: int, theta: float, device, scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of Meta's rotary angles, (seqlen, head_dim // 2), in fp32."""
    freqs = rope_frequencies(head_dim, theta, scaling, device)
    angles = torch.outer(torch.arange(seqlen, device=device, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Meta rotates adjacent pairs (x[2i], x[2i+1]) as one complex number; done here
    # in real arithmetic because MPS has no complex kernels. x: (bs, seqlen, heads, head_dim)
    # cos, sin: (seqlen, head_dim // 2) shared by the batch, or (bs, seqlen, head_dim // 2) per sequence.
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = (cos[None, :, None, :], sin[None, :, None, :]) if cos.dim() == 2 else (cos[:, :, None], sin[:, :, None])
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.rope_theta, self.rope_scaling = args.rope_theta, args.rope_scaling
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        self.qk_norm = args.qk_norm
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps)

    def _qkv(self, x):
        """q, k, v of x as (bs, seqlen, heads, head_dim); q and k normed per head (Qwen3), not yet roped."""
        bs, seqlen, _ = x.shape
        q = self.wq(x).view(bs, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bs, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bs, seqlen, self.n_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(self, x, kv: "KVCache | None" = None, layer: int = 0):
        if kv is not None:
            return self._cached(x, kv, layer)
        bs, seqlen, _ = x.shape
        q, k, v = self._qkv(x)
        cos, sin = rope_tables(seqlen, self.head_dim, self.rope_theta, x.device, self.rope_scaling)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:  # grouped-query attention: each kv head serves `rep` query heads
            k = k.repeat_interleave(rep, dim=2)
            v = v.repeat_interleave(rep, dim=2)
        # (bs, heads, seqlen, head_dim)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(bs, seqlen, -1))

    def _cached(self, x, kv: "KVCache", layer: int):
        """x's queries against the keys and values of every token so far; x's own are added to the cache."""
        bs, seqlen, _ = x.shape
        q, k, v = self._qkv(x)
        q, k = apply_rope(q, kv.cos, kv.sin), apply_rope(k, kv.cos, kv.sin)
        k, v = kv.store(layer, k, v)  # (bs, tokens so far, n_kv_heads, head_dim)
        rep = self.n_heads // self.n_kv_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=2)
            v = v.repeat_interleave(rep, dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=kv.mask)
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
        self.cos_table, self.sin_table = rope_tables(max_len, args.head_dim, args.rope_theta, device, args.rope_scaling)
        self.len = 0  # columns filled
        self.start = 0  # the first column of the tokens now passing through

    @staticmethod
    def nbytes(args: ModelArgs, bs: int, max_len: int, dtype: torch.dtype) -> int:
        return 2 * args.n_layers * bs * max_len * args.n_kv_heads * args.head_dim * dtype.itemsize

    def advance(self, valid: torch.Tensor):
        """Make room for the next columns; valid (bs, seqlen) is False where a column is padding."""
        bs, seqlen = valid.shape
        self.start, end = self.len, self.len + seqlen
        self.valid[:, self.start:end] = valid
        pos = (self.valid[:, :end].long().cumsum(1) - 1).clamp(min=0)[:, self.start:end]
        self.cos, self.sin = self.cos_table[pos], self.sin_table[pos]  # (bs, seqlen, head_dim // 2)
        causal = torch.ones(seqlen, end, dtype=torch.bool, device=valid.device).tril(self.start)
        # A padding query sees only itself, so that its row is finite and no NaN reaches real tokens.
        itself = torch.zeros_like(causal)
        itself[:, self.start:] = torch.eye(seqlen, dtype=torch.bool, device=valid.device)
        self.mask = ((causal[None] & self.valid[:, None, :end]) | itself[None])[:, None]  # (bs, 1, seqlen, end)
        self.len = end

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer][:, self.start:self.len] = k
        self.v[layer][:, self.start:self.len] = v
        return self.k[layer][:, :self.len], self.v[layer][:, :self.len]


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden_dim
        self.w1 = nn.Linear(args.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, dropout: float = 0.0):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        # Residual dropout draws from the device's global RNG, which the trainer
        # saves before the forward pass and restores before the recompute.
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, kv: KVCache | None = None, layer: int = 0):
        """kv (generation only): attend to the cached tokens too; layer is this block's index in it."""
        h = x + self.dropout(self.attention(self.attention_norm(x), kv, layer))
        return h + self.dropout(self.feed_forward(self.ffn_norm(h)))


class TiedOutput(nn.Module):
    """The output layer of a tied model: no weight of its own, it multiplies by the embedding matrix.

    A store keeps it as an "output" module with no tensors; its caller passes the
    embedding's weight, and the gradient that reaches that weight belongs to the embedding.
    """

    def forward(self, h: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(h, embedding_weight)


def module_names(args: ModelArgs) -> list[str]:
    """The streamed modules in forward order; names are Meta's key prefixes."""
    return ["tok_embeddings", *(f"layers.{i}" for i in range(args.n_layers)), "norm", "output"]


def build_module(name: str, args: ModelArgs, dropout: float = 0.0) -> nn.Module:
    """An empty (meta-device) module for one stored name, to be filled with load_state_dict(assign=True)."""
    with torch.device("meta"):
        if name == "tok_embeddings":
            # An explicit weight skips nn.Embedding's init, which costs a second of imports.
            return nn.Embedding(args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim))
        if name == "norm":
            return RMSNorm(args.dim, args.norm_eps)
        if name == "output":
            return TiedOutput() if args.tie_word_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        if name.startswith("layers."):
            return TransformerBlock(args, dropout)
    raise ConfigError(f"unknown module name {name!r}")


class Transformer(nn.Module):
    """The whole model in memory: the reference that streamed training must equal."""

    def __init__(self, args: ModelArgs, dropout: float = 0.0):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, dropout) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        if args.tie_word_embeddings:
            self.output = TiedOutput()
        else:
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        h = self.norm(h)
        if self.args.tie_word_embeddings:
            return self.output(h, self.tok_embeddings.weight)
        return self.output(h)
