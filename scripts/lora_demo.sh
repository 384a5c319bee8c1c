#!/usr/bin/env bash
# LoRA demo: teach the world model the new word "zorb" (a red circle) with recipes/world-lora-demo.toml, and score
# "zorb" prompts with the exact checker before and after (4 images per prompt), plus the small public set for damage.
# Usage: bash scripts/lora_demo.sh [OUT=runs/lora-demo]
set -euo pipefail
OUT=${1:-runs/lora-demo}
source "$(dirname "$0")/ladder_lib.sh"
mkdir -p "$OUT"
P="$OUT/zorb.jsonl"
cat > "$P" <<'JSONL'
{"prompt": "a zorb", "tag": "single_object", "objects": [{"shape": "circle", "color": "red"}]}
{"prompt": "a large zorb", "tag": "size", "objects": [{"shape": "circle", "color": "red", "size": "large"}]}
{"prompt": "a zorb on a white background", "tag": "style", "objects": [{"shape": "circle", "color": "red"}], "background": "white"}
{"prompt": "a zorb on a black background", "tag": "style", "objects": [{"shape": "circle", "color": "red"}], "background": "black"}
{"prompt": "a zorb in the top left", "tag": "placement", "objects": [{"shape": "circle", "color": "red", "position": "top left"}]}
{"prompt": "a zorb in the bottom right", "tag": "placement", "objects": [{"shape": "circle", "color": "red", "position": "bottom right"}]}
JSONL
zorb() { [ -f "$2" ] || $K eval world --checkpoint "$1" --prompts "$P" --images-per-prompt 4 --no-fid --out "$2"; }
zorb world "$OUT/before.json"
[ -f "$OUT/run/final/model.safetensors" ] || $K train recipes/world-lora-demo.toml --out "$OUT/run" --resume --no-progress
zorb "$OUT/run/final" "$OUT/after.json"
for ck in world "$OUT/run/final"; do
  name=$([ "$ck" = world ] && echo before || echo after)
  [ -f "$OUT/$name-public.json" ] || $K eval world --checkpoint "$ck" --prompts world_eval_small --images-per-prompt 2 \
    --no-fid --out "$OUT/$name-public.json"
done
