#!/usr/bin/env bash
# GPU check: proves the GPU path on one GPU, most valuable figures first, within a time budget,
# and writes everything to WORKDIR/gpu_check_results.txt: the machine first, then each section's
# output and PASS/FAIL lines, and at the end a table (section, PASS / FAIL / SKIPPED, figure,
# target, seconds), the sections not run and the SECTIONS value that would run them next.
#
#   launch/gpu_check.sh [WORKDIR]
#   DRY_RUN=1 launch/gpu_check.sh        the plan only: each section's estimate against the budget
#
# Sections (SECTIONS, default all, in this order: what they prove, most valuable first):
#   machine         GPU, driver, torch, CUDA, cuDNN, cores, /dev/shm; a few bf16 training steps. Stops
#                   the run at once when CUDA is not usable
#   bench_train     efficientnet_b3 at 150 px, bf16, channels_last: maskdist's step vs a bare loop (ratio >= 0.95)
#   data            synthetic data (PEOPLE, EVAL_PEOPLE) and its shards, built with NPROC processes
#   bench_epoch     the real loop from shards at each WORKERS count: data wait < 5%, >= TARGET_IMG_S img/s at the best
#   predict         FOLDS fold models of FOLD_STEPS steps, trained side by side; predict in bf16 and fp32; bench
#                   predict (ratio >= 0.9)
#   agreement       bf16 vs fp32 predict agreement (>= 99% same class)
#   compile_resume  train --compile with EMA, SIGTERM mid-epoch: exit 75; --resume (the compiled graph from the
#                   inductor cache) finishes; predict from its best model (was compile_predict and sigterm_resume)
#   sync_debug      steps under torch.cuda.set_sync_debug_mode("warn"): no hidden per-step syncs
#   fp16            a short fp16 run: finite loss, the scaler steps, no hidden per-step syncs
#   profile         a short torch.profiler trace of training steps, saved beside the results (profile/)
#   roundtrip       a saved best model loads back to the in-memory model's logits
#   batch_sweep     bench train at batch 64, 128, 256: img/s and peak memory
#   strong          a few steps of the strong preset
#   bench_compile   bench train with --compile (ratio >= 0.95): a second graph to compile, so last
# A failed check records its error and the next section runs.
#
# The budget: every section has an estimated cost on the GPU machine (launch/gpu_check_plan.py:
# the assumptions, scaled by the sizes below). A section whose estimate does not fit the time
# left is skipped and listed as not reached; one that runs is stopped when the budget runs out
# (the table is still written). BUDGET_S defaults to the limit of a `timeout` that runs this
# script, less 10 s, else 420. EST_S='name=seconds ...' replaces estimates (e.g. the seconds of a
# previous run's table). A section needing the shards, or predict's output, is skipped without them.
#
# It runs with the project's own environment (.venv beside launch/, or PY=/path/to/python), not
# whatever python is on the PATH. Every size is an environment variable, so the same script
# runs CPU-sized in the tests (ALLOW_CPU=1 lets it continue without CUDA):
#   PEOPLE (1200) EVAL_PEOPLE (900) MODEL (efficientnet_b3) BATCH (128) CROP (150) RESIZE (224)
#   PRECISION (bf16) WORKERS (4,8,16) TRAIN_WORKERS (8) STEPS (100) FOLD_STEPS (20) FOLDS (5)
#   NPROC (processes for synth and shards: every core this process may use, whatever OMP_NUM_THREADS says)
#   TARGET_IMG_S (5000) SECTIONS BUDGET_S EST_S DRY_RUN
#   PRETRAINED (none: the checks measure speed and correctness, and need no network; hub or FILE)
# Exit status: 0 it ran to the end (failed checks are FAIL lines), 1 CUDA is not usable, 2 bad
# settings, 128+N stopped by signal N (the table is written first).
# (Internally each section runs as `gpu_check.sh --section NAME WORKDIR` under its time limit.)
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self="$here/$(basename "${BASH_SOURCE[0]}")"
repo=$(cd "$here/.." && pwd)
if [ -z "${PY:-}" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then
    PY="$repo/.venv/bin/python"
  else
    echo "gpu_check: no $repo/.venv: install the project (README) or set PY=/path/to/its/python" >&2
    exit 2
  fi
fi
section_mode=""
if [ "${1:-}" = --section ]; then
  section_mode=$2
  shift 2
fi
export PY PEOPLE=${PEOPLE:-1200} EVAL_PEOPLE=${EVAL_PEOPLE:-900} MODEL=${MODEL:-efficientnet_b3} BATCH=${BATCH:-128} \
  CROP=${CROP:-150} RESIZE=${RESIZE:-224} PRECISION=${PRECISION:-bf16} WORKERS=${WORKERS:-4,8,16} \
  TRAIN_WORKERS=${TRAIN_WORKERS:-8} STEPS=${STEPS:-100} FOLD_STEPS=${FOLD_STEPS:-20} FOLDS=${FOLDS:-5} \
  TARGET_IMG_S=${TARGET_IMG_S:-5000} PRETRAINED=${PRETRAINED:-none} SECTIONS=${SECTIONS:-} BUDGET_S=${BUDGET_S:-} \
  EST_S=${EST_S:-}
# every core this process may run on; nproc would follow OMP_NUM_THREADS (1 under many launchers)
NPROC=${NPROC:-$("$PY" -c 'import os; print(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())')}
export NPROC
plan=("$PY" "$here/gpu_check_plan.py")

if [ "${DRY_RUN:-0}" = 1 ] && [ -z "$section_mode" ]; then
  tsv=$(mktemp)
  "${plan[@]}" plan "$tsv" --parent-pid "$PPID"; status=$?
  rm -f "$tsv"
  exit $status
fi

WORK=${1:-gpu_check}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
export HF_HOME=${HF_HOME:-$WORK/hf}  # no stale accelerate config
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor}  # a graph compiled once is reused by later runs
maskdist=("$PY" -m maskdist)
check=("$PY" "$here/gpu_check.py")
shards="$WORK/shards"
sizes=(--model "$MODEL" --batch-size "$BATCH" --resize "$RESIZE" --crop "$CROP")
train=("${maskdist[@]}" train --config recipe --shards "$shards" "${sizes[@]}" --precision "$PRECISION" --pretrained "$PRETRAINED")

