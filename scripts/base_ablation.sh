#!/usr/bin/env bash
# The base-model ablation of BENCHMARKS.md ("World base: pixel vs latent at equal wall time"): both arms start from
# the shipped pixel model and train side by side, one thread each on the 2-core machine (nothing else running), for
# about 30 minutes; then each is scored on the public prompts with 2 images per prompt. Resumable: a finished arm is
# skipped, an interrupted one continues with --resume.
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
  $K train "recipes/world-ablation-$1.toml" --out "$OUT/$1" $([ -d "$OUT/$1" ] && echo --resume) > "$OUT/$1.log" 2>&1
  echo "$1: $(( $(date +%s) - start )) s wall (this run)" >> "$OUT/wall.txt"
}
arm latent & arm pixel & wait
eval_world "$OUT/latent/final" "$OUT/latent/report.json" & eval_world "$OUT/pixel/final" "$OUT/pixel/report.json" & wait
