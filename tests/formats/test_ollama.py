"""The Ollama Modelfile beside a GGUF: its TEMPLATE, run as Ollama's Go template would run it, renders what the
model's own chat template renders in transformers; untranslatable templates are left out and said so."""
from __future__ import annotations

import logging

import pytest

from slowllama.errors import ConfigError
from slowllama.formats.ollama import MARK, write_modelfile
from tests.formats.gguf_helpers import go_render, hf_render, make_model, modelfile_parts

pytest.importorskip("transformers")
CHATS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}],
    [{"role": "user", "content": "Hello there"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}],
]


def generation_stops(folder) -> set[str]:
    """The texts of the ids generation stops at, as transformers reads them (generation_config.json's eos)."""
    import transformers

    eos = transformers.GenerationConfig.from_pretrained(folder).eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    return set(tok.convert_ids_to_tokens(sorted(set(eos) | {tok.eos_token_id})))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {"llama3": make_model(tmp_path_factory.mktemp("l") / "m"),
            "qwen": make_model(tmp_path_factory.mktemp("q") / "m", "qwen2", "qwen")}


def test_chatml_with_its_default_system_prompt(folders, tmp_path):
    path = write_modelfile(tmp_path / "model-f16.gguf", folders["qwen"])
    text = path.read_text()
    parts = modelfile_parts(text)
    assert text.startswith(MARK) and parts["FROM"] == "./model-f16.gguf"
    assert parts["SYSTEM"] == "You are a helpful assistant."
    assert parts["stops"][0] == "<|im_end|>" and set(parts["stops"]) == {"<|im_end|>", "<|endoftext|>"} \
        == generation_stops(folders["qwen"])
    for chat in CHATS:  # Ollama puts SYSTEM first where a conversation has no system message
        messages = chat if chat[0]["role"] == "system" else [{"role": "system", "content": parts["SYSTEM"]}, *chat]
        assert go_render(parts["TEMPLATE"], messages) == hf_render(folders["qwen"], chat)


def test_llama3_headers(folders, tmp_path):
    """llama.cpp adds BOS itself (the GGUF says so), so the TEMPLATE starts after the template's bos_token."""
    parts = modelfile_parts(write_modelfile(tmp_path / "model-q8_0.gguf", folders["llama3"]).read_text())
    assert parts["SYSTEM"] is None and parts["stops"][0] == "<|eot_id|>"
    assert set(parts["stops"]) == {"<|eot_id|>", *generation_stops(folders["llama3"])}
    for chat in CHATS:
        assert "<|begin_of_text|>" + go_render(parts["TEMPLATE"], chat) == hf_render(folders["llama3"], chat)


def test_untranslatable_template_is_left_out_and_said(folders, tmp_path, caplog):
    folder = tmp_path / "m"
    folder.mkdir()
    for p in folders["llama3"].iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                                                "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with caplog.at_level(logging.WARNING):
        text = write_modelfile(tmp_path / "model-f16.gguf", folder).read_text()
    parts = modelfile_parts(text)
    assert parts["TEMPLATE"] is None and "# TEMPLATE left out" in text and "TEMPLATE left out" in caplog.text
    assert parts["FROM"] == "./model-f16.gguf" and "<|eot_id|>" in parts["stops"]


def test_never_replaces_a_users_modelfile(folders, tmp_path):
    mine = tmp_path / "model-f16.Modelfile"
    mine.write_text("FROM llama3\nSYSTEM mine\n")
    with pytest.raises(ConfigError, match="was not written by slowllama"):
        write_modelfile(tmp_path / "model-f16.gguf", folders["qwen"])
    assert mine.read_text() == "FROM llama3\nSYSTEM mine\n"
    mine.unlink()
    write_modelfile(tmp_path / "model-f16.gguf", folders["qwen"])
    write_modelfile(tmp_path / "model-f16.gguf", folders["llama3"])  # its own: replaced
    assert "<|eot_id|>" in modelfile_parts(mine.read_text())["stops"]
