"""Tiny models for the GGUF tests and the references they are checked against: the gguf package's own name map
and quantizer, llama.cpp's q/k permutation written out, transformers' jinja rendering."""
from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import torch

from tests.engine.test_hf_training import make_model as hf_training_model
from tests.formats.test_tokenizers import CORPUS, _save

# Qwen2-Instruct's chat template: ChatML with a default system prompt.
QWEN_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama 3 Instruct's chat template.
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def make_qwen_like(folder: Path) -> Path:
    """Byte-level BPE split by Qwen2's own regex (from transformers), ChatML tokens, no BOS, eos <|im_end|>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    stops = [tk.token_to_id("<|im_end|>"), tk.token_to_id("<|endoftext|>")]
    return _save(tk, folder, generation={"eos_token_id": stops}, config_edit=lambda c: c.update(chat_template=QWEN_TEMPLATE),
                 eos_token="<|im_end|>", pad_token="<|endoftext|>")


def make_model(folder: Path, kind: str = "llama", tokenizer: str = "llama3", **kw) -> Path:
    """test_hf_training's tiny model, with the Llama 3 chat template or with a Qwen-like tokenizer instead."""
    hf_training_model(folder, kind, **kw)
    if tokenizer == "llama3":
        (folder / "chat_template.jinja").write_text(LLAMA3_TEMPLATE)
    else:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (folder / name).unlink(missing_ok=True)
        make_qwen_like(folder)
    return folder


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: Hugging Face's rotate-half q/k rows to interleaved ones."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_encoding(x: torch.Tensor, kind: str) -> tuple[object, np.ndarray]:
    """(ggml type, bytes) llama.cpp's converter gives a tensor for --outtype kind, from gguf's own quantizer."""
    T = gguf.GGMLQuantizationType
    a = x.float().numpy()
    qtype = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[kind] if a.ndim > 1 else T.F32
    if qtype == T.Q8_0 and a.shape[-1] % 32:
        qtype = T.F16
    return qtype, a if qtype == T.F32 else a.astype(np.float16) if qtype == T.F16 else gguf.quants.quantize(a, qtype)


def gguf_tensor_name(arch, n_layers: int, hf_name: str, suffix: str = "") -> str:
    base, _, kind = hf_name.rpartition(".")
    name = gguf.get_tensor_name_map(arch, n_layers).get_name(base)
    assert name is not None, hf_name
    return f"{name}.{kind}{suffix}"


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def go_render(template: str, messages: list[dict]) -> str:
    """Ollama's Go template for the subset slowllama writes ({{- range .Messages }}..{{ end }}, .Role, .Content,
    "{{-" trimming the text before it), so the test checks the TEMPLATE text itself, not slowllama's model of it."""
    items, trim_next = [], False
    for p in re.split(r"(\{\{.*?\}\})", template):
        if p.startswith("{{"):
            if p.startswith("{{-") and items and items[-1][0] == "text":
                items[-1] = ("text", items[-1][1].rstrip())
            items.append(("act", p.strip("{}").strip("-").strip()))
            trim_next = p.endswith("-}}")
        else:
            items.append(("text", p.lstrip() if trim_next else p))
            trim_next = False
    start, end = items.index(("act", "range .Messages")), items.index(("act", "end"))

    def run(seq, m=None):
        return "".join(v if k == "text" else {".Role": m and m["role"], ".Content": m and m["content"]}[v]
                       for k, v in seq)
    return run(items[:start]) + "".join(run(items[start + 1:end], m) for m in messages) + run(items[end + 1:])


def modelfile_parts(text: str) -> dict:
    out = {"FROM": re.search(r"^FROM (.+)$", text, re.MULTILINE).group(1),
           "stops": re.findall(r'^PARAMETER stop "(.*)"$', text, re.MULTILINE)}
    for key in ("TEMPLATE", "SYSTEM"):
        m = re.search(rf'^{key} """(.*?)"""$', text, re.MULTILINE | re.DOTALL)
        out[key] = m.group(1) if m else None
    return out


def hf_render(folder: Path, messages: list[dict]) -> str:
    tok = __import__("transformers").AutoTokenizer.from_pretrained(folder)
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
