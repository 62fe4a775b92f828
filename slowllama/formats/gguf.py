"""llama.cpp's GGUF: a Hugging Face Llama folder written as one .gguf file, streamed one module at a time.

Tensor infos (names, shapes, types, byte sizes) are known from ModelArgs alone, so the header is written
first and each module's data after it, read, converted and dropped in turn: peak memory is one module.
wq/wk are written in Meta's interleaved RoPE order, which is the order llama.cpp's converter produces
from Hugging Face's rotate-half one (HFCheckpoint.read_module already un-permutes them).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..fsutil import fsync_dir, tmp_path, write_error
from ..model.transformer import module_names
from .hf import HFCheckpoint, expected_shapes
from .tokenizer import HFTokenizer

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
MAGIC = b"GGUF"
# Meta parameter name within a module -> llama.cpp's name ("{}" is the layer index).
LLAMA_NAMES = {
    ("tok_embeddings", "weight"): "token_embd.weight",
    ("norm", "weight"): "output_norm.weight",
    ("output", "weight"): "output.weight",
    ("layer", "attention.wq.weight"): "blk.{}.attn_q.weight",
    ("layer", "attention.wk.weight"): "blk.{}.attn_k.weight",
    ("layer", "attention.wv.weight"): "blk.{}.attn_v.weight",
    ("layer", "attention.wo.weight"): "blk.{}.attn_output.weight",
    ("layer", "feed_forward.w1.weight"): "blk.{}.ffn_gate.weight",
    ("layer", "feed_forward.w3.weight"): "blk.{}.ffn_up.weight",
    ("layer", "feed_forward.w2.weight"): "blk.{}.ffn_down.weight",
    ("layer", "attention_norm.weight"): "blk.{}.attn_norm.weight",
    ("layer", "ffn_norm.weight"): "blk.{}.ffn_norm.weight",
}


def gguf_name(module: str, param: str) -> str:
    if module.startswith("layers."):
        return LLAMA_NAMES[("layer", param)].format(module.split(".")[1])
    return LLAMA_NAMES[(module, param)]


def _qtype(gguf_type: str, shape: tuple[int, ...]):
    """The ggml type of one tensor: norms (1-D) stay f32 as llama.cpp keeps them; q8_0 needs rows of 32."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return T.F32
    if gguf_type == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] != 0:
        return T.F16  # llama.cpp's fallback for rows q8_0 cannot block
    return {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[gguf_type]


def encode_tensor(t: torch.Tensor, qtype) -> np.ndarray:
    """One tensor's bytes in ggml type qtype (numpy, C order: ggml's ne[0] is the last axis)."""
    import gguf

    x = t.detach().to(torch.float32).contiguous().numpy()
    T = gguf.GGMLQuantizationType
    if qtype == T.F32:
        return x
    if qtype == T.F16:
        return x.astype(np.float16)
    return gguf.quants.quantize(x, qtype)


def _nbytes(shape, qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * size


# ---- tokenizer ---------------------------------------------------------------

def _add_hf_bpe(w, folder: Path, vocab_size: int):
    """tokenizer.json's BPE vocabulary as llama.cpp's "gpt2" tokenizer: tokens by id, types, merges, bos/eos."""
    path = folder / "tokenizer.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    model = raw.get("model") or {}
    if model.get("type") != "BPE":
        raise ConfigError(f"{path}: model.type {model.get('type')!r} is not supported for GGUF (BPE)")
    vocab = dict(model["vocab"])
    kinds = {}
    for a in raw.get("added_tokens") or []:
        vocab[a["content"]] = a["id"]
        kinds[a["id"]] = 3 if a.get("special") else 4  # CONTROL, USER_DEFINED
    n = max(max(vocab.values()) + 1, vocab_size)  # rows past the tokenizer are padding, as llama.cpp pads
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n  # UNUSED until named
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = kinds.get(i, 1)  # NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    tok = HFTokenizer(folder)  # bos/eos as slowllama and transformers read them (tokenizer_config, generation_config)
    if tok.bos_id is not None:
        w.add_bos_token_id(tok.bos_id)
    if tok.eos_id is not None:
        w.add_eos_token_id(tok.eos_id)
    # transformers' fast tokenizer adds BOS only when tokenizer.json's post-processor does; say the same to llama.cpp
    w.add_add_bos_token(_post_processor_adds_first(raw.get("post_processor")))


def _post_processor_adds_first(pp) -> bool:
    """Whether a TemplateProcessing post-processor (alone or in a Sequence) puts a special token first."""
    if not isinstance(pp, dict):
        return False
    if pp.get("type") == "Sequence":
        return any(_post_processor_adds_first(p) for p in pp.get("processors") or [])
    single = pp.get("single") or []
    return pp.get("type") == "TemplateProcessing" and bool(single) and "SpecialToken" in single[0]


def _add_sentencepiece(w, path: Path):
    """tokenizer.model as llama.cpp's "llama" tokenizer: pieces, scores and types by id."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                     else 5 if sp.is_unused(i) else 1)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    if sp.bos_id() >= 0:
        w.add_bos_token_id(sp.bos_id())
    if sp.eos_id() >= 0:
        w.add_eos_token_id(sp.eos_id())


# ---- the file ----------------------------------------------------------------

def check_request(ckpt: HFCheckpoint, out: Path, gguf_type: str):
    """Every refusal before any work: the type, the model, the output path. ckpt is the folder to convert,
    or the one a run will export (its config.json and tokenizer go into the export unchanged)."""
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"--type {gguf_type!r} is not supported (supported: {', '.join(GGUF_TYPES)})")
    raw = json.loads(ckpt.config_path.read_text(encoding="utf-8"))
    if raw.get("model_type") != "llama":
        raise ConfigError(f"{ckpt.config_path}: model_type {raw.get('model_type')!r} is not supported for GGUF (llama)")
    if ckpt.args.rope_scaling:
        raise ConfigError(f"{ckpt.config_path}: rope scaling is not supported for GGUF yet")
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"{out}: is a folder; give the path of the .gguf file to write")
    if out.exists():
        with open(out, "rb") as f:
            if f.read(4) != MAGIC:
                raise ConfigError(f"{out}: exists and is not a GGUF file; refusing to overwrite it")
    if not (ckpt.dir / "tokenizer.json").is_file() and not (ckpt.dir / "tokenizer.model").is_file():
        raise ConfigError(f"{ckpt.dir}: no tokenizer.json or tokenizer.model to write into the GGUF")


def export_gguf(folder: str | Path, out: str | Path, gguf_type: str = "f16") -> Path:
    """Write the Hugging Face Llama folder as a GGUF file at out, atomically; returns out."""
    import gguf

    folder, out = Path(folder), Path(out)
    ckpt = HFCheckpoint(folder)
    check_request(ckpt, out, gguf_type)
    args = ckpt.args
    plan = []  # (module, param, gguf name, shape, qtype): the header's tensor infos, in data order
    for module in module_names(args):
        for param, shape in expected_shapes(args, module).items():
            plan.append((module, param, gguf_name(module, param), tuple(shape), _qtype(gguf_type, tuple(shape))))
    tmp = tmp_path(out)
    w = gguf.GGUFWriter(tmp, "llama")
    try:
        w.add_context_length(args.max_seq_len)
        w.add_embedding_length(args.dim)
        w.add_block_count(args.n_layers)
        w.add_feed_forward_length(args.ffn_hidden_dim)
        w.add_head_count(args.n_heads)
        w.add_head_count_kv(args.n_kv_heads)
        w.add_layer_norm_rms_eps(args.norm_eps)
        w.add_rope_freq_base(float(args.rope_theta))
        w.add_rope_dimension_count(args.head_dim)
        w.add_key_length(args.head_dim)
        w.add_value_length(args.head_dim)
        w.add_vocab_size(args.vocab_size)
        w.add_file_type({"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}[gguf_type])  # llama_ftype
        if (folder / "tokenizer.json").is_file():
            _add_hf_bpe(w, folder, args.vocab_size)
        else:
            _add_sentencepiece(w, folder / "tokenizer.model")
        for _, _, name, shape, qtype in plan:
            w.add_tensor_info(name, shape, np.float32, _nbytes(shape, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for module in dict.fromkeys(p[0] for p in plan):
            tensors = ckpt.read_module(module)  # one module in memory at a time
            for m, param, _, _, qtype in plan:
                if m == module:
                    w.write_tensor_data(encode_tensor(tensors.pop(param), qtype))
            del tensors
        w.fout[0].flush()
        os.fsync(w.fout[0].fileno())
        w.close()
        os.replace(tmp, out)
    except BaseException as e:
        w.close()
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(out, e) from e
        raise
    fsync_dir(out.parent)
    return out
