#!/usr/bin/env bash
# The base-model ablation of BENCHMARKS.md ("World base: pixel vs latent at equal wall time"): both arms start from
# the pixel model START (default: the shipped `world`; the measured run started from the ship before it, i.e.
# runs/world-binding/final of `make world-base`) and train side by side, one thread each on the 2-core machine
# (nothing else running), for about 30 minutes; then each is scored on the public prompts with 2 images per prompt.
# Resumable: a finished arm is skipped, an interrupted one continues with --resume.
#   bash scripts/base_ablation.sh [runs/ablation]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ladder_lib.sh
export OMP_NUM_THREADS=1
OUT=${1:-runs/ablation}
mkdir -p "$OUT"
arm() {
  [ -d "$OUT/$1/final" ] && return 0
  local start; start=$(date +%s)
  local key; key=$([ "$1" = pixel ] && echo model.init || echo model.transfer)
  $K train "recipes/world-ablation-$1.toml" --out "$OUT/$1" --set "$key=${START:-world}" \
    $([ -d "$OUT/$1" ] && echo --resume) > "$OUT/$1.log" 2>&1
  echo "$1: $(( $(date +%s) - start )) s wall (this run)" >> "$OUT/wall.txt"
}
arm latent & a=$!; arm pixel & b=$!
wait $a; wait $b  # each arm's exit status: a failed arm stops the script
eval_world "$OUT/latent/final" "$OUT/latent/report.json" & a=$!
eval_world "$OUT/pixel/final" "$OUT/pixel/report.json" & b=$!
wait $a; wait $b
