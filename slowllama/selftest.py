"""`python -m slowllama.selftest`: kept as the documented entry point; the self-test lives in slowllama/cli/selftest.py."""
import sys

from .cli.selftest import main

if __name__ == "__main__":
    sys.exit(main())
