"""tools/perplexity.py and slowllama.inference.evaluate: the loss of transformers' own forward, each module read once."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from slowllama.cli import perplexity
from slowllama.data.windows import load_data
from slowllama.formats import open_checkpoint
from slowllama.formats.tokenizer import load_tokenizer
from slowllama.inference.evaluate import eval_batches, evaluate
from slowllama.model.transformer import module_names
from tests.cli.test_gen_cli import make_model

transformers = pytest.importorskip("transformers")

TEXT = ("It was a bright cold day in April, and the clocks were striking thirteen. Winston Smith, his chin nuzzled "
        "into his breast in an effort to escape the vile wind, slipped quickly through the glass doors. ") * 3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {k: make_model(tmp_path_factory.mktemp(k), tied=k == "tied", seed=1) for k in ("untied", "tied")}


def hf_token_losses(folder, ids: list[int], seq_len: int) -> list[float]:
    """Each token's loss (after the first) from transformers, in windows of seq_len + 1 consecutive tokens,
    the last ending at the text's end; a token scored by an earlier window keeps that score."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    losses: dict[int, float] = {}
    starts = list(range(0, len(ids) - seq_len, seq_len)) + [len(ids) - seq_len - 1]
    for a in starts:
        w = torch.tensor([ids[a: a + seq_len + 1]])
        with torch.no_grad():
            lp = model(w[:, :-1]).logits[0].double().log_softmax(-1)
        for j in range(seq_len):
            losses.setdefault(a + 1 + j, -float(lp[j, w[0, j + 1]]))
    return [losses[p] for p in sorted(losses)]


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_perplexity_equals_transformers_on_text(models, kind, tmp_path, capsys):
    folder = models[kind]
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    assert perplexity.main([str(folder), "--data", str(data), "--seq-len", "24", "--batch-size", "3",
                            "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out.rstrip("\n").rpartition("\n")[2])
    ids = transformers.AutoTokenizer.from_pretrained(folder)(TEXT).input_ids
    assert (len(ids) - 1) % 24 != 0  # so that the last window overlaps the one before it
    want = hf_token_losses(folder, ids, 24)
    assert got["tokens"] == len(want) == len(ids) - 1
    mean = sum(want) / len(want)
    assert got["loss"] == pytest.approx(mean, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(mean), rel=1e-5)


def test_jsonl_records_are_scored_whole(models, tmp_path):
    """{"text": ...} records, BOS + text + EOS each, padded into batches: the same loss as one at a time."""
    folder = models["untied"]
    texts = ["Hello there, general Kenobi.", "A short one.", TEXT[:150]]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    got = perplexity.run(model_dir=str(folder), data=str(tmp_path / "d.jsonl"), seq_len=64, batch_size=2,
                         device="cpu")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([(tok(t).input_ids + [tok.eos_token_id])[:65]])
        with torch.no_grad():
            logits = model(ids[:, :-1]).logits[0]
        total += float(F.cross_entropy(logits.double(), ids[0, 1:], reduction="sum"))
        n += ids.shape[1] - 1
    assert got["tokens"] == n
    assert got["loss"] == pytest.approx(total / n, rel=1e-5)


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_each_module_is_read_once_for_the_whole_file(models, kind, tmp_path):
    folder = models[kind]
    ckpt = open_checkpoint(folder)
    data = load_data_text(folder, tmp_path, 16)
    batches = eval_batches(data, 2)
    assert len(batches) > 3
    reads = []

    def read(name):
        reads.append(name)
        return ckpt.read_module(name)

    loss_sum, n = evaluate(read, ckpt.args, batches, torch.device("cpu"))
    assert reads == module_names(ckpt.args)
    assert n == len(data.tokens) - 1 and math.isfinite(loss_sum) and loss_sum > 0
    # Activations kept in host RAM between modules give the same loss.
    assert evaluate(ckpt.read_module, ckpt.args, batches, torch.device("cpu"), offload=True) == (loss_sum, n)


def load_data_text(folder, tmp_path, seq_len):
    path = tmp_path / "eval.txt"
    path.write_text(TEXT)
    return load_data(path, load_tokenizer(folder), seq_len)


def test_every_text_token_is_a_target_once(models, tmp_path):
    data = load_data_text(models["untied"], tmp_path, 10)
    batches = eval_batches(data, 4)
    ys = torch.cat([y for _, y in batches])
    assert int((ys != -100).sum()) == len(data.tokens) - 1
    scored = torch.cat([y[y != -100] for y in ys])
    assert sorted(scored.tolist()) == sorted(data.tokens[1:].tolist())


def test_errors_are_one_line(models, tmp_path, capsys):
    folder = models["untied"]
    (tmp_path / "short.txt").write_text("Hi")
    for extra, what in ((["--data", str(tmp_path / "missing.txt")], "missing.txt"),
                        (["--data", str(tmp_path / "short.txt"), "--seq-len", "64"], "short.txt"),
                        (["--data", str(tmp_path / "short.txt"), "--seq-len", "100000"], "--seq-len"),
                        (["--data", str(tmp_path / "short.txt"), "--batch-size", "0"], "--batch-size")):
        assert perplexity.main([str(folder), "--device", "cpu", *extra]) == 2
        err = capsys.readouterr()
        assert err.out == "" and err.err.count("\n") == 1 and what in err.err
