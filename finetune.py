"""Fine-tune a Meta-format Llama checkpoint that does not fit in memory, streaming it from SSD.

    python finetune.py                        # demo: the tiny model in test_data/ learns a new fact
    python finetune.py path/to/llama-2-7b --data notes.txt
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from slowllama.model import ConfigError
from slowllama.run import finetune, parse_size, verify_store
from slowllama.trainer import NonFiniteError

ROOT = Path(__file__).resolve().parent
DEMO_MODEL = ROOT / "test_data" / "tiny"
DEMO_DATA = ROOT / "test_data" / "demo_fact.txt"
# Chosen so that the tiny model learns the demo fact in about a minute on 2 cores.
DEMO = dict(iters=40, batch_size=4, seq_len=48, optimizer="adamw", lr=3e-3, eval_every=20, gen_tokens=40)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", nargs="?", help="Meta checkpoint folder (params.json, consolidated.NN.pth); "
                   "none runs the demo on test_data/tiny")
    p.add_argument("--data", help="UTF-8 text to train on, or .jsonl records of {\"text\"} or {\"prompt\", \"completion\"}")
    p.add_argument("--val-data", help="text or .jsonl whose loss is reported every --eval-every iterations")
    p.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction of --data for the validation loss")
    p.add_argument("--out", help="output folder for the tuned model (default: MODEL_DIR-tuned)")
    p.add_argument("--work-dir", help="where the block store and cached activations live (default: OUT.work)")
    p.add_argument("--iters", type=int, default=100, help="training iterations")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per iteration")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences run through each block at once; each block is still loaded once per pass")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step; they pass through each block together, so no gradients are stored")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="optimizer; its state is stored beside each module")
    p.add_argument("--optim-state-dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the stored optimizer moments (bfloat16 halves AdamW's state on disk)")
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=0.0, help="weight decay")
    p.add_argument("--dropout", type=float, default=0.0, help="residual dropout probability in each block")
    p.add_argument("--seed", type=int, default=42, help="seed for batch sampling and dropout")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (auto: mps, then cuda, then cpu)")
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype blocks compute in; updates always go to float32 masters")
    p.add_argument("--store-dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the block store's master weights (bfloat16 rounds updates stochastically)")
    p.add_argument("--act-dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype of the cached activations")
    p.add_argument("--ram-budget", default="0", help="RAM for keeping modules and activations resident, e.g. 8G; 0 keeps only the current and next module; none: no limit")
    p.add_argument("--no-prefetch", action="store_true", help="read each module only when it is needed")
    p.add_argument("--no-verify", action="store_true", help="skip checking each module's checksum as it is read")
    p.add_argument("--eval-every", type=int, default=0, help="print a greedy completion of --prompt every N iterations (0: only before and after)")
    p.add_argument("--prompt", default="", help="prompt for the completions printed during training")
    p.add_argument("--gen-tokens", type=int, default=32, help="tokens per completion")
    p.add_argument("--save-every", type=int, default=0, help="export the tuned model every N iterations (0: only at the end)")
    p.add_argument("--shards", type=int, default=None, help="shard count of the exported model (default: as the original)")
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank instead of all weights (0: full fine-tuning)")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale numerator: adapters add alpha/rank * B @ A")
    p.add_argument("--lora-targets", default="wq,wv", help="comma-separated layers that get adapters: wq, wk, wv, wo, w1, w2, w3")
    p.add_argument("--merge", action="store_true", help="LoRA: also export the model with the adapters merged in (Meta format)")
    p.add_argument("--resume", action="store_true", help="continue the run in --work-dir exactly where it stopped")
    p.add_argument("--verify", action="store_true", help="check every module of the block store in --work-dir against its checksums, then exit")
    p.add_argument("--stop-on-nan", action="store_true", help="stop the run on a NaN or Inf loss instead of skipping the step")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    return p


def main(argv=None) -> int:
    p = parser()
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if a.verify and a.model_dir:
        return verify(a)
    try:
        ram_budget = parse_size(a.ram_budget)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    opts = dict(
        model_dir=a.model_dir, data=a.data, out=a.out, work_dir=a.work_dir, iters=a.iters, batch_size=a.batch_size,
        micro_batch=a.micro_batch, seq_len=a.seq_len, grad_accum=a.grad_accum, lr=a.lr, optimizer=a.optimizer,
        optim_state_dtype=a.optim_state_dtype, momentum=a.momentum, weight_decay=a.weight_decay, dropout=a.dropout,
        seed=a.seed, device=a.device, compute_dtype=a.compute_dtype, store_dtype=a.store_dtype,
        act_dtype=a.act_dtype, ram_budget=ram_budget, prefetch=not a.no_prefetch,
        verify=not a.no_verify, eval_every=a.eval_every, prompt=a.prompt, gen_tokens=a.gen_tokens,
        save_every=a.save_every, shards=a.shards, resume=a.resume, stop_on_nonfinite=a.stop_on_nan,
        lora_rank=a.lora_rank, lora_alpha=a.lora_alpha, lora_targets=a.lora_targets, merge=a.merge,
        val_data=a.val_data, val_fraction=a.val_fraction)
    demo = a.model_dir is None
    if demo:
        # The demo owns its folders, so it may start them afresh every time.
        work = Path(a.work_dir or "demo-out/tiny-work")
        shutil.rmtree(work, ignore_errors=True)
        prompt = DEMO_DATA.read_text(encoding="utf-8").split(",")[0].split(".")[0][:40].rsplit(" ", 1)[0]
        opts.update(DEMO, model_dir=DEMO_MODEL, data=a.data or DEMO_DATA, out=a.out or "demo-out/tiny-tuned",
                    work_dir=work, prompt=a.prompt or prompt)
        print(f"demo: fine-tuning {DEMO_MODEL.relative_to(ROOT)} on {DEMO_DATA.relative_to(ROOT)}")
    elif not a.data and not a.resume:
        p.error("--data is required with a model directory")
    try:
        summary = finetune(**opts)
    except (ConfigError, OSError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3 if isinstance(e, NonFiniteError) else 2
    except KeyboardInterrupt:
        print("interrupted: the store holds the last committed state; resume with --resume", file=sys.stderr)
        return 130
    if demo:
        print(f"\nprompt:  {opts['prompt']!r}\nbefore:  {summary.get('before')!r}\nafter:   {summary.get('after')!r}")
    print(f"tuned model: {summary['out']}")
    return 0


def verify(a) -> int:
    try:
        problems = verify_store(model_dir=a.model_dir, out=a.out, work_dir=a.work_dir)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in problems:
        print(f"problem: {line}", file=sys.stderr)
    print("store verified: no problems" if not problems else f"{len(problems)} problem(s) found")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
