#!/usr/bin/env bash
# The post-training ladder on the world base model, one heavy job at a time (resumable: finished steps are skipped).
# Usage: bash scripts/world_ladder.sh [OUT=runs/ladder]
set -euo pipefail
OUT=${1:-runs/ladder}
source "$(dirname "$0")/ladder_lib.sh"
mkdir -p "$OUT"
eval_world world "$OUT/base.json"
[ -f "$OUT/pairs.parquet" ] || $K pairs --out "$OUT/pairs.parquet" --prompts 160 --group 4 --kind both
for obj in dpo stpo; do
  [ -f "$OUT/$obj/final/model.safetensors" ] || $K train recipes/world-po.toml --out "$OUT/$obj" --resume \
    --set "stages.0.objective.name=$obj" --set "stages.0.data.path=$OUT/pairs.parquet" --no-progress
  eval_world "$OUT/$obj/final" "$OUT/$obj.json"
done
[ -f "$OUT/rl/final/model.safetensors" ] || $K train recipes/world-rl.toml --out "$OUT/rl" --resume --no-progress
eval_world "$OUT/rl/final" "$OUT/rl.json"
