"""`python -m slowllama COMMAND ...`: the `slowllama` console command."""
import sys

from .cli.main import main

sys.exit(main())
