#!/usr/bin/env bash
# Installs slowllama into .venv, then runs finetune.py (the demo when given no arguments).
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -r requirements.txt
exec .venv/bin/python finetune.py "$@"
