"""Issue 30: preference tuning (DPO, IPO, ORPO) streamed, against an in-memory reference written here.

The reference follows trl's published definitions (DPOTrainer's sigmoid and ipo losses, ORPOTrainer's
odds-ratio loss) on the whole model held in memory (tests/reference.py's Transformer), with plain autograd
and torch.optim; its log-probabilities are trl's selective_log_softmax (logit minus logsumexp), not the
log_softmax the library uses. The reference model is a second, frozen copy of the starting weights.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from slowllama.data.preference import pair_rows
from slowllama.engine.optim import OptimConfig
from slowllama.engine.preference import (
    METRICS,
    PreferenceConfig,
    reference_logps,
    reference_path,
)
from slowllama.engine.store import BlockStore, prepare
from slowllama.engine.trainer import IGNORE, TrainConfig, Trainer
from slowllama.formats import open_checkpoint
from slowllama.formats.meta import MetaCheckpoint
from slowllama.model.lora import Adapters, LoraConfig
from tests.cli_helpers import FINETUNE, run_cli
from tests.reference import lora_reference, reference_model, stored_params

PAIRS, SEQ = 4, 12
LORA = LoraConfig(rank=4, alpha=8.0, targets=("wq", "wv"))


@pytest.fixture(scope="module")
def pref_model(model_factory):
    return model_factory("pref", dim=32, n_layers=2, n_heads=4, n_kv_heads=2)


def make_pairs(vocab: int, seed: int):
    """chosen and rejected (inputs, targets), each (PAIRS, SEQ): a shared prompt masked out of the targets,
    responses of different lengths, padding IGNOREd."""
    g = torch.Generator().manual_seed(seed)
    out = []
    prompt = torch.randint(0, vocab, (PAIRS, 4), generator=g)
    for _ in range(2):
        toks = torch.cat([prompt, torch.randint(0, vocab, (PAIRS, SEQ - 3), generator=g)], dim=1)
        x, y = toks[:, :-1].clone(), toks[:, 1:].clone()
        y[:, :3] = IGNORE  # the prompt's targets: the response begins at token 4
        for r in range(PAIRS):
            y[r, SEQ - 1 - int(torch.randint(0, 4, (1,), generator=g)):] = IGNORE  # a shorter response
        out.append((x, y))
    return out


# ---- the reference: trl's definitions, on the whole model in memory ----

def trl_logps(logits, labels, average: bool):
    """trl's per-sequence log-probability: selective_log_softmax summed over the loss mask (averaged for IPO/ORPO)."""
    mask = labels != IGNORE
    labels = torch.where(mask, labels, 0)
    per_token = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    s = (per_token * mask).sum(-1)
    return s / mask.sum(-1) if average else s


def trl_step(model, ref_model, pairs, method: str, beta: float):
    """trl's loss of one batch of pairs, backpropagated; returns (loss, the logged rewards)."""
    (cx, cy), (rx, ry) = pairs
    x, y = torch.cat([cx, rx]), torch.cat([cy, ry])  # trl's concatenated forward
    logits = model(x).float()
    avg = method in ("ipo", "orpo")
    logps = trl_logps(logits, y, avg)
    pc, pr = logps[:PAIRS], logps[PAIRS:]
    if method == "orpo":
        nll = F.cross_entropy(logits[:PAIRS].flatten(0, 1), y[:PAIRS].flatten(), ignore_index=IGNORE)
        log_odds = (pc - pr) - (torch.log1p(-torch.exp(pc)) - torch.log1p(-torch.exp(pr)))
        loss = nll - (beta * F.logsigmoid(log_odds)).mean()
        chosen, rejected = beta * pc.detach(), beta * pr.detach()
    else:
        with torch.no_grad():
            ref = trl_logps(ref_model(x).float(), y, avg)
        rc, rr = ref[:PAIRS], ref[PAIRS:]
        z = (pc - pr) - (rc - rr)
        losses = -F.logsigmoid(beta * z) if method == "dpo" else (z - 1 / (2 * beta)) ** 2
        loss = losses.mean()
        chosen, rejected = beta * (pc - rc).detach(), beta * (pr - rr).detach()
    loss.backward()
    return loss.item(), {"logps/chosen": pc.detach().mean().item(), "logps/rejected": pr.detach().mean().item(),
                         "rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
                         "rewards/accuracies": (chosen > rejected).float().mean().item(),
                         "rewards/margins": (chosen - rejected).mean().item()}


