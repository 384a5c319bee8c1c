#!/usr/bin/env bash
# iREPA ablation: the same recipe, steps, data and seeds with and without the alignment term; prints the flow loss
# over the last 100 steps and the world eval of each. Usage: bash benchmarks/irepa_ablation.sh [OUT]
set -euo pipefail
out=${1:-runs/irepa-ablation}
bin=$(dirname "$0")/../.venv/bin
for arm in irepa baseline; do
  flag=true; [ "$arm" = baseline ] && flag=false
  "$bin/krea2" train recipes/irepa-ablation.toml --out "$out/$arm" --set stages.0.objective.irepa=$flag --no-progress
  "$bin/krea2" eval world --checkpoint "$out/$arm/final" --prompts world_eval --images-per-prompt 1 \
    --out "$out/$arm/report.json" | tail -n 12
done
"$bin/python" - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for arm in ("irepa", "baseline"):
    ls = [json.loads(l)["loss"] for l in (out / arm / "pretrain-16" / "losses.jsonl").read_text().splitlines()]
    report = json.loads((out / arm / "report.json").read_text())
    tags = {k: round(v, 3) for k, v in report.get("per_tag", {}).items()}
    print(f"{arm:9s} flow loss (last 100 steps) {sum(ls[-100:]) / 100:.4f}  overall {report.get('overall'):.3f}  "
          f"fid {report.get('fid', float('nan')):.1f}  {tags}")
PY
