#!/usr/bin/env bash
# The README's test command: creates .venv (if missing), installs the package with its test
# dependencies, and runs the whole test suite. Extra arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[dev]"
exec .venv/bin/python -m pytest -q "$@"
