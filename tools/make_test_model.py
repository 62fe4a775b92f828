"""Write a small Meta-format Llama checkpoint with random weights and a sentencepiece tokenizer.

    python tools/make_test_model.py OUT_DIR --text test_data/corpus.txt --dim 64 --n-layers 2
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slowllama.formats.meta import save_meta  # noqa: E402
from slowllama.model.transformer import ModelArgs, Transformer  # noqa: E402


def train_tokenizer(text_path: str | Path, out_path: str | Path, vocab_size: int):
    """A BPE tokenizer with Llama's special ids (unk 0, bos 1, eos 2, no pad) and byte fallback."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=str(text_path), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, split_digits=True, minloglevel=2, max_sentence_length=16384,
        hard_vocab_limit=False,
    )
    Path(out_path).write_bytes(buf.getvalue())


def random_state_dict(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))  # not all ones, so norm updates are visible
            else:
                p.normal_(0.0, 0.02 if "tok_embeddings" not in name else 1.0)
    return {k: v.detach() for k, v in model.state_dict().items()}


def make_test_model(out_dir: str | Path, *, text: str | Path, dim: int = 64, n_layers: int = 2, n_heads: int = 4,
                    n_kv_heads: int | None = None, vocab_size: int = 320, multiple_of: int = 32,
                    ffn_dim_multiplier: float | None = None, rope_theta: float | None = None,
                    n_shards: int = 1, dtype: torch.dtype = torch.float32, seed: int = 0,
                    explicit_vocab: bool = False, rope_freqs: bool = False) -> Path:
    """Create OUT_DIR with params.json, consolidated.NN.pth and tokenizer.model; returns OUT_DIR."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(text, out / "tokenizer.model", vocab_size)
    import sentencepiece as spm

    n_pieces = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).vocab_size()
    params = {"dim": dim, "n_layers": n_layers, "n_heads": n_heads, "multiple_of": multiple_of,
              "norm_eps": 1e-5, "vocab_size": n_pieces if explicit_vocab else -1}
    if n_kv_heads is not None:
        params["n_kv_heads"] = n_kv_heads
    if ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = ffn_dim_multiplier
    if rope_theta is not None:
        params["rope_theta"] = rope_theta
    args = ModelArgs(**{**params, "vocab_size": n_pieces})
    sd = random_state_dict(args, seed)
    if rope_freqs:  # Meta's Llama 2 files carry this unused tensor; keep the format honest
        sd["rope.freqs"] = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
    save_meta(out, params, sd, n_shards=n_shards, dtype=dtype)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--text", required=True, help="UTF-8 text to train the tokenizer on")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-kv-heads", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=320)
    p.add_argument("--multiple-of", type=int, default=32)
    p.add_argument("--ffn-dim-multiplier", type=float, default=None)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    make_test_model(a.out_dir, text=a.text, dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads,
                    n_kv_heads=a.n_kv_heads, vocab_size=a.vocab_size, multiple_of=a.multiple_of,
                    ffn_dim_multiplier=a.ffn_dim_multiplier, n_shards=a.shards,
                    dtype=getattr(torch, a.dtype), seed=a.seed)
    print(json.dumps({"out": a.out_dir}))


if __name__ == "__main__":
    main()
