#!/usr/bin/env bash
# Creates .venv (once) with winattn and its test extras. Safe to run again: it only installs
# what is missing. Usage: ./setup.sh  (then .venv/bin/winattn ..., .venv/bin/python -m pytest)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import winattn, timm, torchvision, transformers" 2>/dev/null; then
    # torch and torchvision are pinned as a pair: a torchvision of another build fails to import.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check \
        "torch==2.14.1" "torchvision==0.29.1"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
fi
