"""Instruction data (JSONL), validation loss and gradient accumulation, against in-memory references."""
import json

import pytest
import torch
import torch.nn.functional as F

from slowllama.data.windows import IGNORE, Examples, TokenWindows, load_data
from slowllama.engine.optim import OptimConfig
from slowllama.engine.store import prepare
from slowllama.engine.trainer import TrainConfig, Trainer
from slowllama.errors import ConfigError
from slowllama.formats.meta import MetaCheckpoint
from slowllama.formats.tokenizer import Tokenizer
from slowllama.inference.evaluate import evaluate
from slowllama.run.loop import finetune
from tests.reference import reference_model, reference_step, stored_params


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_prompt_tokens_are_masked_and_eos_ends_the_completion(gqa_model, tmp_path):
    tok = Tokenizer(MetaCheckpoint(gqa_model).tokenizer)
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: the fox?", "completion": " A: quick."},
                                               {"text": "The lazy dog."}])
    ex = Examples.from_records(path, tok, seq_len=32)
    prompt = tok.encode("Q: the fox?", bos=True)
    completion = tok.encode(" A: quick.", bos=False, eos=True)
    x, y = ex.inputs[0], ex.targets[0]
    n = len(prompt) + len(completion)
    assert x[: n - 1].tolist() == (prompt + completion)[:-1]
    assert (y[: len(prompt) - 1] == IGNORE).all()
    assert y[len(prompt) - 1: n - 1].tolist() == completion  # EOS is a target
    assert (y[n - 1:] == IGNORE).all()  # padding never counts
    text = tok.encode("The lazy dog.", bos=True, eos=True)
    assert ex.targets[1][: len(text) - 1].tolist() == text[1:]


@pytest.mark.parametrize("line,match", [
    ("{not json", r"d.jsonl:2: not valid JSON"),
    ('{"prompt": "a"}', r"d.jsonl:2: expected"),
    ('{"text": 5}', r"d.jsonl:2: expected"),
    ('["text"]', r"d.jsonl:2: expected"),
])
def test_malformed_record_names_its_line(gqa_model, tmp_path, line, match):
    tok = Tokenizer(MetaCheckpoint(gqa_model).tokenizer)
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ConfigError, match=match):
        load_data(path, tok, 16)


def test_padded_examples_train_like_autograd(gqa_model, tmp_path):
    """Right padding is attention-safe under the causal mask: the step equals the reference on the same batch."""
    tok = Tokenizer(MetaCheckpoint(gqa_model).tokenizer)
    recs = [{"prompt": f"Day {i}:", "completion": f" the hen laid {i} eggs."} for i in range(6)]
    ex = Examples.from_records(_write_jsonl(tmp_path / "d.jsonl", recs), tok, seq_len=24)
    store = prepare(MetaCheckpoint(gqa_model), tmp_path / "store")
    optim = OptimConfig("sgd", lr=0.1)
    tr = Trainer(store, tmp_path, torch.device("cpu"), TrainConfig(optim=optim, seed=2, dropout=0.1, micro_batch=2))
    model = reference_model(gqa_model, dropout=0.1)
    opt = optim.make(list(model.parameters()))
    for step in range(2):
        batch = ex.batch(step, 4, seed=2)
        assert tr.train_step(*batch).loss == reference_step(model, opt, *batch, seed=2, step=step, micro_batch=2)
    tr.close()
    got = stored_params(store)
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())
    # and padding really is inert: whatever the pad tokens are, the real positions' logits stay
    n = len(tok.encode("Day 0:", bos=True)) + len(tok.encode(" the hen laid 0 eggs.", bos=False, eos=True))
    x = ex.inputs[:1].clone()
    x2 = x.clone()
    x2[0, n:] = 7
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x)[0, :n], model(x2)[0, :n])


def test_validation_loss_equals_the_reference(gqa_model, tmp_path):
    w = TokenWindows(list(range(3, 200)), seq_len=16)
    batches = w.fixed_batches(3, n=2)
    store = prepare(MetaCheckpoint(gqa_model), tmp_path / "store")
    total, n = evaluate(store.module_tensors, store.args, batches, torch.device("cpu"))
    model = reference_model(gqa_model, dropout=0.5).eval()
    assert n == sum(int((y != IGNORE).sum()) for _, y in batches)
    with torch.no_grad():
        want = sum(F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item() / n for x, y in batches)
    assert total / n == pytest.approx(want, abs=1e-6)


def test_grad_accum_and_val_fraction_through_finetune(gqa_model, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("Anna counted the hens in the field. One, two, three. " * 30)
    summary = finetune(model_dir=gqa_model, data=data, out=tmp_path / "out", iters=2, batch_size=2, seq_len=16,
                       lr=0.05, grad_accum=3, val_fraction=0.2, eval_every=1, seed=9)
    recs = [json.loads(l) for l in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in recs if "val_loss" in r] == [0, 1, 2]
    assert [r["tokens"] for r in recs if "loss" in r] == [2 * 3 * 16] * 2
    # the same two steps in memory: three batches of two, accumulated, then one SGD step
    tok = Tokenizer(MetaCheckpoint(gqa_model).tokenizer)
    train, _ = TokenWindows.from_file(data, tok, 16).split(0.2)
    model = reference_model(gqa_model)
    opt = OptimConfig("sgd", lr=0.05).make(list(model.parameters()))
    for step in range(2):
        parts = [train.batch(step * 3 + k, 2, seed=9) for k in range(3)]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        assert summary["losses"][step] == reference_step(model, opt, x, y, seed=9, step=step, micro_batch=2)
    tuned = MetaCheckpoint(tmp_path / "out")
    for module in ("layers.0", "output"):
        for p, t in tuned.read_module(module).items():
            assert torch.equal(t, model.state_dict()[f"{module}.{p}"]), (module, p)
