# Shared by demo.sh and test.sh: create .venv if missing and install ptft into it.
# TORCH_SPEC pins the torch pair; the default is the pair this project is tested with.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PTFT_VENV:-$ROOT/.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
EXTRAS="${1:-}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtual environment in $VENV" >&2
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.ptft-installed-$(cat "$ROOT/pyproject.toml" "$0" | cksum | cut -d' ' -f1)$EXTRAS"
if [ ! -f "$stamp" ]; then
  "$PY" -m pip install -q --upgrade pip >&2
  # shellcheck disable=SC2086
  "$PY" -m pip install -q $TORCH_SPEC >&2
  "$PY" -m pip install -q -e "$ROOT$EXTRAS" >&2
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
