"""Meta's Llama 3 tokenizer (tiktoken's tokenizer.model) as a Hugging Face tokenizer.json, for an export to a
Hugging Face folder.

tiktoken's BPE merges, at every step, the adjacent pair whose concatenation has the lowest rank. A byte-level BPE
in tokenizers merges the adjacent pair listed first among its merges. Listing every split (a, b) of every token,
ordered by the rank of a + b, makes the two pick the same pair at every step; ignore_merges takes a whole
pre-token that is itself a token directly, as tiktoken does. Tokens are written in GPT-2's byte-to-character
alphabet, which tokenizers' ByteLevel pre-tokenizer and decoder use.
"""
from __future__ import annotations

import json


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves, the other 68 bytes
    take the characters from U+0100 on, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _merges(ranks: dict[bytes, int], text) -> list[list[str]]:
    """Every (a, b) with a, b and a + b all tokens, ordered by the rank of a + b (then of a, then of b)."""
    found = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            a, b = token[:cut], token[cut:]
            if a in ranks and b in ranks:
                found.append((rank, ranks[a], ranks[b], a, b))
    found.sort(key=lambda m: m[:3])
    return [[text(a), text(b)] for _, _, _, a, b in found]


def tokenizer_json(ranks: dict[bytes, int], pattern: str, special: dict[str, int], bos: str | None) -> bytes:
    """tokenizer.json for a tiktoken encoding: its ranks, pre-tokenizer pattern and special tokens (name -> id),
    adding bos at the start of every sequence as Meta's encode(bos=True) does."""
    alphabet = byte_alphabet()

    def text(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for t, i in sorted(special.items(), key=lambda p: p[1])]
    post = None
    if bos is not None:
        first = {"SpecialToken": {"id": bos, "type_id": 0}}
        post = {"type": "TemplateProcessing",
                "single": [first, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [first, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": bos, "type_id": 1}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [special[bos]], "tokens": [bos]}}}
    doc = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {text(t): r for t, r in sorted(ranks.items(), key=lambda p: p[1])},
                  "merges": _merges(ranks, text)},
    }
    return (json.dumps(doc, ensure_ascii=False, indent=2) + "\n").encode()


def tokenizer_config_json(bos: str | None, eos: str | None, chat_template: str | None, max_len: int) -> bytes:
    """The tokenizer_config.json beside it: transformers' generic fast tokenizer, no clean-up on decoding (tiktoken
    gives the text back as it was)."""
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
           "clean_up_tokenization_spaces": False, "model_max_length": max_len,
           "model_input_names": ["input_ids", "attention_mask"]}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    return (json.dumps(cfg, ensure_ascii=False, indent=2) + "\n").encode()
