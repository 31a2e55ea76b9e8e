#!/usr/bin/env bash
# Train every fold of a shard set, then predict with the ensemble (a thin wrapper on `maskdist kfold`).
#   launch/kfold.sh SHARDS OUT [--processes N] [--cpu] [--parallel-folds P --gpus 0,1,2,3] [train options...]
# Change: CONFIG to another experiment config; everything else passes through.
set -euo pipefail
shards=${1:?usage: launch/kfold.sh SHARDS OUT [options]}
out=${2:?usage: launch/kfold.sh SHARDS OUT [options]}
shift 2
CONFIG=${CONFIG:-$(dirname "$0")/configs/recipe.yaml}
exec maskdist kfold --shards "$shards" --out "$out" --config "$CONFIG" "$@"
