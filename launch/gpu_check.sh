#!/usr/bin/env bash
# GPU check: proves the GPU path on one GPU and writes every figure, with one PASS/FAIL line
# per check against its target, to WORKDIR/gpu_check_results.txt (aimed at under 10 minutes
# on one H200-class GPU, data synthesis included).
#
#   launch/gpu_check.sh [WORKDIR]
#
# Checks (SECTIONS, in order):
#   machine         driver, torch.version.cuda, cuDNN, bf16, /dev/shm; stops at once when CUDA is not usable
#   data            synthetic data (PEOPLE) and its shards
#   bench_train     efficientnet_b3 at 150 px, bf16, channels_last: maskdist's step vs a bare loop, without and with --compile (ratio >= 0.95)
#   batch_sweep     bench train at batch 64, 128, 256: img/s and peak memory
#   bench_epoch     the real loop from shards at 4, 8, 16 workers: data wait < 5%, and >= TARGET_IMG_S img/s at the best
#   sync_debug      steps under torch.cuda.set_sync_debug_mode("warn"), bf16 and fp16: no hidden per-step syncs
#   fp16            a short fp16 run: finite loss, the scaler steps
#   compile_predict train with --compile, then predict from its best model
#   roundtrip       a saved best model loads back to the in-memory model's logits
#   sigterm_resume  SIGTERM mid-epoch with EMA on: exit 75, then --resume on CUDA finishes
#   strong          a few steps of the strong preset
#   predict         FOLDS fold models of a few steps; predict in bf16 and fp32; bench predict (ratio >= 0.9)
#   agreement       bf16 vs fp32 predict agreement (>= 99% same class)
#   profile         a short torch.profiler trace of training steps, saved beside the results
# A failed check records its error and the script goes on to the next.
#
# It runs with the project's own environment (.venv beside launch/, or PY=/path/to/python), not
# whatever python is on the PATH. Every size is an environment variable, so the same script
# runs CPU-sized in the tests (ALLOW_CPU=1 lets it continue without CUDA):
#   PEOPLE (2700) EVAL_PEOPLE (1800) MODEL (efficientnet_b3) BATCH (128) CROP (150) RESIZE (224)
#   PRECISION (bf16) WORKERS (4,8,16) TRAIN_WORKERS (8) STEPS (100) FOLD_STEPS (20) FOLDS (5)
#   NPROC (cores for synth and shards) TARGET_IMG_S (5000) SECTIONS (all of the above)
#   PRETRAINED (none: the checks measure speed and correctness, and need no network; hub or FILE)
set -uo pipefail
WORK=${1:-gpu_check}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
if [ -z "${PY:-}" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then
    PY="$repo/.venv/bin/python"
  else
    echo "gpu_check: no $repo/.venv: install the project (README) or set PY=/path/to/its/python" >&2
    exit 2
  fi
fi
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
FOLDS=${FOLDS:-5}
NPROC=${NPROC:-$(nproc)}
TARGET_IMG_S=${TARGET_IMG_S:-5000}
PRETRAINED=${PRETRAINED:-none}
SECTIONS=${SECTIONS:-machine data bench_train batch_sweep bench_epoch sync_debug fp16 compile_predict roundtrip sigterm_resume strong predict agreement profile}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
results="$WORK/gpu_check_results.txt"
: > "$results"
export HF_HOME=${HF_HOME:-$WORK/hf}  # no stale accelerate config
maskdist=("$PY" -m maskdist)
check=("$PY" "$here/gpu_check.py")
shards="$WORK/shards"
sizes=(--model "$MODEL" --batch-size "$BATCH" --resize "$RESIZE" --crop "$CROP")
train=("${maskdist[@]}" train --config recipe --shards "$shards" "${sizes[@]}" --precision "$PRECISION" --workers "$TRAIN_WORKERS"
       --pretrained "$PRETRAINED")

json() { "${check[@]}" json "$1"; }

machine() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  echo "cpus $(nproc)"
  "${check[@]}" machine
}

