"""Device choice, dtype rules and RNG state, the same code for cpu, cuda and mps."""
from __future__ import annotations

import contextlib
import logging
import os
import platform

import numpy as np
import psutil
import torch

from .errors import ConfigError
from .fsutil import ByteCounter

log = logging.getLogger(__name__)

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


def _mps_built() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_built()


def choose_device(name: str = "auto", available=_available, mps_built=_mps_built) -> tuple[torch.device, str]:
    """(device, why): auto prefers mps, then cuda, then cpu; a named device must exist."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ConfigError(f"--device {name!r}: expected one of {', '.join(DEVICES)}")
    if name != "auto":
        if not available(name.split(":")[0]):
            raise ConfigError(f"--device {name}: not available on this machine")
        return torch.device(name), f"--device {name}"
    kind = next(k for k in ("mps", "cuda", "cpu") if available(k))
    why = {"mps": "auto: mps is available", "cuda": "auto: cuda is available (no mps)",
           "cpu": "auto: neither mps nor cuda is available"}[kind]
    if kind != "mps" and mps_built():
        # torch 2.9 and later need macOS 14 for mps: an older Mac falls back without saying so.
        why += "; mps is built into torch but unavailable (torch 2.9+ needs macOS 14 or newer)"
    return torch.device(kind), why


def pick_device(name: str = "auto", available=_available, mps_built=_mps_built) -> torch.device:
    """choose_device's device, logged with the reason (a warning when mps is built but unusable)."""
    device, why = choose_device(name, available, mps_built)
    (log.warning if "unavailable" in why else log.info)("device %s (%s)", device, why)
    return device


def versions(device: torch.device) -> dict:
    """torch, Python, OS and driver versions: what a bug report about this device needs."""
    out = {"torch": torch.__version__, "python": platform.python_version(),
           "os": f"{platform.system()} {platform.release()}", "machine": platform.machine()}
    if platform.system() == "Darwin":
        out["macos"] = platform.mac_ver()[0]
    if device.type == "cuda":
        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(device)
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        with contextlib.suppress(Exception):  # the driver version needs NVML, which may be missing
            out["driver"] = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
    return out


MPS_MIN_TORCH = (2, 5)  # before 2.5, an mps RNG state restore did not replay dropout masks


def check_torch_for_device(device: torch.device, version: str = torch.__version__):
    """Refuse a torch whose kernels on this device break the recompute's exactness."""
    have = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    if device.type == "mps" and have < MPS_MIN_TORCH:
        raise ConfigError(f"--device mps needs torch {'.'.join(map(str, MPS_MIN_TORCH))} or newer (found {version}): "
                          f"older versions do not replay dropout masks after an RNG restore")


def check_compute_dtype(device: torch.device, dtype: torch.dtype, mps_bf16=None):
    """Refuse combinations that are missing kernels or would silently lose precision."""
    if dtype == torch.float32:
        return
    if dtype == torch.float16:
        # float16's 5-bit exponent flushes gradients below 6e-8 to zero, and slowllama does no loss scaling.
        raise ConfigError(f"--compute-dtype float16 on {device.type} loses small gradients without loss scaling, "
                          f"which slowllama does not do: use bfloat16 or float32")
    if device.type == "mps" and dtype == torch.bfloat16:
        ok = mps_bf16() if mps_bf16 else _mps_supports_bf16()
        if not ok:
            raise ConfigError("--compute-dtype bfloat16 needs macOS 14 or newer on mps: use float32")


def check_dtypes(device: torch.device, *, compute: torch.dtype, store: torch.dtype, act: torch.dtype,
                 optim_state: torch.dtype = torch.float32, probe=None):
    """Every dtype a step uses, tried on the device before any work: a missing kernel fails here, not mid-step.

    probe(device, dtype) raises when dtype cannot be cast to and from float32 on the device.
    """
    check_compute_dtype(device, compute)
    probe = probe or _probe_dtype
    for option, dtype in (("--compute-dtype", compute), ("--store-dtype", store), ("--act-dtype", act),
                          ("--optim-state-dtype", optim_state)):
        try:
            probe(device, dtype)
        except (RuntimeError, TypeError) as e:
            raise ConfigError(f"{option} {str(dtype).removeprefix('torch.')} does not work on {device}: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def _probe_dtype(device: torch.device, dtype: torch.dtype):
    # The operations a step does with each dtype: casts both ways, and for compute a matmul.
    x = torch.ones(4, 4, device=device)
    y = x.to(dtype)
    (y @ y).to(torch.float32).sum().item()
    y.to("cpu").to(device)


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


def use_deterministic(device: torch.device):
    """Bit-reproducible kernels for --deterministic: deterministic algorithms, a fixed cuBLAS workspace, and
    the math attention kernel in every forward (no-grad, recompute and backward alike)."""
    # cuBLAS reads the variable when its handle is created: set it before the first matmul on the device.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        # Flash and memory-efficient attention have nondeterministic backward kernels, and the kernel
        # chosen may differ between a no-grad forward and one with grad; math is one kernel for both.
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
            torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.enable_math_sdp(True)


def unified_memory(device: torch.device) -> bool:
    """Whether the device's copy of a module lives in the same RAM as the host's (Apple Silicon)."""
    return device.type == "mps"


class _MpsSync:
    """A fence for torch versions without mps events: waits for all queued mps work."""

    def record(self, stream=None):
        pass

    def synchronize(self):
        torch.mps.synchronize()


def copy_fence(device: torch.device, stream=None):
    """An event recorded after the non_blocking copies just queued (None on cpu, where copies are done at once).

    Its synchronize() returns when they have finished: only then may their source buffer be refilled.
    """
    if device.type == "cuda":
        event = torch.cuda.Event()
        event.record(stream)
    elif device.type == "mps":
        event = torch.mps.event.Event() if hasattr(torch.mps, "event") else _MpsSync()
        event.record()
    else:
        return None
    return event


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
    """t on the cpu in dtype (the cast happens first, so a narrowing one moves fewer bytes).

    The copy is blocking, into pageable memory, on purpose. What comes back (an updated module on its
    way to the disk, a cached activation kept all step, a gradient handed down) lives long in host RAM:
    pinning it would put up to the whole RAM budget in page-locked memory, which the pinned allocator
    rounds up and never returns. A bounded pinned staging buffer would need a second copy from it into
    pageable memory, which is what CUDA does for a pageable copy anyway, and most callers check the values
    (all_finite) or write them at once, so a non_blocking copy would have little to overlap with. The
    benchmark's transfer floor counts these bytes at the measured pageable rate (benchmarks/_phases.py).
    """
    if dtype is not None:
        t = t.to(dtype)
    if t.device.type != "cpu":
        TRANSFERS.add(to_host=t.nbytes)
    return t.to("cpu")


# Device memory that generation leaves alone: the allocator's slack, kernels' workspace, other users.
HEADROOM = 0.1


def memory_budget(device: torch.device) -> int:
    """Bytes generation may fill on device: free CUDA memory, MPS's recommended working set less
    what is allocated, or available RAM on cpu; less HEADROOM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    elif device.type == "mps":
        free = torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    else:
        free = psutil.virtual_memory().available
    return max(0, int(free * (1 - HEADROOM)))
