#!/usr/bin/env bash
# Installs slowllama and its test dependencies into .venv, then runs the tests.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -r requirements.txt
# One worker per core (at most 4: each holds torch and transformers); a test file stays on one worker, so
# its module fixtures are built once.
exec .venv/bin/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile "$@"
