"""A quantized LoRA base (--base-quant): the blocks' linear weights held as NF4 or int8 in the base store.

The formats are torchao's, which runs on CPU, CUDA and MPS with plain torch ops (torchtune's QLoRA
uses the same NF4 tensor):
- nf4: QLoRA's 4-bit NormalFloat, one absmax per 64 weights, the absmaxes double-quantized to int8
  in blocks of 256 around their mean (torchao's NF4Tensor, to_nf4(w, 64, 256));
- int8: symmetric per-output-channel absmax (torchao's Int8Tensor with PerRow granularity).
A quantized weight `key` is stored as its parts, `key~nf4.data` and so on, so that a block file
stays a flat dict of plain tensors; norms, biases, embeddings and the output layer are kept as the
checkpoint has them. Dequantization runs where the parts are (the compute device), in the dtype asked for.
"""
from __future__ import annotations

import logging
import math

import torch

from ..errors import ConfigError
from ..model.lora import TARGETS

KINDS = ("nf4", "int8")
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256  # QLoRA's: weights per absmax, absmaxes per second-level scale
SEP = "~"  # between a weight's key and the name of one of its parts
LINEAR_WEIGHTS = frozenset(f"{layer}.weight" for layer in TARGETS.values())
# The parts of each kind, as the block file holds them.
PARTS = {"nf4": ("nf4.data", "nf4.scalers", "nf4.factor", "nf4.mean"), "int8": ("int8.q", "int8.scale")}


def _torchao():
    """torchao's NF4 and int8 pieces, imported on first use (the import takes seconds)."""
    # Importing torchao logs each optional CUDA kernel library it cannot load (none is used here) and
    # torch's pytree deprecations of its enums: quiet for the import only.
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        from torchao.quantization.granularity import PerRow
        from torchao.quantization.quant_primitives import dequantize_affine
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import (
            NF4Tensor,
            SubclassTensorArgs,
        )
    except ImportError as e:
        raise ConfigError(f"--base-quant needs torchao (pip install 'slowllama[quant]'): {e}") from e
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return NF4Tensor, SubclassTensorArgs, Int8Tensor, PerRow, dequantize_affine


def is_quantized(module: str, key: str) -> bool:
    """Whether --base-quant quantizes this parameter: the linear weights of the transformer blocks."""
    return module.startswith("layers.") and key in LINEAR_WEIGHTS


def check_quantizable(kind: str, shapes: dict[str, tuple[int, ...]]):
    """Refuse, before any work, a checkpoint whose linear weights the format cannot hold.
    shapes: full key (layers.N.attention.wq.weight) -> shape."""
    _torchao()
    if kind != "nf4":
        return
    for key, shape in shapes.items():
        module, _, param = key.partition(".")
        if module == "layers":
            module, _, param = param.partition(".")
            n = math.prod(shape)
            if is_quantized(f"layers.{module}", param) and n % (NF4_BLOCK * NF4_SCALER_BLOCK):
                raise ConfigError(f"--base-quant nf4: {key} {list(shape)} has {n} weights, NF4's double quantization "
                                  f"needs a multiple of {NF4_BLOCK * NF4_SCALER_BLOCK}; use --base-quant int8")


