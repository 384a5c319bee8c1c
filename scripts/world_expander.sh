#!/usr/bin/env bash
# The world prompt expander end to end (about 1.5 hours on 2 cores; each step is skipped when its output exists and
# --resume continues an interrupted run):
#   SFT from scratch (trl.SFTTrainer, 1,200 steps) -> more SFT on fresh pairs (1,200 steps, lr 1e-3)
#   -> GRPO (trl.GRPOTrainer, GDPO aggregation, 200 steps) -> eval on the public prompts (2 expansions and images per
#   prompt, the world base drawing): the model alone at medium, the guarded expander at low / medium / high
#   -> ship the GRPO model as `--expander world`.
# Usage: bash scripts/world_expander.sh [OUT=runs/expander]
set -euo pipefail
OUT=${1:-runs/expander}
BIN=${VENV:-.venv}/bin
mkdir -p "$OUT/eval"
[ -f "$OUT/sft/final/expander.json" ] || $BIN/krea2-expander sft --out "$OUT/sft" --steps 1200 --resume
[ -f "$OUT/sft2/final/expander.json" ] || $BIN/krea2-expander sft --init "$OUT/sft/final" --out "$OUT/sft2" \
  --steps 1200 --lr 1e-3 --seed 1 --resume
[ -f "$OUT/rl2/final/expander.json" ] || $BIN/krea2-expander grpo --init "$OUT/sft2/final" --out "$OUT/rl2" \
  --steps 200 --prompts 150 --lr 5e-4 --diversity-weight 1.5 --resume
ev() {  # ev NAME LEVEL [--verify]
  [ -f "$OUT/eval/$1.json" ] || $BIN/krea2 eval expander --expander "$OUT/rl2/final" --creativity "$2" ${3:-} \
    --out "$OUT/eval/$1.json" | tail -1
}
ev rl2-medium medium
for level in low medium high; do ev "rl2-$level-verify" "$level" --verify; done
$BIN/krea2-expander ship "$OUT/rl2/final" --overwrite
