#!/usr/bin/env bash
# Turbo on the world model, measured (BENCHMARKS.md "World Turbo"): the teacher at its preset and at 8/4 Euler steps;
# TDM students at 8 (shipped) and 4 steps (recipes/world-turbo.toml) and a DMD2 student at 4 steps (recipes/world-turbo-dmd2.toml,
# about the same CPU time as TDM-4); a LoRA trained on the teacher (make lora-demo) applied to the student; the
# teacher-to-student difference extracted as LoRAs of several ranks. Every step is skipped when its output exists.
# Usage: bash scripts/world_turbo.sh [OUT=runs/turbo]
set -euo pipefail
OUT=${1:-runs/turbo}
source "$(dirname "$0")/ladder_lib.sh"
mkdir -p "$OUT/eval" "$OUT/lora"
train() {  # recipe, out [--set ...]
  [ -f "$2/final/model.safetensors" ] || $K train "$1" --out "$2" --resume --no-progress "${@:3}"
}
train recipes/world-turbo.toml "$OUT/tdm8"
train recipes/world-turbo.toml "$OUT/tdm4" --set stages.0.objective.student_steps=4 --set sampling.steps=4
train recipes/world-turbo-dmd2.toml "$OUT/dmd2_4"

for s in 20 8 4; do eval_world world "$OUT/eval/teacher_s$s.json" --steps "$s"; done
eval_world "$OUT/tdm4/final" "$OUT/eval/tdm4.json"
eval_world "$OUT/tdm8/final" "$OUT/eval/tdm8.json"
eval_world "$OUT/tdm8/final" "$OUT/eval/tdm8_at4.json" --steps 4
eval_world "$OUT/dmd2_4/final" "$OUT/eval/dmd2_4.json"

# a LoRA trained on the teacher, on the student: the "zorb" prompts of the LoRA demo, 4 images per prompt
ZORB=runs/lora-demo/run/zorb/lora.safetensors
[ -f "$ZORB" ] || bash "$(dirname "$0")/lora_demo.sh" runs/lora-demo
zorb() { [ -f "$2" ] || $K eval world --checkpoint "$1" --prompts runs/lora-demo/zorb.jsonl --images-per-prompt 4 \
  --no-fid --out "$2" "${@:3}"; }
for st in tdm8 tdm4; do
  [ -f "$OUT/lora/$st+zorb/model.safetensors" ] || $K lora merge "$OUT/$st/final" "$ZORB" --out "$OUT/lora/$st+zorb"
done
zorb world "$OUT/eval/zorb_teacher.json"
zorb runs/lora-demo/run/final "$OUT/eval/zorb_teacher+lora.json"
for st in tdm8 tdm4; do
  zorb "$OUT/$st/final" "$OUT/eval/zorb_$st.json"
  zorb "$OUT/lora/$st+zorb" "$OUT/eval/zorb_$st+lora.json"
done

# the teacher-to-student difference as a LoRA: reconstruction error per rank, and the teacher + LoRA at 4 steps
for r in 4 16 64; do
  [ -f "$OUT/lora/distill_r$r.safetensors" ] || $K lora extract world "$OUT/tdm4/final" --rank "$r" \
    --out "$OUT/lora/distill_r$r.safetensors" | tee "$OUT/lora/distill_r$r.log"
  [ -f "$OUT/lora/world+distill_r$r/model.safetensors" ] || $K lora merge world "$OUT/lora/distill_r$r.safetensors" \
    --out "$OUT/lora/world+distill_r$r"
  eval_world "$OUT/lora/world+distill_r$r" "$OUT/eval/world+distill_r$r.json" --steps 4 --guidance 0 --mu 1.15
done
