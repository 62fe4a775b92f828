"""What a step keeps in RAM: one plan, read by the trainer, the I/O estimate and the up-front costs.

The RAM budget (TrainConfig.ram_budget; None: no limit) is split in this order:
  1. the cached inputs of the modules below the turn (one hidden state per token each): they
     are small, a few MB a module, and off the budget they go to scratch files that are
     written and read back every step;
  2. extra blocks in the turn (K): each block the turn holds is never recomputed and never
     read a second time, so it saves a module's forward pass and a read, the largest costs
     of a step on a CPU; the turn grows from the top down, and in full fine-tuning of an
     untied model it may take the embedding too, when the step recomputes nothing at all;
  3. the streamer's module cache gets what is left: a cached module saves a read only.
A quantized LoRA base (--base-quant) first keeps all of itself cached when the budget holds it beside
the activations, the turn taking what is left: there a turn block costs its dequantized copy, 4 to 8
times the module as cached, while the cache spares every read of the base.
With budget 0 the turn is the minimal one (the last block, the norm and the output
layer, K = 0), the activations go to disk and no module stays cached.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..blockfile import DTYPES
from ..model.transformer import ModelArgs
from .quant import stored_sizes


@dataclass(frozen=True)
class ModuleSize:
    ram: int  # bytes the module takes in RAM as the streamer holds it (16-bit stores widened), state included
    file: int  # bytes a read of it moves at the steady state (its file, with the optimizer state it will have)
    numel: int  # parameters
    dequant: int = 0  # bytes a quantized base's weights take dequantized while the module computes (quant.py)


@dataclass(frozen=True)
class StepPlan:
    top: int  # the turn's first module: the turn is modules [top, M)
    lowest: int  # the lowest module the reverse pass reaches: 1 in LoRA, whose embedding is frozen, else 0
    turn_blocks: int  # K: the modules the turn holds beyond the last block, the norm and the output layer
    acts_in_ram: bool  # the cached inputs of the modules below the turn stay in RAM (else scratch files)
    act_bytes: int  # bytes of those cached inputs
    turn_bytes: int  # RAM the K extra modules of the turn hold (module, gradients, saved tensors)
    cache_budget: float  # bytes left to the streamer's module cache
    budget: float  # the whole budget (inf: no limit)


def saved_bytes_per_block(args: ModelArgs, rows: int, seq: int, compute_dtype: torch.dtype, dropout: float,
                          lora_rank: int = 0, lora_targets: int = 0) -> int:
    """Bytes autograd saves running one TransformerBlock forward with grad on a (rows, seq) micro-batch,
    parameters not counted (model.py's ops with torch's CPU kernels; checked in tests/engine/test_turn.py).

    Per RMSNorm: its input and its fp32 rsqrt (one per token; model/transformer.py's _RMSNormFn), and the
    output, which the linear layers after it keep. Attention: the complex cos + i sin table, once for q and
    once for k, q, k, v (k and v after the GQA repeat, so all n_heads wide) and the output, as
    scaled_dot_product_attention's flash kernel keeps them, with one fp32 logsumexp per head and token.
    Feed-forward: w1's and w3's outputs, the SiLU of the first and the product. Dropout: one mask per
    residual branch, in the compute dtype.
    CUDA's math attention (--deterministic) also keeps the (heads, seq, seq) scores: not counted here.
    """
    c, n = compute_dtype.itemsize, rows * seq
    attn_width = args.n_heads * args.head_dim
    norm = _norm_saved(n, args.dim, c, n) + n * args.dim * c
    attention = 2 * seq * (args.head_dim // 2) * 8 + 4 * n * attn_width * c + rows * args.n_heads * seq * 4
    ffn = 4 * n * args.ffn_hidden_dim * c
    masks = 2 * n * args.dim * c if dropout > 0 else 0
    adapters = lora_targets * 2 * n * lora_rank * c  # x @ A^T and its scaled product, per target
    return 2 * norm + attention + ffn + masks + adapters + _variant_saved_bytes(args, rows, seq, c)


def _norm_saved(n: int, width: int, c: int, scales: int) -> int:
    """What one RMSNorm keeps for its backward: its input (n rows of width, c bytes each) and an fp32 rsqrt
    per row it normalises (scales of them: one per token, or one per head of each token)."""
    return n * width * c + scales * 4


def _variant_saved_bytes(args: ModelArgs, rows: int, seq: int, c: int) -> int:
    """What the per-layer windows, soft-caps and extra norms of Qwen3, Gemma and OLMo 2 add to a Llama block's
    saved bytes (c: the compute dtype's itemsize), from the ops they add (checked as saved_bytes_per_block is).

    A norm that casts last (Gemma, OLMo 2) keeps what a Llama one does; a post-norm's output goes to the
    residual, which keeps nothing; so does a q/k norm's, which RoPE or attention keeps as q and k; without
    pre-norms the linear layers keep the block's own input and h. A window: SDPA's additive mask, (seq, seq).
    Soft-capping writes attention out: tanh's output, the fp32 softmax and its cast (one tensor in fp32),
    less SDPA's logsumexp, plus the bool mask.
    """
    n, d = rows * seq, args.dim
    out = 0 if args.pre_norms else 2 * n * d * c - 2 * (_norm_saved(n, d, c, n) + n * d * c)
    if args.post_norms:
        out += 2 * _norm_saved(n, d, c, n)
    if args.qk_norm:
        for heads in (args.n_heads, args.n_kv_heads):
            out += _norm_saved(n, heads * args.head_dim, c, n if args.qk_norm_whole else n * heads)
    windowed = any(args.window(i) is not None for i in range(args.n_layers))
    if args.attn_softcap is not None:
        scores = rows * args.n_heads * seq * seq
        out += scores * (c + 4 + (c if c != 4 else 0)) - rows * args.n_heads * seq * 4 + seq * seq
    elif windowed:
        out += seq * seq * c
    return out


def turn_module_bytes(i: int, args: ModelArgs, size: ModuleSize, cfg, rows: int, mb_rows: int, seq: int) -> int:
    """RAM module i holds in the turn, from the forward pass to its commit: the module as read, its
    parameters' gradients (fp32; with bf16 compute, the cast copy and its bf16 gradient), the tensors
    autograd saves for one micro-batch (the turn runs them one at a time) and the gradient into its
    input for every micro-batch, kept for its commit."""
    c = cfg.compute_dtype.itemsize
    lora = cfg.lora is not None
    if lora:  # a frozen base: no gradients of its own; a cast copy when it computes in another dtype
        grads = size.dequant or (0 if size.ram <= size.numel * c else size.numel * c)
    else:
        grads = size.numel * 4
    if i == 0:  # the embedding: token ids saved, a dense (vocab, dim) gradient, nothing handed down
        return size.ram + grads + mb_rows * seq * 8
    saved = saved_bytes_per_block(args, mb_rows, seq, cfg.compute_dtype, cfg.dropout,
                                  cfg.lora.rank if lora else 0, len(cfg.lora.targets) if lora else 0)
    return size.ram + grads + saved + rows * seq * args.dim * c


def cached_input_bytes(i: int, args: ModelArgs, cfg, rows: int, seq: int) -> int:
    """Bytes of module i's cached input for the whole batch: token ids for the embedding, else a hidden state."""
    return rows * seq * (8 if i == 0 else args.dim * cfg.act_dtype.itemsize)


def lowest_turn_module(args: ModelArgs, cfg) -> int:
    """The lowest module the turn may take. The embedding only in full fine-tuning of an untied model:
    LoRA does not train it, and a tied model's output layer already runs on its weight at the turn."""
    return 1 if cfg.lora is not None or args.tie_word_embeddings else 0


def plan_step(cfg, args: ModelArgs, sizes: list[ModuleSize], rows: int, mb_rows: int, seq: int,
              device_budget: float = math.inf) -> StepPlan:
    """The turn and what stays in RAM for a step of `rows` sequences of `seq` tokens, run `mb_rows` at a time.

    cfg.turn_blocks forces K (tests); else K is the largest the budget holds after the activations.
    On CUDA the turn's modules, gradients and saved tensors live on the device: device_budget
    (bytes free there for them) bounds the turn too.
    """
    m = len(sizes)
    lowest = 1 if cfg.lora is not None else 0  # the reverse pass recomputes, and caches, only down to there
    first = lowest_turn_module(args, cfg)
    base = m - 3  # the minimal turn: the last block, the norm and the output layer
    budget = math.inf if cfg.ram_budget is None else cfg.ram_budget

    def acts(top: int) -> int:
        return sum(cached_input_bytes(i, args, cfg, rows, seq) for i in range(lowest, top))

    turn = [0] * m  # turn[top]: what modules [top, base) hold in the turn
    for top in range(base - 1, first - 1, -1):
        turn[top] = turn[top + 1] + turn_module_bytes(top, args, sizes[top], cfg, rows, mb_rows, seq)
    # A quantized base stays cached whole where the budget holds it (see above); 0: not quantized.
    resident = sum(s.ram for s in sizes) if any(s.dequant for s in sizes) else 0
    if cfg.turn_blocks is not None:
        top = max(first, base - cfg.turn_blocks)
    elif resident and turn[base] + acts(base) + resident <= budget:
        top = next(t for t in range(first, base + 1)
                   if turn[t] + acts(t) + resident <= budget and turn[t] <= device_budget)
    else:
        # The cost of a larger turn grows as the top goes down (a block holds far more than its cached
        # input): take the lowest top whose turn and activations fit together.
        top = next((t for t in range(first, base + 1) if turn[t] + acts(t) <= budget and turn[t] <= device_budget),
                   base)
    in_ram = cfg.ram_budget is None or turn[top] + acts(top) <= budget
    held = turn[top] + (acts(top) if in_ram else 0)
    return StepPlan(top=top, lowest=lowest, turn_blocks=base - top, acts_in_ram=in_ram, act_bytes=acts(top), turn_bytes=turn[top],
                    cache_budget=max(0.0, budget - held), budget=budget)


def module_sizes(store, cfg) -> list[ModuleSize]:
    """Each trainable module's size in RAM and on disk at the steady state, from the store's headers alone
    (reading every module here would cost a whole pass over the store)."""
    lora = cfg.lora is not None
    n_state = 0 if lora else {"sgd": 1 if cfg.optim.momentum else 0, "adamw": 2}[cfg.optim.name]
    # What the streamer widens a 16-bit store's parameters to as it reads them (blackbox.widen_params).
    wide = cfg.compute_dtype.itemsize if lora else 4
    out = []
    for n in store.trainable:
        tensors = store.header(n)["tensors"]
        params = [(name, shape) for name, _, shape, _ in tensors if "#" not in name]
        have = sum(1 for name, _, _, _ in tensors if params and name.startswith(params[0][0] + "#"))
        # A quantized base holds its parts as stored, floating ones widened (quant.stored_sizes).
        numel, held, dequant = stored_sizes([(k, DTYPES[dt], shape) for k, dt, shape, _ in tensors if "#" not in k],
                                            wide)
        missing = max(0, n_state - have) * numel * cfg.optim_state_dtype.itemsize  # state a first step adds
        state = sum(DTYPES[dt].itemsize * math.prod(shape) for name, dt, shape, _ in tensors if "#" in name)
        ram = held + state + missing
        out.append(ModuleSize(ram=ram, file=store.path(n).stat().st_size + missing, numel=numel, dequant=dequant))
    return out


def resident_budget(cfg, args: ModelArgs, sizes: list[ModuleSize], rows: int, seq: int) -> int:
    """The smallest RAM budget that keeps every module cached beside the minimal turn and the cached
    inputs: a step then reads nothing of the base (LoRA; a full fine-tune writes every module anyway)."""
    lowest = 1 if cfg.lora is not None else 0
    return sum(s.ram for s in sizes) + sum(cached_input_bytes(i, args, cfg, rows, seq)
                                           for i in range(lowest, len(sizes) - 3))


def holds_trained_state(cfg, plan: StepPlan, sizes: list[ModuleSize]) -> bool:
    """Whether RAM can keep every updated module (with its optimizer state) from one commit to the next
    (--commit-every, commits.py): a full fine-tune whose cached inputs stay in RAM and whose modules
    below the turn, with the minimal three that the budget does not count, all fit the module cache the
    plan leaves (the K more blocks of the turn are counted in the plan)."""
    rest = sum(s.ram for s in sizes[:plan.top]) + sum(s.ram for s in sizes[len(sizes) - 3:])
    return cfg.lora is None and plan.acts_in_ram and rest <= plan.cache_budget