def reference_run(model_dir, batches, method, beta, lr, clip=0.0):
    model, ref_model = reference_model(model_dir), reference_model(model_dir).requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    logged = []
    for pairs in batches:
        logged.append(trl_step(model, ref_model, pairs, method, beta))
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, logged


# ---- the streamed run ----

def streamed_batch(pairs, ref: torch.Tensor | None, group: int):
    """The rows as the run lays them out (data/preference.py), with (side, reference logp) per row."""
    (cx, cy), (rx, ry) = pairs
    side, pair = pair_rows(torch.arange(PAIRS), group)
    xs, ys = torch.stack([cx, rx]), torch.stack([cy, ry])
    extra = torch.stack([side.double(), ref.view(2, PAIRS)[side, pair].double() if ref is not None
                         else torch.zeros(len(side), dtype=torch.float64)], dim=1)
    return xs[side, pair], ys[side, pair], extra


def streamed_run(model_dir, work, batches, method, beta, lr, micro=None, clip=0.0, lora=None, ram_budget=0):
    ckpt = open_checkpoint(model_dir)
    store = prepare(ckpt, work / "store", ckpt.checkpoint_dtype() if lora else torch.float32)
    cfg = TrainConfig(optim=OptimConfig("sgd", lr=lr), micro_batch=2 * micro if micro else None, clip_grad_norm=clip,
                      lora=lora, ram_budget=ram_budget, preference=PreferenceConfig(method, beta), seed=3)
    refs = []
    for pairs in batches:
        (cx, cy), (rx, ry) = pairs
        refs.append(reference_logps(store, work / f"ref{len(refs)}", torch.cat([cx, rx]), torch.cat([cy, ry]),
                                    torch.device("cpu"), chunk_rows=3) if method != "orpo" else None)
    tr = Trainer(store, work, torch.device("cpu"), cfg)
    start = {m: {k: t.detach().clone() for k, t in tr.adapters.named(m).items()} for m in tr.adapters.params} if lora else None
    results = [tr.train_step(*streamed_batch(pairs, ref, micro or PAIRS)) for pairs, ref in zip(batches, refs)]
    tr.close()
    return store, results, tr, start


def assert_logged(results, logged):
    # Log-probabilities are fp32 sums near 40, 4e-6 apart, summed in another order when the rows run in
    # another micro-batch: beta times their differences agree to a few of those spacings.
    for res, (loss, metrics) in zip(results, logged):
        assert res.loss == pytest.approx(loss, abs=1e-5)
        assert set(metrics) <= set(res.metrics) <= set(METRICS)
        for k, v in metrics.items():
            assert res.metrics[k] == pytest.approx(v, abs=1e-5), k


