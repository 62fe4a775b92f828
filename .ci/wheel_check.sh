#!/usr/bin/env bash
# CI: what a user gets from `pip install .`. Builds the wheel, installs it into a fresh virtual environment
# outside the checkout and runs the installed `slowllama` command from an empty folder: a package or data file
# that the wheel leaves out fails here, where the editable install of run_tests.sh would hide it.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# From a copy without build/ or *.egg-info: setuptools reuses a stale build/ and would pack files it no longer finds.
mkdir "$tmp/src"
tar -C "$repo" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' -cf - . | tar -C "$tmp/src" -xf -
"$python" -m pip wheel -q --no-deps "$tmp/src" -w "$tmp/dist"
"$python" -m venv "$tmp/venv"
# requirements.txt's pins as constraints: the CPU build of torch, and only the runtime dependencies.
grep -v '^-e' "$repo/requirements.txt" > "$tmp/constraints.txt"
"$tmp/venv/bin/python" -m pip install -q "$tmp"/dist/slowllama-*.whl -c "$tmp/constraints.txt"

mkdir "$tmp/user" && cd "$tmp/user"  # not the checkout: nothing can come from it
export PATH="$tmp/venv/bin:$PATH"
tiny="$(python -c 'from slowllama.cli.finetune import DEMO_MODEL; print(DEMO_MODEL)')"
fact="$(python -c 'from slowllama.cli.finetune import DEMO_DATA; print(DEMO_DATA)')"
case "$tiny" in "$repo"*) echo "wheel check: slowllama was imported from the checkout ($tiny)" >&2; exit 1;; esac
slowllama --help > /dev/null
slowllama finetune "$tiny" --data "$fact" --iters 2 --batch-size 2 --seq-len 32 --out tuned --work-dir work \
    --device cpu
slowllama generate tuned --device cpu --prompt "The clock tower" --max-new-tokens 8
slowllama selftest --device cpu --out selftest.json
echo "wheel check: the installed slowllama trained, generated and passed its self-test"
