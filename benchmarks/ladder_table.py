"""Markdown table of `krea2 eval world` reports: one row per report, per-tag scores, FID and hf_ratio, and, where
the report has them, model calls per image (NFE), sampling ms per image and the seed diversity.

    python benchmarks/ladder_table.py runs/ladder/base.json runs/ladder/sft-*.json ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr", "placement", "size", "style")


def main(paths: list[str]) -> None:
    print("| model | overall | " + " | ".join(TAGS) + " | FID | hf_ratio | NFE | ms/image | diversity |")
    print("|---" * (len(TAGS) + 7) + "|")
    for p in paths:
        r = json.loads(Path(p).read_text())
        tags = " | ".join(f"{r['per_tag'].get(t, float('nan')):.3f}" for t in TAGS)
        fid = f"{r['fid']:.1f}" if r.get("fid") is not None else "-"
        hf = f"{r['hf_ratio']:.3f}" if r.get("hf_ratio") is not None else "-"
        nfe = r.get("nfe", "-")
        ms = f"{1000 * r['seconds_per_image']:.0f}" if r.get("seconds_per_image") is not None else "-"
        div = f"{r['diversity']:.2f}" if r.get("diversity") is not None else "-"
        print(f"| {Path(p).stem} | {r['overall']:.3f} | {tags} | {fid} | {hf} | {nfe} | {ms} | {div} |")


if __name__ == "__main__":
    main(sys.argv[1:])
