#!/usr/bin/env bash
# Chain the stages through the checkpoint path each one prints (last stdout line).
# Usage: scripts/pipeline.sh PRETRAIN_CONFIG FINETUNE_CONFIG [KEY=VALUE ...]  (overrides go to both stages)
# With PREDICT_INPUT=FOLDER (or file, glob) it ends by predicting those images with the finetuned model:
# one JSON record per image on stdout after evaluate's metrics.
set -euo pipefail
PRE="${1:-configs/ae.yaml}"; FT="${2:-configs/finetune.yaml}"; shift $(( $# < 2 ? $# : 2 ))
CKPT=$(ptft pretrain "$PRE" "$@" | tail -n1)
echo "pretrained: $CKPT" >&2
BEST=$(ptft finetune "$FT" init.checkpoint="$CKPT" "$@" | tail -n1)
echo "finetuned: $BEST" >&2
ptft evaluate "$BEST"
if [ -n "${PREDICT_INPUT:-}" ]; then
  ptft predict "$BEST" "$PREDICT_INPUT"
fi
