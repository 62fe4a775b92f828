"""The options of a fine-tuning run, defined once.

Each field of `RunOptions` carries its command-line help and its kind:
- MATH: decides the run's numbers; saved in run.json, and a resume that is given another
  value is refused (`--iters` alone may grow, to extend a run);
- OUTPUT: what the run reports and exports; saved, and a value given on resume wins;
- SESSION: where and how fast this process runs; never saved.
The parser, the defaults, validation, run.json and the resume comparison all come from here.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..engine.quant import KINDS as BASE_QUANT_KINDS
from ..errors import ConfigError
from ..formats.gguf import GGUF_TYPES
from .schedule import SCHEDULES

MATH, OUTPUT, SESSION = "math", "output", "session"
METHODS = ("sft", "dpo", "ipo", "orpo")  # sft: the next-token loss; the others: preference losses (engine/preference.py)
DTYPE_CHOICES = ("float32", "bfloat16", "float16")


# Options that name files: made absolute, so that a run resumes from any working directory.
PATHS = ("model_dir", "data", "val_data", "out", "work_dir", "tensorboard")
# What run.json keeps beside the options: the content hashes a resume checks the data against,
# and the number of data-parallel ranks (distributed.py), which decides the global batch.
# Options every run.json has held since the first: one without them is not a run's, whatever else it holds.
ALWAYS_SAVED = ("model_dir", "data", "iters", "batch_size", "seq_len", "lr", "seed")
SAVED_EXTRAS = ("data_sha256", "val_data_sha256", "ranks")
# MATH options that a resume checks by content instead of by value: the model and data may have
# moved (same bytes, new path); the work dir is where the run was found; iters may grow.
RESUME_MAY_CHANGE = ("iters", "model_dir", "data", "val_data", "work_dir")


def opt(default, help: str, kind: str = MATH, **argparse_kw):
    return field(default=default, metadata={"help": help, "kind": kind, **argparse_kw})


AUTO_SHARE = 0.5  # --ram-budget auto: this share of the memory available when the run starts


def auto_budget() -> int:
    """Half of what psutil says is available: host RAM, which on Apple Silicon is also the GPU's
    (one pool, counted once). The rest stays for the device copies, the OS and the page cache."""
    import psutil

    return int(psutil.virtual_memory().available * AUTO_SHARE)


def parse_commit_every(text: str | int) -> int | None:
    """--commit-every: 'auto' (None, commits.py's rule) or a number of iterations of at least 1."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return None
    try:
        n = int(text)
    except (TypeError, ValueError):
        n = 0
    if isinstance(text, bool) or n < 1 or str(n) != str(text).strip():
        raise ConfigError(f"--commit-every {text!r}: expected auto or a number of iterations of at least 1")
    return n


def parse_size(text: str | int | None) -> int | None:
    """'8G', '512M', '1.5T', '0', 'auto' (AUTO_SHARE of the available memory) or 'none' (no limit) to bytes."""
    if text is None or isinstance(text, int):
        return text
    if text.strip().lower() in ("none", "inf", "unlimited"):
        return None
    if text.strip().lower() == "auto":
        return auto_budget()
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)[bB]?\s*", text)
    if not m:
        raise ConfigError(f"--ram-budget {text!r}: expected auto, none or a size like 0, 512M or 8G")
    return int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))


