"""`python tools/plot_loss.py ...`: the same command as `slowllama plot` (slowllama/cli/plot.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from slowllama.cli.plot import main, plot, read_log  # noqa: E402, F401

if __name__ == "__main__":
    sys.exit(main())
