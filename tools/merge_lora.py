"""`python tools/merge_lora.py ...`: the same command as `slowllama merge-lora` (slowllama/cli/merge_lora.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from slowllama.cli.merge_lora import main, merge_lora  # noqa: E402, F401

if __name__ == "__main__":
    sys.exit(main())
