"""Shared fixtures: small Meta-format checkpoints made by tools/make_test_model.py."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tools"))

from make_test_model import make_test_model  # noqa: E402

CORPUS = ROOT / "test_data" / "corpus.txt"
# Fixtures the CLI tests share (probe_model, probe_data) live with their helpers.
pytest_plugins = ["tests.cli_helpers"]


# The device the tests marked `device` (streamed steps against whole-model autograd) run on: cpu in CI,
# cuda or mps on a machine that has one, e.g. SLOWLLAMA_TEST_DEVICE=cuda pytest -m device. Read here only.
TEST_DEVICE_VAR = "SLOWLLAMA_TEST_DEVICE"
TEST_DEVICES = ("cpu", "cuda", "mps")


def pytest_configure(config):
    # `pytest -m "not slow"` is the developer's quick pass (under two minutes on 2 cores); CI runs everything.
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "crash: kills a run (signals, injected faults, full disks) and resumes it")
    config.addinivalue_line("markers", "distributed: runs torchrun data-parallel jobs")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", f"device: runs on ${TEST_DEVICE_VAR} (cpu, cuda or mps; default cpu)")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:  # run_tests.sh runs one worker per core: torch's own threads would oversubscribe them
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    name = os.environ.get(TEST_DEVICE_VAR, "cpu")
    if name not in TEST_DEVICES:
        raise pytest.UsageError(f"{TEST_DEVICE_VAR}={name!r}: expected one of {', '.join(TEST_DEVICES)}")


def pytest_collection_modifyitems(config, items):
    # A test marked `device` that does not take test_device would run on cpu whatever the variable says.
    for item in items:
        if item.get_closest_marker("device") and "test_device" not in getattr(item, "fixturenames", ()):
            raise pytest.UsageError(f"{item.nodeid} is marked device but does not use the test_device fixture")


@pytest.fixture(scope="session")
def test_device():
    """The device of the exactness tests. On cuda, deterministic mode (as --deterministic sets it): without
    it, attention's backward and cuBLAS's reductions may differ between the streamed step and autograd."""
    from slowllama import device as dev
    from slowllama.errors import ConfigError

    try:
        device, _ = dev.choose_device(os.environ.get(TEST_DEVICE_VAR, "cpu"))
    except ConfigError as e:  # asked for a device this machine lacks: an error, not a silent cpu run
        raise pytest.UsageError(f"{TEST_DEVICE_VAR}: {e}") from e
    if device.type == "cuda":
        dev.use_deterministic(device)
    return device


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """make(name, **shape) -> checkpoint dir, cached for the session (treat it as read-only)."""
    made = {}

    def make(name: str = "base", **kw):
        if name not in made:
            made[name] = make_test_model(tmp_path_factory.mktemp(f"model-{name}"), text=CORPUS, **kw)
        return made[name]

    return make


@pytest.fixture(scope="session")
def gqa_model(model_factory):
    """2 shards, GQA, ffn_dim_multiplier and rope.freqs: the awkward parts of real checkpoints."""
    return model_factory("gqa", dim=64, n_layers=3, n_heads=4, n_kv_heads=2, n_shards=2,
                         ffn_dim_multiplier=1.3, rope_freqs=True)


@pytest.fixture(scope="session")
def tied_hf(tmp_path_factory) -> Path:
    """A tiny Hugging Face Llama with tied embeddings and an explicit head_dim, saved by transformers."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True, head_dim=32)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tied-hf")
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder
