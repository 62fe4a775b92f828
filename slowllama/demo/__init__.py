"""The demo's assets, shipped with the package: a tiny Meta-format Llama (tools/train_tiny.py made it) and the fact
it learns in `slowllama finetune` with no arguments."""