@dataclass
class RunOptions:
    # What to train and where: paths are made absolute, so a resume works from any folder.
    model_dir: str | None = opt(None, "checkpoint folder: Meta (params.json, consolidated.NN.pth) or Hugging Face "
                                      "(config.json, *.safetensors)", MATH,
                                positional=True)
    data: str | None = opt(None, 'UTF-8 text to train on, or records in .jsonl, .json (an array), .parquet or .csv '
                                 '(a column per key): {"text"}, {"prompt", "completion"}, {"messages"}, Alpaca '
                                 '{"instruction", "input", "output"} or ShareGPT {"conversations"}; chat records are '
                                 'rendered with the model\'s chat template')
    val_data: str | None = opt(None, "text or records whose loss is reported every --eval-every iterations")
    val_fraction: float = opt(0.0, "hold out this fraction of --data for the validation loss")
    out: str | None = opt(None, "output folder for the tuned model (default: MODEL_DIR-tuned)", OUTPUT)
    work_dir: str | None = opt(None, "where the block store and cached activations live (default: OUT.work)", MATH)
    # The math.
    iters: int = opt(100, "training iterations; on --resume, a larger number extends a run")
    batch_size: int = opt(4, "sequences per iteration")
    micro_batch: int | None = opt(None, "sequences run through each block at once; each block is still loaded "
                                        "once per pass")
    seq_len: int = opt(128, "tokens per sequence")
    grad_accum: int = opt(1, "batches per optimizer step; they pass through each block together, so no gradients "
                             "are stored")
    lr: float = opt(1e-4, "learning rate (the peak, with a schedule)")
    lr_schedule: str = opt("constant", "how the lr moves after warmup: constant, or a linear or cosine decay to "
                                       "--min-lr at the last iteration", choices=SCHEDULES)
    warmup_iters: int = opt(0, "iterations of linear warmup from lr/W to lr")
    min_lr: float = opt(0.0, "the lr that linear and cosine schedules decay to")
    optimizer: str = opt("sgd", "optimizer; its state is stored beside each module", choices=("sgd", "adamw"))
    optim_state_dtype: str = opt("float32", "dtype of the stored optimizer moments (bfloat16 halves AdamW's state "
                                            "on disk)", choices=("float32", "bfloat16"))
    momentum: float = opt(0.0, "SGD momentum")
    weight_decay: float = opt(0.0, "weight decay")
    dropout: float = opt(0.0, "residual dropout probability in each block")
    clip_grad_norm: float = opt(0.0, "clip the global gradient norm to this before each update, exactly as "
                                     "torch.nn.utils.clip_grad_norm_ (full fine-tuning: one more reverse pass "
                                     "that reads the modules again; 0: off)")
    seed: int = opt(42, "seed for batch sampling and dropout")
    # float16 is not offered: without loss scaling it flushes small gradients to zero.
    compute_dtype: str = opt("float32", "dtype blocks compute in; updates always go to float32 masters",
                             choices=("float32", "bfloat16"))
    store_dtype: str = opt("float32", "dtype of the block store's master weights (bfloat16 rounds updates "
                                      "stochastically)", choices=("float32", "bfloat16"))
    act_dtype: str = opt("float32", "dtype of the cached activations", choices=DTYPE_CHOICES)
    train_on_prompt: bool = opt(False, "also train on prompts and non-assistant turns of records "
                                       "(default: completions and assistant turns only)")
    lora_rank: int = opt(0, "train LoRA adapters of this rank instead of all weights (0: full fine-tuning)")
    lora_alpha: float = opt(16.0, "LoRA scale numerator: adapters add alpha/rank * B @ A")
    lora_targets: str = opt("wq,wv", "comma-separated layers that get adapters: wq, wk, wv, wo, w1, w2, w3")
    base_quant: str | None = opt(None, "LoRA: keep the blocks' linear weights in the base store quantized, so that "
                                       "more of the base stays in RAM: nf4 (QLoRA's 4-bit NormalFloat) or int8 (per "
                                       "output channel); dequantized on the device just before each module computes",
                                 choices=BASE_QUANT_KINDS)
    # Preference tuning (data/preference.py, engine/preference.py): the loss over chosen/rejected pairs.
    method: str = opt("sft", "what the run optimizes: sft (next-token loss on --data's records or text), or over "
                             '{"prompt", "chosen", "rejected"} records: dpo (sigmoid loss against the starting '
                             "model, whose log-probabilities one layer-major pass computes before training), ipo "
                             "(DPO's squared loss on length-averaged log-probabilities) or orpo (chosen NLL plus "
                             "the odds-ratio loss; no reference pass); losses as trl defines them",
                      choices=METHODS)
    beta: float = opt(0.1, "DPO/IPO: strength of the pull toward the starting model (trl's beta); ORPO: weight of "
                           "the odds-ratio loss (trl's beta)")
    # What the run reports and writes.
    eval_every: int = opt(0, "print a greedy completion of --prompt every N iterations (0: only before and after)",
                          OUTPUT)
    prompt: str = opt("", "prompt for the completions printed during training", OUTPUT)
    gen_tokens: int = opt(32, "tokens per completion", OUTPUT)
    save_every: int = opt(0, "also export the model every N iterations, into OUT/checkpoint-NNNNNN (0: only at the "
                             "end, into OUT)", OUTPUT)
    keep: int = opt(2, "numbered checkpoints to keep; older ones are deleted", OUTPUT)
    export_format: str | None = opt(None, "format of the export: hf or meta (default: the format the model came "
                                          "in; a Meta checkpoint can come out as a Hugging Face folder)", OUTPUT,
                                    choices=("hf", "meta"))
    shards: int | None = opt(None, "shard count of the exported model (default: as the original)", OUTPUT)
    gguf: str | None = opt(None, "also write OUT/model-TYPE.gguf and its Ollama model-TYPE.Modelfile for llama.cpp, "
                                 "Ollama and LM Studio from the Hugging Face export of a Llama, Mistral, Qwen2 or "
                                 "Qwen3 model (a LoRA run without --merge: its adapter as OUT/adapter-TYPE.gguf, "
                                 "for llama.cpp's --lora): f32, f16, bf16 or q8_0", OUTPUT, choices=GGUF_TYPES)
    merge: bool = opt(False, "LoRA: also export the model with the adapters merged in (Meta format)", OUTPUT)
    tensorboard: str | None = opt(None, "also write TensorBoard scalar events (loss, validation, lr, grad norm, "
                                        "tokens/s, disk bytes, ETA) into DIR; needs pip install "
                                        "'slowllama[tensorboard]'", OUTPUT, metavar="DIR")
    # Never saved: permission to replace another run's output is given each time, not inherited by a resume.
    overwrite_out: bool = opt(False, "let this run replace what another run left in --out (its export, "
                                     "checkpoints and log)", SESSION)
    # Where and how fast: free to change between a run and its resume.
    device: str = opt("auto", "auto, cpu, cuda or mps (auto: mps, then cuda, then cpu)", SESSION)
    ram_budget: str = opt("auto", "RAM for keeping modules, activations and gradients resident, e.g. 8G; auto: half "
                                  "of the memory available at start; 0 keeps only the current and next module; "
                                  "none: no limit", SESSION)
    commit_every: str = opt("auto", "when the RAM budget holds every module: keep the updated modules in RAM and "
                                    "commit them to the store every N iterations, and before every evaluation, "
                                    "checkpoint and the export (a crash loses at most N iterations, replayed exactly "
                                    "on resume); auto: every 10, or sooner when 10 would pass 2 minutes of measured "
                                    "step time; 1: every iteration. Modules that do not fit commit every iteration",
                             SESSION, metavar="N")
    no_prefetch: bool = opt(False, "read each module only when it is needed", SESSION)
    no_verify: bool = opt(False, "skip checking each module's checksum as it is read", SESSION)
    stop_on_nan: bool = opt(False, "stop the run on a NaN or Inf loss instead of skipping the step", SESSION)
    deterministic: bool = opt(False, "bit-reproducible kernels on cuda (deterministic algorithms, math attention); "
                                     "slower", SESSION)

    @property
    def rows_per_example(self) -> int:
        """Sequences per --batch-size unit: a preference pair is two rows, its chosen and its rejected."""
        return 1 if self.method == "sft" else 2

    @staticmethod
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    @classmethod
    def kind(cls, name: str) -> str:
        return _FIELDS[name].metadata["kind"]

    @classmethod
    def names(cls, *kinds: str) -> list[str]:
        return [f.name for f in fields(cls) if f.metadata["kind"] in kinds]

    def validate(self):
        """Refuse impossible values with one line naming the option."""
        for name in ("iters", "batch_size", "seq_len", "gen_tokens", "grad_accum", "keep"):
            _at_least(self, name, 1)
        for name in ("eval_every", "save_every", "lora_rank", "warmup_iters", "seed"):
            _at_least(self, name, 0)
        if self.shards is not None:
            _at_least(self, "shards", 1)
        if self.micro_batch is not None and not 1 <= self.micro_batch <= self.batch_size:
            raise ConfigError(f"--micro-batch must be between 1 and --batch-size {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        for name in ("momentum", "weight_decay", "clip_grad_norm"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{self.flag(name)} must be 0 or positive, got {v}")
        if not (math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr):
            raise ConfigError(f"--min-lr must be between 0 and --lr {self.lr}, got {self.min_lr}")
        if self.momentum >= 1:
            raise ConfigError(f"--momentum must be below 1, got {self.momentum}")
        for name in ("dropout", "val_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{self.flag(name)} must be in [0, 1), got {v}")
        if self.val_fraction and self.val_data:
            raise ConfigError("--val-data and --val-fraction exclude each other")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in (*choices, *([None] if f.default is None else [])):
                raise ConfigError(f"{self.flag(f.name)} {getattr(self, f.name)!r}: expected one of {', '.join(choices)}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"--beta must be a positive number, got {self.beta}")
        if self.method != "sft" and self.train_on_prompt:
            raise ConfigError(f"--method {self.method}: --train-on-prompt does not apply; a preference loss counts "
                              f"the responses only")
        if self.method != "sft" and (self.val_data or self.val_fraction):
            raise ConfigError(f"--method {self.method}: --val-data and --val-fraction report a next-token loss, "
                              f"which preference pairs do not have; leave them out")
        if self.merge and not self.lora_rank:
            raise ConfigError("--merge needs --lora-rank")
        if self.base_quant and not self.lora_rank:
            raise ConfigError("--base-quant needs --lora-rank: a full fine-tune updates the weights it would quantize")
        parse_size(self.ram_budget)
        parse_commit_every(self.commit_every)

    def check_effective(self):
        """Refuse an option that this run would ignore, as --merge without --lora-rank is: a user who sets one
        expects it to act. Only for a new run: a resume repeats its saved options, whatever they are."""
        def given(name):
            return getattr(self, name) != _FIELDS[name].default

        ignored = [
            ("momentum", self.optimizer != "sgd", "it applies to --optimizer sgd, not adamw"),
            ("min_lr", self.lr_schedule == "constant", "it is where --lr-schedule linear or cosine decays to, and "
                                                       "the schedule is constant"),
            ("store_dtype", self.lora_rank > 0, "a LoRA run keeps its base in the checkpoint's dtype and its "
                                                "adapters in float32"),
            ("optim_state_dtype", self.optimizer == "sgd" and not self.momentum,
             "SGD without --momentum keeps no optimizer state"),
            ("lora_alpha", not self.lora_rank, "it applies to LoRA, which --lora-rank turns on"),
            ("lora_targets", not self.lora_rank, "it applies to LoRA, which --lora-rank turns on"),
            ("beta", self.method == "sft", "it applies to --method dpo, ipo and orpo, not sft"),
        ]
        for name, idle, why in ignored:
            if idle and given(name):
                raise ConfigError(f"{self.flag(name)} {getattr(self, name)} would do nothing: {why}")
        if self.warmup_iters > self.iters:
            raise ConfigError(f"--warmup-iters {self.warmup_iters} is more than --iters {self.iters}: the learning "
                              f"rate would never reach --lr")

    def saved(self) -> dict:
        """What run.json keeps: every option but the SESSION ones."""
        return {k: v for k, v in dataclasses.asdict(self).items() if self.kind(k) != SESSION}

    @classmethod
    def from_saved(cls, path: Path) -> tuple[RunOptions, dict]:
        """The options a run saved, and the whole of run.json (which also holds the data's hashes)."""
        try:
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
            missing = [k for k in ALWAYS_SAVED if k not in raw]
            if missing:  # defaults stand in for options newer than a run, never for the run itself
                raise ValueError(f"it lacks {', '.join(missing)}")
            return cls(**{k: v for k, v in raw.items() if k in _FIELDS and cls.kind(k) != SESSION}), raw
        except FileNotFoundError as e:
            raise ConfigError(f"--resume: {path} not found, there is no run to resume in {path.parent}") from e
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"--resume: {path} is unreadable or corrupt ({e}); delete the folder to start over") from e