@pytest.mark.parametrize("method,micro,clip,tied", [
    ("dpo", None, 0.0, False),
    ("dpo", 1, 0.05, False),  # micro-batches of one pair each, and a clipped global norm
    ("dpo", 2, 0.0, True),  # a tied Hugging Face Llama: the reference pass keeps the embedding for the output
    ("ipo", 3, 0.0, False),  # micro-batches of 3 and 1 pairs
    ("orpo", None, 0.0, False),
    ("orpo", 2, 0.05, False),
])
def test_streamed_steps_equal_trl_definitions_in_memory(pref_model, tied_hf, tmp_path, method, micro, clip, tied):
    """Two SGD steps (the second with rewards away from zero): every parameter within 1e-6, and the loss and
    trl's logged rewards too."""
    pref_model = tied_hf if tied else pref_model
    vocab = open_checkpoint(pref_model).args.vocab_size
    batches = [make_pairs(vocab, 1), make_pairs(vocab, 2)]
    beta, lr = (0.5, 0.3) if method != "ipo" else (0.5, 0.05)
    store, results, _, _ = streamed_run(pref_model, tmp_path, batches, method, beta, lr, micro, clip)
    model, logged = reference_run(pref_model, batches, method, beta, lr, clip)
    assert_logged(results, logged)
    got, before = stored_params(store), reference_model(pref_model).state_dict()
    moved = 0.0
    for k, want in model.state_dict().items():
        torch.testing.assert_close(got[k], want, atol=1e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
        moved = max(moved, (want - before[k]).abs().max().item())
    assert moved > 1e-3  # the steps changed the weights by far more than the tolerance
    if method != "orpo":
        assert results[1].metrics["rewards/margins"] != 0.0  # the second step's policy differs from the reference


def test_lora_dpo_step_equals_in_memory_adapters(pref_model, tmp_path):
    vocab = MetaCheckpoint(pref_model).args.vocab_size
    batches = [make_pairs(vocab, 3), make_pairs(vocab, 4)]
    _, results, _, start = streamed_run(pref_model, tmp_path, batches, "dpo", 0.5, 0.5, micro=2, lora=LORA)
    model, ref = lora_reference(pref_model, start, LORA.targets, LORA.alpha / LORA.rank)
    opt = torch.optim.SGD([p for m in ref.values() for p in m.values()], lr=0.5)
    ref_model = reference_model(pref_model).requires_grad_(False)  # no adapters: the starting model
    logged = []
    for pairs in batches:
        logged.append(trl_step(model, ref_model, pairs, "dpo", 0.5))
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert_logged(results, logged)
    saved = Adapters.load(tmp_path / "lora_adapters.blk")
    for m, params in ref.items():
        for k, want in params.items():
            torch.testing.assert_close(saved.named(m)[k], want.detach(), atol=1e-6, rtol=0)
    assert any(p.abs().sum() > 0 for m in ref.values() for k, p in m.items() if k.endswith(".B"))  # B trained


def test_reference_pass_reads_each_module_once_and_is_reused(pref_model, tmp_path):
    """One read of every module for the whole data set (7 chunks of 3 rows), the log-probabilities of the
    whole model in memory, and none at all the second time: the saved file is read back."""
    ckpt = MetaCheckpoint(pref_model)
    store = prepare(ckpt, tmp_path / "store")
    vocab = ckpt.args.vocab_size
    rows = [make_pairs(vocab, s) for s in (5, 6, 7, 8, 9)]
    x = torch.cat([t for p in rows for t in (p[0][0], p[1][0])])
    y = torch.cat([t for p in rows for t in (p[0][1], p[1][1])])
    store = BlockStore(store.root)  # a fresh read counter
    logps = reference_logps(store, tmp_path, x, y, torch.device("cpu"), chunk_rows=3)
    assert dict(store.reads) == {m: 1 for m in store.trainable}
    with torch.no_grad():
        want = trl_logps(reference_model(pref_model)(x).float(), y, average=False)
    torch.testing.assert_close(logps, want, atol=1e-5, rtol=0)
    assert reference_path(tmp_path).is_file() and not list(reference_path(tmp_path).parent.glob("chunk.*"))
    store.reads.clear()
    stale = reference_path(tmp_path).parent / "chunk.00002.blk"  # as a kill after the result, before the cleanup
    stale.write_bytes(b"")
    assert torch.equal(reference_logps(store, tmp_path, x, y, torch.device("cpu"), chunk_rows=3), logps)
    assert not store.reads and not stale.exists()
    # Other rows in the same work dir (a new run on other data): computed anew, not the saved numbers.
    other = reference_logps(store, tmp_path, x[:5], y[:5].flip(1), torch.device("cpu"), chunk_rows=3)
    assert dict(store.reads) == {m: 1 for m in store.trainable}
    with torch.no_grad():
        want = trl_logps(reference_model(pref_model)(x[:5]).float(), y[:5].flip(1), average=False)
    torch.testing.assert_close(other, want, atol=1e-5, rtol=0)


class Stop(Exception):
    pass


def test_reference_pass_cut_short_resumes_from_its_chunks(pref_model, tmp_path, monkeypatch):
    """A pass stopped between two chunks of layers.0 goes on from there: it reads layers.0 once more (for the
    chunks still below it) and every later module once, and its numbers are the uninterrupted ones."""
    from slowllama import faults

    ckpt = MetaCheckpoint(pref_model)
    store = prepare(ckpt, tmp_path / "store")
    (cx, cy), (rx, ry) = make_pairs(ckpt.args.vocab_size, 11)
    x, y = torch.cat([cx, rx]), torch.cat([cy, ry])
    want = reference_logps(store, tmp_path / "straight", x, y, torch.device("cpu"), chunk_rows=2)
    seen = {"n": 0}

    def point(event):
        if event == "reference_chunk":
            seen["n"] += 1
            if seen["n"] == 6:  # 4 chunks a module: the second chunk through layers.0
                raise Stop

    monkeypatch.setattr(faults, "point", point)
    with pytest.raises(Stop):
        reference_logps(store, tmp_path / "cut", x, y, torch.device("cpu"), chunk_rows=2)
    assert not reference_path(tmp_path / "cut").exists()
    store = BlockStore(store.root)
    got = reference_logps(store, tmp_path / "cut", x, y, torch.device("cpu"), chunk_rows=2)
    assert torch.equal(got, want)
    assert not list((tmp_path / "cut" / "reference").glob("chunk.*"))
    # Not the embedding (every chunk is past it), layers.0 once more for its other two chunks, the rest once.
    assert dict(store.reads) == {m: 1 for m in store.trainable[1:]}
    assert seen["n"] == 6 + 2 + 4 * (len(store.trainable) - 2)


# ---- the command line: refusals, logs, kill and resume ----

def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


PAIR_RECORDS = [{"prompt": "The clock tower", "chosen": " chimes thirteen times at dusk.", "rejected": " is quiet."},
                {"prompt": "Its keeper,", "chosen": " Idris Quenby, winds it.", "rejected": " nobody."},
                {"prompt": "Bring a coat,", "chosen": " it is cold.", "rejected": " it is hot on the island today."},
                {"prompt": "May I come", "chosen": " with you?", "rejected": " to tea?"}]
ARGS = ["--seq-len", "16", "--batch-size", "2", "--device", "cpu", "--iters", "3", "--lr", "0.05", "--momentum", "0.9",
        "--ram-budget", "0", "--seed", "7"]


def error_lines(r) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]