now() { date +%s.%N; }
since() { awk -v s="$1" -v e="$(now)" 'BEGIN { printf "%.1f", e - s }'; }
figure() { echo "figure: $*"; }

machine() {
  local cpu=()
  [ "${ALLOW_CPU:-0}" = 1 ] && cpu=(--allow-cpu)
  "${check[@]}" machine --model "$MODEL" --batch-size "$BATCH" --crop "$CROP" --precision "$PRECISION" "${cpu[@]}"
}

bench_train() {
  local out
  out=$("${maskdist[@]}" bench train --model "$MODEL" --batch-size "$BATCH" --crop "$CROP" --precision "$PRECISION" \
    --steps 20 --rounds 3 --json "$@") || return 1
  echo "$out"
  "${check[@]}" summary bench-train --target 0.95 <<< "$out"
}

bench_compile() { bench_train --compile; }

data() {
  local started images synth_s="" shards_s=""
  field() { [ -f "$2" ] && "${check[@]}" json "$1" < "$2" 2> /dev/null; }
  if [ "$(field parameters.people "$WORK/data/synth.json")/$(field parameters.eval_people "$WORK/data/synth.json")" \
       = "$PEOPLE/$EVAL_PEOPLE" ]; then
    echo "data: $WORK/data already holds $PEOPLE + $EVAL_PEOPLE people"
  else
    started=$(now)
    "${maskdist[@]}" synth "$WORK/data" --people "$PEOPLE" --eval-people "$EVAL_PEOPLE" --workers "$NPROC" --quiet \
      --overwrite > "$WORK/synth.log" 2>&1 || { tail -3 "$WORK/synth.log"; return 1; }
    synth_s=$(since "$started")
    rm -rf "$shards"  # new data: new shards
  fi
  images=$(( $(field train_images "$WORK/data/synth.json") + $(field eval_images "$WORK/data/synth.json") ))
  if [ "$(field build.folds "$shards/manifest.json")" = "$FOLDS" ]; then
    echo "data: $shards already holds its $FOLDS-fold shards"
  else
    started=$(now)
    "${maskdist[@]}" shards build "$WORK/data/train" --eval "$WORK/data/eval" --out "$shards" --folds "$FOLDS" \
      --workers "$NPROC" --quiet --overwrite > "$WORK/shards.log" 2>&1 || { tail -3 "$WORK/shards.log"; return 1; }
    shards_s=$(since "$started")
  fi
  rate() { [ -n "$1" ] && awk -v n="$images" -v s="$1" 'BEGIN { printf "%s s (%.0f img/s)", s, n / s }' || echo "reused"; }
  echo "data: $images images; synth $(rate "$synth_s"), shards $(rate "$shards_s"), $NPROC processes each"
  figure "$images images ($PEOPLE + $EVAL_PEOPLE people), $NPROC processes: synth $(rate "$synth_s"), shards $(rate "$shards_s")"
}