def _at_least(o: RunOptions, name: str, low: int):
    v = getattr(o, name)
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ConfigError(f"{o.flag(name)} must be an integer of at least {low}, got {v!r}")


_FIELDS = {f.name: f for f in fields(RunOptions)}


# --help lists the options in these groups, in RunOptions' order: each group runs from the field named here to
# the next group's, so an option added to RunOptions lands in the group of its neighbours.
HELP_GROUPS = {"model_dir": "model and data", "iters": "training", "lora_rank": "LoRA",
               "method": "preference tuning",
               "eval_every": "reports and export", "overwrite_out": "where and how fast"}


def add_arguments(p: argparse.ArgumentParser):
    """RunOptions as command-line flags, by HELP_GROUPS. Defaults are left out of the namespace (SUPPRESS),
    so that what a user typed can be told from what they did not."""
    group = p
    for f in fields(RunOptions):
        md = f.metadata
        if f.name in HELP_GROUPS:
            group = p.add_argument_group(HELP_GROUPS[f.name])
        hint = f"{md['help']} (default: {f.default})" if f.default not in (None, False, "") else md["help"]
        if md.get("positional"):
            group.add_argument(f.name, nargs="?", default=argparse.SUPPRESS, help=md["help"])
        elif isinstance(f.default, bool):
            group.add_argument(RunOptions.flag(f.name), action="store_true", default=argparse.SUPPRESS,
                               help=md["help"])
        else:
            typ = {"int": int, "float": float, "int | None": int, "str": str, "str | None": str}[str(f.type)]
            group.add_argument(RunOptions.flag(f.name), type=typ, default=argparse.SUPPRESS,
                               choices=md.get("choices"), metavar=md.get("metavar"), help=hint)


def read_config(path: str | Path) -> dict:
    """Options from a TOML or JSON file (a run's run.json is one), keyed by field name.

    Keys may use dashes or underscores; relative paths are taken from the file's folder.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".json":
            data = json.loads(raw)
        else:
            import tomllib

            data = tomllib.loads(raw.decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror})") from e
    except (ValueError, UnicodeDecodeError) as e:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ConfigError(f"--config {path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a table of options")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in SAVED_EXTRAS:
            continue
        if name not in _FIELDS:
            raise ConfigError(f"--config {path}: unknown option {key!r}")
        if value is not None and not _fits(_FIELDS[name], value):
            raise ConfigError(f"--config {path}: {key} = {value!r} is not a {_FIELDS[name].type}")
        if name in PATHS and value is not None:
            value = str((path.parent / value).absolute()) if not Path(value).is_absolute() else value
        out[name] = value
    return out


def _fits(f, value) -> bool:
    kind = str(f.type).split(" | ")[0]
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, str) or (f.name in ("ram_budget", "commit_every") and isinstance(value, int))
