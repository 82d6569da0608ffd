#!/usr/bin/env bash
# Which lever moves few-label accuracy on data the recipes were not tuned on? (issue #19)
# Runs the shipped configs/ssl_pretrain.yaml + configs/ssl_finetune.yaml with one knob changed at a time,
# many runs at once (meant for a GPU machine: on the 2-core CPU one 8,000-step FixMatch run alone takes ~15 min),
# seed 0, 10 labels per class, and prints one line of test accuracy per run.
#   DATA_ROOT=../shared/data DEVICE=cuda bash scripts/recipe_sweep.sh
# A run still going after LIMIT seconds gets SIGINT (ptft saves a checkpoint and stops) and is evaluated
# from its best checkpoint so far; its line says rc=124 and how many validations it made.
set -u
DATA_ROOT=${DATA_ROOT:-../shared/data}; DEVICE=${DEVICE:-cuda}; LIMIT=${LIMIT:-185}
W=${WORK:-/tmp/ptft-recipe-sweep}; RESULTS=${RESULTS:-$W/sweep.txt}; mkdir -p "$W"
D="data.root=$DATA_ROOT train.device=$DEVICE"
PY=${PY:-python3}
pre() {  # name dataset steps
  timeout -s INT "$LIMIT" $PY -m ptft pretrain configs/ssl_pretrain.yaml data.name=$2 $D train.max_steps=$3 \
    train.eval_every_steps=$(( $3 / 8 )) run.dir=$W/$1 --overwrite > /dev/null 2> "$W/$1.log"; echo "$1 rc=$?" >&2; }
ft() {  # name dataset init steps extra-overrides...
  local n=$1 ds=$2 init=$3 steps=$4; shift 4
  timeout -s INT "$LIMIT" $PY -m ptft finetune configs/ssl_finetune.yaml data.name=$ds $D init.checkpoint=$init \
    train.max_steps=$steps run.dir=$W/$n "$@" --overwrite > /dev/null 2> "$W/$n.log"; local rc=$?
  $PY -m ptft evaluate "$W/$n" train.device=$DEVICE > /dev/null 2>> "$W/$n.log"
  $PY - "$W/$n" "$rc" <<'PY' >> "$RESULTS"
import json, pathlib, sys
run, rc = pathlib.Path(sys.argv[1]), sys.argv[2]
try:
    acc = json.loads((run / "eval/test/metrics.json").read_text())["accuracy"]
except (OSError, KeyError, ValueError) as exc:
    acc = f"n/a ({type(exc).__name__})"
log = run / "metrics.jsonl"
validations = sum('"val/' in line for line in log.read_text().splitlines()) if log.exists() else 0
print(f"{run.name:<34} rc={rc:<4} validations={validations:<4} test_acc={acc}")
PY
}
# wave 1: the pretrainings, and finetunes from scratch
pre fm_c2k fashion_mnist 2000 & pre fm_c8k fashion_mnist 8000 & pre mn_c2k mnist 2000 &
ft fm_scratch_none_2k fashion_mnist null 2000 finetune.unlabelled=none &
ft fm_scratch_fm_2k fashion_mnist null 2000 &
ft fm_scratch_fm_8k fashion_mnist null 8000 &
ft fm_scratch_fm_8k_t08 fashion_mnist null 8000 finetune.confidence_threshold=0.8 &
ft mn_scratch_fm_8k mnist null 8000 &
wait
# wave 2: from the pretrained encoders
ft fm_c2k_none_2k fashion_mnist "$W/fm_c2k" 2000 finetune.unlabelled=none &
ft fm_c2k_fm_8k fashion_mnist "$W/fm_c2k" 8000 &
ft fm_c8k_none_2k fashion_mnist "$W/fm_c8k" 2000 finetune.unlabelled=none &
ft fm_c8k_fm_8k fashion_mnist "$W/fm_c8k" 8000 &
ft fm_c8k_fm_8k_t08 fashion_mnist "$W/fm_c8k" 8000 finetune.confidence_threshold=0.8 &
ft mn_c2k_fm_8k mnist "$W/mn_c2k" 8000 &
ft mn_c2k_none_2k mnist "$W/mn_c2k" 2000 finetune.unlabelled=none &
wait
# wave 3: longer FixMatch, pseudo-labels, fewer unlabelled per labelled, no LP-FT
ft fm_scratch_fm_20k fashion_mnist null 20000 train.eval_every_steps=500 &
ft fm_c2k_full_fm_8k fashion_mnist "$W/fm_c2k" 8000 finetune.mode=full finetune.unfreeze_at_step=null &
ft mn_scratch_fm_20k mnist null 20000 train.eval_every_steps=500 &
ft fm_scratch_pl_8k fashion_mnist null 8000 finetune.unlabelled=pseudo_label &
ft fm_scratch_fm_8k_mu3 fashion_mnist null 8000 finetune.unlabelled_ratio=3 &
wait
cat "$RESULTS"
