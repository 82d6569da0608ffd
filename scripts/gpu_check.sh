#!/usr/bin/env bash
# The accelerator check (issue #14): run on a lent GPU machine from the repository root, e.g. with the
# device tool: `bash scripts/gpu_check.sh` (figures land in results/gpu/<date>.json and a table on stderr).
# `bash scripts/gpu_check.sh --dry-run` runs every check on the CPU with tiny lengths (the test suite does).
# Uses the python on PATH (ptft imported from this checkout); PY=... picks another.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" "$ROOT/scripts/gpu_check.py" "$@"
