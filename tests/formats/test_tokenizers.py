"""The three tokenizer backends against their references: transformers' AutoTokenizer and tiktoken built directly."""
import base64
import json

import pytest

from slowllama.errors import ConfigError
from slowllama.formats.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    load_tokenizer,
)

CORPUS = ["The quick brown fox jumps over the lazy dog. 1234567 numbers!", "Ünïcödé café naïve — 日本語 テキスト 😀",
          "  spaces\t\ttabs\n\nnewlines  ", "Hello there, how are you? I'm fine, don't worry."] * 20
TEXTS = ["Hello world", "  leading and trailing  ", "tabs\t\tand\n\n\nnewlines\r\n", "Ünïcödé café — 日本語 😀",
         "a<|eot_id|>b <|begin_of_text|>c", "x</s> <s>y<|im_end|>", "", "   ", "numbers 1234567890 don't !"]
LLAMA3_PATTERN_IN_TEST = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                          r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_bpe(specials):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN_IN_TEST), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tk


def _metaspace_bpe():
    # Llama 2's layout in tokenizer.json: metaspace words, byte fallback
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    alphabet = [f"<0x{i:02X}>" for i in range(256)]
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"] + alphabet,
                                                       show_progress=False))
    return tk


def _save(tk, folder, generation=None, config_edit=None, **special):
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tk, **special).save_pretrained(folder)
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    if config_edit:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        config_edit(cfg)
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def make_llama3_like(folder):
    """Byte-level BPE adding <|begin_of_text|> through a TemplateProcessing post-processor."""
    from tokenizers import processors

    tk = _byte_level_bpe(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                          "<|eot_id|>"])
    bos = tk.token_to_id("<|begin_of_text|>")
    tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                      special_tokens=[("<|begin_of_text|>", bos)])
    stops = [tk.token_to_id("<|end_of_text|>"), tk.token_to_id("<|eot_id|>")]
    return _save(tk, folder, generation={"bos_token_id": bos, "eos_token_id": stops},
                 bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def make_smollm_like(folder):
    """Byte-level BPE with ChatML tokens, no BOS, eos <|im_end|>, one extra token declared only in the config."""
    tk = _byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    n = tk.get_vocab_size()
    extra = {"content": "<tool>", "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
             "special": False}
    return _save(tk, folder, generation={"eos_token_id": tk.token_to_id("<|im_end|>")},
                 config_edit=lambda c: c.update(added_tokens_decoder={str(n): extra}),
                 bos_token="<|endoftext|>", eos_token="<|im_end|>")


def make_llama2_like(folder, add_bos):
    """Metaspace BPE, with or without a BOS-adding post-processor.

    The config's add_bos_token says the opposite: transformers ignores it when tokenizer.json exists.
    """
    from tokenizers import processors

    tk = _metaspace_bpe()
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                          special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return _save(tk, folder, config_edit=lambda c: c.update(add_bos_token=not add_bos, add_eos_token=False),
                 bos_token="<s>", eos_token="</s>", unk_token="<unk>")


HF_STYLES = {"llama3": make_llama3_like, "smollm": make_smollm_like,
             "llama2-bos": lambda d: make_llama2_like(d, True), "llama2-nobos": lambda d: make_llama2_like(d, False)}


@pytest.fixture(scope="module", params=sorted(HF_STYLES))
def hf_folder(request, tmp_path_factory):
    return HF_STYLES[request.param](tmp_path_factory.mktemp(request.param))


def test_hf_tokenizer_encodes_and_decodes_as_autotokenizer(hf_folder):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(hf_folder)
    tok = load_tokenizer(hf_folder)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (ref.bos_token_id, ref.eos_token_id, len(ref))
    for text in TEXTS + ["<tool>call"]:
        ids = ref(text).input_ids
        assert tok.encode(text, bos=True) == ids, text
        assert tok.encode(text, bos=False) == ref(text, add_special_tokens=False).input_ids, text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False), text
        got, offsets = tok.encode_with_offsets(text)
        assert got == ref(text, add_special_tokens=False).input_ids and len(offsets) == len(got)
    eos_ids = tok.encode("hi", bos=False, eos=True)
    assert eos_ids[-1] == ref.eos_token_id and eos_ids[:-1] == ref("hi", add_special_tokens=False).input_ids


def test_hf_stop_ids_come_from_the_model_files(tmp_path):
    tok = load_tokenizer(make_llama3_like(tmp_path / "l3"))
    gen = json.loads((tmp_path / "l3" / "generation_config.json").read_text())
    assert tok.stop_ids == set(gen["eos_token_id"]) and len(tok.stop_ids) == 2
    assert tok.encode("x", bos=True)[0] == tok.bos_id == gen["bos_token_id"]
    (tmp_path / "l3" / "generation_config.json").unlink()
    assert load_tokenizer(tmp_path / "l3").stop_ids == {tok.tk.token_to_id("<|eot_id|>")}


def test_llama2_style_bos_follows_the_config(tmp_path):
    with_bos = load_tokenizer(make_llama2_like(tmp_path / "a", True))
    without = load_tokenizer(make_llama2_like(tmp_path / "b", False))
    assert with_bos.encode("the fox")[0] == with_bos.bos_id and with_bos.encode("the fox")[1:] == without.encode("the fox")


# --- Meta's Llama 3 tokenizer.model (tiktoken) ---

MERGES = [b"th", b"the", b" t", b" the", b"he", b"in", b"ing", b" a", b"an", b"and", b" and", b"er", b"ou", b"\n\n",
          b"  ", b"12", b"123"]


def write_tiktoken_file(path):
    # Byte tokens first, each merge after its parts, as a BPE file must be; rank = line order.
    tokens = [bytes([b]) for b in range(256)] + MERGES
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return {t: r for r, t in enumerate(tokens)}


