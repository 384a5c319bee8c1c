#!/usr/bin/env bash
# Per-domain SFT from the world base (counting, relations, styles), then merges of the three (uniform average and
# TIES against the base), each evaluated on the public prompts with 2 images per prompt. Resumable.
# Usage: bash scripts/world_sft.sh [OUT=runs/ladder]
set -euo pipefail
OUT=${1:-runs/ladder}
K=.venv/bin/krea2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
eval_world() {  # checkpoint, report
  [ -f "$2" ] || $K eval world --checkpoint "$1" --prompts world_eval --images-per-prompt 2 --out "$2"
}
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
# the base again with this eval's figures (hf_ratio was added to the report after the first base run)
eval_world world "$OUT/base2.json"
# Flow-GRPO trains without CFG: the RL model and the base also at guidance 0
[ -f "$OUT/rl-g0.json" ] || $K eval world --checkpoint "$OUT/rl/final" --prompts world_eval --images-per-prompt 2 \
  --guidance 0 --out "$OUT/rl-g0.json"
[ -f "$OUT/base-g0.json" ] || $K eval world --checkpoint world --prompts world_eval --images-per-prompt 2 \
  --guidance 0 --out "$OUT/base-g0.json"
