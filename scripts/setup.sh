#!/usr/bin/env bash
# Creates .venv (once) and installs the package with its dev extra. Safe to run again.
# torch==2.13.0 is installed first when the venv has no torch: a bare `torch` requirement would
# otherwise pull a multi-GB CUDA build on a machine without one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