def quantize(kind: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """The parts of a 2-D weight (out, in) quantized as kind, by torchao."""
    NF4Tensor, _, Int8Tensor, PerRow, _ = _torchao()
    if kind == "nf4":
        q = NF4Tensor.from_tensor(w.contiguous(), NF4_BLOCK, NF4_SCALER_BLOCK)
        # Two 4-bit codes a byte, in the weight's row-major order: (out, in / 2) keeps the shape readable.
        data = q.quantized_data.view(w.shape[0], w.shape[1] // 2)
        parts = (data, q.quantized_scalers, q.quantization_factor, q.scaler_mean)
    else:
        q = Int8Tensor.from_hp(w, PerRow())
        parts = (q.qdata, q.scale)
    # Dense copies: torchao may hand out strided views (a one-element factor with stride 256).
    return {name: torch.empty(t.shape, dtype=t.dtype).copy_(t) for name, t in zip(PARTS[kind], parts)}


def dequantize(kind: str, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The weight back from its parts, computed in dtype on the parts' device (torchao's dequantization)."""
    NF4Tensor, SubclassTensorArgs, _, _, dequantize_affine = _torchao()
    if kind == "nf4":
        data, scalers, factor, mean = (parts[p] for p in PARTS[kind])
        shape = torch.Size((data.shape[0], data.shape[1] * 2))
        meta = SubclassTensorArgs(shape, (shape[1], 1), 0, dtype, data.device, False)
        q = NF4Tensor(meta, NF4_BLOCK, shape.numel() // NF4_BLOCK, NF4_SCALER_BLOCK, scalers, factor.to(dtype),
                      mean.to(dtype), data.flatten(), _nf4_codes(dtype, data.device))
        return q.get_original_weight()
    q, scale = (parts[p] for p in PARTS[kind])
    return dequantize_affine(q, (1, q.shape[1]), scale, None, torch.int8, output_dtype=dtype)


_CODES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _nf4_codes(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """NF4's 16 code values as torchao builds them (in from_tensor), in dtype on device."""
    if (dtype, device) not in _CODES:
        NF4Tensor = _torchao()[0]
        probe = NF4Tensor.from_tensor(torch.ones(NF4_BLOCK * NF4_SCALER_BLOCK, dtype=dtype), NF4_BLOCK, NF4_SCALER_BLOCK)
        _CODES[dtype, device] = probe.nf4.to(device)
    return _CODES[dtype, device]


def quantize_module(kind: str, module: str, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A module's parameters as the quantized base store holds them."""
    out = {}
    for key, t in params.items():
        if is_quantized(module, key):
            out.update({f"{key}{SEP}{p}": v for p, v in quantize(kind, t).items()})
        else:
            out[key] = t
    return out


def dequantize_module(params: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A stored module's parameters, keyed by parameter name, every floating one in dtype."""
    out, parts = {}, {}
    for key, t in params.items():
        if SEP in key:
            weight, part = key.split(SEP)
            parts.setdefault(weight, {})[part] = t
        else:
            out[key] = t if t.dtype == dtype else t.to(dtype)
    for weight, p in parts.items():
        out[weight] = dequantize(next(k for k in KINDS if PARTS[k][0] in p), p, dtype)
    return out


def part_shapes(kind: str, shape: tuple[int, int], dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple]]:
    """(dtype, shape) of each part quantize() makes of an (out, in) weight of dtype, without quantizing it."""
    out_f, in_f = shape
    n = out_f * in_f
    if kind == "nf4":
        return {"nf4.data": (torch.uint8, (out_f, in_f // 2)), "nf4.scalers": (torch.int8, (n // NF4_BLOCK,)),
                "nf4.factor": (dtype, (n // (NF4_BLOCK * NF4_SCALER_BLOCK),)), "nf4.mean": (dtype, ())}
    return {"int8.q": (torch.int8, (out_f, in_f)), "int8.scale": (torch.float32, (out_f, 1))}


def stored_sizes(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]], wide: int) -> tuple[int, int, int]:
    """(parameters, bytes the streamer holds, bytes the dequantized weights take while the module computes)
    of a module from its stored tensors: a floating tensor is widened to `wide` bytes a value as read."""
    numel = held = dequant = 0
    for key, dt, shape in tensors:
        n = math.prod(shape)
        held += n * (max(wide, dt.itemsize) if dt.is_floating_point else dt.itemsize)
        if SEP not in key:
            numel += n
        elif key.endswith(SEP + "nf4.data"):
            numel, dequant = numel + 2 * n, dequant + 2 * n * wide
        elif key.endswith(SEP + "int8.q"):
            numel, dequant = numel + n, dequant + n * wide
    return numel, held, dequant
