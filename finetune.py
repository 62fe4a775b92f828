"""`python finetune.py ...`: the same command as `slowllama finetune` (slowllama/cli/finetune.py)."""
import sys

from slowllama.cli.finetune import DEMO, DEMO_DATA, DEMO_MODEL, demo, main, parser  # noqa: F401  (the script's API)

if __name__ == "__main__":
    sys.exit(main())