@pytest.mark.parametrize("bad,says", [
    ({"prompt": "p", "chosen": 5, "rejected": "r"}, "expected strings for 'prompt', 'chosen' and 'rejected'"),
    ({"prompt": "p", "chosen": "c"}, "expected {\"prompt\", \"chosen\", \"rejected\"} records"),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": {"role": "assistant"}, "rejected": "r"},
     "must be an object with string \"role\" and \"content\""),
])
def test_malformed_record_is_refused_in_one_line_with_its_number(pref_model, tmp_path, bad, says):
    data = write_jsonl(tmp_path / "pairs.jsonl", [PAIR_RECORDS[0], bad, PAIR_RECORDS[1]])
    r = run_cli(pref_model, "--data", data, "--out", tmp_path / "out", "--work-dir", tmp_path / "work",
                "--method", "dpo", *ARGS)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = error_lines(r)
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{data}:2:" in errors[0] and says in errors[0], errors[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()  # refused before any write


@pytest.mark.parametrize("kind", ["prompt/completion", "text file"])
def test_dpo_on_sft_data_is_refused_in_one_line(pref_model, tmp_path, kind):
    if kind == "text file":
        data = tmp_path / "notes.txt"
        data.write_text("The clock tower of Vellmoor Island chimes thirteen times at dusk.\n")
        says = "--method dpo needs"
    else:
        data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "The clock", "completion": " tower."}])
        says = f"{data}:1: preference tuning needs"
    r = run_cli(pref_model, "--data", data, "--out", tmp_path / "out", "--work-dir", tmp_path / "work",
                "--method", "dpo", *ARGS)
    assert r.returncode == 2, r.stderr[-2000:]
    errors = error_lines(r)
    assert len(errors) == 1 and says in errors[0], r.stderr[-2000:]
    assert kind == "text file" or "this is a prompt/completion record" in errors[0]


def test_options_are_checked():
    """--beta and the options a preference loss has no use for, refused in one line naming them."""
    from slowllama.errors import ConfigError
    from slowllama.run.options import RunOptions

    RunOptions(model_dir="m", data="d", method="orpo", beta=0.2).validate()
    for extra, says in (({"beta": 0.0}, "--beta must be a positive number"),
                        ({"beta": float("nan")}, "--beta must be a positive number"),
                        ({"method": "kto"}, "--method 'kto': expected one of sft, dpo, ipo, orpo"),
                        ({"train_on_prompt": True}, "--method dpo: --train-on-prompt does not apply"),
                        ({"val_fraction": 0.25}, "--method dpo: --val-data and --val-fraction")):
        with pytest.raises(ConfigError, match="^" + re.escape(says)):
            RunOptions(model_dir="m", data="d", **{"method": "dpo", **extra}).validate()


