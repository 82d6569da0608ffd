#!/usr/bin/env bash
# The README's picture of `ptft report`, and the check that the page renders in a real browser:
# pretrain configs/ae.yaml, finetune configs/finetune.yaml from it and from scratch, evaluate both,
# report the two finetuning runs, and screenshot the page with headless Chromium into
# docs/images/report.png. Runs on the CPU in a few minutes (the shipped configs as they are); the test suite does not need Chromium.
#   bash scripts/report_screenshot.sh            (PY=... picks the python; CHROMIUM=... the browser;
#                                                 PTFT_RUNS=... keeps the runs and report.html there)
# Debian/Ubuntu: apt-get install -y chromium
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
CHROMIUM="${CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}"
OUT="$ROOT/docs/images/report.png"
if [ -z "$CHROMIUM" ]; then
  echo "report_screenshot.sh: no Chromium found; install it (apt-get install -y chromium) or set CHROMIUM=..." >&2
  exit 2
fi
RUNS="${PTFT_RUNS:-$(mktemp -d)}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
ptft() { "$PY" -m ptft "$@"; }

AE=$(ptft pretrain configs/ae.yaml run.dir="$RUNS/ae" --overwrite | tail -n1)
ptft finetune configs/finetune.yaml run.dir="$RUNS/finetune" init.checkpoint="$AE" --overwrite > /dev/null
ptft finetune configs/finetune.yaml run.dir="$RUNS/scratch" init.checkpoint=null --overwrite > /dev/null
ptft evaluate "$RUNS/finetune" > /dev/null
ptft evaluate "$RUNS/scratch" > /dev/null
REPORT=$(ptft report "$RUNS/finetune" "$RUNS/scratch" --out "$RUNS/report.html" --png "$RUNS/curves.png")

mkdir -p "$(dirname "$OUT")"
# --no-sandbox: containers and root have no user namespaces for Chromium's sandbox; the page is our own.
"$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1200,1600 \
  --screenshot="$OUT.tmp.png" "file://$(cd "$(dirname "$REPORT")" && pwd)/$(basename "$REPORT")" 2> "$RUNS/chromium.log" \
  || { cat "$RUNS/chromium.log" >&2; exit 1; }
# A blank or failed render leaves no file or a tiny one: refuse it rather than commit it.
"$PY" - "$OUT.tmp.png" <<'PYEOF'
import sys
from PIL import Image
image = Image.open(sys.argv[1]).convert("L")
colours = len(image.resize((300, 400)).getcolors(256))  # "L": at most 256 levels
if image.size != (1200, 1600) or colours < 20:
    sys.exit(f"report_screenshot.sh: the screenshot looks blank ({image.size}, {colours} grey levels)")
PYEOF
mv "$OUT.tmp.png" "$OUT"
echo "report: $REPORT; screenshot: $OUT" >&2
echo "$OUT"
