"""Peak RSS and speed of preparing a Hugging Face folder into a block store and exporting it back.

    python benchmarks/bench_hf_io.py --layers 32 --dim 512 --vocab 32000

Each phase runs in a fresh process whose RSS is sampled every 2 ms; the figures are
printed against the largest tensor and one layer, the units that bounded memory is measured in.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASE = r"""
import json, sys, threading, time
from pathlib import Path
import psutil
sys.path.insert(0, {root!r})
from slowllama.formats import open_checkpoint
from slowllama.engine.store import BlockStore, export_store, prepare
proc = psutil.Process()
base = proc.memory_info().rss  # after imports: what the phase itself adds is measured
peak, done = [base], threading.Event()
def sample():  # ru_maxrss would count the imports' own transient peak
    while not done.wait(0.002):
        peak[0] = max(peak[0], proc.memory_info().rss)
threading.Thread(target=sample, daemon=True).start()
folder, work, phase = Path({folder!r}), Path({work!r}), {phase!r}
t0 = time.perf_counter()
if phase == "prepare":
    prepare(open_checkpoint(folder), work / "store")
else:
    export_store(BlockStore(work / "store"), folder, work / "out")
dt = time.perf_counter() - t0
done.set()
print(json.dumps({{"seconds": dt, "peak_over_start": peak[0] - base}}))
"""


def make_model(folder: Path, layers: int, dim: int, vocab: int):
    import torch
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=dim, intermediate_size=dim * 11 // 4, num_hidden_layers=layers,
                                   num_attention_heads=8, num_key_value_heads=4, vocab_size=vocab,
                                   max_position_embeddings=512)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.save_pretrained(folder, max_shard_size="200MB")
    return {n: p.numel() * p.element_size() for n, p in model.named_parameters()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, work = Path(tmp) / "model", Path(tmp) / "work"
        sizes = make_model(folder, a.layers, a.dim, a.vocab)
        source = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        largest = max(sizes.values())
        layer = sum(v for k, v in sizes.items() if ".layers.0." in k)
        out = {"source_bytes": source, "largest_tensor_bytes": largest, "layer_bytes_bf16": layer}
        for phase in ("prepare", "export"):
            code = PHASE.format(root=str(ROOT), folder=str(folder), work=str(work), phase=phase)
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            res = json.loads(r.stdout.strip().splitlines()[-1])
            extra = res["peak_over_start"]
            out[phase] = {"seconds": round(res["seconds"], 3), "GB_per_s": round(source / res["seconds"] / 1e9, 3),
                          "peak_rss_over_start_bytes": extra, "x_largest_tensor": round(extra / largest, 2),
                          "x_fp32_layer": round(extra / (2 * layer), 2)}
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