data() {
  [ -f "$WORK/data/synth.json" ] || "${maskdist[@]}" synth "$WORK/data" --people "$PEOPLE" --eval-people "$EVAL_PEOPLE" \
    --workers "$NPROC" --quiet > "$WORK/synth.log" || return 1
  [ -f "$shards/manifest.json" ] || "${maskdist[@]}" shards build "$WORK/data/train" --eval "$WORK/data/eval" --out "$shards" \
    --folds "$FOLDS" --workers "$NPROC" --quiet
}

bench_train() {
  local plain compiled
  plain=$("${maskdist[@]}" bench train --model "$MODEL" --batch-size "$BATCH" --crop "$CROP" --precision "$PRECISION" \
    --steps 20 --rounds 3 --json) || return 1
  echo "$plain"
  "${check[@]}" target "bench train ratio" "$(json ratio <<< "$plain")" ">=" 0.95
  compiled=$("${maskdist[@]}" bench train --model "$MODEL" --batch-size "$BATCH" --crop "$CROP" --precision "$PRECISION" \
    --steps 20 --rounds 3 --compile --json) || return 1
  echo "$compiled"
  "${check[@]}" target "bench train ratio with --compile" "$(json ratio <<< "$compiled")" ">=" 0.95
}

batch_sweep() {
  local b out
  for b in 64 128 256; do
    out=$("${maskdist[@]}" bench train --model "$MODEL" --batch-size "$b" --crop "$CROP" --precision "$PRECISION" \
      --steps 10 --rounds 1 --json) || return 1
    echo "batch $b: $("$PY" -c "import json,sys; d=json.load(sys.stdin); print(f\"{d['batch_size'] / d['maskdist_step_s']:.0f} img/s, peak {d['peak_memory_mb']} MB\")" <<< "$out")"
  done
}

bench_epoch() {
  local out
  out=$("${maskdist[@]}" bench epoch "$shards" --config recipe --workers "$WORKERS" --steps "$STEPS" --warmup 10 "${sizes[@]}" \
    --precision "$PRECISION" --json) || return 1
  echo "$out" | tee "$WORK/bench_epoch.json"
  "$PY" - "$TARGET_IMG_S" "$WORK/bench_epoch.json" <<'PY'
import json, sys
data, target = json.load(open(sys.argv[2])), float(sys.argv[1])
for workers, wait in data["data_wait_frac"].items():
    rate = data["images_per_s"][workers]
    print(f"{'PASS' if wait < 0.05 else 'FAIL'} bench epoch {workers} workers data wait: {100 * wait:.1f}% (target < 5%), {rate:.0f} img/s")
best = max(data["images_per_s"].values())
print(f"{'PASS' if best >= target else 'FAIL'} bench epoch img/s: {best:.0f} (target >= {target:.0f})")
PY
}

sync_debug() {
  local p status=0
  for p in bf16 fp16; do
    "${check[@]}" sync-debug "$shards" --precision "$p" "${sizes[@]}" --workers "$TRAIN_WORKERS" --steps 20 || status=1
  done
  return $status
}

fp16() { "${check[@]}" fp16 "$shards" "${sizes[@]}" --workers "$TRAIN_WORKERS" --steps 20; }

compile_predict() {
  rm -rf "$WORK/runs_compile"
  "${train[@]}" --fold 0 --out "$WORK/runs_compile" --epochs 1 --max-steps "$FOLD_STEPS" --compile > "$WORK/compile.log" 2>&1 \
    || { tail -3 "$WORK/compile.log"; return 1; }
  "${maskdist[@]}" predict "$WORK/runs_compile/fold0" --shards "$shards" --out "$WORK/compile_submission.csv" \
    --workers "$TRAIN_WORKERS" --batch-size 256 --precision "$PRECISION" || return 1
  echo "PASS compile then predict: the compiled run's best model predicts"
}

roundtrip() { "${check[@]}" roundtrip "$shards" "${sizes[@]}" --workers "$TRAIN_WORKERS" --steps 10 --precision "$PRECISION"; }

