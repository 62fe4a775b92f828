"""`python tools/export_gguf.py EXPORT_DIR --out FILE.gguf --type f16`: a Hugging Face Llama folder (e.g. a
finetune export) as one GGUF file for llama.cpp (slowllama/formats/gguf.py)."""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from slowllama.errors import ConfigError  # noqa: E402
from slowllama.formats.gguf import GGUF_TYPES, export_gguf  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("export_dir")
    p.add_argument("--out", required=True, help="the .gguf file to write")
    p.add_argument("--type", default="f16", help=f"weight type: {', '.join(GGUF_TYPES)} (norms stay f32)")
    a = p.parse_args(argv)
    try:
        out = export_gguf(a.export_dir, a.out, a.type)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
