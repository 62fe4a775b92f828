"""Alpaca, ShareGPT, JSON arrays, Parquet and CSV: each read to the same examples as the equivalent records in
the formats slowllama had (messages, text JSONL), each refusal naming the record, the up-front line its format."""
import csv
import json

import pytest
import torch

from slowllama.data.windows import load_data
from slowllama.errors import ConfigError
from slowllama.formats.tokenizer import load_tokenizer
from tests.data.test_chat import LLAMA3_GENERATION
from tests.formats.test_tokenizers import make_llama3_like

ALPACA = [
    {"instruction": "Name the capital of France.", "input": "", "output": "Paris."},
    {"instruction": "Add the numbers.", "input": "12 and 30", "output": "42", "system": "Be exact."},
    {"instruction": "Say hi.", "output": "Hi!"},  # "input" is optional
]
# LLaMA-Factory's conversion (AlpacaDatasetConverter): instruction and non-empty input joined by one newline.
ALPACA_MESSAGES = [
    [{"role": "user", "content": "Name the capital of France."}, {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Add the numbers.\n12 and 30"},
     {"role": "assistant", "content": "42"}],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
]
SHAREGPT = [
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Ünïcödé?"},
                       {"from": "gpt", "value": "Yes: café 日本語"}, {"from": "human", "value": "And 1234?"},
                       {"from": "gpt", "value": "Fine.\n"}]},
    {"conversations": [{"from": "user", "value": "hello"}, {"from": "assistant", "value": "hello there"}]},
    {"system": "Speak French.", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "salut"}]},
]
SHAREGPT_MESSAGES = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ünïcödé?"},
     {"role": "assistant", "content": "Yes: café 日本語"}, {"role": "user", "content": "And 1234?"},
     {"role": "assistant", "content": "Fine.\n"}],
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello there"}],
    [{"role": "system", "content": "Speak French."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "salut"}],
]
TEXTS = ["The clock tower, chimes \"thirteen\" times.\nAt dusk.", "Anna, counted; the hens."]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = make_llama3_like(tmp_path_factory.mktemp("llama3"))
    (folder / "chat_template.jinja").write_text(LLAMA3_GENERATION)
    return load_tokenizer(folder)


def jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def write_parquet(path, columns: dict):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=2)  # several row groups, read batch by batch
    return path


def same(a, b):
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_alpaca_and_sharegpt_equal_their_messages(tok, tmp_path, train_on_prompt):
    for name, records, messages in (("alpaca", ALPACA, ALPACA_MESSAGES), ("sharegpt", SHAREGPT, SHAREGPT_MESSAGES)):
        want = load_data(jsonl(tmp_path / f"{name}-m.jsonl", [{"messages": m} for m in messages]), tok, 64,
                         train_on_prompt)
        same(load_data(jsonl(tmp_path / f"{name}.jsonl", records), tok, 64, train_on_prompt), want)
        (tmp_path / f"{name}.json").write_text(json.dumps(records), encoding="utf-8")  # a JSON array, as Alpaca ships
        same(load_data(tmp_path / f"{name}.json", tok, 64, train_on_prompt), want)


def test_tables_equal_their_jsonl(tok, tmp_path):
    texts = load_data(jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS]), tok, 48)
    chats = load_data(jsonl(tmp_path / "m.jsonl", [{"messages": m} for m in SHAREGPT_MESSAGES]), tok, 64)
    alpaca = load_data(jsonl(tmp_path / "a.jsonl", [{"messages": m} for m in ALPACA_MESSAGES]), tok, 64)
    same(load_data(write_csv(tmp_path / "t.csv", ["id", "text"], [[i, t] for i, t in enumerate(TEXTS)]), tok, 48),
         texts)
    same(load_data(write_csv(tmp_path / "m.csv", ["messages"], [[json.dumps(m)] for m in SHAREGPT_MESSAGES]), tok, 64),
         chats)
    rows = [[r["instruction"], r.get("input", ""), r["output"], r.get("system", "")] for r in ALPACA]
    same(load_data(write_csv(tmp_path / "a.csv", ["instruction", "input", "output", "system"], rows), tok, 64), alpaca)
    # Parquet: a list<struct> messages column, a string column of JSON, text; Alpaca beside tatsu-lab's "text"
    same(load_data(write_parquet(tmp_path / "t.parquet", {"text": TEXTS}), tok, 48), texts)
    same(load_data(write_parquet(tmp_path / "m.parquet", {"messages": SHAREGPT_MESSAGES}), tok, 64), chats)
    same(load_data(write_parquet(tmp_path / "j.parquet", {"messages": [json.dumps(m) for m in SHAREGPT_MESSAGES]}),
                   tok, 64), chats)
    a = write_parquet(tmp_path / "a.parquet", {"instruction": [r["instruction"] for r in ALPACA],
                                               "input": [r.get("input") for r in ALPACA],  # a null input is none
                                               "output": [r["output"] for r in ALPACA],
                                               "system": [r.get("system") for r in ALPACA], "text": ["x"] * 3})
    got = load_data(a, tok, 64)
    same(got, alpaca)
    assert got.summary == (f"3 Alpaca records from {a} (Parquet, columns instruction, input, output, system; "
                           f"ignored: text)")


