"""Meta's Llama 3 tokenizer.model written as a tokenizer.json: transformers' AutoTokenizer reads it and tokenizes as
tiktoken does, special tokens, unicode, digits and whitespace runs included.

The BPE ranks are learnt here from a small multilingual text (tiktoken needs a valid BPE: each token the merge of
two earlier ones), so that merges of multi-byte characters, digits and spaces all occur.
"""
from __future__ import annotations

import base64
import collections
import itertools

import pytest
import regex
import torch

from slowllama.formats.tiktoken_json import (
    byte_alphabet,
    tokenizer_config_json,
    tokenizer_json,
)
from slowllama.formats.tokenizer import (
    LLAMA3_CHAT_TEMPLATE,
    LLAMA3_PATTERN,
    TiktokenTokenizer,
)

transformers = pytest.importorskip("transformers")
tiktoken = pytest.importorskip("tiktoken")

CORPUS = ("The quick brown fox jumps over the lazy dog. Then the other thing, and then another one!\n\n"
          "Numbers: 12345 678 90 2024-12-07 3.14159; caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber "
          "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u65e5\u672c \u4e2d\u6587 \u0440\u0443\u0441\u0441\u043a\u0438\u0439 "
          "\u0442\u0435\u043a\u0441\u0442 emoji \U0001F600\U0001F600 tabs\t\tand    spaces   \n  indented code:\n"
          "    def f(x):\n        return x + 1\n") * 3
# Unseen words, runs of spaces and newlines, digits beyond three, special tokens mid-text, CRLF, a lone emoji.
TEXT = ("<|begin_of_text|>Hello, the WORLD's thing's 1234567 r\u00e9sum\u00e9s \u65e5\u672c\u8a9e!\r\n\r\n"
        "   x  <|eot_id|>\t\t\tindent\n\n\n    y = f(12) + 3.5e-7 \U0001F600 \u00fc\u00dfer caf\u00e9<|start_header_id|>"
        "user<|end_header_id|>\n\nquestion?  \n")


def learn_ranks(text: str, n_merges: int = 300) -> dict[bytes, int]:
    """A byte-level BPE learnt on text within Llama 3's pre-tokens: bytes first, then each merge, most frequent
    pair first."""
    words = collections.Counter(tuple(bytes([b]) for b in w.encode()) for w in regex.findall(LLAMA3_PATTERN, text))
    ranks = {bytes([b]): b for b in range(256)}
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, n in words.items():
            for a, b in itertools.pairwise(w):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda p: (p[1], p[0]))
        if a + b in ranks:  # already a token through another split: it needs no rank of its own
            words = collections.Counter({_merge(w, a, b): n for w, n in words.items()})
            continue
        ranks[a + b] = len(ranks)
        words = collections.Counter({_merge(w, a, b): n for w, n in words.items()})
    return ranks


def _merge(word, a, b):
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


@pytest.fixture(scope="module")
def llama3_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiktoken")
    ranks = learn_ranks(CORPUS)
    (folder / "tokenizer.model").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return TiktokenTokenizer(folder / "tokenizer.model")


def write_hf_tokenizer(tok: TiktokenTokenizer, folder):
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(tokenizer_json(tok.ranks, LLAMA3_PATTERN, tok.special, tok.bos_token))
    (folder / "tokenizer_config.json").write_bytes(tokenizer_config_json(tok.bos_token, tok.eos_token,
                                                                         tok.chat_template, 8192))
    return folder


def test_the_byte_alphabet_is_gpt2s():
    alphabet = byte_alphabet()
    assert len(set(alphabet.values())) == 256 and alphabet[ord("A")] == "A"
    assert alphabet[ord(" ")] == "\u0120" and alphabet[ord("\n")] == "\u010a"  # the familiar 'Ġ' and 'Ċ'


def test_autotokenizer_tokenizes_like_tiktoken(llama3_tokenizer, tmp_path):
    tok = llama3_tokenizer
    assert len(tok.ranks) > 400  # merges were learnt, multi-byte ones among them
    assert any(len(t.decode("utf-8", "ignore")) == 1 and len(t) > 1 for t in tok.ranks)
    hf = transformers.AutoTokenizer.from_pretrained(write_hf_tokenizer(tok, tmp_path / "hf"))
    want = tok.encode(TEXT, bos=True)
    assert want.count(tok.special["<|eot_id|>"]) == 1 and len(want) < len(TEXT.encode())  # specials and merges used
    assert hf(TEXT)["input_ids"] == want
    assert hf(TEXT, add_special_tokens=False)["input_ids"] == tok.encode(TEXT, bos=False)
    assert hf.decode(want) == tok.decode(want) == "<|begin_of_text|>" + TEXT
    for line in CORPUS.splitlines(keepends=True):
        assert hf(line, add_special_tokens=False)["input_ids"] == tok.encode(line, bos=False), line
    assert hf.chat_template == LLAMA3_CHAT_TEMPLATE


def test_a_meta_llama3_checkpoint_exported_as_hf_carries_a_tokenizer_json(llama3_tokenizer, tmp_path):
    from slowllama.engine.store import export_store, prepare
    from slowllama.formats import open_checkpoint
    from slowllama.formats.meta import save_meta
    from slowllama.formats.tokenizer import load_tokenizer
    from slowllama.model.transformer import ModelArgs
    from tools.make_test_model import random_state_dict

    model = tmp_path / "llama3"
    model.mkdir()
    (model / "tokenizer.model").write_bytes(llama3_tokenizer.path.read_bytes())
    params = {"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32, "norm_eps": 1e-5,
              "rope_theta": 500000.0, "vocab_size": llama3_tokenizer.vocab_size}
    save_meta(model, params, random_state_dict(ModelArgs(**params)))
    store = prepare(open_checkpoint(model), tmp_path / "store")
    export_store(store, model, tmp_path / "out", export_format="hf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert hf(TEXT)["input_ids"] == llama3_tokenizer.encode(TEXT, bos=True)
    assert load_tokenizer(tmp_path / "out").encode(TEXT) == llama3_tokenizer.encode(TEXT)  # slowllama reads it too
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert ref.config.vocab_size == len(hf)
