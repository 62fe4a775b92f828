"""`python test_gen.py MODEL ...`: the same command as `slowllama generate` (slowllama/cli/generate.py)."""
import sys

from slowllama.cli.generate import Generation, generate, generate_many, generate_text, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
