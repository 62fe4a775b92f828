"""llama.cpp's GGUF: a Hugging Face Llama, Mistral, Qwen2 or Qwen3 folder written as one .gguf file, streamed
one module at a time.

Tensor infos (names, shapes, types, byte sizes) are known from ModelArgs alone, so the header is written
first and each module's data after it, read, converted and dropped in turn: peak memory is one module.
Names come from the gguf package's own tables (gguf.TENSOR_NAMES), so they are llama.cpp's.
RoPE layout: llama.cpp runs its "llama" architecture (Llama and Mistral) with interleaved RoPE, so wq/wk stay
in Meta's order (the order its converter permutes Hugging Face's rotate-half rows into; HFCheckpoint.read_module
already un-permutes them), and runs qwen2/qwen3 with rotate-half RoPE, so those get Hugging Face's order back.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from .. import __version__, faults
from ..errors import ConfigError
from ..fsutil import fsync_dir, read_json_object, tmp_path, write_error
from ..model.transformer import ModelArgs, module_names
from ..paths import check_not_under_a_file
from .gguf_vocab import add_vocab, vocab_source
from .hf import HFCheckpoint, _rope_heads, expected_shapes, from_meta
from .ollama import check_modelfile, modelfile_path, write_modelfile

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
MAGIC = b"GGUF"
# config.json's model_type -> the gguf.MODEL_ARCH member llama.cpp loads it as (its converter writes Mistral as llama).
ARCHS = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3"}
ROTATE_HALF_ARCHS = {"QWEN2", "QWEN3"}  # llama.cpp's NEOX RoPE: q/k rows in Hugging Face's order
# The attention biases llama.cpp's graph for each architecture adds (a file with others fails to load there).
ATTENTION_BIASES = {"LLAMA": {"wq", "wk", "wv", "wo"}, "QWEN2": {"wq", "wk", "wv"}, "QWEN3": set()}
# Architectures whose llama.cpp graph reads the rope_freqs tensor (its converter writes it for Llama 3 RoPE).
ROPE_FREQS_ARCHS = {"LLAMA"}
# Meta's name of a weight (and llama.cpp's rope_freqs), less ".weight"/".bias" -> the gguf.MODEL_TENSOR member it is written as.
TENSORS = {
    "tok_embeddings": "TOKEN_EMBD", "norm": "OUTPUT_NORM", "output": "OUTPUT", "rope_freqs": "ROPE_FREQS",
    "attention.wq": "ATTN_Q", "attention.wk": "ATTN_K", "attention.wv": "ATTN_V", "attention.wo": "ATTN_OUT",
    "attention.q_norm": "ATTN_Q_NORM", "attention.k_norm": "ATTN_K_NORM", "attention_norm": "ATTN_NORM",
    "feed_forward.w1": "FFN_GATE", "feed_forward.w3": "FFN_UP", "feed_forward.w2": "FFN_DOWN", "ffn_norm": "FFN_NORM",
}
# The key slowllama writes into every GGUF (its version): what tells its own file, which an export may replace,
# from a user's (a downloaded or llama.cpp-converted GGUF), which it never replaces. llama.cpp ignores it.
WRITER_KEY = "slowllama.version"
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}  # gguf.LlamaFileType


def _tensor_name(meta: str, layer: int | None = None) -> str:
    """'attention.wq', 3 -> 'blk.3.attn_q', from gguf's own table."""
    import gguf

    return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[TENSORS[meta]]].format(bid=layer)


def gguf_name(module: str, param: str) -> str:
    """('layers.3', 'attention.wq.bias') -> 'blk.3.attn_q.bias'; ('norm', 'weight') -> 'output_norm.weight'."""
    if module.startswith("layers."):
        base, _, suffix = param.rpartition(".")
        return f"{_tensor_name(base, int(module.split('.')[1]))}.{suffix}"
    return f"{_tensor_name(module)}.{param}"


