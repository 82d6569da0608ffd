#!/usr/bin/env bash
# From a fresh clone: install ptft into .venv, then pretrain -> finetune -> evaluate on the
# embedded digits data, and compare with the same finetune from scratch.
set -euo pipefail
source "$(dirname "$0")/_env.sh"
cd "$ROOT"
export PTFT_RUNS="${PTFT_RUNS:-runs/demo}"
AE=$(ptft pretrain configs/ae.yaml run.dir="$PTFT_RUNS/ae" --overwrite | tail -n1)
FT=$(ptft finetune configs/finetune.yaml run.dir="$PTFT_RUNS/finetune" init.checkpoint="$AE" --overwrite | tail -n1)
BASE=$(ptft finetune configs/finetune.yaml run.dir="$PTFT_RUNS/scratch" init.checkpoint=null --overwrite | tail -n1)
ptft evaluate "$PTFT_RUNS/ae" > "$PTFT_RUNS/ae.eval.json"
ptft evaluate "$PTFT_RUNS/finetune" | tee "$PTFT_RUNS/finetune.eval.json"
ptft evaluate "$PTFT_RUNS/scratch" > "$PTFT_RUNS/scratch.eval.json"
"$PY" - "$PTFT_RUNS" <<'PYEOF'
import json, sys
runs = sys.argv[1]
ft = json.load(open(f"{runs}/finetune.eval.json"))
base = json.load(open(f"{runs}/scratch.eval.json"))
ae = json.load(open(f"{runs}/ae.eval.json"))
print("\ndigits test accuracy, finetuned on the same few labels:", file=sys.stderr)
print(f"  finetuned from the autoencoder : {ft['accuracy']:.4f}", file=sys.stderr)
print(f"  trained from scratch           : {base['accuracy']:.4f}", file=sys.stderr)
print(f"  autoencoder test PSNR {ae['psnr']:.2f} dB, k-NN {ae['knn_accuracy']:.4f} (pictures in {runs}/*/eval/test/)",
      file=sys.stderr)
PYEOF
