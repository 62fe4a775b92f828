#!/usr/bin/env bash
# Installs slowllama and its test dependencies into .venv, then runs the tests.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -r requirements.txt
exec .venv/bin/python -m pytest -q "$@"
