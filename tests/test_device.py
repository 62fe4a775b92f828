"""Device choice, dtype rules and RNG state: the logic shared by cpu, cuda and mps."""
import pytest
import torch

from slowllama import device as dev
from slowllama.errors import ConfigError


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
    dev.check_compute_dtype(mps, torch.bfloat16, mps_bf16=lambda: True)
    with pytest.raises(ConfigError, match="macOS 14"):
        dev.check_compute_dtype(mps, torch.bfloat16, mps_bf16=lambda: False)


@pytest.mark.parametrize("kind", ["cpu", "cuda", "mps"])
def test_float16_compute_is_refused_without_loss_scaling(kind):
    # Why: a gradient that bf16 keeps is flushed to zero in float16 (its smallest subnormal is 6e-8).
    assert torch.tensor(1e-8).to(torch.bfloat16).item() != 0 and torch.tensor(1e-8).half().item() == 0
    with pytest.raises(ConfigError, match="--compute-dtype float16 .*loss scaling"):
        dev.check_compute_dtype(torch.device(kind), torch.float16)


def test_every_dtype_is_tried_on_the_device_before_any_work():
    cpu = torch.device("cpu")
    dev.check_dtypes(cpu, compute=torch.bfloat16, store=torch.bfloat16, act=torch.bfloat16)  # real kernels

    def no_bf16(device, dtype):
        if dtype == torch.bfloat16:
            raise RuntimeError("bfloat16 is not supported on this device\nmore detail")

    with pytest.raises(ConfigError, match=r"^--act-dtype bfloat16 does not work on cpu: bfloat16 is not supported "
                                          r"on this device$"):
        dev.check_dtypes(cpu, compute=torch.float32, store=torch.float32, act=torch.bfloat16, probe=no_bf16)
    with pytest.raises(ConfigError, match="^--store-dtype bfloat16"):
        dev.check_dtypes(cpu, compute=torch.float32, store=torch.bfloat16, act=torch.float32, probe=no_bf16)
    dev.check_dtypes(cpu, compute=torch.float32, store=torch.float32, act=torch.float32, probe=no_bf16)


def test_mps_needs_torch_2_5_for_dropout_replay():
    mps = torch.device("mps")
    with pytest.raises(ConfigError, match="--device mps needs torch 2.5 or newer .*2.4.1"):
        dev.check_torch_for_device(mps, "2.4.1")
    dev.check_torch_for_device(mps, "2.5.0")
    dev.check_torch_for_device(mps, "2.13.0+cpu")
    dev.check_torch_for_device(torch.device("cuda"), "2.1.0")


def test_the_choice_is_logged_and_a_silent_mps_fallback_warns(caplog):
    with caplog.at_level("INFO", logger="slowllama.device"):
        assert dev.pick_device("auto", available=_avail("cpu"), mps_built=lambda: True).type == "cpu"
    warn = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warn) == 1 and "mps is built into torch but unavailable" in warn[0].getMessage()
    caplog.clear()
    with caplog.at_level("INFO", logger="slowllama.device"):
        dev.pick_device("auto", available=_avail("cpu", "cuda"), mps_built=lambda: False)
    assert [r.levelname for r in caplog.records] == ["INFO"] and "device cuda" in caplog.records[0].getMessage()
    device, why = dev.choose_device("mps", available=_avail("cpu", "mps"))
    assert device.type == "mps" and why == "--device mps"


def test_versions_name_torch_and_os():
    v = dev.versions(torch.device("cpu"))
    assert v["torch"] == torch.__version__ and v["os"] and v["python"]


def test_deterministic_mode_sets_torch_flags(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    flags = {}
    for name in ("enable_flash_sdp", "enable_mem_efficient_sdp", "enable_cudnn_sdp", "enable_math_sdp"):
        monkeypatch.setattr(torch.backends.cuda, name, lambda on, name=name: flags.__setitem__(name, on))
    before = torch.are_deterministic_algorithms_enabled()
    try:
        dev.use_deterministic(torch.device("cuda"))
        assert torch.are_deterministic_algorithms_enabled()
        import os
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert flags == {"enable_flash_sdp": False, "enable_mem_efficient_sdp": False, "enable_cudnn_sdp": False,
                         "enable_math_sdp": True}
    finally:
        torch.use_deterministic_algorithms(before)


def test_copy_fences_per_device(monkeypatch):
    assert dev.copy_fence(torch.device("cpu")) is None
    recorded = []

    class Event:
        def record(self, stream=None):
            recorded.append(stream)

    monkeypatch.setattr(torch.mps.event, "Event", Event)
    assert isinstance(dev.copy_fence(torch.device("mps")), Event) and recorded == [None]
    monkeypatch.setattr(torch.cuda, "Event", Event)
    dev.copy_fence(torch.device("cuda"), "copy-stream")
    assert recorded == [None, "copy-stream"]


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
