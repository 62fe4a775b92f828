"""`python tools/export_gguf.py EXPORT_DIR --out FILE.gguf --type f16`: the same command as `slowllama export`
(slowllama/cli/export.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from slowllama.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
