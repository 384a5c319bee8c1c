#!/usr/bin/env bash
# The world prompt expander end to end (about 1 hour on 2 cores; each step is skipped when its output exists and
# --resume continues an interrupted run):
#   SFT from scratch (trl.SFTTrainer, 1,200 steps) -> GRPO (trl.GRPOTrainer, GDPO aggregation, 100 steps)
#   -> eval on the public prompts (2 expansions and images per prompt, the world base drawing): the model alone at
#   medium, the guarded expander (--verify) at low / medium / high -> ship the GRPO model as `--expander world`.
# BENCHMARKS.md "Prompt expander" also reports a longer arm (more SFT, then 200 GRPO steps) that was not shipped.
# Usage: bash scripts/world_expander.sh [OUT=runs/expander]
set -euo pipefail
OUT=${1:-runs/expander}
BIN=${VENV:-.venv}/bin
mkdir -p "$OUT/eval"
[ -f "$OUT/sft/final/expander.json" ] || $BIN/krea2-expander sft --out "$OUT/sft" --steps 1200 --resume
[ -f "$OUT/rl/final/expander.json" ] || $BIN/krea2-expander grpo --init "$OUT/sft/final" --out "$OUT/rl" \
  --steps 100 --prompts 150 --lr 3e-4 --resume
ev() {  # ev NAME LEVEL [--verify]
  [ -f "$OUT/eval/$1.json" ] || $BIN/krea2 eval expander --expander "$OUT/rl/final" --creativity "$2" ${3:-} \
    --out "$OUT/eval/$1.json" | tail -1
}
ev rl1-medium medium
for level in low medium high; do ev "rl1-$level-verify" "$level" --verify; done
$BIN/krea2-expander ship "$OUT/rl/final" --overwrite