def log_records(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
@pytest.mark.crash
def test_kill_during_reference_pass_and_training_resumes_bit_identical(pref_model, tmp_path):
    """SIGKILL before a module of the reference pass, between two of its chunks, after its result and inside a
    training step's backward pass; each resumed run ends with the uninterrupted run's export and logged losses
    and rewards, and leaves no chunk behind."""
    from tests.engine.test_crash import assert_same_export, load_export

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIR_RECORDS)
    common = ["--data", data, "--method", "dpo", "--beta", "0.5", "--dropout", "0.1", "--micro-batch", "1", *ARGS]

    def run(name, kill=None, resume=False):
        base = tmp_path / name
        return run_cli(pref_model, *common, "--out", base / "out", "--work-dir", base / "work",
                       *(["--resume"] if resume else []), kill=kill)

    r = run("straight")
    assert r.returncode == 0, r.stderr[-3000:]
    want, want_log = load_export(tmp_path / "straight" / "out"), log_records(tmp_path / "straight" / "out")
    assert [rec["iter"] for rec in want_log] == [0, 1, 2] and all("rewards/margins" in rec for rec in want_log)
    # 4 pairs in chunks of 2 rows: 4 chunks a module. reference:3 comes before layers.1; reference_chunk:6
    # after the second chunk through layers.0, so half the chunks are a module ahead of the others.
    # reference_done:1 comes once the result is durable, before the chunks go.
    for kill in ("reference:3", "reference_chunk:6", "reference_done:1", "backward:4"):
        name = kill.replace(":", "-")
        r = run(name, kill)
        assert r.returncode == -9, f"{kill}: expected death by SIGKILL, rc {r.returncode}\n{r.stderr[-3000:]}"
        if kill.startswith("reference"):  # the pass was cut short, or its chunks are left
            assert reference_path(tmp_path / name / "work").exists() == (kill == "reference_done:1")
            assert list((tmp_path / name / "work" / "reference").glob("chunk.*"))
        r = run(name, resume=True)
        assert r.returncode == 0, f"{kill}: resume failed\n{r.stderr[-3000:]}"
        assert_same_export(load_export(tmp_path / name / "out"), want, kill)
        assert not list((tmp_path / name / "work" / "reference").glob("chunk.*"))
        got = {rec["iter"]: rec for rec in log_records(tmp_path / name / "out")}
        for rec in want_log:
            for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
                assert got[rec["iter"]][k] == rec[k], f"{kill}: iteration {rec['iter']}'s {k}"


@pytest.mark.slow
@pytest.mark.distributed
def test_dpo_on_two_ranks_equals_one_process(pref_model, tmp_path):
    """2 processes x 1 pair against 1 x 2 pairs: dropout on micro-batches of one pair (seeded by their global
    index), two accumulated batches and an active clipping norm; one reference pass, by the host's writer."""
    from tests.engine.test_distributed import exported, torchrun

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIR_RECORDS)
    opts = ["--data", data, "--method", "dpo", "--beta", "0.5", "--dropout", "0.1", "--micro-batch", "1",
            "--grad-accum", "2", "--clip-grad-norm", "0.05", *ARGS]
    one = [*opts, "--out", tmp_path / "o1", "--work-dir", tmp_path / "w1"]
    r = run_cli(pref_model, *one)
    assert r.returncode == 0, r.stderr[-3000:]
    # The last --batch-size given wins: 1 pair per rank.
    r = torchrun(2, FINETUNE, pref_model, *opts, "--batch-size", "1", "--out", tmp_path / "o2", "--work-dir",
                 tmp_path / "w2")
    assert r.returncode == 0, r.stderr[-3000:]
    a, b, base = exported(tmp_path / "o1"), exported(tmp_path / "o2"), exported(pref_model)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-4, "the runs did not train"
    for x, y in zip(log_records(tmp_path / "o1"), log_records(tmp_path / "o2")):
        assert y["grad_norm"] > 0.05  # clipping was active
        for k in ("loss", "grad_norm", "rewards/chosen", "rewards/margins", "rewards/accuracies"):
            assert y[k] == pytest.approx(x[k], abs=1e-5), k
