#!/usr/bin/env bash
# GPU check: the figures docs/performance.md asks of a GPU, in one run (about 8 minutes on
# one H200-class GPU), all written to one results file.
#   1. bench train: efficientnet_b3 at 150 px, bf16, channels_last, maskdist's step vs a bare loop
#   2. bench epoch: the real training loop on full-size synthetic shards at 4, 8, 16 loader workers
#   3. one epoch of the recipe preset, with TensorBoard
#   4. a 5-fold predict (fold models of a few steps each) and bench predict against a bare forward
#
#   launch/gpu_check.sh [WORKDIR]        results in WORKDIR/gpu_check_results.txt
#
# Every size is an environment variable, so the same script runs CPU-sized in the tests:
#   PEOPLE (2700) EVAL_PEOPLE (1800) MODEL (efficientnet_b3) BATCH (128) CROP (150) RESIZE (224)
#   PRECISION (bf16) WORKERS (4,8,16) TRAIN_WORKERS (8) STEPS (100) FOLD_STEPS (20) EPOCH_STEPS (0: a full
#   epoch) FOLDS (5) NPROC (cores for synth and shards) CPU (1: CPU-sized, each run one process without a launcher)
set -euo pipefail
WORK=${1:-gpu_check}
PEOPLE=${PEOPLE:-2700}
EVAL_PEOPLE=${EVAL_PEOPLE:-1800}
MODEL=${MODEL:-efficientnet_b3}
BATCH=${BATCH:-128}
CROP=${CROP:-150}
RESIZE=${RESIZE:-224}
PRECISION=${PRECISION:-bf16}
WORKERS=${WORKERS:-4,8,16}
TRAIN_WORKERS=${TRAIN_WORKERS:-8}
STEPS=${STEPS:-100}
FOLD_STEPS=${FOLD_STEPS:-20}
EPOCH_STEPS=${EPOCH_STEPS:-0}
FOLDS=${FOLDS:-5}
NPROC=${NPROC:-$(nproc)}
MASKDIST=${MASKDIST:-maskdist}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$WORK"
results="$WORK/gpu_check_results.txt"
: > "$results"
export HF_HOME=${HF_HOME:-$WORK/hf}  # no stale accelerate config
if [ "${CPU:-0}" = 1 ]; then  # CPU-sized runs (the test): one process each, no launcher
  launch=(python)
else
  launch=(accelerate launch --config_file "$here/1gpu.yaml" --mixed_precision "$PRECISION")
fi
common=(--model "$MODEL" --batch-size "$BATCH" --resize "$RESIZE" --crop "$CROP" --precision "$PRECISION")

section() { printf '\n== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)" | tee -a "$results"; }
record() { "$@" 2>&1 | tee -a "$results"; }

section "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  echo "cpus $(nproc)"; } 2>&1 | tee -a "$results"

section "data: synth $PEOPLE people, shards"
[ -f "$WORK/data/synth.json" ] || "$MASKDIST" synth "$WORK/data" --people "$PEOPLE" --eval-people "$EVAL_PEOPLE" --workers "$NPROC" > "$WORK/synth.log"
[ -f "$WORK/shards/manifest.json" ] || record "$MASKDIST" shards build "$WORK/data/train" --eval "$WORK/data/eval" --out "$WORK/shards" \
  --folds "$FOLDS" --workers "$NPROC" --quiet

section "bench train: $MODEL at $CROP px, $PRECISION"
record "$MASKDIST" bench train --model "$MODEL" --batch-size "$BATCH" --crop "$CROP" --precision "$PRECISION" --steps 20 --rounds 3

section "bench epoch: the training loop at $WORKERS loader workers"
record "$MASKDIST" bench epoch "$WORK/shards" --config recipe --workers "$WORKERS" --steps "$STEPS" --warmup 10 "${common[@]}"

section "recipe: one epoch with TensorBoard"
rm -rf "$WORK/runs"
epoch_steps=()
[ "$EPOCH_STEPS" != 0 ] && epoch_steps=(--max-steps "$EPOCH_STEPS")
record "${launch[@]}" -m maskdist train --config recipe --shards "$WORK/shards" --fold 0 --out "$WORK/runs" --epochs 1 \
  --workers "$TRAIN_WORKERS" --log-every 20 "${common[@]}" "${epoch_steps[@]}"
python - "$WORK/runs/fold0/tb" <<'PY' 2>&1 | tee -a "$results"
import sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0}); acc.Reload()
for tag in ("train/images_per_s", "train/data_wait_frac", "train/step_s", "memory/peak_allocated_mb", "val/macro_f1"):
    if tag in acc.Tags()["scalars"]:
        values = [e.value for e in acc.Scalars(tag)]
        print(f"tensorboard {tag}: last {values[-1]:.4g}, mean {sum(values) / len(values):.4g} over {len(values)} logs")
PY

section "$FOLDS-fold predict"
for fold in $(seq 1 $(( FOLDS - 1 ))); do
  "${launch[@]}" -m maskdist train --config recipe --shards "$WORK/shards" --fold "$fold" --out "$WORK/runs" --epochs 1 \
    --max-steps "$FOLD_STEPS" --workers "$TRAIN_WORKERS" "${common[@]}" > "$WORK/fold$fold.log" 2>&1
done
record "${launch[@]}" -m maskdist predict "$WORK/runs" --shards "$WORK/shards" --out "$WORK/submission.csv" \
  --workers "$TRAIN_WORKERS" --batch-size 256 --precision "$PRECISION"
record "$MASKDIST" score "$WORK/submission.csv" "$WORK/data/eval_answers.csv"
record "$MASKDIST" bench predict "$WORK/runs" --shards "$WORK/shards" --workers "$TRAIN_WORKERS" --batch-size 256 --precision "$PRECISION"

section "done"
echo "results: $results"
