#!/usr/bin/env bash
# The README's test command: installs (jobs/setup.sh) and runs the whole test suite.
# Extra arguments go to pytest (e.g. -m "not slow" for the quick subset).
set -euo pipefail
cd "$(dirname "$0")/.."
bash jobs/setup.sh
exec .venv/bin/python -m pytest -q "$@"
