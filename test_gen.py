"""`python test_gen.py MODEL ...`: the same command as `slowllama generate` (slowllama/cli/generate.py)."""
import sys

try:
    from slowllama.cli.generate import Generation, generate, generate_many, generate_text, main  # noqa: F401
except KeyboardInterrupt:  # Ctrl-C while torch loads: nothing has started, so no traceback
    print("interrupted before anything started", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
