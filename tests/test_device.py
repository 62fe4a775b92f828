"""Device choice, dtype rules and RNG state: the logic shared by cpu, cuda and mps."""
import pytest
import torch

from slowllama import device as dev
from slowllama.model import ConfigError


def _avail(*kinds):
    return lambda k: k in kinds


@pytest.mark.parametrize("kinds,want", [(("cpu",), "cpu"), (("cpu", "cuda"), "cuda"), (("cpu", "cuda", "mps"), "mps"),
                                        (("cpu", "mps"), "mps")])
def test_auto_prefers_mps_then_cuda_then_cpu(kinds, want):
    assert dev.pick_device("auto", available=_avail(*kinds)).type == want


def test_named_devices_must_exist_and_be_known():
    assert dev.pick_device("cpu", available=_avail("cpu")).type == "cpu"
    assert dev.pick_device("cuda:1", available=_avail("cpu", "cuda")) == torch.device("cuda:1")
    with pytest.raises(ConfigError, match="--device mps: not available"):
        dev.pick_device("mps", available=_avail("cpu"))
    with pytest.raises(ConfigError, match="expected one of"):
        dev.pick_device("tpu", available=_avail("cpu"))


def test_compute_dtype_rules():
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    for d in (cpu, cuda, mps):
        dev.check_compute_dtype(d, torch.float32)
    dev.check_compute_dtype(cuda, torch.bfloat16)
    dev.check_compute_dtype(cuda, torch.float16)
    dev.check_compute_dtype(mps, torch.float16)
    dev.check_compute_dtype(mps, torch.bfloat16, mps_bf16=lambda: True)
    with pytest.raises(ConfigError, match="macOS 14"):
        dev.check_compute_dtype(mps, torch.bfloat16, mps_bf16=lambda: False)
    with pytest.raises(ConfigError, match="float16 is not supported on cpu"):
        dev.check_compute_dtype(cpu, torch.float16)


def test_rng_state_round_trip_reproduces_dropout():
    cpu = torch.device("cpu")
    dev.seed_device(cpu, dev.derive_seed(1, 2, 3))
    state = dev.get_rng_state(cpu)
    a = torch.nn.functional.dropout(torch.ones(1000), 0.5)
    dev.set_rng_state(cpu, state)
    b = torch.nn.functional.dropout(torch.ones(1000), 0.5)
    assert torch.equal(a, b)


def test_derived_seeds_are_stable_and_distinct():
    assert dev.derive_seed(1, 2, 3) == dev.derive_seed(1, 2, 3)
    seeds = {dev.derive_seed(s, step, mb) for s in range(3) for step in range(20) for mb in range(4)}
    assert len(seeds) == 3 * 20 * 4
    assert all(0 <= s < 2 ** 63 for s in seeds)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite(dtype):
    t = torch.randn(1000).to(dtype)
    assert dev.all_finite(t)
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = t.clone()
        u[17] = bad
        assert not dev.all_finite(u)
    big = torch.full((4,), torch.finfo(dtype).max, dtype=dtype)  # its sum overflows, yet every value is finite
    assert dev.all_finite(big)
    assert dev.all_finite(torch.tensor([], dtype=dtype))


def test_host_device_copies_are_counted_only_when_bytes_move():
    from slowllama.device import TRANSFERS, to_device, to_host

    t = torch.ones(256)  # 1 KiB
    before = TRANSFERS.snapshot()
    assert to_device(t, torch.device("cpu")) is t
    assert to_host(t) is t
    assert to_host(t, torch.bfloat16).dtype == torch.bfloat16
    assert TRANSFERS.snapshot() == before
    # the meta device stands in for an accelerator: the copy is counted, in bytes
    assert to_device(t, torch.device("meta")).device.type == "meta"
    assert TRANSFERS.snapshot() == (before[0] + 1024, before[1])
