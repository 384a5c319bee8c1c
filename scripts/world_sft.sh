#!/usr/bin/env bash
# Per-domain SFT from the world base (counting, relations, styles), then merges of the three (uniform average and
# TIES against the base), each evaluated on the public prompts with 2 images per prompt. Resumable.
# Usage: bash scripts/world_sft.sh [OUT=runs/ladder]
set -euo pipefail
OUT=${1:-runs/ladder}
source "$(dirname "$0")/ladder_lib.sh"
mkdir -p "$OUT"
declare -A DOMAINS=([counting]='["counting"]' [relations]='["position","color_attr"]' [styles]='["style","colors"]')
for d in counting relations styles; do
  [ -f "$OUT/sft-$d/final/model.safetensors" ] || $K train recipes/world-sft.toml --out "$OUT/sft-$d" --resume \
    --no-progress --set "stages.0.data.tags=${DOMAINS[$d]}"
  eval_world "$OUT/sft-$d/final" "$OUT/sft-$d.json"
done
SFTS="$OUT/sft-counting/final $OUT/sft-relations/final $OUT/sft-styles/final"
[ -d "$OUT/merge-avg" ] || $K merge $SFTS --out "$OUT/merge-avg"
eval_world "$OUT/merge-avg" "$OUT/merge-avg.json"
[ -d "$OUT/merge-ties" ] || $K merge $SFTS --out "$OUT/merge-ties" --method ties --base world --density 0.3
eval_world "$OUT/merge-ties" "$OUT/merge-ties.json"
# Flow-GRPO trains without CFG: the RL model and the base also at guidance 0
eval_world "$OUT/rl/final" "$OUT/rl-g0.json" --guidance 0
eval_world world "$OUT/base-g0.json" --guidance 0
