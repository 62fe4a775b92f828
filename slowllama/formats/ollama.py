"""An Ollama Modelfile beside a GGUF, so that `ollama create NAME -f model-TYPE.Modelfile` works unedited.

TEMPLATE is Ollama's Go template for the model's chat format. It is written only where the model's own
(jinja) chat template is proven to render like one of the formats below: each candidate's output is
computed for probe conversations and compared, character for character, with what the model's template
renders for them. A template that always opens with a default system prompt (Qwen's) gets it as SYSTEM,
which Ollama inserts when a conversation has none. Any other template is left out, with a comment saying
so: Ollama then picks a template itself from the GGUF's tokenizer.chat_template.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from ..errors import ConfigError
from ..fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

MARK = "# Modelfile written by slowllama"  # its first line: what tells ours from a user's Modelfile
_HOLE = "\ue000"  # a private-use character standing for a default system prompt while matching


def _chatml(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def _llama3(messages: list[dict]) -> str:
    return ("".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages)
            + "<|start_header_id|>assistant<|end_header_id|>\n\n")


# name -> (what the Go template renders for a conversation, the Go template, its end-of-turn token)
FORMATS = {
    "ChatML": (_chatml, ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
                        "{{ end }}<|im_start|>assistant\n"), "<|im_end|>"),
    "Llama 3": (_llama3, ("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
                         "{{ .Content }}<|eot_id|>\n{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"),
                "<|eot_id|>"),
}
_U1, _A1, _U2 = ({"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
                 {"role": "user", "content": "And 3+3?"})
_SYSTEM = {"role": "system", "content": "Answer briefly."}
PROBES = [[_SYSTEM, _U1, _A1, _U2], [_SYSTEM, _U1], [_U1, _A1, _U2], [_U1]]


def modelfile_path(gguf: Path) -> Path:
    """model-f16.gguf -> model-f16.Modelfile (paths.py owns these names in an export folder)."""
    return Path(gguf).with_suffix(".Modelfile")


def check_modelfile(path: Path):
    """Refuse to replace a Modelfile that slowllama did not write."""
    if path.is_dir() or (path.exists() and not path.read_text(encoding="utf-8", errors="replace").startswith(MARK)):
        raise ConfigError(f"{path}: exists and was not written by slowllama; refusing to overwrite it")


def translate(template: str, variables: dict, bos_added: str | None) -> tuple[str, str | None, str] | None:
    """(format name, default system prompt or None, end-of-turn token) of the format the jinja template renders
    exactly, or None. bos_added: the BOS text the tokenizer adds itself (a template's leading one is dropped,
    as llama.cpp adds it)."""
    from .chat_template import render

    def rendered(messages):
        text, _ = render(template, messages, add_generation_prompt=True, variables=variables)
        return text[len(bos_added):] if bos_added and text.startswith(bos_added) else text

    try:
        texts = [rendered(p) for p in PROBES]
    except ConfigError:
        return None
    for name, (fmt, _, end) in FORMATS.items():
        if all(t == fmt(p) for t, p in zip(texts, PROBES)):
            return name, None, end
        # A default system prompt where none is given: the conversations without one render as with one.
        hole = re.escape(fmt([{"role": "system", "content": _HOLE}, _U1])).replace(re.escape(_HOLE), "(.*)")
        m = re.fullmatch(hole, texts[3], re.DOTALL)
        if m and texts[:2] == [fmt(p) for p in PROBES[:2]] and \
                texts[2:] == [fmt([{"role": "system", "content": m.group(1)}, *p]) for p in PROBES[2:]]:
            return name, m.group(1), end
    return None


def modelfile_text(gguf_name: str, template: str | None, variables: dict, bos_added: str | None,
                   stops: list[str]) -> tuple[str, str | None]:
    """The Modelfile, and the line to log when TEMPLATE is left out (None when it is written)."""
    lines = [f"{MARK}: ollama create NAME -f {Path(gguf_name).with_suffix('.Modelfile').name}",
             f"FROM ./{gguf_name}"]
    found = translate(template, variables, bos_added) if template else None
    note = None
    if found is None or '"""' in (found[1] or ""):
        note = ("TEMPLATE left out: the model has no chat template" if not template else
                f"TEMPLATE left out: the chat template is not one slowllama translates ({', '.join(FORMATS)}); "
                f"Ollama picks one from the GGUF's tokenizer.chat_template")
        lines.append(f"# {note}")
    else:
        name, system, end = found
        lines.append(f"# TEMPLATE: the chat template renders as {name}")
        lines.append(f'TEMPLATE """{FORMATS[name][1]}"""')
        if system is not None:
            lines.append(f'SYSTEM """{system}"""')
        stops = [end, *stops]
    for s in dict.fromkeys(stops):
        lines.append(f'PARAMETER stop "{s}"')
    return "\n".join(lines) + "\n", note


def write_modelfile(gguf: Path, folder: Path) -> Path:
    """Write the Modelfile of gguf (the GGUF of the model folder `folder`) beside it, atomically."""
    from .tokenizer import HFTokenizer, _chat_template, _read_json, load_tokenizer

    gguf = Path(gguf)
    tok = load_tokenizer(folder)
    template = tok.chat_template or _chat_template(folder, _read_json(folder / "tokenizer_config.json"))
    text_of = tok.tk.id_to_token if isinstance(tok, HFTokenizer) else tok.sp.id_to_piece
    bos_added = None  # llama.cpp adds BOS as the tokenizer does, so a template's own leading one is not repeated
    if tok.bos_id is not None and tok.encode("x", bos=True)[:1] == [tok.bos_id]:
        bos_added = text_of(tok.bos_id)
    stops = [text_of(i) for i in sorted(tok.stop_ids)]
    stops = [s for s in stops if s and '"' not in s]
    text, note = modelfile_text(gguf.name, template, dict(tok.template_tokens), bos_added, stops)
    path = modelfile_path(gguf)
    check_modelfile(path)
    atomic_write_bytes(path, [text.encode("utf-8")])
    if note:
        log.warning("%s: %s", path, note)
    return path