def reference_encoding(ranks):
    import tiktoken

    n = len(ranks)
    # Written out from Meta's llama-models tokenizer, not taken from slowllama
    named = {"<|begin_of_text|>": n, "<|end_of_text|>": n + 1, "<|finetune_right_pad_id|>": n + 4,
             "<|start_header_id|>": n + 6, "<|end_header_id|>": n + 7, "<|eom_id|>": n + 8, "<|eot_id|>": n + 9,
             "<|python_tag|>": n + 10, "<|reserved_special_token_2|>": n + 11, "<|reserved_special_token_246|>": n + 255}
    return tiktoken.Encoding(name="ref", pat_str=LLAMA3_PATTERN_IN_TEST, mergeable_ranks=ranks, special_tokens=named), named


def test_tiktoken_file_matches_tiktoken_built_directly(tmp_path):
    ranks = write_tiktoken_file(tmp_path / "tokenizer.model")
    ref, named = reference_encoding(ranks)
    tok = Tokenizer(tmp_path)  # a folder with tokenizer.model, told apart from sentencepiece by content
    assert isinstance(tok, TiktokenTokenizer)
    assert tok.vocab_size == len(ranks) + 256
    assert all(tok.encode(name, bos=False) == [i] for name, i in named.items())
    assert (tok.bos_id, tok.eos_id) == (named["<|begin_of_text|>"], named["<|end_of_text|>"])
    assert tok.stop_ids == {named["<|end_of_text|>"], named["<|eot_id|>"], named["<|eom_id|>"]}
    for text in TEXTS + ["the and then thing 123456", "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"]:
        want = ref.encode(text, allowed_special="all")
        assert tok.encode(text, bos=True, eos=True) == [tok.bos_id] + want + [tok.eos_id]
        assert tok.decode(want) == text
        ids, offsets = tok.encode_with_offsets(text)
        assert ids == want and "".join(text[a:b] for a, b in offsets) == text


def test_sentencepiece_is_recognised_by_content(gqa_model, tmp_path):
    import sentencepiece as spm

    from slowllama.formats.meta import MetaCheckpoint

    path = MetaCheckpoint(gqa_model).tokenizer
    tok = load_tokenizer(path)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert isinstance(tok, SentencePieceTokenizer) and tok.stop_ids == {sp.eos_id()}
    assert tok.encode("the lazy dog", bos=True, eos=True) == [sp.bos_id(), *sp.encode("the lazy dog"), sp.eos_id()]
    renamed = tmp_path / "weird.name"
    renamed.write_bytes(path.read_bytes())
    assert isinstance(load_tokenizer(renamed), SentencePieceTokenizer)


@pytest.mark.parametrize("content,match", [(b"\x00garbage", "not a sentencepiece model"),
                                           (b"aGVsbG8= 0\nnot-base64!! 1\n", r"tokenizer.model:2: expected a base64"),
                                           (b"aGVsbG8= 0\naGk= 5\n", "ranks are not"),
                                           (b"{not json", "not a tokenizers file")])
def test_bad_tokenizer_files_name_themselves(tmp_path, content, match):
    (tmp_path / "tokenizer.model").write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        load_tokenizer(tmp_path / "tokenizer.model")


def test_a_folder_without_tokenizer_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ConfigError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path / "m")


def test_a_token_declared_only_in_tokenizer_config_is_added(tmp_path):
    tok = load_tokenizer(make_smollm_like(tmp_path / "s"))
    n = int(next(iter(json.loads((tmp_path / "s" / "tokenizer_config.json").read_text())["added_tokens_decoder"])))
    assert tok.encode("<tool>x", bos=False)[0] == n == tok.vocab_size - 1


def test_tiktoken_encodes_long_texts_in_metas_pieces(tmp_path):
    ranks = write_tiktoken_file(tmp_path / "tokenizer.model")
    ref, _ = reference_encoding(ranks)
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    run = "the" * 10_000  # a 30k-character run without whitespace: Meta cuts it after 25k characters
    assert tok.encode(run, bos=False) == ref.encode(run[:25_000]) + ref.encode(run[25_000:]) != ref.encode(run)
    text = "and then " * 44_445  # 400,005 characters: Meta encodes 400k-character chunks apart
    assert tok.encode(text, bos=False) == ref.encode(text[:400_000]) + ref.encode(text[400_000:]) != ref.encode(text)
    ids, offsets = tok.encode_with_offsets(run)
    assert ids == tok.encode(run, bos=False) and "".join(run[a:b] for a, b in offsets) == run


def test_tiktoken_chat_follows_metas_chat_format(tmp_path):
    from slowllama.data.chat import encode_chat

    ranks = write_tiktoken_file(tmp_path / "tokenizer.model")
    ref, named = reference_encoding(ranks)
    tok = load_tokenizer(tmp_path / "tokenizer.model")
    messages = [{"role": "system", "content": " Be kind.\n"}, {"role": "user", "content": "the thing 123?"},
                {"role": "assistant", "content": "  and the answer 12345!\n\n"}, {"role": "user", "content": "in"},
                {"role": "assistant", "content": "the end"}]
    # Meta's ChatFormat.encode_dialog_prompt, written out: header, "\n\n", stripped content, <|eot_id|>
    want, trained = [named["<|begin_of_text|>"]], [False]
    for m in messages:
        head = [named["<|start_header_id|>"], *ref.encode(m["role"]), named["<|end_header_id|>"], *ref.encode("\n\n")]
        body = ref.encode(m["content"].strip()) + [named["<|eot_id|>"]]
        want += head + body
        trained += [False] * len(head) + [m["role"] == "assistant"] * len(body)
    assert encode_chat(tok, messages) == (want, trained)