def _qtype(gguf_type: str, shape: tuple[int, ...]):
    """The ggml type of one tensor: 1-D ones (norms, biases) stay f32 as llama.cpp keeps them; q8_0 needs rows of 32."""
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
    return int(np.prod(shape)) // block * size


def gguf_layout(arch: str, args: ModelArgs, key: str, t: torch.Tensor) -> torch.Tensor:
    """A tensor in Meta's layout (Meta key `key`) as llama.cpp's architecture arch reads it."""
    heads = _rope_heads(args, key)
    return from_meta(t, heads, args.head_dim) if heads is not None and arch in ROTATE_HALF_ARCHS else t


def rope_freqs(args: ModelArgs) -> torch.Tensor:
    """llama.cpp's rope_freqs for Llama 3 RoPE: per frequency, the factor its graph divides it by, computed as
    convert_hf_to_gguf.py computes it (float32 frequencies, float32 comparisons). The original context is the
    rope scaling's own original_max_position_embeddings, as transformers and Meta use it (llama.cpp's converter
    reads a top-level key that Llama 3.x configs lack and falls back to 8192, their value)."""
    s = args.rope_scaling
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    dim = args.head_dim
    freqs = 1.0 / (float(args.rope_theta) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_wavelen, high_wavelen = old / low, old / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(float(factor))
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(float(1 / ((1 - smooth) / factor + smooth)))
    return torch.tensor(factors, dtype=torch.float32)


def model_arch(config_path: Path) -> str:
    """The gguf.MODEL_ARCH member name of a config.json's model; refuses one llama.cpp has no mapping for here."""
    model_type = read_json_object(config_path).get("model_type")
    if model_type not in ARCHS:
        raise ConfigError(f"{config_path}: model_type {model_type!r} has no GGUF mapping "
                          f"(supported: {', '.join(ARCHS)})")
    return ARCHS[model_type]


def _check_arch(ckpt: HFCheckpoint, arch: str):
    a, where = ckpt.args, ckpt.config_path
    biases = {t for t, on in (("wq", a.qkv_bias), ("wk", a.qkv_bias), ("wv", a.qkv_bias), ("wo", a.o_bias)) if on}
    extra = sorted(biases - ATTENTION_BIASES[arch])
    if extra:
        raise ConfigError(f"{where}: attention biases on {', '.join(extra)} have no place in llama.cpp's "
                          f"{arch.lower()} architecture")
    kind = (a.rope_scaling or {}).get("rope_type")
    if kind == "llama3" and arch not in ROPE_FREQS_ARCHS:
        raise ConfigError(f"{where}: llama3 rope scaling is read by llama.cpp's llama architecture only, "
                          f"not {arch.lower()}")


def check_out(out: Path):
    """Refuse an output path that is a folder, below a file (the OS would name the temp file beside it, not
    out), or a file that is not a GGUF (a user's, never replaced)."""
    out = Path(out)
    check_not_under_a_file(out, "--out")
    if out.is_dir():
        raise ConfigError(f"{out}: is a folder; give the path of the .gguf file to write")
    if out.exists():
        with open(out, "rb") as f:
            if f.read(4) != MAGIC:
                raise ConfigError(f"{out}: exists and is not a GGUF file; refusing to overwrite it")
        if not _written_by_slowllama(out):
            raise ConfigError(f"{out}: a GGUF that slowllama did not write; refusing to replace it "
                              f"(give another --out)")


def _written_by_slowllama(path: Path) -> bool:
    import gguf

    try:
        return WRITER_KEY in gguf.GGUFReader(path).fields  # memory-mapped: the header is all it reads
    except (ValueError, OSError, IndexError):  # cut short or damaged: not known to be ours, so it is kept
        return False


def check_type(gguf_type: str):
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"--type {gguf_type!r} is not supported (supported: {', '.join(GGUF_TYPES)})")


