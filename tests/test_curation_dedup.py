"""Dedup on the emoji set with injected near-duplicates and distinct-but-similar images (skin tones, keycaps, flags).

Prints precision and recall; the thresholds are in krea2.data.curation.dedup.DedupConfig.
"""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
from PIL import Image

from krea2.data import emoji
from krea2.data.curation.jobs import run_worker
from krea2.data.curation.sources import ingest
from krea2.data.curation.store import open_store

pytestmark = pytest.mark.skipif(emoji.font_path() is None, reason=emoji.MISSING)
SIZE = 64


def _variants(im: Image.Image) -> dict[str, Image.Image]:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=70)
    c = max(1, round(im.width * 0.015))
    return {"resized": im.resize((48, 48), Image.LANCZOS), "reencoded": Image.open(buf).convert("RGB"),
            "cropped": im.crop((c, c, im.width - c, im.height - c))}


def test_dedup_precision_recall_on_emoji(tmp_path):
    rng = random.Random(0)
    all_emoji = list(emoji.iter_emoji())
    tones = [i for i, (_, n) in enumerate(all_emoji) if n.endswith(" skin tone") and "," not in n]
    picked = sorted(set(rng.sample(range(len(all_emoji)), 150) + tones[:60] + list(range(12))))  # + keycaps
    folder = tmp_path / "emoji"
    folder.mkdir()
    truth: dict[str, int] = {}  # file -> group (pixel-identical renders share a group)
    seen_pixels: dict[bytes, int] = {}
    originals = {}
    for i in picked:
        im = emoji.render_emoji(all_emoji[i][0], SIZE)
        group = seen_pixels.setdefault(im.tobytes(), i)
        im.save(folder / f"e{i:04d}.png")
        truth[f"e{i:04d}.png"] = group
        originals[i] = im
    injected = []
    for i in rng.sample(sorted(originals), 60):
        for kind, v in _variants(originals[i]).items():
            name = f"v{i:04d}_{kind}.{'jpg' if kind == 'reencoded' else 'png'}"
            v.save(folder / name, quality=95) if name.endswith(".jpg") else v.save(folder / name)
            truth[name] = truth[f"e{i:04d}.png"]
            injected.append(name)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with open_store(url, migrate=True) as s:
        ingest(s, [folder])
    for job in ("decode", "filter", "hash", "dedup"):
        run_worker(url, job, batch=64)
    with open_store(url) as s:
        rows = s.execute("SELECT id, ref, dedup, dedup_ok FROM images")
    name_of = {r["id"]: r["ref"].rsplit("/", 1)[-1] for r in rows}
    assert len(rows) == len(truth) and all(r["dedup"] is not None for r in rows)
    flagged = [r for r in rows if r["dedup_ok"] == 0]
    correct = [r for r in flagged if truth[name_of[json.loads(r["dedup"])["cluster"]]] == truth[name_of[r["id"]]]]
    precision = len(correct) / max(1, len(flagged))
    found = {name_of[r["id"]] for r in correct}
    # A variant counts as found when it, or its original, was folded into the other (ingest order decides which).
    groups_with_dup = {truth[n] for n in found}
    recall = np.mean([truth[n] in groups_with_dup and (n in found or f"e{truth[n]:04d}.png" in found)
                      for n in injected])
    per_kind = {k: np.mean([n in found or f"e{truth[n]:04d}.png" in found for n in injected if k in n])
                for k in ("resized", "reencoded", "cropped")}
    false_merges = [(name_of[r["id"]], name_of[json.loads(r["dedup"])["cluster"]]) for r in flagged if r not in correct]
    print(f"\ndedup on {len(truth)} emoji images ({len(injected)} injected): precision {precision:.3f} "
          f"recall {recall:.3f} per kind {per_kind}; false merges {false_merges[:8]}")
    assert precision >= 0.93
    assert recall >= 0.88
    # Exact duplicates by md5 always fold, and skin-tone variants (distinct but similar) stay apart.
    tone_names = {f"e{i:04d}.png" for i in tones[:60]}
    tone_merges = sum(a in tone_names and b in tone_names for a, b in false_merges)
    print(f"skin-tone images merged with another tone: {tone_merges} of {len(tone_names)}")
    assert tone_merges <= 6  # adjacent tones (light vs medium-light) are the hardest pairs
