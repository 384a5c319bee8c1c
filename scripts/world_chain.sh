#!/usr/bin/env bash
# The post-training chain on the world base, each rung from the one before (BENCHMARKS.md "Post-training chain"):
#   base -> per-domain SFT (counting, relations, styles) -> TIES merge (the SFT rung; the uniform average beside it)
#   -> on-policy + off-policy pairs from the SFT rung -> STPO (Diffusion-DPO beside it, same pairs, noise and seeds)
#   -> strict pairs from the STPO model -> a small calibration STPO stage
#   -> Flow-GRPO (rubric + strict + artifacts + aesthetic, no CFG) = world-rl (shipped: see the Makefile).
# Every rung is evaluated on the public prompts (2 images per prompt); every step is skipped when its output exists,
# so an interrupted chain is resumed by running it again (a rerun rung does not invalidate the later ones: delete
# them too). One heavy job at a time, 1 thread (ladder_lib.sh).
# Usage: bash scripts/world_chain.sh [OUT=runs/chain] [BASE=world]
set -euo pipefail
OUT=${1:-runs/chain}
BASE=${2:-world}
source "$(dirname "$0")/ladder_lib.sh"
mkdir -p "$OUT/eval"
train() {  # recipe, out [--set ...]
  [ -f "$2/final/model.safetensors" ] || $K train "$1" --out "$2" --resume --no-progress "${@:3}"
}
pairs() {  # checkpoint, out [pairs options]
  [ -f "$2" ] || $K pairs --checkpoint "$1" --out "$2" "${@:3}"
}
eval_world "$BASE" "$OUT/eval/base.json"

# 1. per-domain SFT from the base, then merges into one generalist (TIES against the base is the SFT rung)
declare -A DOMAINS=([counting]='["counting"]' [relations]='["position","color_attr"]' [styles]='["style","colors"]')
for d in counting relations styles; do
  train recipes/world-sft.toml "$OUT/sft-$d" --set "model.init=$BASE" --set "stages.0.data.tags=${DOMAINS[$d]}"
  eval_world "$OUT/sft-$d/final" "$OUT/eval/sft-$d.json"
done
SFTS=("$OUT/sft-counting/final" "$OUT/sft-relations/final" "$OUT/sft-styles/final")
[ -d "$OUT/merge-avg" ] || $K merge "${SFTS[@]}" --out "$OUT/merge-avg"
eval_world "$OUT/merge-avg" "$OUT/eval/merge-avg.json"
[ -d "$OUT/sft" ] || $K merge "${SFTS[@]}" --out "$OUT/sft" --method ties --base "$BASE" --density 0.3
eval_world "$OUT/sft" "$OUT/eval/sft.json"

# 2. preference optimisation on pairs sampled from the SFT rung: DPO and STPO side by side, STPO goes on
pairs "$OUT/sft" "$OUT/pairs.parquet" --prompts 160 --group 4 --kind both
for obj in dpo stpo; do
  train recipes/world-po.toml "$OUT/$obj" --set "model.init=$OUT/sft" --set "stages.0.objective.name=$obj" \
    --set "stages.0.data.path=$OUT/pairs.parquet"
  eval_world "$OUT/$obj/final" "$OUT/eval/$obj.json"
done
# calibration: strictly judged pairs (winner passes the exact checker, loser fails) from the STPO model
pairs "$OUT/stpo/final" "$OUT/strict.parquet" --prompts 160 --group 4 --kind both --strict --seed 1
train recipes/world-calibrate.toml "$OUT/calib" --set "model.init=$OUT/stpo/final" \
  --set "stages.0.data.path=$OUT/strict.parquet"
eval_world "$OUT/calib/final" "$OUT/eval/calib.json"

# 3. Flow-GRPO from the calibrated model (trained without CFG: evaluated at its preset and at guidance 0), with the
# aesthetic stand-in trained against the base's samples (the one shipped as world_aesthetic, for BASE=world)
[ -f "$OUT/aesthetic/aesthetic.safetensors" ] || $K train-aesthetic --checkpoint "$BASE" --out "$OUT/aesthetic" \
  --no-progress
REWARDS="{world_rubric = 1.0, world_strict = 0.5, world_artifacts = 1.0, \"world_aesthetic:$OUT/aesthetic\" = 0.5}"
train recipes/world-rl.toml "$OUT/rl" --set "model.init=$OUT/calib/final" --set "stages.0.objective.rewards=$REWARDS"
eval_world "$OUT/rl/final" "$OUT/eval/rl.json"
eval_world "$OUT/rl/final" "$OUT/eval/rl-g0.json" --guidance 0
eval_world "$OUT/calib/final" "$OUT/eval/calib-g0.json" --guidance 0
.venv/bin/python benchmarks/ladder_table.py "$OUT"/eval/{base,sft-counting,sft-relations,sft-styles,merge-avg,sft,dpo,stpo} \
  "$OUT"/eval/{calib,rl,calib-g0,rl-g0}.json