def check_request(ckpt: HFCheckpoint, out: Path, gguf_type: str, modelfile: bool = True):
    """Every refusal before any work: the type, the model, its tokenizer, the output paths. ckpt is the folder
    to convert, or the one a run will export (its config.json and tokenizer go into the export unchanged)."""
    check_type(gguf_type)
    _check_arch(ckpt, model_arch(ckpt.config_path))
    check_out(out)
    vocab_source(ckpt.dir)
    if modelfile:
        if modelfile_path(Path(out)) == Path(out):  # the Modelfile would be written over the GGUF just made
            raise ConfigError(f"--out {out}: is the Modelfile's own name; give a .gguf path (or --no-modelfile)")
        check_modelfile(modelfile_path(Path(out)))


def write_gguf(out: Path, arch: str, add_metadata: Callable, infos: list[tuple[str, tuple, object]],
               data: Iterator[np.ndarray]) -> Path:
    """Write a GGUF at out atomically (a temp file beside it, fsynced, renamed): metadata, the tensor infos
    (name, shape, ggml type) and then each array `data` yields, in the same order. A failure (a full disk)
    leaves out as it was and no temp file; an OSError comes back as one line naming out."""
    import gguf

    out = Path(out)
    tmp = tmp_path(out)
    w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch]])  # opens nothing yet
    try:
        add_metadata(w)
        w.add_string(WRITER_KEY, __version__)
        for name, shape, qtype in infos:
            w.add_tensor_info(name, shape, np.float32, _nbytes(shape, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        n = 0
        for array in data:
            w.write_tensor_data(array)
            n += 1
            faults.point("gguf_tensor")
        if n != len(infos):
            raise RuntimeError(f"{out}: {n} tensors written for {len(infos)} announced")
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


def _add_model_metadata(w, ckpt: HFCheckpoint, arch: str, gguf_type: str, name: str):
    """What llama.cpp's loader reads for these architectures, as its converter writes it, and the tokenizer."""
    import gguf

    args = ckpt.args
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
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
    scaling = args.rope_scaling or {}
    if scaling.get("rope_type") == "linear":  # llama3 scaling travels as the rope_freqs tensor instead
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    if args.sliding_window is not None:
        w.add_sliding_window(args.sliding_window)
    w.add_file_type(gguf.LlamaFileType[FILE_TYPES[gguf_type]])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_vocab(w, ckpt.dir, args.vocab_size)


def export_gguf(folder: str | Path, out: str | Path, gguf_type: str = "f16", modelfile: bool = True) -> Path:
    """Write the Hugging Face folder as a GGUF file at out, atomically, and (modelfile) an Ollama Modelfile
    beside it; returns out."""
    folder, out = Path(folder), Path(out)
    ckpt = HFCheckpoint(folder)
    check_request(ckpt, out, gguf_type, modelfile)
    arch, args = model_arch(ckpt.config_path), ckpt.args
    plan = []  # (module, param, gguf name, shape, qtype): the header's tensor infos, in data order
    if (args.rope_scaling or {}).get("rope_type") == "llama3":  # first, as llama.cpp's converter writes it
        plan.append((None, None, f"{_tensor_name('rope_freqs')}.weight",
                     (args.head_dim // 2,), _qtype(gguf_type, (1,))))
    for module in module_names(args):
        for param, shape in expected_shapes(args, module).items():
            plan.append((module, param, gguf_name(module, param), tuple(shape), _qtype(gguf_type, tuple(shape))))

    def data():
        if plan[0][0] is None:
            yield encode_tensor(rope_freqs(args), plan[0][4])
        for module in dict.fromkeys(p[0] for p in plan if p[0] is not None):
            tensors = ckpt.read_module(module)  # one module in memory at a time
            for m, param, _, _, qtype in plan:
                if m == module:
                    t = gguf_layout(arch, args, f"{module}.{param}", tensors.pop(param))
                    yield encode_tensor(t, qtype)
            del tensors

    write_gguf(out, arch, lambda w: _add_model_metadata(w, ckpt, arch, gguf_type, folder.name),
               [(n, s, q) for _, _, n, s, q in plan], data())
    if modelfile:
        write_modelfile(out, folder)
    return out
