"""Preference records (data/preference.py): what is rendered, what is trained on, how a batch is laid out."""
import json

import pytest
import torch

from slowllama.data.chat import encode_chat
from slowllama.data.preference import load_pairs, pair_rows
from slowllama.data.records import Where
from slowllama.data.windows import IGNORE
from slowllama.errors import ConfigError
from slowllama.formats.tokenizer import load_tokenizer
from tests.data.test_chat import LLAMA3, LLAMA3_GENERATION, _runs
from tests.formats.test_tokenizers import make_llama3_like

PROMPT = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
          {"role": "user", "content": "Another one?"}]


@pytest.fixture(scope="module")
def chat_tokenizers(tmp_path_factory):
    out = {}
    for kind, template in (("plain", LLAMA3), ("generation", LLAMA3_GENERATION)):
        folder = make_llama3_like(tmp_path_factory.mktemp(f"pairs-{kind}"))
        (folder / "chat_template.jinja").write_text(template)
        out[kind] = load_tokenizer(folder)
    return out


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def trained_text(tok, ids, targets) -> list[str]:
    """The decoded runs of trained targets of one row (target t is token t + 1)."""
    mask = [bool(m) for m in (targets != IGNORE)]
    return [tok.decode(run) for run in _runs(ids[1:], mask[: len(ids) - 1])]


@pytest.mark.parametrize("kind", ["plain", "generation"])
def test_messages_pairs_train_on_the_response_only(chat_tokenizers, tmp_path, kind):
    """A prompt that holds an assistant turn of its own: only the chosen (or rejected) turn is trained on,
    rendered as the chat template renders the whole conversation."""
    tok = chat_tokenizers[kind]
    rec = {"prompt": PROMPT, "chosen": {"role": "assistant", "content": "Green."},
           "rejected": [{"role": "assistant", "content": "I won't say."}]}
    pairs = load_pairs(write(tmp_path / "p.jsonl", [rec]), tok, 128, "dpo")
    for side, text in ((0, "Green."), (1, "I won't say.")):
        response = [rec["chosen"]] if side == 0 else rec["rejected"]
        ids, _ = encode_chat(tok, PROMPT + response)
        assert pairs.inputs[side, 0, : len(ids) - 1].tolist() == ids[:-1]
        assert trained_text(tok, ids, pairs.targets[side, 0]) == [text + "<|eot_id|>"]
    assert pairs.summary == f"1 preference pair from {tmp_path / 'p.jsonl'}"


def test_string_pairs_use_the_template_or_plain_concatenation(chat_tokenizers, gqa_model, tmp_path):
    rec = {"prompt": "Name a colour.", "chosen": " Green.", "rejected": " No."}
    data = write(tmp_path / "p.jsonl", [rec])
    tok = chat_tokenizers["plain"]  # a template: a user turn and an assistant turn
    pairs = load_pairs(data, tok, 64, "orpo")
    ids, _ = encode_chat(tok, [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": " Green."}])
    assert trained_text(tok, ids, pairs.targets[0, 0]) == ["Green.<|eot_id|>"]  # the template trims
    sp = load_tokenizer(gqa_model)  # no template: BOS + prompt, response + EOS
    assert sp.chat_template is None
    pairs = load_pairs(data, sp, 64, "dpo")
    for side, key in ((0, "chosen"), (1, "rejected")):
        p, r = sp.encode(rec["prompt"], bos=True, eos=False), sp.encode(rec[key], bos=False, eos=True)
        ids = p + r
        assert pairs.inputs[side, 0, : len(ids) - 1].tolist() == ids[:-1]
        want = torch.tensor(ids[1:])
        want[: len(p) - 1] = IGNORE
        assert pairs.targets[side, 0, : len(ids) - 1].tolist() == want.tolist()
        assert (pairs.targets[side, 0, len(ids) - 1:] == IGNORE).all()  # padding


def test_a_response_cut_off_by_seq_len_is_refused_with_its_record(gqa_model, tmp_path):
    sp = load_tokenizer(gqa_model)
    long_prompt = "the clock tower of the island " * 10
    data = write(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c"},
                                        {"prompt": long_prompt, "chosen": " yes", "rejected": " no"}])
    with pytest.raises(ConfigError, match=rf"^{data}:2: the chosen response has no token within --seq-len 8$"):
        load_pairs(data, sp, 8, "dpo")


def test_mixed_styles_and_responses_without_an_assistant_turn_are_refused(chat_tokenizers, tmp_path):
    from slowllama.data.preference import encode_pair

    tok, where = chat_tokenizers["plain"], Where("f.jsonl", 3, line=True)
    with pytest.raises(ConfigError, match=r"^f\.jsonl:3: expected strings"):
        encode_pair(tok, {"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}], "rejected": "r"}, where)
    with pytest.raises(ConfigError, match=r"^f\.jsonl:3: 'rejected' holds no assistant message"):
        encode_pair(tok, {"prompt": PROMPT, "chosen": {"role": "assistant", "content": "c"},
                          "rejected": {"role": "user", "content": "r"}}, where)


def test_pair_rows_keep_each_pair_in_one_group():
    side, pair = pair_rows(torch.tensor([7, 3, 5, 1, 2]), 2)
    # groups (7, 3), (5, 1), (2): each its chosen rows, then its rejected rows
    assert side.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0, 1]
    assert pair.tolist() == [7, 3, 7, 3, 5, 1, 5, 1, 2, 2]
    assert [(s.tolist(), p.tolist()) for s, p in zip(side.split(4), pair.split(4))][1] == ([0, 0, 1, 1], [5, 1, 5, 1])


def test_a_pair_given_to_sft_says_which_methods_take_it(gqa_model, tmp_path):
    from slowllama.data.windows import load_data

    data = write(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": " b", "rejected": " c"}])
    with pytest.raises(ConfigError, match=rf"^{data}:1: expected one of .* train on it with --method dpo, ipo or orpo$"):
        load_data(data, load_tokenizer(gqa_model), 16)
