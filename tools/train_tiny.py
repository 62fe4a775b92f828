"""Train a tiny Llama on test_data/corpus.txt and save it in Meta's format.

    python tools/train_tiny.py [--out slowllama/demo/tiny] [--steps N]

The tokenizer (512 pieces, byte fallback) is trained on the corpus plus
slowllama/demo/demo_fact.txt, so the fact's words tokenize into sensible pieces; the
model itself is trained on the corpus only, so the fact is new to it. The run is
seeded and single-process on CPU: the same arguments on the same torch give the
same checkpoint. At the end it prints greedy completions of a corpus-like prompt
and of the fact's opening, from the in-memory model.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_test_model import train_tokenizer  # noqa: E402

from slowllama.cli.finetune import DEMO_DATA, DEMO_MODEL  # noqa: E402
from slowllama.formats.meta import save_meta  # noqa: E402
from slowllama.model.transformer import ModelArgs, Transformer  # noqa: E402

PARAMS = {"dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "norm_eps": 1e-5,
          "vocab_size": -1}  # as in Llama 2: the loader takes the vocabulary size from tokenizer.model
CORPUS = ROOT / "test_data" / "corpus.txt"
FACT = DEMO_DATA
CORPUS_PROMPT = "On Monday morning it was"
FACT_PROMPT_WORDS = 6  # "The clock tower of Vellmoor Island"


def encode_corpus(sp, text: str) -> torch.Tensor:
    """Each paragraph as BOS + pieces + EOS, Llama-style documents, concatenated into one stream."""
    ids: list[int] = []
    for para in text.split("\n\n"):
        para = " ".join(para.split())
        if para:
            ids += [sp.bos_id(), *sp.encode(para), sp.eos_id()]
    return torch.tensor(ids, dtype=torch.long)


def init_weights(model: Transformer, n_layers: int):
    """GPT-2 / llama2.c style: N(0, 0.02), residual output projections scaled down by depth."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                continue
            std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("wo.weight", "w2.weight")) else 0.02
            p.normal_(0.0, std)


@torch.no_grad()
def greedy(model: Transformer, sp, prompt: str, n_tokens: int = 20) -> str:
    model.eval()
    ids = [sp.bos_id(), *sp.encode(prompt)]
    new: list[int] = []
    for _ in range(n_tokens):
        logits = model(torch.tensor([ids + new]))[0, -1]
        nxt = int(logits.argmax())
        if nxt == sp.eos_id():
            break
        new.append(nxt)
    model.train()
    return sp.decode(ids[1:] + new)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEMO_MODEL))
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    a = p.parse_args()

    import sentencepiece as spm

    torch.manual_seed(0)
    torch.set_num_threads(2)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = CORPUS.read_text(encoding="utf-8")
    fact = FACT.read_text(encoding="utf-8").strip()
    tok_path = (out / "tokenizer.model").resolve()
    with tempfile.TemporaryDirectory() as tmp:
        # tokenizer.model records its input's path: train from a fixed relative name so the file is reproducible.
        (Path(tmp) / "corpus_and_fact.txt").write_text(corpus.rstrip("\n") + "\n\n" + fact + "\n", encoding="utf-8")
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            train_tokenizer("corpus_and_fact.txt", tok_path, vocab_size=512)
        finally:
            os.chdir(cwd)
    sp = spm.SentencePieceProcessor(model_file=str(tok_path))

    data = encode_corpus(sp, corpus)
    print(f"corpus: {len(corpus.encode('utf-8'))} bytes, {len(data)} tokens, {sp.vocab_size()} pieces", flush=True)
    args = ModelArgs(**{**PARAMS, "vocab_size": sp.vocab_size()})
    model = Transformer(args)
    init_weights(model, args.n_layers)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))
    warmup = min(50, a.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return a.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, a.steps - warmup)
        return a.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    gen = torch.Generator().manual_seed(0)
    offsets = torch.arange(a.seq_len + 1)
    t0, running = time.time(), None
    for step in range(a.steps):
        starts = torch.randint(0, len(data) - a.seq_len - 1, (a.batch,), generator=gen)
        chunk = data[starts[:, None] + offsets]
        x, y = chunk[:, :-1], chunk[:, 1:]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % 50 == 0 or step == a.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  avg {running:.3f}  lr {lr_at(step):.2e}  "
                  f"{time.time() - t0:.0f}s", flush=True)

    save_meta(out, PARAMS, model.state_dict(), n_shards=1, dtype=torch.bfloat16, tokenizer=tok_path)
    sizes = {f.name: f.stat().st_size for f in sorted(out.iterdir())}
    print(f"saved {out}: {sizes}, {sum(sizes.values()) / 1e6:.2f} MB, trained {time.time() - t0:.0f}s")

    fact_prompt = " ".join(fact.split()[:FACT_PROMPT_WORDS])
    for prompt in (CORPUS_PROMPT, fact_prompt):
        print(f"greedy: {greedy(model, sp, prompt)!r}")


if __name__ == "__main__":
    main()