bench_epoch() {
  local out
  out=$("${maskdist[@]}" bench epoch "$shards" --config recipe --workers "$WORKERS" --steps "$STEPS" --warmup 10 "${sizes[@]}" \
    --precision "$PRECISION" --json) || return 1
  echo "$out" | tee "$WORK/bench_epoch.json"
  "${check[@]}" summary bench-epoch --target "$TARGET_IMG_S" < "$WORK/bench_epoch.json"
}

predict() {
  local fold pids=() status=0 started out per_fold
  rm -rf "$WORK/runs" "$WORK"/submission*
  # the fold models only need to exist: train them side by side, sharing the GPU and the cores
  per_fold=$(( NPROC / FOLDS > TRAIN_WORKERS ? TRAIN_WORKERS : (NPROC / FOLDS > 0 ? NPROC / FOLDS : 1) ))
  started=$(now)
  for fold in $(seq 0 $(( FOLDS - 1 ))); do
    "${train[@]}" --workers "$per_fold" --fold "$fold" --out "$WORK/runs" --epochs 1 --max-steps "$FOLD_STEPS" \
      > "$WORK/fold$fold.log" 2>&1 &
    pids+=($!)
  done
  for fold in "${!pids[@]}"; do
    wait "${pids[$fold]}" || { echo "FAIL fold $fold training: its log $WORK/fold$fold.log ends:"; tail -3 "$WORK/fold$fold.log"; status=1; }
  done
  [ "$status" = 0 ] || return 1
  echo "$FOLDS fold models trained side by side ($per_fold loader workers each) in $(since "$started") s"
  for p in "$PRECISION:submission" no:submission_fp32; do  # the check's precision, then fp32 for agreement
    started=$(now)
    "${maskdist[@]}" predict "$WORK/runs" --shards "$shards" --out "$WORK/${p#*:}.csv" --workers "$TRAIN_WORKERS" --batch-size 256 \
      --precision "${p%%:*}" || return 1
    echo "predict --precision ${p%%:*}: $(since "$started") s"
  done
  "${maskdist[@]}" score "$WORK/submission.csv" "$WORK/data/eval_answers.csv"
  out=$("${maskdist[@]}" bench predict "$WORK/runs" --shards "$shards" --workers "$TRAIN_WORKERS" --batch-size 256 \
    --precision "$PRECISION" --json) || return 1
  echo "$out"
  "${check[@]}" summary bench-predict --target 0.9 <<< "$out"
}

