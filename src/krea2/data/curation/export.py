"""Export: training rows as Parquet, pre-cropped and pre-resized to a size bucket, pre-shuffled into same-bucket
batches. One row group is one batch; `manifest.json` maps step -> (file, row group), so a loader reads sequentially
and can replay any step exactly (SYSTEM.md 10.6).
"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image

from krea2.data.curation.checks import load_rgb
from krea2.data.curation.sources import read_bytes
from krea2.data.curation.store import Store
from krea2.errors import Krea2Error

ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9, 9 / 16, 2.0, 0.5)
BUCKET_MULTIPLE = 16  # VAE factor 8 x patch 2: every bucket side is a whole number of latent patches
READY = "decode_ok = 1 AND filter_ok = 1 AND dedup_ok = 1 AND caption_ok = 1 AND rewrite_ok = 1"


def size_buckets(size: int, multiple: int = BUCKET_MULTIPLE) -> list[tuple[int, int]]:
    """(width, height) buckets of about size*size pixels, one per aspect ratio."""
    out = []
    for ar in ASPECTS:
        w = max(multiple, round(size * math.sqrt(ar) / multiple) * multiple)
        h = max(multiple, round(size / math.sqrt(ar) / multiple) * multiple)
        if (w, h) not in out:
            out.append((w, h))
    return out


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ar = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ar))


def crop_resize(rgb: np.ndarray, bw: int, bh: int) -> tuple[np.ndarray, list[int]]:
    """Centre crop to the bucket's aspect, then resize; returns the image and the crop box in source pixels."""
    h, w = rgb.shape[:2]
    scale = max(bw / w, bh / h)
    cw, ch = min(w, round(bw / scale)), min(h, round(bh / scale))
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    box = [x0, y0, x0 + cw, y0 + ch]
    im = Image.fromarray(rgb).crop(box).resize((bw, bh), Image.LANCZOS)
    return np.asarray(im), box


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def export_rows(store: Store, out_dir: str | Path, size: int = 64, batch_size: int = 16, seed: int = 0,
                drop_last: bool = False, batches_per_file: int = 256, where: str = "1=1",
                progress: bool = False) -> dict:
    """Write the ready rows (every job passed) as Parquet training rows; returns the manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    out = Path(out_dir)
    if (out / "manifest.json").exists():
        raise Krea2Error(f"{out} already holds an export: pick a new --out (exports are immutable for replay)")
    rows = store.execute(f"SELECT id, ref, md5, source, license, meta, decode, ocr, caption, rewrite FROM images "
                         f"WHERE {READY} AND ({where}) ORDER BY id")
    if not rows:
        raise Krea2Error("no row is ready for export: run the jobs first (`krea2 curate status` shows what is left)")
    buckets = size_buckets(size)
    by_bucket: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        d = json.loads(r["decode"])
        by_bucket.setdefault(nearest_bucket(d["width"], d["height"], buckets), []).append(r)
    rng = random.Random(seed)
    batches = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        rng.shuffle(members)
        for i in range(0, len(members), batch_size):
            chunk = members[i:i + batch_size]
            if drop_last and len(chunk) < batch_size:
                continue
            batches.append((bucket, chunk))
    rng.shuffle(batches)  # global order of batches: buckets interleave, every batch stays one shape
    out.mkdir(parents=True, exist_ok=True)
    steps, writer, file_name = [], None, None
    bar = tqdm(total=sum(len(c) for _, c in batches), desc="export", unit="row", disable=not progress)
    for step, ((bw, bh), chunk) in enumerate(batches):
        if step % batches_per_file == 0:
            if writer:
                writer.close()
            file_name = f"part-{step // batches_per_file:05d}.parquet"
            writer = None
        cols: dict[str, list] = {k: [] for k in SCHEMA_FIELDS}
        for r in chunk:
            rgb, _ = load_rgb(read_bytes(r["ref"]))
            img, box = crop_resize(rgb, bw, bh)
            cap, rew, ocr = json.loads(r["caption"]), json.loads(r["rewrite"]), json.loads(r["ocr"])
            for k, v in (("id", r["id"]), ("image", _png(img)), ("image_ref", r["ref"]), ("md5", r["md5"]),
                         ("width", bw), ("height", bh), ("crop_box", box), ("caption_long", cap["long"]),
                         ("caption_medium", rew["medium"]), ("caption_short", rew["short"]),
                         ("ocr_text", ocr["text"]), ("caption_accuracy", cap.get("accuracy")),
                         ("source", r["source"]), ("license", r["license"]), ("meta", r["meta"] or "{}")):
                cols[k].append(v)
            bar.update(1)
        table = pa.table(cols, schema=SCHEMA)
        if writer is None:
            writer = pq.ParquetWriter(out / file_name, SCHEMA, compression="zstd")
        writer.write_table(table, row_group_size=len(chunk))  # one row group = one batch
        steps.append({"file": file_name, "row_group": step % batches_per_file, "width": bw, "height": bh,
                      "n": len(chunk)})
    if writer:
        writer.close()
    bar.close()
    manifest = {"version": 1, "size": size, "batch_size": batch_size, "seed": seed, "rows": sum(s["n"] for s in steps),
                "buckets": {f"{w}x{h}": sum(s["n"] for s in steps if (s["width"], s["height"]) == (w, h))
                            for w, h in sorted(by_bucket)}, "steps": steps}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _schema():
    import pyarrow as pa

    return pa.schema([("id", pa.int64()), ("image", pa.binary()), ("image_ref", pa.string()), ("md5", pa.string()),
                      ("width", pa.int32()), ("height", pa.int32()), ("crop_box", pa.list_(pa.int32())),
                      ("caption_long", pa.string()), ("caption_medium", pa.string()), ("caption_short", pa.string()),
                      ("ocr_text", pa.string()), ("caption_accuracy", pa.float64()), ("source", pa.string()),
                      ("license", pa.string()), ("meta", pa.string())])


SCHEMA = _schema()
SCHEMA_FIELDS = SCHEMA.names
