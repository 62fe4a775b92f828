"""Meta's format: real model shapes, re-sharding, padded vocabularies, Code Llama's rope_theta."""
import json
import shutil

import pytest
import torch

from slowllama.engine.store import export_store, prepare
from slowllama.formats.meta import MetaCheckpoint, expected_shapes, load_tensor_file
from slowllama.model.transformer import ModelArgs, build_module, module_names

# params.json as Meta ships them, with the shapes their checkpoints hold.
REAL = {
    "llama-2-7b": ({"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
                    "vocab_size": -1}, {"feed_forward.w1.weight": (11008, 4096), "attention.wk.weight": (4096, 4096)}),
    "llama-2-13b": ({"dim": 5120, "multiple_of": 256, "n_heads": 40, "n_layers": 40, "norm_eps": 1e-05,
                     "vocab_size": -1}, {"feed_forward.w1.weight": (13824, 5120), "attention.wk.weight": (5120, 5120)}),
    "llama-2-70b": ({"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8,
                     "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1},
                    {"feed_forward.w1.weight": (28672, 8192), "attention.wk.weight": (1024, 8192)}),
    "codellama-34b": ({"dim": 8192, "n_layers": 48, "n_heads": 64, "n_kv_heads": 8, "vocab_size": 32000,
                       "multiple_of": 256, "ffn_dim_multiplier": 1.0, "norm_eps": 1e-5, "rope_theta": 1000000},
                      {"feed_forward.w2.weight": (8192, 22016), "attention.wv.weight": (1024, 8192)}),
    "codellama-7b": ({"dim": 4096, "n_layers": 32, "n_heads": 32, "multiple_of": 256, "ffn_dim_multiplier": 1.0,
                      "norm_eps": 1e-5, "rope_theta": 1000000, "vocab_size": 32016},
                     {"feed_forward.w1.weight": (11008, 4096)}),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_model_shapes(tmp_path, name):
    params, known = REAL[name]
    (tmp_path / "params.json").write_text(json.dumps(params))
    args = ModelArgs.from_json(tmp_path / "params.json")
    if args.vocab_size == -1:
        args.vocab_size = 32000  # from Llama 2's tokenizer
    shapes = expected_shapes(args, "layers.0")
    for k, v in known.items():
        assert shapes[k] == v
    for m in module_names(args)[:2] + ["norm", "output"]:
        module = build_module(m, args)  # on the meta device: no memory
        assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == expected_shapes(args, m)


def test_reshard_round_trip_is_bit_identical(gqa_model, tmp_path):
    ckpt = MetaCheckpoint(gqa_model)
    store = prepare(ckpt, tmp_path / "store")
    export_store(store, gqa_model, tmp_path / "one", n_shards=1)
    assert len(list((tmp_path / "one").glob("*.pth"))) == 1
    again = prepare(MetaCheckpoint(tmp_path / "one"), tmp_path / "store1")
    export_store(again, tmp_path / "one", tmp_path / "two", n_shards=2)
    for shard in ckpt.shards:
        a = torch.load(shard, weights_only=True)
        b = load_tensor_file(tmp_path / "two" / shard.name)
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_code_llama_style_checkpoint_trains_and_exports(model_factory, tmp_path):
    """rope_theta 1e6 and a vocabulary padded beyond the tokenizer's pieces, as in Code Llama."""
    src = model_factory("codellama", dim=64, n_layers=2, n_heads=4, rope_theta=1e6, explicit_vocab=True,
                        dtype=torch.bfloat16)
    model = tmp_path / "m"
    shutil.copytree(src, model)
    params = json.loads((model / "params.json").read_text())
    pieces = params["vocab_size"]
    # pad the vocabulary: 16 more rows in the embedding and the output layer
    sd = torch.load(model / "consolidated.00.pth", weights_only=True)
    for k in ("tok_embeddings.weight", "output.weight"):
        sd[k] = torch.cat([sd[k], torch.zeros(16, sd[k].shape[1], dtype=sd[k].dtype)])
    torch.save(sd, model / "consolidated.00.pth")
    params["vocab_size"] = pieces + 16
    (model / "params.json").write_text(json.dumps(params))
    ckpt = MetaCheckpoint(model)
    assert ckpt.args.rope_theta == 1e6 and ckpt.args.vocab_size == pieces + 16
    from slowllama.engine.optim import OptimConfig
    from slowllama.engine.trainer import TrainConfig, Trainer

    store = prepare(ckpt, tmp_path / "store")
    tr = Trainer(store, tmp_path, torch.device("cpu"), TrainConfig(optim=OptimConfig(lr=0.01)))
    x = torch.randint(0, pieces, (2, 9))
    assert torch.isfinite(torch.tensor(tr.train_step(x[:, :-1], x[:, 1:]).loss))
    tr.close()
    export_store(store, model, tmp_path / "out")
    out = MetaCheckpoint(tmp_path / "out")
    assert out.args.vocab_size == pieces + 16 and out.checkpoint_dtype() == torch.bfloat16