sigterm_resume() {
  local out="$WORK/runs_sigterm" pid status
  rm -rf "$out"
  "${train[@]}" --fold 0 --out "$out" --epochs 2 --max-steps "$FOLD_STEPS" --ema-decay 0.99 --log-batches > "$WORK/sigterm.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 600); do
    [ -f "$out/fold0/batches/rank0.txt" ] && [ "$(wc -l < "$out/fold0/batches/rank0.txt")" -ge 3 ] && break
    sleep 0.5
  done
  kill -TERM "$pid"
  wait "$pid"; status=$?
  [ "$status" = 75 ] || { echo "FAIL sigterm: exit $status, expected 75"; tail -3 "$WORK/sigterm.log"; return 1; }
  "${train[@]}" --fold 0 --out "$out" --epochs 2 --max-steps "$FOLD_STEPS" --ema-decay 0.99 --log-batches --resume \
    > "$WORK/resume.log" 2>&1 || { tail -3 "$WORK/resume.log"; return 1; }
  echo "PASS sigterm then resume: exit 75, then $(grep -o 'resuming at epoch [0-9]* step [0-9]*' "$WORK/resume.log")"
}

strong() {
  rm -rf "$WORK/runs_strong"
  "${maskdist[@]}" train --config strong --shards "$shards" --fold 0 --out "$WORK/runs_strong" --epochs 1 --max-steps 10 \
    "${sizes[@]}" --precision "$PRECISION" --workers "$TRAIN_WORKERS" --pretrained "$PRETRAINED" > "$WORK/strong.log" 2>&1 || { tail -3 "$WORK/strong.log"; return 1; }
  echo "PASS strong preset: $(grep -o 'epoch 0: .*' "$WORK/strong.log" | head -1)"
}

predict() {
  local fold out
  rm -rf "$WORK/runs"
  for fold in $(seq 0 $(( FOLDS - 1 ))); do
    "${train[@]}" --fold "$fold" --out "$WORK/runs" --epochs 1 --max-steps "$FOLD_STEPS" > "$WORK/fold$fold.log" 2>&1 \
      || { tail -3 "$WORK/fold$fold.log"; return 1; }
  done
  "${maskdist[@]}" predict "$WORK/runs" --shards "$shards" --out "$WORK/submission.csv" --workers "$TRAIN_WORKERS" \
    --batch-size 256 --precision "$PRECISION" || return 1
  "${maskdist[@]}" predict "$WORK/runs" --shards "$shards" --out "$WORK/submission_fp32.csv" --workers "$TRAIN_WORKERS" \
    --batch-size 256 --precision no || return 1
  "${maskdist[@]}" score "$WORK/submission.csv" "$WORK/data/eval_answers.csv"
  out=$("${maskdist[@]}" bench predict "$WORK/runs" --shards "$shards" --workers "$TRAIN_WORKERS" --batch-size 256 \
    --precision "$PRECISION" --json) || return 1
  echo "$out"
  "${check[@]}" target "bench predict ratio" "$(json ratio <<< "$out")" ">=" 0.9
}

agreement() { "${check[@]}" agreement "$WORK/submission.probs.npz" "$WORK/submission_fp32.probs.npz"; }

profile() { "${check[@]}" profile "$shards" "$WORK/profile" "${sizes[@]}" --workers "$TRAIN_WORKERS" --steps 10 --precision "$PRECISION"; }

for name in $SECTIONS; do
  printf '\n== %s (%s)\n' "$name" "$(date -u +%H:%M:%S)" | tee -a "$results"
  "$name" 2>&1 | tee -a "$results"
  status=${PIPESTATUS[0]}
  if [ "$status" != 0 ]; then
    echo "FAIL $name: exit $status (its output is above)" | tee -a "$results"
    if [ "$name" = machine ] && [ "${ALLOW_CPU:-0}" != 1 ]; then
      echo "stopping: CUDA is not usable here (see above); every other check needs it" | tee -a "$results"
      exit 1
    fi
  fi
done
summary=$(grep -E '^(PASS|FAIL) ' "$results")
printf '\n== summary\n%s\n' "$summary" | tee -a "$results"
echo "results: $results"
