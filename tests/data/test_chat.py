"""Chat rendering, ids and assistant masks against transformers' apply_chat_template on templates written here."""
import json

import pytest

from slowllama.data.chat import encode_chat
from slowllama.errors import ConfigError
from slowllama.formats.chat_template import render
from slowllama.formats.tokenizer import load_tokenizer
from tests.formats.test_tokenizers import make_llama3_like, make_smollm_like

LLAMA3 = ("{{ bos_token }}{% for message in messages %}"
          "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_GENERATION = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# SmolLM2's layout, written over several lines so that trim_blocks and lstrip_blocks shape the output
CHATML = """{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {%- if loop.first and messages[0]['role'] != 'system' %}
        {{- '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM<|im_end|>\\n' }}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
CHATML_GENERATION = CHATML.replace(
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}",
    "{{- '<|im_start|>' + message['role'] + '\\n' }}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' + '\\n' }}{% endgeneration %}{% else %}"
    "{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}")
# tojson (no HTML escaping, unicode kept) and strftime_now, as transformers provides them
EXTRAS = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] | tojson }}\n{% endfor %}"
          "{% if strftime_now('%Y') | length != 4 %}{{ raise_exception('no year') }}{% endif %}{{ eos_token }}")

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": " Paris, naturally.  "}],
    [{"role": "system", "content": "Be brief <b>&</b> kind."},
     {"role": "user", "content": "Ünïcödé?\n\n  spaces  "},
     {"role": "assistant", "content": "Yes: café 日本語 😀"},
     {"role": "user", "content": "And numbers 1234567?"},
     {"role": "assistant", "content": "1234567 is\tfine.\n"}],
]
FOLDERS = {"llama3": (make_llama3_like, {"plain": LLAMA3, "generation": LLAMA3_GENERATION}),
           "chatml": (make_smollm_like, {"plain": CHATML, "generation": CHATML_GENERATION, "extras": EXTRAS})}
assert "generation" in CHATML_GENERATION and "generation" in LLAMA3_GENERATION
CASES = [(f, k) for f, (_, templates) in FOLDERS.items() for k in templates]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for name, (make, templates) in FOLDERS.items():
        for kind, template in templates.items():
            folder = make(tmp_path_factory.mktemp(f"{name}-{kind}"))
            (folder / "chat_template.jinja").write_text(template)
            out[name, kind] = folder
    return out


@pytest.mark.parametrize("name,kind", CASES)
def test_text_and_ids_equal_apply_chat_template(folders, name, kind):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(folders[name, kind])
    tok = load_tokenizer(folders[name, kind])
    for messages in CONVERSATIONS:
        for prompt in (False, True):
            text, _ = render(tok.chat_template, messages, add_generation_prompt=prompt, variables=tok.template_tokens)
            assert text == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        ids, mask = encode_chat(tok, messages, train_on_prompt=True)
        assert ids == ref.apply_chat_template(messages, tokenize=True)["input_ids"] and mask == [True] * len(ids)
        if kind == "extras":  # its closing eos_token moves as the conversation grows: no prefix marks a turn
            with pytest.raises(ConfigError, match=r"renders messages\[[12]\] differently.*generation"):
                encode_chat(tok, messages)
            continue
        ids2, mask = encode_chat(tok, messages)
        assert ids2 == ids and len(mask) == len(ids) and any(mask) and not all(mask)


@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_generation_mask_equals_transformers(folders, name):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(folders[name, "generation"])
    tok = load_tokenizer(folders[name, "generation"])
    for messages in CONVERSATIONS:
        want = ref.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        assert encode_chat(tok, messages)[1] == [bool(b) for b in want["assistant_masks"]]


def _runs(ids, mask):
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs, cur = runs + [cur], []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize("name,end,strip", [("llama3", "<|eot_id|>", True), ("chatml", "<|im_end|>\n", False)])
def test_prefix_mask_is_the_assistant_text_and_end_of_turn(folders, name, end, strip):
    tok = load_tokenizer(folders[name, "plain"])
    gen = load_tokenizer(folders[name, "generation"])
    for messages in CONVERSATIONS:
        ids, mask = encode_chat(tok, messages)
        want = [(m["content"].strip() if strip else m["content"]) + end for m in messages if m["role"] == "assistant"]
        assert [tok.decode(run) for run in _runs(ids, mask)] == want
        assert encode_chat(gen, messages) == (ids, mask)  # the {% generation %} spans agree


def test_named_templates_use_default(tmp_path):
    folder = make_smollm_like(tmp_path / "m")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": EXTRAS}]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_tokenizer(folder).chat_template == EXTRAS
    cfg["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="tokenizer_config.json: chat_template lists no template named"):
        load_tokenizer(folder)


def test_no_template_and_refusals_are_config_errors(folders, tmp_path, gqa_model):
    from slowllama.formats.meta import MetaCheckpoint

    sp = load_tokenizer(MetaCheckpoint(gqa_model).tokenizer)
    with pytest.raises(ConfigError, match="need a chat template, and .*tokenizer.model has none"):
        encode_chat(sp, CONVERSATIONS[0])
    tok = load_tokenizer(folders["chatml", "plain"])
    with pytest.raises(ConfigError, match="refused the conversation: Unknown role: tool"):
        encode_chat(tok, [{"role": "tool", "content": "x"}])
    with pytest.raises(ConfigError, match=r"d.jsonl:3: messages\[1\] must be"):
        encode_chat(tok, [{"role": "user", "content": "x"}, {"role": "assistant"}], where="d.jsonl:3")


# --- chat records in JSONL training data ---

def test_messages_records_train_on_assistant_tokens_only(folders, tmp_path):
    from transformers import AutoTokenizer

    from slowllama.data.windows import IGNORE, load_data

    folder = folders["llama3", "generation"]
    ref = AutoTokenizer.from_pretrained(folder)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    tok = load_tokenizer(folder)
    ex = load_data(path, tok, seq_len=512)
    everything = load_data(path, tok, seq_len=512, train_on_prompt=True)
    for row, messages in enumerate(CONVERSATIONS):
        want = ref.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = want["input_ids"], want["assistant_masks"]
        n = len(ids)
        assert ex.inputs[row, : n - 1].tolist() == ids[:-1]
        assert ex.targets[row, : n - 1].tolist() == [i if m else IGNORE for i, m in zip(ids[1:], mask[1:])]
        assert everything.targets[row, : n - 1].tolist() == ids[1:]
        assert (ex.targets[row, n - 1:] == IGNORE).all() and (everything.targets[row, n - 1:] == IGNORE).all()


def test_train_on_prompt_reaches_prompt_completion_records(folders, tmp_path):
    from slowllama.data.windows import IGNORE, load_data

    tok = load_tokenizer(folders["chatml", "plain"])
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "Q: the fox?", "completion": " A: quick."}) + "\n")
    ids = tok.encode("Q: the fox?", bos=True) + tok.encode(" A: quick.", bos=False, eos=True)
    n_prompt = len(tok.encode("Q: the fox?", bos=True))
    masked, full = load_data(path, tok, 32), load_data(path, tok, 32, train_on_prompt=True)
    assert full.targets[0, : len(ids) - 1].tolist() == ids[1:]
    assert masked.targets[0, : len(ids) - 1].tolist() == [IGNORE] * (n_prompt - 1) + ids[n_prompt:]


def test_messages_without_a_template_name_the_line(gqa_model, tmp_path):
    from slowllama.data.windows import load_data
    from slowllama.formats.meta import MetaCheckpoint

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"messages": CONVERSATIONS[0]}) + "\n")
    with pytest.raises(ConfigError, match="d.jsonl:2: chat messages need a chat template"):
        load_data(path, load_tokenizer(MetaCheckpoint(gqa_model).tokenizer), 16)
