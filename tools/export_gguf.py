"""`python tools/export_gguf.py EXPORT_DIR --out FILE.gguf --type f16`: a Hugging Face Llama, Mistral, Qwen2 or
Qwen3 folder (e.g. a finetune export) as one GGUF file for llama.cpp, and FILE.Modelfile beside it for Ollama
(slowllama/formats/gguf.py, slowllama/formats/ollama.py)."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from slowllama.errors import ConfigError
from slowllama.formats.gguf import GGUF_TYPES, export_gguf


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("export_dir")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--type", default="f16", help=f"weight type: {', '.join(GGUF_TYPES)} (norms stay f32)")
    p.add_argument("--no-modelfile", action="store_true", help="do not write the Ollama Modelfile beside it")
    a = p.parse_args(argv)
    try:
        out = export_gguf(a.export_dir, a.out, a.type, modelfile=not a.no_modelfile)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
