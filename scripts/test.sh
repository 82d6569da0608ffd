#!/usr/bin/env bash
# Install ptft with its dev extra into .venv (created if missing) and run the test suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m slow` for the long checks.
set -euo pipefail
source "$(dirname "$0")/_env.sh" "[dev]"
cd "$ROOT"
exec "$PY" -m pytest -q "$@"
