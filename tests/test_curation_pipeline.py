"""Files -> queue -> Parquet training rows on both backends; sources; bad inputs; caption accuracy; status; map; CLI."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from krea2.data import emoji
from krea2.data.curation.jobs import PIPELINE, run_worker
from krea2.data.curation.rows import TrainingRows
from krea2.data.curation.sources import ingest, write_world_folder
from krea2.data.curation.status import job_counts, metrics_text
from krea2.data.curation.store import open_store
from krea2.errors import Krea2Error

pytest_plugins = ["curation_fixtures"]
HAS_FONT = emoji.font_path() is not None


def _run_all(url: str, **options) -> None:
    for job in PIPELINE:
        run_worker(url, job, batch=16, options=options)


def test_emoji_and_world_to_training_rows(store_url, tmp_path):
    if not HAS_FONT:
        pytest.skip(emoji.MISSING)
    emoji.write_emoji_folder(tmp_path / "emoji", 32, limit=24)
    write_world_folder(tmp_path / "world", 24, 32, seed=0)
    with open_store(store_url) as s:
        assert ingest(s, [tmp_path / "emoji", tmp_path / "world"]).added == 48
        assert ingest(s, [tmp_path / "emoji"]).added == 0  # idempotent
    _run_all(store_url)
    with open_store(store_url) as s:
        counts = job_counts(s)
        assert all(counts[j]["pending"] == 0 and counts[j]["failed"] == 0 for j in PIPELINE)
        ready = s.count("rewrite_ok = 1")
        from krea2.data.curation.export import export_rows

        manifest = export_rows(s, tmp_path / "rows", size=32, batch_size=8, seed=1)
    assert manifest["rows"] == ready >= 40
    rows = TrainingRows(tmp_path / "rows")
    assert len(rows) == len(manifest["steps"])
    batches = list(rows)
    ids = [ex.meta["id"] for b in batches for ex in b]
    assert len(ids) == len(set(ids)) == ready
    for b in batches:
        assert len({ex.image.shape for ex in b}) == 1 and b[0].image.shape == (32, 32, 3)
        for ex in b:
            assert set(ex.captions) == {"long", "medium", "short"} and all(ex.captions.values())
    world = [ex for b in batches for ex in b if ex.meta["source"] == "world"]
    assert world and all("scene" in ex.meta for ex in world)
    # Resume at a step exactly.
    again = list(rows.batches(2))
    assert [ex.meta["id"] for ex in again[0]] == [ex.meta["id"] for ex in batches[2]]
    assert np.array_equal(again[0][0].image, batches[2][0].image)
    # The trainer reads the rows: two steps of a tiny model on them.
    from krea2.train.config import parse_recipe
    from krea2.train.trainer import train_recipe

    recipe = parse_recipe({"name": "rows", "model": {"preset": "tiny-world"}, "stages": [
        {"name": "a", "steps": 2, "batch_size": 4, "data": {"source": "rows", "path": str(tmp_path / "rows"),
                                                            "size": 32, "pool": 64}}]})
    final = train_recipe(recipe, tmp_path / "run", progress=False)
    assert (final / "model.safetensors").is_file()


def _png(color=(200, 30, 30), size=(40, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    arr = (rng.integers(0, 60, (size[1], size[0], 3)) + np.array(color) // 2).astype(np.uint8)
    Image.fromarray(arr).convert(mode).save(buf, "PNG")
    return buf.getvalue()


def _bomb_png(w: int, h: int) -> bytes:
    """A small PNG whose header claims w x h pixels (IHDR rewritten, CRC fixed)."""
    import struct
    import zlib

    data = bytearray(_png())
    ihdr = b"IHDR" + struct.pack(">II", w, h) + bytes(data[24:29])
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def _bad_corpus(d) -> dict[str, str]:
    """file name -> the word its recorded outcome must contain ('' = decodes fine)."""
    d.mkdir()
    good = _png()
    (d / "ok image.png").write_bytes(good)
    (d / "ünïcødé 画像.png").write_bytes(_png((20, 200, 20)))
    (d / "empty.png").write_bytes(b"")
    (d / "truncated.png").write_bytes(good[: len(good) // 2])
    (d / "garbage.jpg").write_bytes(b"this is not an image at all" * 10)
    (d / "corrupt.png").write_bytes(good[:60] + bytes(200) + good[260:])
    buf = io.BytesIO()
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(buf, "JPEG")
    (d / "really_a_jpeg.png").write_bytes(buf.getvalue())
    for mode in ("CMYK", "P", "RGBA", "LA", "I;16", "1"):
        buf = io.BytesIO()
        im = Image.fromarray((np.random.default_rng(1).integers(0, 255, (24, 24, 3))).astype(np.uint8))
        im = im.convert(mode) if mode != "I;16" else Image.fromarray(np.full((24, 24), 40000, np.uint16))
        im.save(buf, "TIFF" if mode == "CMYK" else "PNG")
        (d / f"mode_{mode.replace(';', '_')}.{'tif' if mode == 'CMYK' else 'png'}").write_bytes(buf.getvalue())
    # A decompression bomb: a tiny PNG header claiming 100k x 100k pixels.
    (d / "bomb.png").write_bytes(_bomb_png(100_000, 100_000))
    expect = {"ok image.png": "", "ünïcødé 画像.png": "", "empty.png": "empty", "truncated.png": "truncated",
              "garbage.jpg": "not an image", "corrupt.png": "", "really_a_jpeg.png": "extension",
              "bomb.png": "decompression bomb"}
    expect.update({f"mode_{m.replace(';', '_')}.{'tif' if m == 'CMYK' else 'png'}": "converted"
                   for m in ("CMYK", "P", "RGBA", "LA", "I;16", "1")})
    return expect


def test_bad_inputs_all_end_in_a_recorded_reason(store_url, tmp_path):
    expect = _bad_corpus(tmp_path / "bad")
    with open_store(store_url) as s:
        assert ingest(s, [tmp_path / "bad"]).added == len(expect)
    stats = run_worker(store_url, "decode", batch=4)
    assert stats.failed == 0  # nothing crashed: every file got a result
    with open_store(store_url) as s:
        rows = {r["ref"].rsplit("/", 1)[-1]: r for r in s.execute("SELECT ref, decode, decode_ok FROM images")}
    assert set(rows) == set(expect)
    for name, word in expect.items():
        result = json.loads(rows[name]["decode"])
        text = json.dumps(result, ensure_ascii=False)
        if name in ("corrupt.png",):
            assert rows[name]["decode_ok"] == 0 and result["reason"], text
        elif word in ("", "extension", "converted"):
            assert rows[name]["decode_ok"] == 1, f"{name}: {text}"
            assert word in text, f"{name}: {text}"
        else:
            assert rows[name]["decode_ok"] == 0 and word in result["reason"], f"{name}: {text}"


def test_filters_drop_only_extreme_images(tmp_path, store_url):
    d = tmp_path / "f"
    d.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(d / "blank.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3)).astype(np.uint8)).save(d / "noise.png")
    Image.fromarray(np.full((16, 128, 3), 90, np.uint8) + rng.integers(0, 9, (16, 128, 3)).astype(np.uint8)).save(
        d / "strip.png")
    grad = np.linspace(30, 220, 64)[None, :, None] * np.array([1.0, 0.8, 0.5])
    photo = np.clip(grad + rng.normal(0, 12, (64, 64, 3)), 0, 255).astype(np.uint8)
    box = np.zeros((128, 64, 3), np.uint8)
    box[48:96] = photo[:48]  # letterboxed: black bars cover 62% of the height
    Image.fromarray(box).save(d / "letterbox.png")
    Image.fromarray(photo).save(d / "fine.png")
    Image.fromarray(photo).resize((16, 16)).resize((64, 64), Image.BILINEAR).save(d / "blurry.png")  # blur passes
    with open_store(store_url) as s:
        ingest(s, [d])
    run_worker(store_url, "decode")
    run_worker(store_url, "filter")
    with open_store(store_url) as s:
        out = {r["ref"].rsplit("/", 1)[-1]: (r["filter_ok"], json.loads(r["filter"])["reasons"])
               for r in s.execute("SELECT ref, filter, filter_ok FROM images")}
    assert out["fine.png"][0] == 1 and out["blurry.png"][0] == 1, (out["fine.png"], out["blurry.png"])
    assert "near-constant" in " ".join(out["blank.png"][1])
    assert "noise" in " ".join(out["noise.png"][1])
    assert "aspect" in " ".join(out["strip.png"][1])
    assert "border" in " ".join(out["letterbox.png"][1]), out["letterbox.png"]


def test_sources_list_tar_parquet(store_url, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    imgs = [_png((i * 40, 100, 200 - i * 30)) for i in range(4)]
    mirror = tmp_path / "mirror" / "example.com" / "img"
    mirror.mkdir(parents=True)
    (mirror / "a.png").write_bytes(imgs[0])
    (tmp_path / "list.txt").write_text("https://example.com/img/a.png\n# comment\n")
    with tarfile.open(tmp_path / "shard.tar", "w") as tf:
        for k, data in (("x", imgs[1]), ("y", imgs[2])):
            for name, payload in ((f"{k}.png", data), (f"{k}.json", json.dumps({"license": "cc-by"}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    pq.write_table(pa.table({"image": [imgs[3]], "caption": ["a test"], "license": ["cc0"]}), tmp_path / "p.parquet")
    with open_store(store_url) as s:
        with pytest.raises(Krea2Error, match="--mirror"):
            ingest(s, [tmp_path / "list.txt"])
        added = ingest(s, [tmp_path / "list.txt", tmp_path / "shard.tar", tmp_path / "p.parquet"],
                       mirror=tmp_path / "mirror").added
        assert added == 4
        assert ingest(s, [tmp_path / "shard.tar", tmp_path / "p.parquet"]).added == 0
        rows = s.execute("SELECT ref, md5, bytes, format, width, license, meta FROM images ORDER BY id")
    assert [r["format"] for r in rows] == ["PNG"] * 4 and all(r["width"] == 40 for r in rows)
    assert json.loads(rows[0]["meta"])["url"] == "https://example.com/img/a.png"
    assert rows[1]["license"] == "cc-by" and rows[3]["license"] == "cc0"
    run_worker(store_url, "decode")
    with open_store(store_url) as s:
        assert s.count("decode_ok = 1") == 4  # bytes read back from mirror, tar member and Parquet row


def test_caption_accuracy_drops_miscaptioned_images(store_url, tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    for name, caption, terms in (("good", "A red circle and a blue square.", ["red", "circle", "blue", "square"]),
                                 ("bad", "A photo of a cat.", ["red", "circle", "blue", "square"])):
        (d / f"{name}.png").write_bytes(_png((200, 30, 30) if name == "good" else (30, 30, 200)))
        (d / f"{name}.json").write_text(json.dumps({"captions": {"long": caption}, "truth_terms": terms,
                                                    "ocr_text": "SALE" if name == "good" else ""}))
    with open_store(store_url) as s:
        ingest(s, [d])
    _run_all(store_url)
    with open_store(store_url) as s:
        r = {x["ref"].rsplit("/", 1)[-1]: x for x in s.execute("SELECT ref, caption, caption_ok, rewrite FROM images")}
    good, bad = json.loads(r["good.png"]["caption"]), json.loads(r["bad.png"]["caption"])
    assert good["accuracy"] == 1.0 and r["good.png"]["caption_ok"] == 1
    assert '"SALE"' in good["long"]  # OCR text reaches the long caption
    assert bad["accuracy"] == 0.0 and r["bad.png"]["caption_ok"] == 0 and r["bad.png"]["rewrite"] is None
    assert json.loads(r["good.png"]["rewrite"])["short"]


def sample_map_fn(row: dict):
    return {"ref_len": len(row["ref"])} if row["id"] % 2 else None


def test_status_metrics_and_map(store_url):
    with open_store(store_url) as s:
        s.insert_images([{"ref": f"r{i}"} for i in range(10)])
    run_worker(store_url, "refl", fn=f"{__name__}:sample_map_fn", where="id <= 6")
    with open_store(store_url) as s:
        assert s.count("refl IS NOT NULL") == 6 and s.count("refl_ok = 1") == 3
        c = job_counts(s)
    assert c["refl"]["done"] == 6 and c["decode"]["pending"] == 10 and c["filter"]["blocked"] == 10
    text = metrics_text(store_url)
    assert 'krea2_curation_rows{job="decode",state="pending"} 10.0' in text


def test_cli_end_to_end_sqlite(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from krea2.data.curation.cli import app

    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(6):
        (d / f"{i}.png").write_bytes(_png((i * 40, 50, 90)))
        (d / f"{i}.json").write_text(json.dumps({"captions": {"long": f"Test image number {i}."}}))
    monkeypatch.setenv("KREA2_CURATION_DB", f"sqlite:///{tmp_path / 'db.sqlite'}")
    runner = CliRunner()
    r = runner.invoke(app, ["status"])
    assert isinstance(r.exception, Krea2Error) and "krea2 curate init" in str(r.exception)
    assert runner.invoke(app, ["init"]).exit_code == 0
    assert "added 6" in runner.invoke(app, ["ingest", str(d)]).output
    r = runner.invoke(app, ["work", "decode", "--workers", "2", "--batch", "2", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "wrote 6" in r.output
    r = runner.invoke(app, ["run", "--opt", "max_phash_dist=-1"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["status", "--json"])
    assert json.loads(r.output)["rewrite"]["kept"] == 6
    r = runner.invoke(app, ["export", "--out", str(tmp_path / "rows"), "--size", "32", "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    assert sum(len(b) for b in TrainingRows(tmp_path / "rows")) == 6
    r = runner.invoke(app, ["work", "nope"])
    assert isinstance(r.exception, Krea2Error)
