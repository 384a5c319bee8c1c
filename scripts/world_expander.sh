#!/usr/bin/env bash
# The world prompt expander end to end: SFT (trl.SFTTrainer) -> GRPO (trl.GRPOTrainer, GDPO aggregation) -> eval of
# both at every creativity level on the public prompts (2 expansions and images per prompt, the world base drawing)
# -> ship the RL model as `--expander world`. Each step is skipped when its output exists; --resume continues a run.
# Usage: bash scripts/world_expander.sh [OUT=runs/expander]
set -euo pipefail
OUT=${1:-runs/expander}
BIN=${VENV:-.venv}/bin
mkdir -p "$OUT/eval"
[ -f "$OUT/sft/final/expander.json" ] || $BIN/krea2-expander sft --out "$OUT/sft" --resume
[ -f "$OUT/rl/final/expander.json" ] || $BIN/krea2-expander grpo --init "$OUT/sft/final" --out "$OUT/rl" --resume
for model in sft rl; do
  for level in low medium high; do
    R="$OUT/eval/$model-$level.json"
    [ -f "$R" ] || $BIN/krea2 eval expander --expander "$OUT/$model/final" --creativity "$level" --out "$R" | tail -1
  done
done
$BIN/krea2-expander ship "$OUT/rl/final" --overwrite
