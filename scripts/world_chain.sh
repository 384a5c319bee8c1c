#!/usr/bin/env bash
# The post-training chain on the world base, each rung from the one before (BENCHMARKS.md "Post-training chain"):
#   base -> per-domain SFT (counting, relations, styles) -> merge (uniform average or TIES, whichever scores higher
#   on validation prompts: the SFT rung)
#   -> on-policy + off-policy pairs from the SFT rung -> Diffusion-DPO and STPO (same pairs, noise and seeds; the PO
#   rung is the one scoring higher on the validation prompts) -> strict pairs from it -> a small calibration stage
#   -> Flow-GRPO (rubric + strict + artifacts + aesthetic, no CFG) = world-rl (shipped: see the Makefile).
# Every rung is evaluated on the public prompts (2 images per prompt); every step is skipped when its output exists,
# so an interrupted chain is resumed by running it again (a rerun rung does not invalidate the later ones: delete
# them too). One heavy job at a time, 1 thread (ladder_lib.sh).
# Usage: bash scripts/world_chain.sh [OUT=runs/chain] [BASE=world]
set -euo pipefail
OUT=${1:-runs/chain}
BASE=${2:-world}
source "$(dirname "$0")/ladder_lib.sh"
mkdir -p "$OUT/eval" "$OUT/val"
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
[ -d "$OUT/merge-ties" ] || $K merge "${SFTS[@]}" --out "$OUT/merge-ties" --method ties --base "$BASE" --density 0.3
# the SFT rung is the merge that scores higher on a validation set of fresh grammar prompts (a seed neither the
# public files nor the training pools use), never on the public prompts the ladder reports
VAL="$OUT/val.jsonl"
[ -f "$VAL" ] || .venv/bin/python -c "from krea2.eval.world_eval import write_prompts; write_prompts('$VAL', 20, 500_009)"
eval_val() {  # checkpoint, report: 2 images per validation prompt, no FID
  [ -f "$2" ] || $K eval world --checkpoint "$1" --prompts "$VAL" --images-per-prompt 2 --no-fid --out "$2"
}
best() {  # names of runs under $OUT/val -> the one with the highest validation overall
  .venv/bin/python -c "import json, sys; print(max(sys.argv[2:], key=lambda m: json.load(open(f'{sys.argv[1]}/{m}.json'))[
  'overall']))" "$OUT/val" "$@"
}
for m in merge-avg merge-ties; do
  eval_world "$OUT/$m" "$OUT/eval/$m.json"
  eval_val "$OUT/$m" "$OUT/val/$m.json"
done
SFT=$(best merge-avg merge-ties)
echo "SFT rung: $SFT (validation prompts)"
SFT="$OUT/$SFT"

# 2. preference optimisation on pairs sampled from the SFT rung: Diffusion-DPO and STPO side by side (same pairs, noise
# and seeds); the PO rung is the one that scores higher on the validation prompts
pairs "$SFT" "$OUT/pairs.parquet" --prompts 160 --group 4 --kind both
for obj in dpo stpo; do
  train recipes/world-po.toml "$OUT/$obj" --set "model.init=$SFT" --set "stages.0.objective.name=$obj" \
    --set "stages.0.data.path=$OUT/pairs.parquet"
  eval_world "$OUT/$obj/final" "$OUT/eval/$obj.json"
  eval_val "$OUT/$obj/final" "$OUT/val/$obj.json"
done
PO=$(best dpo stpo)
echo "PO rung: $PO (validation prompts)"
# calibration: strictly judged pairs (winner passes the exact checker, loser fails) from the PO rung, a small stage of
# the same objective
pairs "$OUT/$PO/final" "$OUT/strict.parquet" --prompts 160 --group 4 --kind both --strict --seed 1
train recipes/world-calibrate.toml "$OUT/calib" --set "model.init=$OUT/$PO/final" \
  --set "stages.0.data.path=$OUT/strict.parquet" --set "stages.0.objective.name=$PO"
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
.venv/bin/python benchmarks/ladder_table.py "$OUT"/eval/{base,sft-counting,sft-relations,sft-styles,merge-avg,merge-ties,dpo,stpo}.json \
  "$OUT"/eval/{calib,rl,calib-g0,rl-g0}.json
