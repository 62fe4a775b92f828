"""Device choice, dtype rules and RNG state, the same code for cpu, cuda and mps."""
from __future__ import annotations

import numpy as np
import torch

from .fsutil import ByteCounter
from .model import ConfigError

# Bytes copied between host and accelerator; nothing moves on cpu.
TRANSFERS = ByteCounter("to_device", "to_host")

DEVICES = ("auto", "cpu", "cuda", "mps")
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _available(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    return kind == "cpu"


def pick_device(name: str = "auto", available=_available) -> torch.device:
    """auto prefers mps, then cuda, then cpu; a named device must exist."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ConfigError(f"--device {name!r}: expected one of {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device(next(k for k in ("mps", "cuda", "cpu") if available(k)))
    if not available(name.split(":")[0]):
        raise ConfigError(f"--device {name}: not available on this machine")
    return torch.device(name)


def check_compute_dtype(device: torch.device, dtype: torch.dtype, mps_bf16=None):
    """Refuse combinations that are missing kernels or would silently lose precision."""
    if dtype == torch.float32:
        return
    if device.type == "cpu" and dtype == torch.float16:
        raise ConfigError("--compute-dtype float16 is not supported on cpu: use float32 or bfloat16")
    if device.type == "mps" and dtype == torch.bfloat16:
        ok = mps_bf16() if mps_bf16 else _mps_supports_bf16()
        if not ok:
            raise ConfigError("--compute-dtype bfloat16 needs macOS 14 or newer on mps: use float32 or float16")


def _mps_supports_bf16() -> bool:
    try:
        torch.ones(1, device="mps", dtype=torch.bfloat16) + 1
        return True
    except (RuntimeError, TypeError):
        return False


# ---- RNG -------------------------------------------------------------------
# Dropout on device D draws from D's default generator. The trainer seeds it per
# (run seed, step, micro-batch) and saves its state before each module, so that the
# recompute in the backward pass, or after a resume, draws the very same masks.

def derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_device(device: torch.device, seed: int):
    torch.manual_seed(seed)  # seeds cpu and every accelerator's default generator


def get_rng_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    if device.type == "mps":
        return torch.mps.get_rng_state()
    return torch.get_rng_state()


def set_rng_state(device: torch.device, state: torch.Tensor):
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state)
    else:
        torch.set_rng_state(state)


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def all_finite(t: torch.Tensor) -> bool:
    """True when t holds no NaN or Inf.

    One reduction instead of isfinite's full boolean copy: a NaN or Inf anywhere makes
    the sum non-finite; only a sum that overflows needs the exact check.
    """
    if t.numel() == 0 or not t.is_floating_point():
        return True
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


def to_device(t: torch.Tensor, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
    if t.device != device and device.type != "cpu":
        TRANSFERS.add(to_device=t.nbytes)
    return t.to(device, non_blocking=non_blocking)


def to_host(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """t on the cpu in dtype (the cast happens first, so a narrowing one moves fewer bytes)."""
    if dtype is not None:
        t = t.to(dtype)
    if t.device.type != "cpu":
        TRANSFERS.add(to_host=t.nbytes)
    return t.to("cpu")
