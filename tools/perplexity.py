"""`python tools/perplexity.py ...`: the same command as `slowllama perplexity` (slowllama/cli/perplexity.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from slowllama.cli.perplexity import main, run  # noqa: E402, F401

if __name__ == "__main__":
    sys.exit(main())
