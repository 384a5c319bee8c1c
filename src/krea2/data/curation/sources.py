"""Ingest: folder trees, lists of files (or URLs' local mirror), tar shards and Parquet into the image table.

A row's `ref` says where its bytes are: a local path, `tar://SHARD#MEMBER` or `parquet://FILE#ROW`. Ingest records the
md5, byte size, format and size (from the header only) and merges sidecar metadata (`x.json`, `x.txt` beside `x.png`).
`ref` is unique, so ingesting the same source twice adds nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from PIL import Image

from krea2.data.curation.store import Store
from krea2.errors import Krea2Error

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".jfif"}
LIFTED = ("source", "license")  # sidecar keys that become columns


@dataclass
class IngestStats:
    seen: int = 0
    added: int = 0
    skipped: list[str] = field(default_factory=list)  # files that cannot be rows (unencodable names), with why


# -- reading bytes back ------------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _parquet_file(path: str):
    import pyarrow.parquet as pq

    return pq.ParquetFile(path)


@lru_cache(maxsize=2)
def _parquet_group(path: str, group: int, column: str):
    return _parquet_file(path).read_row_group(group, columns=[column]).column(0).to_pylist()


def _parquet_image(path: str, row: int, column: str) -> bytes:
    meta = _parquet_file(path).metadata
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if row < n:
            value = _parquet_group(path, g, column)[row]
            return value["bytes"] if isinstance(value, dict) else value  # HF datasets store {"bytes", "path"}
        row -= n
    raise FileNotFoundError(f"{path} has no row {row}")


def read_bytes(ref: str) -> bytes:
    """The bytes behind a row's ref (raises FileNotFoundError when they are gone)."""
    if ref.startswith("tar://"):
        shard, _, member = ref[len("tar://"):].rpartition("#")
        with tarfile.open(shard) as tf:
            f = tf.extractfile(member)
            if f is None:
                raise FileNotFoundError(f"{member} is not a file in {shard}")
            return f.read()
    if ref.startswith("parquet://"):
        path, _, spec = ref[len("parquet://"):].rpartition("#")
        row, _, column = spec.partition(":")
        return _parquet_image(path, int(row), column or "image")
    with open(ref, "rb") as f:
        return f.read()


def probe(data: bytes) -> dict:
    """md5, size and (header only, never decoding pixels) format and dimensions; None where the header is bad."""
    info = {"md5": hashlib.md5(data).hexdigest(), "bytes": len(data), "format": None, "width": None, "height": None}
    try:
        with Image.open(io.BytesIO(data)) as im:
            info.update(format=im.format, width=im.width, height=im.height)
    except Exception:  # noqa: BLE001 - the decode job records the reason; ingest keeps the row
        pass
    return info


# -- scanners: each yields rows for Store.insert_images ----------------------------------------------------------------


def _row(ref: str, data: bytes, meta: dict, source: str | None) -> dict:
    meta = dict(meta)
    row = {"ref": ref, **probe(data), "meta": meta, "source": meta.pop("source", None) or source,
           "license": meta.pop("license", None)}
    return row


def _sidecar(path: Path) -> dict:
    meta = {}
    js, txt = path.with_suffix(".json"), path.with_suffix(".txt")
    if js.is_file():
        try:
            meta.update(json.loads(js.read_text(encoding="utf-8")))
        except (ValueError, UnicodeDecodeError) as e:
            meta["sidecar_error"] = f"{js.name}: {e}"
    if txt.is_file():
        meta["caption"] = txt.read_text(encoding="utf-8", errors="replace").strip()
    return meta


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def scan_folder(root: Path, source: str | None, stats: IngestStats) -> Iterator[dict]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if path.suffix.lower() not in IMAGE_EXTS:
                continue
            yield from _scan_file(path, source, {}, stats)


def _scan_file(path: Path, source: str | None, extra: dict, stats: IngestStats) -> Iterator[dict]:
    ref = str(path.resolve())
    if not _encodable(ref):
        stats.skipped.append(f"{ref.encode('utf-8', 'surrogateescape')!r}: file name is not valid UTF-8")
        return
    if not path.is_file():
        stats.skipped.append(f"{ref}: not found")
        return
    yield _row(ref, path.read_bytes(), {**_sidecar(path), **extra}, source)


def scan_list(list_file: Path, mirror: Path | None, source: str | None, stats: IngestStats) -> Iterator[dict]:
    """One path or URL a line; a URL maps to MIRROR/host/path (where a downloader put it)."""
    base = list_file.parent
    for line in list_file.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        extra = {}
        if "://" in line:
            if mirror is None:
                raise Krea2Error(f"{list_file} lists URLs: pass --mirror DIR, the folder holding their local copies")
            u = urlparse(line)
            path = mirror / u.netloc / u.path.lstrip("/")
            extra["url"] = line
        else:
            path = Path(line) if Path(line).is_absolute() else base / line
        yield from _scan_file(path, source, extra, stats)