def test_the_summary_states_the_format(tok, tmp_path):
    a = jsonl(tmp_path / "a.jsonl", ALPACA)
    assert load_data(a, tok, 64).summary == f"3 Alpaca records from {a}"
    s = jsonl(tmp_path / "s.jsonl", SHAREGPT)
    assert load_data(s, tok, 64).summary == f"3 ShareGPT records from {s}"
    mixed = jsonl(tmp_path / "x.jsonl", [{"text": "a b"}, {"prompt": "q", "completion": "a"}, {"text": "c"}])
    assert load_data(mixed, tok, 64).summary == f"3 records from {mixed} (2 text, 1 prompt/completion)"
    c = write_csv(tmp_path / "t.csv", ["text"], [[t] for t in TEXTS])
    assert load_data(c, tok, 48).summary == f"2 text records from {c} (CSV, columns text)"
    p = tmp_path / "p.txt"
    p.write_text(" ".join(TEXTS * 8))
    assert load_data(p, tok, 16).summary.startswith("plain text, ") and str(p) in load_data(p, tok, 16).summary


GOOD_A, GOOD_S = json.dumps(ALPACA[0]), json.dumps(SHAREGPT[1])


@pytest.mark.parametrize("name,lines,match", [
    ("a.jsonl", [GOOD_A, '{"instruction": "x", "output": 5}'], r"a.jsonl:2: expected a string for 'output'"),
    ("a.jsonl", [GOOD_A, '{"instruction": "x", "input": "y"}'], r"a.jsonl:2: expected one of .*Alpaca"),
    ("a.jsonl", [GOOD_A, '{"instruction": "x", "output": "y", "history": []}'], r"a.jsonl:2: expected one of"),
    ("a.jsonl", [GOOD_A, "", '{"text": "plain"}'],
     r"a.jsonl:3: a text record in a file whose first record \(.*a.jsonl:1\) is Alpaca"),
    ("s.jsonl", ['{"text": "plain"}', GOOD_S], r"s.jsonl:2: a ShareGPT record in a file whose first .* is text"),
    ("s.jsonl", [GOOD_S, json.dumps({"conversations": [{"from": "tool", "value": "x"}]})],
     r"s.jsonl:2: expected conversations\[0\]\[\"from\"\] to be one of system, human, .*not 'tool'"),
    ("s.jsonl", [GOOD_S, json.dumps({"conversations": [{"from": "human", "value": "x"}, {"from": "system",
                                                                                         "value": "y"}]})],
     r"s.jsonl:2: expected a system turn only first, not at conversations\[1\]"),
    ("s.jsonl", [GOOD_S, '{"conversations": []}'], r"s.jsonl:2: expected a non-empty list"),
    ("s.jsonl", [GOOD_S, '{"conversations": [{"from": "human", "value": "x", "weight": 0}]}'],
     r"s.jsonl:2: expected conversations\[0\] as"),
    ("m.jsonl", ['{"messages": "hi"}'], r'm.jsonl:1: "messages" must be a non-empty list'),  # not a text record
    ("a.json", ['[' + GOOD_A + ', {"text": "plain"}]'], r"a.json: record 2: a text record in a file whose first"),
    ("a.json", ['{"instruction": "x", "output": "y"}'], r"a.json: expected a JSON array"),
    ("a.json", ['[' + GOOD_A + ', {"instruction": "x", "output": 1}]'], r"a.json: record 2: expected a string for 'output'"),
])
def test_malformed_or_mixed_records_name_the_record(tok, tmp_path, name, lines, match):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=match):
        load_data(path, tok, 64)


def test_malformed_tables_name_the_record_and_column(tok, tmp_path):
    cases = [
        (write_csv(tmp_path / "m.csv", ["messages"], [[json.dumps(SHAREGPT_MESSAGES[0])], ["{not json"]]),
         r"m.csv: record 2: column 'messages' is not valid JSON"),
        (write_csv(tmp_path / "f.csv", ["text", "id"], [["a", "1"], ["b", "2", "3"]]),
         r"f.csv: record 2 has 3 fields, the header 2"),
        (write_csv(tmp_path / "n.csv", ["title", "body"], [["a", "b"]]),
         r"n.csv: no column set of a known kind among 'title', 'body'"),
        (write_parquet(tmp_path / "t.parquet", {"text": ["fine", None, "fine"]}),
         r"t.parquet: record 2: expected a string for column 'text'"),
        (write_parquet(tmp_path / "a.parquet", {"instruction": ["x", "y"], "output": ["z", None]}),
         r"a.parquet: record 2: expected a string for column 'output'"),
        (write_parquet(tmp_path / "m.parquet", {"messages": [SHAREGPT_MESSAGES[1], [{"role": "user", "content": None}]]}),
         r"m.parquet: record 2: messages\[0\] must be an object with string"),
    ]
    for path, match in cases:
        with pytest.raises(ConfigError, match=match):
            load_data(path, tok, 64)
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(ConfigError, match=r"x.parquet: not a readable Parquet file"):
        load_data(tmp_path / "x.parquet", tok, 64)


def test_parquet_without_pyarrow_is_one_line(tok, tmp_path, monkeypatch):
    import sys

    path = write_parquet(tmp_path / "t.parquet", {"text": TEXTS})
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r't.parquet: reading Parquet needs pyarrow \(pip install "slowllama\[parquet\]"\)'):
        load_data(path, tok, 64)


def test_finetune_states_the_format_up_front(tmp_path, capsys):
    from slowllama.run.loop import finetune
    from tests.cli.test_gen_cli import make_model

    model = make_model(tmp_path / "m")
    data = jsonl(tmp_path / "a.jsonl", ALPACA)
    finetune(model_dir=model, data=data, val_data=jsonl(tmp_path / "s.jsonl", SHAREGPT), out=tmp_path / "out",
             iters=1, batch_size=2, seq_len=128, device="cpu")
    out = capsys.readouterr().out
    assert f"data: 3 Alpaca records from {data}\n" in out
    assert f"validation data: 3 ShareGPT records from {tmp_path / 's.jsonl'}\n" in out
