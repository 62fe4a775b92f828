"""Write a Hugging Face Llama folder (e.g. a finetune export) as one GGUF file for llama.cpp, Ollama and LM Studio.

    slowllama export EXPORT_DIR --out FILE.gguf [--type f16]
    python tools/export_gguf.py EXPORT_DIR --out FILE.gguf [--type f16]

Module by module, through slowllama/formats/gguf.py (needs pip install "slowllama[gguf]").
"""
from __future__ import annotations

import argparse
import sys

from slowllama.errors import ConfigError
from slowllama.formats.gguf import GGUF_TYPES, export_gguf


def main(argv=None, prog: str | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    source = p.add_argument_group("what to convert")
    source.add_argument("export_dir", help="a Hugging Face Llama folder: config.json, *.safetensors, tokenizer.json")
    out = p.add_argument_group("the GGUF file")
    out.add_argument("--out", required=True, help="the .gguf file to write")
    out.add_argument("--type", default="f16", help=f"weight type: {', '.join(GGUF_TYPES)} (norms stay f32; "
                                                   f"default: f16)")
    a = p.parse_args(argv)
    try:
        written = export_gguf(a.export_dir, a.out, a.type)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {written} ({written.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
