"""`python finetune.py ...`: the same command as `slowllama finetune` (slowllama/cli/finetune.py)."""
import sys

try:
    from slowllama.cli.finetune import DEMO, DEMO_DATA, DEMO_MODEL, demo, main, parser  # noqa: F401  (the script's API)
except KeyboardInterrupt:  # Ctrl-C while torch loads: nothing has started, so no traceback
    print("interrupted before anything started", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
