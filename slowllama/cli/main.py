"""`slowllama COMMAND ...`: one console command over the same code as finetune.py, test_gen.py and tools/.

Each subcommand is a module of this package with `main(argv) -> int`; `slowllama COMMAND --help` is that
command's own help, so the scripts and the subcommands cannot drift apart.
"""
from __future__ import annotations

import importlib
import sys

# name -> (module under slowllama.cli, one line for the overview). The order is the order of a user's day.
COMMANDS = {
    "finetune": ("finetune", "fine-tune a model, streaming it from SSD (no arguments: the demo)"),
    "generate": ("generate", "print completions from a model (original or tuned), with a KV cache"),
    "perplexity": ("perplexity", "loss and perplexity of a model on a text or JSONL file, one read of the model"),
    "merge-lora": ("merge_lora", "merge LoRA adapters into their base model, in the base's format"),
    "export": ("export", "write a Hugging Face Llama folder as one GGUF file for llama.cpp and Ollama"),
    "plot": ("plot", "draw a run's loss curves from its train_log.jsonl"),
    "selftest": ("selftest", "check this device: exactness, dropout replay, recovery, memory, speed"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: slowllama COMMAND [options]   (slowllama COMMAND --help for a command's options)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(f"slowllama {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: slowllama {name!r} is not a command; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"{__package__}.{COMMANDS[name][0]}")
    except KeyboardInterrupt:  # Ctrl-C while torch loads: nothing has started
        print("interrupted before anything started", file=sys.stderr)
        return 130
    return module.main(rest, prog=f"slowllama {name}")


if __name__ == "__main__":
    sys.exit(main())
