"""A training curve as a Markdown table: TensorBoard scalars of a run, averaged over windows of steps.

    python benchmarks/tb_curves.py runs/chain/rl reward/world_rubric grpo/kl --windows 6

RUN is a `krea2 train` output folder (its tb/<stage>/ event files, read in the folders' alphabetical order) or a
folder of event files; a step logged twice (a resumed run) keeps its last value. Each tag's points are split into
equal windows of steps and averaged (batch means of RL rewards are noisy; a window mean is the curve).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} over every event file under run (stages in order of their folders)."""
    out: dict[str, dict[int, float]] = {}
    for f in sorted(run.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(points.items()) for tag, points in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("tags", nargs="+")
    ap.add_argument("--windows", type=int, default=6)
    args = ap.parse_args()
    if args.windows < 1:
        raise SystemExit("error: --windows must be >= 1")
    data = scalars(args.run)
    missing = [t for t in args.tags if t not in data]
    if missing:
        raise SystemExit(f"error: {args.run} has no scalars {missing}; it has {sorted(data)}")
    print("| steps | " + " | ".join(args.tags) + " |")
    print("|---" * (len(args.tags) + 1) + "|")
    steps = np.array([s for s, _ in data[args.tags[0]]])
    edges = np.linspace(steps.min(), steps.max() + 1, args.windows + 1).astype(int)
    for lo, hi in zip(edges[:-1], edges[1:]):
        cells = []
        for t in args.tags:
            v = [val for s, val in data[t] if lo <= s < hi]
            cells.append(f"{np.mean(v):.4f}" if v else "-")
        print(f"| {lo}-{hi - 1} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