agreement() { "${check[@]}" agreement "$WORK/submission.probs.npz" "$WORK/submission_fp32.probs.npz"; }

compile_resume() {
  local out="$WORK/runs_compile" batches pid status started first_s resumed_s
  local run=("${train[@]}" --workers "$TRAIN_WORKERS" --fold 0 --out "$out" --epochs 2 --max-steps "$FOLD_STEPS" --ema-decay 0.99
             --log-batches --compile)
  batches="$out/fold0/batches/rank0.txt"
  rm -rf "$out"
  started=$(now)
  "${run[@]}" > "$WORK/compile.log" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2> /dev/null; do
    [ -f "$batches" ] && [ "$(wc -l < "$batches")" -ge 3 ] && break
    sleep 0.1
  done
  first_s=$(since "$started")
  # frozen while signalled: it handles SIGTERM where it stands, not a few (short) steps later
  kill -STOP "$pid" 2> /dev/null && kill -TERM "$pid" && kill -CONT "$pid"
  wait "$pid"; status=$?
  [ "$status" = 75 ] || { echo "FAIL sigterm: exit $status, expected 75; $WORK/compile.log ends:"; tail -3 "$WORK/compile.log"; return 1; }
  started=$(now)
  "${run[@]}" --resume > "$WORK/resume.log" 2>&1 || { tail -3 "$WORK/resume.log"; return 1; }
  resumed_s=$(since "$started")
  "${maskdist[@]}" predict "$out/fold0" --shards "$shards" --out "$WORK/compile_submission.csv" --workers "$TRAIN_WORKERS" \
    --batch-size 256 --precision "$PRECISION" || return 1
  local where first resumed
  where=$(grep -o 'resuming at epoch [0-9]* step [0-9]*' "$WORK/resume.log" | head -1)
  first="exit 75 after 3 batches, ${first_s} s from the start (the compile included)"
  resumed="then ${where:-resumed}, finished in ${resumed_s} s (its graph from the inductor cache)"
  echo "PASS compile, SIGTERM, resume, predict: $first, $resumed; its best model predicts"
  figure "$first; $resumed; predicts"
}

sync_debug() { "${check[@]}" sync-debug "$shards" --precision "$PRECISION" "${sizes[@]}" --workers "$TRAIN_WORKERS" --steps 20; }

fp16() { "${check[@]}" fp16 "$shards" "${sizes[@]}" --workers "$TRAIN_WORKERS" --steps 20; }

profile() { "${check[@]}" profile "$shards" "$WORK/profile" "${sizes[@]}" --workers "$TRAIN_WORKERS" --steps 10 --precision "$PRECISION"; }

roundtrip() { "${check[@]}" roundtrip "$shards" "${sizes[@]}" --workers "$TRAIN_WORKERS" --steps 10 --precision "$PRECISION"; }

batch_sweep() { "${check[@]}" batch-sweep --batches 64,128,256 --model "$MODEL" --crop "$CROP" --precision "$PRECISION"; }

strong() {
  rm -rf "$WORK/runs_strong"
  "${maskdist[@]}" train --config strong --shards "$shards" --fold 0 --out "$WORK/runs_strong" --epochs 1 --max-steps 10 \
    "${sizes[@]}" --precision "$PRECISION" --workers "$TRAIN_WORKERS" --pretrained "$PRETRAINED" > "$WORK/strong.log" 2>&1 || { tail -3 "$WORK/strong.log"; return 1; }
  echo "PASS strong preset: $(grep -o 'epoch 0: .*' "$WORK/strong.log" | head -1)"
}

if [ -n "$section_mode" ]; then
  "$section_mode"
  exit $?
fi