def scan_tar(shard: Path, source: str | None, stats: IngestStats) -> Iterator[dict]:
    """A webdataset-style shard: `key.png` with optional `key.json` / `key.txt` beside it."""
    shard = shard.resolve()
    with tarfile.open(shard) as tf:
        members = [m for m in tf.getmembers() if m.isfile()]
        by_key: dict[str, dict[str, tarfile.TarInfo]] = {}
        for m in members:
            key, ext = os.path.splitext(m.name)
            by_key.setdefault(key, {})[ext.lower()] = m
        for key in sorted(by_key):
            parts = by_key[key]
            meta = {}
            if ".json" in parts:
                try:
                    meta.update(json.loads(tf.extractfile(parts[".json"]).read()))
                except ValueError as e:
                    meta["sidecar_error"] = str(e)
            if ".txt" in parts:
                meta["caption"] = tf.extractfile(parts[".txt"]).read().decode("utf-8", "replace").strip()
            for ext, m in parts.items():
                if ext in IMAGE_EXTS:
                    yield _row(f"tar://{shard}#{m.name}", tf.extractfile(m).read(), meta, source)


def scan_parquet(path: Path, source: str | None, stats: IngestStats, image_column: str = "image") -> Iterator[dict]:
    """Rows with image bytes in `image_column`, or a `path` column of files; other scalar columns become metadata."""
    import pyarrow.parquet as pq

    path = path.resolve()
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if image_column not in names and "path" not in names:
        raise Krea2Error(f"{path} has neither an {image_column!r} bytes column nor a 'path' column")
    row = 0
    for g in range(pf.metadata.num_row_groups):
        for rec in pf.read_row_group(g).to_pylist():
            meta = {k: v for k, v in rec.items() if k not in (image_column, "path") and _jsonable(v)}
            if image_column in rec and rec[image_column] is not None:
                value = rec[image_column]
                data = value["bytes"] if isinstance(value, dict) else value
                yield _row(f"parquet://{path}#{row}:{image_column}", data, meta, source)
            elif rec.get("path"):
                p = Path(rec["path"])
                yield from _scan_file(p if p.is_absolute() else path.parent / p, source, meta, stats)
            row += 1


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def scan(path: Path, kind: str = "auto", source: str | None = None, mirror: Path | None = None,
         stats: IngestStats | None = None) -> Iterator[dict]:
    stats = stats or IngestStats()
    if not path.exists():
        raise Krea2Error(f"{path} does not exist: give a folder, a list file (.txt), a tar shard or a Parquet file")
    if kind == "auto":
        name = path.name.lower()
        kind = ("folder" if path.is_dir() else "tar" if name.endswith((".tar", ".tar.gz", ".tgz"))
                else "parquet" if name.endswith(".parquet") else "list" if name.endswith((".txt", ".lst"))
                else "file" if path.suffix.lower() in IMAGE_EXTS else "")
        if not kind:
            raise Krea2Error(f"cannot tell what {path} is: pass --kind folder|list|tar|parquet|file")
    if kind == "folder":
        return scan_folder(path, source, stats)
    if kind == "list":
        return scan_list(path, mirror, source, stats)
    if kind == "tar":
        return scan_tar(path, source, stats)
    if kind == "parquet":
        return scan_parquet(path, source, stats)
    if kind == "file":
        return _scan_file(path, source, {}, stats)
    raise Krea2Error(f"unknown --kind {kind!r}: pick folder, list, tar, parquet or file")


def ingest(store: Store, paths: list[Path], kind: str = "auto", source: str | None = None,
           mirror: Path | None = None, batch: int = 500, progress: bool = False) -> IngestStats:
    """Add every image under `paths` to the table; rows already there (same ref) are left alone."""
    from tqdm import tqdm

    stats = IngestStats()
    pending: list[dict] = []
    bar = tqdm(desc="ingest", unit="file", disable=not progress)
    for p in paths:
        for row in scan(Path(p), kind, source, mirror, stats):
            pending.append(row)
            stats.seen += 1
            bar.update(1)
            if len(pending) >= batch:
                stats.added += store.insert_images(pending)
                pending = []
    stats.added += store.insert_images(pending)
    bar.close()
    return stats


def write_world_folder(out_dir: str | Path, n: int, size: int, seed: int) -> int:
    """World images as PNG plus a JSON sidecar (scene record, captions) each, for ingest. Returns the count."""
    import numpy as np

    from krea2.data import world

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for i, ex in enumerate(world.world_examples(n, size, seed)):
        stem = out / f"world_{i:05d}"
        Image.fromarray(np.asarray(ex.image, dtype=np.uint8)).save(stem.with_suffix(".png"))
        scene = ex.meta.get("scene")
        side = {"source": "world", "license": "CC0 (procedural)", "scene": scene, "captions": ex.captions,
                "truth_terms": world_terms(scene)}
        stem.with_suffix(".json").write_text(json.dumps(side, default=_plain))
        count += 1
    return count


def _plain(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON-able: {type(o).__name__}")


def world_terms(scene) -> list[str]:
    """Words a faithful world caption names: each object's colour and shape."""
    if not isinstance(scene, dict):
        return []
    terms = []
    for obj in scene.get("objects", []):
        for key in ("color", "shape"):
            if isinstance(obj, dict) and obj.get(key):
                terms.append(str(obj[key]))
    return sorted(set(terms))
