#!/usr/bin/env bash
# Multi-GPU check (2 or more GPUs on one machine): the collectives, the preemption group
# beside NCCL, and a killed rank. One PASS/FAIL line per check in WORKDIR/multi_gpu_check_results.txt.
#
#   launch/multi_gpu_check.sh [WORKDIR]      after launch/gpu_check.sh WORKDIR (it reuses its shards)
#
#   collectives   all_reduce (values and bus bandwidth), broadcast_object_list and gather_object over NCCL
#   preemption    SIGTERM to a 2-GPU run: every rank saves once and exits 75 (the agreement runs on gloo
#                 beside NCCL); --resume finishes
#   killed_rank   kill -9 of one rank: the others stop with one line within KILL_LIMIT_S (the gloo agreement
#                 notices the lost peer at the next step; NCCL alone would wait out --timeout-s)
#
# CPU=1 runs the same on CPU processes (gloo): a dry run of the script itself, not a GPU figure.
# Sizes: NPROC_GPU (2) MODEL (efficientnet_b3) BATCH (64) CROP (150) RESIZE (224) PRECISION (bf16) KILL_LIMIT_S (120)
set -uo pipefail
WORK=${1:-gpu_check}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
PY=${PY:-$repo/.venv/bin/python}
[ -x "$PY" ] || { echo "multi_gpu_check: no $PY: install the project (README) or set PY" >&2; exit 2; }
NPROC_GPU=${NPROC_GPU:-2}
MODEL=${MODEL:-efficientnet_b3}
BATCH=${BATCH:-64}
CROP=${CROP:-150}
RESIZE=${RESIZE:-224}
PRECISION=${PRECISION:-bf16}
KILL_LIMIT_S=${KILL_LIMIT_S:-120}
WORK=$(cd "$WORK" && pwd)
shards="$WORK/shards"
results="$WORK/multi_gpu_check_results.txt"
: > "$results"
export HF_HOME=${HF_HOME:-$WORK/hf}
if [ "${CPU:-0}" = 1 ]; then
  export ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1
  PRECISION=no
fi
[ -f "$shards/manifest.json" ] || { echo "multi_gpu_check: no shards in $shards: run launch/gpu_check.sh $WORK first" >&2; exit 2; }
launch=("$PY" -m accelerate.commands.launch --multi_gpu --num_processes "$NPROC_GPU" --num_machines 1 --mixed_precision "$PRECISION" --dynamo_backend no)
train=(-m maskdist train --config recipe --shards "$shards" --model "$MODEL" --batch-size "$BATCH" --resize "$RESIZE" --crop "$CROP"
       --precision "$PRECISION" --workers 4 --timeout-s "$KILL_LIMIT_S" --pretrained "${PRETRAINED:-none}")

collectives() {
  cat > "$WORK/collectives.py" <<'PY'
import time, torch, torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
acc = Accelerator()
world, rank = acc.num_processes, acc.process_index
x = torch.full((64 << 20,), float(rank + 1), device=acc.device)  # 256 MB of float32
dist.all_reduce(x)
ok = bool((x == world * (world + 1) / 2).all())
if acc.device.type == "cuda":
    torch.cuda.synchronize()
start = time.perf_counter()
for _ in range(10):
    dist.all_reduce(x)
if acc.device.type == "cuda":
    torch.cuda.synchronize()
seconds = (time.perf_counter() - start) / 10
bus = 2 * (world - 1) / world * x.numel() * 4 / seconds / 1e9
objects = broadcast_object_list([{"from": rank}])[0] == {"from": 0}
gathered = gather_object([rank]) == list(range(world))
if acc.is_main_process:
    print(f"{'PASS' if ok and objects and gathered else 'FAIL'} collectives on {acc.state.backend}: all_reduce values"
          f" {'right' if ok else 'WRONG'}, {bus:.1f} GB/s bus bandwidth, broadcast_object_list {objects}, gather_object {gathered}")
PY
  "${launch[@]}" "$WORK/collectives.py"
}

preemption() {
  local out="$WORK/runs_multi" pid status
  rm -rf "$out"
  "${launch[@]}" "${train[@]}" --fold 0 --out "$out" --epochs 2 --max-steps 40 --log-batches > "$WORK/multi_sigterm.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 600); do
    [ -f "$out/fold0/batches/rank1.txt" ] && [ "$(wc -l < "$out/fold0/batches/rank1.txt")" -ge 3 ] && break
    sleep 0.5
  done
  kill -TERM "$pid"
  wait "$pid"; status=$?
  local saved
  saved=$(grep -c "saved a resumable state" "$WORK/multi_sigterm.log")
  [ "$status" = 75 ] || { echo "FAIL preemption: launcher exit $status, expected 75"; tail -5 "$WORK/multi_sigterm.log"; return 1; }
  "${launch[@]}" "${train[@]}" --fold 0 --out "$out" --epochs 2 --max-steps 40 --log-batches --resume > "$WORK/multi_resume.log" 2>&1 \
    || { echo "FAIL preemption: --resume failed"; tail -5 "$WORK/multi_resume.log"; return 1; }
  echo "PASS preemption: exit 75 with $saved save line(s), then $(grep -o 'resuming at epoch [0-9]* step [0-9]*' "$WORK/multi_resume.log")"
}

killed_rank() {
  local out="$WORK/runs_kill" pid victim started status
  rm -rf "$out"
  "${launch[@]}" "${train[@]}" --fold 1 --out "$out" --epochs 2 --log-batches > "$WORK/multi_kill.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 600); do
    [ -f "$out/fold1/batches/rank1.txt" ] && [ "$(wc -l < "$out/fold1/batches/rank1.txt")" -ge 3 ] && break
    sleep 0.5
  done
  victim=$(pgrep -P "$pid" -f "maskdist train" | tail -1)
  [ -n "$victim" ] || { echo "FAIL killed rank: no rank found under launcher $pid"; return 1; }
  started=$(date +%s)
  kill -9 "$victim"
  wait "$pid"; status=$?
  local took=$(( $(date +%s) - started ))
  local line
  line=$(grep -m1 "lost contact with another process" "$WORK/multi_kill.log")
  if [ "$took" -le "$KILL_LIMIT_S" ] && [ -n "$line" ]; then
    echo "PASS killed rank: the others stopped in ${took} s (limit ${KILL_LIMIT_S} s), launcher exit $status: ${line:0:160}"
  else
    echo "FAIL killed rank: ${took} s (limit ${KILL_LIMIT_S} s), one-line error ${line:+found}${line:-missing}"
    tail -5 "$WORK/multi_kill.log"
    return 1
  fi
}

for name in collectives preemption killed_rank; do
  printf '\n== %s (%s)\n' "$name" "$(date -u +%H:%M:%S)" | tee -a "$results"
  "$name" 2>&1 | tee -a "$results"
  [ "${PIPESTATUS[0]}" = 0 ] || echo "FAIL $name: see above" | tee -a "$results"
done
summary=$(grep -E '^(PASS|FAIL) ' "$results")
printf '\n== summary\n%s\n' "$summary" | tee -a "$results"