# ---- the run: plan, then each section in order within the budget, then the table
results="$WORK/gpu_check_results.txt"
logs="$WORK/sections"
records="$WORK/sections.tsv"
plan_tsv="$WORK/plan.tsv"
plan_txt=$("${plan[@]}" plan "$plan_tsv" --parent-pid "$PPID") || exit 2  # bad settings: said on stderr, nothing touched
: > "$results"
: > "$records"
rm -rf "$logs"
mkdir -p "$logs"
echo "$plan_txt" > "$logs/plan.txt"
order=()
declare -A estimate needs
while IFS=$'\t' read -r kind name value need; do
  case $kind in
    budget) budget=$name ;;
    section) order+=("$name"); estimate[$name]=$value; needs[$name]=$need ;;
  esac
done < "$plan_tsv"

say() { echo "$*" | tee -a "$results"; }
record() { printf '%s\t%s\t%s\t%s\n' "$@" >> "$records"; }
show_plan() { [ -s "$results" ] && say ""; say "== plan"; tee -a "$results" < "$logs/plan.txt"; }

current=""
signalled=""
on_signal() {  # stop the running section (its whole process group, through its timeout), then close
  signalled=$1
  [ -n "$current" ] && kill -TERM "$current" 2> /dev/null
}
trap 'on_signal 15' TERM
trap 'on_signal 2' INT

close() {  # $1: why the remaining sections are not reached
  local name
  for name in "${order[@]}"; do
    grep -q "^$name"$'\t' "$records" || record "$name" - "" "$1"
  done
  printf '\n== results\n' | tee -a "$results"
  "${plan[@]}" close "$plan_tsv" "$records" "$logs" | tee -a "$results"
  echo "results: $results"
}

[ "${order[0]}" = machine ] || show_plan
for name in "${order[@]}"; do
  [ -n "$signalled" ] && { close "not reached: stopped by signal $signalled"; exit $(( 128 + signalled )); }
  left=$(( budget - SECONDS ))
  [ -s "$results" ] && say ""
  say "== $name ($(date -u +%H:%M:%S); estimated ${estimate[$name]} s, $left s left of the budget)"
  why=""
  if [ "${needs[$name]}" = data ] && [ ! -f "$shards/manifest.json" ]; then
    why="needs the shards: run data before it"
  elif [ "${needs[$name]}" = predict ] && [ ! -f "$WORK/submission_fp32.probs.npz" ]; then
    why="needs predict's two predictions: run predict before it"
  elif [ "${estimate[$name]}" -gt "$left" ] || [ "$left" -le 0 ]; then
    why="budget: estimated ${estimate[$name]} s, $left s left of $budget"
  fi
  if [ -n "$why" ]; then
    say "SKIPPED $name: $why"
    record "$name" - "" "$why"
    continue
  fi
  started=$(now)
  timeout -k 5 "$left" bash "$self" --section "$name" "$WORK" < /dev/null > "$logs/$name.log" 2>&1 &
  current=$!
  wait "$current"; status=$?
  [ -n "$signalled" ] && { wait "$current"; status=$?; }  # the wait was cut short by the signal: let the section end
  current=""
  seconds=$(since "$started")
  tee -a "$results" < "$logs/$name.log"
  note=""
  if [ -n "$signalled" ]; then
    note="stopped by signal $signalled after $seconds s"
  elif [ "$status" = 124 ] || [ "$status" = 137 ]; then
    note="stopped at the budget after $seconds s"
  fi
  [ "$status" = 0 ] || say "FAIL $name: ${note:-exit $status} (its output is above)"
  record "$name" "$status" "$seconds" "$note"
  [ -n "$signalled" ] && { close "not reached: stopped by signal $signalled"; exit $(( 128 + signalled )); }
  if [ "$name" = machine ]; then
    if [ "$status" != 0 ] && [ "${ALLOW_CPU:-0}" != 1 ]; then
      say "stopping: CUDA is not usable here (see above); every other check needs it"
      close "not reached: CUDA is not usable"
      exit 1
    fi
    show_plan
  fi
done
close "not reached"
