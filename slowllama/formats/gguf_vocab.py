"""A model folder's tokenizer as GGUF metadata: the vocabulary llama.cpp tokenizes with, its special ids and
the chat template.

Two kinds are written, as llama.cpp's converter writes them:
- a byte-level BPE tokenizer.json as llama.cpp's "gpt2" model, with tokenizer.ggml.pre naming the text
  splitting rule its merges were learned under (llama.cpp applies its own copy of that rule by name);
- a sentencepiece tokenizer.model as its "llama" model (pieces, scores and types).
A tokenizer.json that is neither (a metaspace BPE such as Llama 2's) is written from the sentencepiece file
beside it; with none, or with a byte-level BPE whose splitting rule llama.cpp does not know by a name, the
request is refused: llama.cpp would split text differently from training, which degrades every answer.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from .tokenizer import HFTokenizer, _chat_template, _read_json

# tokenizer.json's pre_tokenizer steps, as _steps spells them -> llama.cpp's tokenizer.ggml.pre name for that
# rule. The regexes are the ones the models' tokenizer.json files hold (Llama 3's counts digits in threes,
# Qwen2's one by one); "gpt-2" is ByteLevel's own regex, "smollm" single digits before it.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    (("Split", LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
    (("Split", QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
    (("ByteLevel", True),): "gpt-2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
}


def _steps(pre) -> tuple:
    """A pre_tokenizer as (kind, what decides its split) per step; anything else as (kind, the step's JSON)."""
    steps = pre.get("pretokenizers") or [] if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    out = []
    for s in steps:
        s = s if isinstance(s, dict) else {}
        kind = s.get("type")
        if kind == "Split" and s.get("behavior") == "Isolated" and not s.get("invert"):
            out.append((kind, (s.get("pattern") or {}).get("Regex")))
        elif kind == "ByteLevel" and not s.get("add_prefix_space"):
            out.append((kind, bool(s.get("use_regex", True))))
        elif kind == "Digits":
            out.append((kind, bool(s.get("individual_digits"))))
        else:
            out.append((kind, json.dumps(s, sort_keys=True)))
    return tuple(out)


def _byte_level(raw: dict) -> bool:
    return any(k == "ByteLevel" for k, _ in _steps(raw.get("pre_tokenizer")))


def _is_sentencepiece(path: Path) -> bool:
    import sentencepiece as spm

    if not path.is_file():
        return False
    try:
        spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError):  # a tiktoken file or anything else
        return False
    return True


def vocab_source(folder: Path) -> tuple[str, Path, str | None]:
    """("gpt2", tokenizer.json, pre name) or ("llama", tokenizer.model, None): what the GGUF's vocabulary is
    written from. Every refusal is here, so check_request makes it before any work."""
    tj, tm = folder / "tokenizer.json", folder / "tokenizer.model"
    if tj.is_file():
        try:
            raw = json.loads(tj.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{tj}: unreadable ({e})") from e
        model_type = (raw.get("model") or {}).get("type")
        if model_type == "BPE" and _byte_level(raw):
            steps = _steps(raw.get("pre_tokenizer"))
            if steps not in PRE_TOKENIZERS:
                raise ConfigError(f"{tj}: its pre_tokenizer ({', '.join(str(k) for k, _ in steps) or 'none'}) splits text by a rule "
                                  f"llama.cpp has no name for (it knows {', '.join(PRE_TOKENIZERS.values())}); "
                                  f"llama.cpp would tokenize differently from training")
            return "gpt2", tj, PRE_TOKENIZERS[steps]
        if _is_sentencepiece(tm):
            return "llama", tm, None
        raise ConfigError(f"{tj}: a {model_type} tokenizer that is not byte-level BPE, with no sentencepiece "
                          f"tokenizer.model beside it, has no GGUF form here")
    if _is_sentencepiece(tm):
        return "llama", tm, None
    raise ConfigError(f"{folder}: no tokenizer.json or sentencepiece tokenizer.model to write into the GGUF")


def add_vocab(w, folder: Path, vocab_size: int) -> HFTokenizer | None:
    """Write the tokenizer metadata of folder; returns the tokenizer.json's tokenizer (None for sentencepiece)."""
    kind, path, pre = vocab_source(folder)
    if kind == "gpt2":
        tok = _add_byte_level_bpe(w, path, pre, vocab_size)
    else:
        _add_sentencepiece(w, path)
        tok = None
    cfg = _read_json(folder / "tokenizer_config.json")
    template = tok.chat_template if tok is not None else _chat_template(folder, cfg)
    if template:
        w.add_chat_template(template)
    return tok


def _add_byte_level_bpe(w, path: Path, pre: str, vocab_size: int) -> HFTokenizer:
    """tokenizer.json as llama.cpp's "gpt2" tokenizer: tokens by id, types, merges, bos/eos. The tokens and their
    ids are the ones slowllama trained with (HFTokenizer adds what tokenizer_config.json declares beyond the file)."""
    import gguf

    T = gguf.TokenType
    raw = json.loads(path.read_text(encoding="utf-8"))
    tok = HFTokenizer(path.parent)
    vocab = tok.tk.get_vocab(with_added_tokens=True)
    added = tok.tk.get_added_tokens_decoder()
    n = max(max(vocab.values()) + 1, vocab_size)  # rows past the tokenizer are padding, as llama.cpp pads
    tokens, types = [f"[PAD{i}]" for i in range(n)], [T.UNUSED] * n
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = (T.CONTROL if added[i].special else T.USER_DEFINED) if i in added else T.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in (raw.get("model") or {}).get("merges") or []]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if tok.bos_id is not None:
        w.add_bos_token_id(tok.bos_id)
    if tok.eos_id is not None:
        w.add_eos_token_id(tok.eos_id)
    # transformers' fast tokenizer adds BOS only when tokenizer.json's post-processor does; say the same to llama.cpp
    w.add_add_bos_token(_post_processor_adds_first(raw.get("post_processor")))
    return tok


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
    import gguf
    import sentencepiece as spm

    T = gguf.TokenType
    sp = spm.SentencePieceProcessor(model_file=str(path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else T.BYTE if sp.is_byte(i)
                     else T.UNUSED if sp.is_unused(i) else T.NORMAL)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    if sp.bos_id() >= 0:
        w.add_bos_token_id(sp.bos_id())
    if sp.eos_id() >= 0:
        w.add_eos_token_id(sp.eos_id())
    if sp.unk_id() >= 0:
        w.add_unk_token_id(sp.unk_id())
