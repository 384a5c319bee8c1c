"""TrainingRows: the trainer's reader for exported Parquet rows. Each item is one same-bucket batch."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from krea2.data.types import Example
from krea2.errors import Krea2Error


class TrainingRows:
    """Batches of `Example` in the exported order. The loader's state is the step index: `batches(step)` resumes
    exactly where a run stopped (one row group per step, read sequentially)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.dir = path.parent if path.name == "manifest.json" else path
        manifest = self.dir / "manifest.json"
        if not manifest.is_file():
            raise Krea2Error(f"{self.dir} holds no manifest.json: export rows with `krea2 curate export --out DIR`")
        self.manifest = json.loads(manifest.read_text())
        self.steps = self.manifest["steps"]

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[list[Example]]:
        return self.batches(0)

    @lru_cache(maxsize=4)  # noqa: B019 - a handful of open files per reader
    def _file(self, name: str):
        import pyarrow.parquet as pq

        return pq.ParquetFile(self.dir / name)

    def batch(self, step: int) -> list[Example]:
        """The batch of `step` (wrapping around for later epochs)."""
        s = self.steps[step % len(self.steps)]
        table = self._file(s["file"]).read_row_group(s["row_group"])
        out = []
        for r in table.to_pylist():
            image = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"))
            meta = json.loads(r["meta"] or "{}")
            meta.update(id=r["id"], ref=r["image_ref"], md5=r["md5"], crop_box=r["crop_box"], source=r["source"],
                        license=r["license"], ocr_text=r["ocr_text"], caption_accuracy=r["caption_accuracy"],
                        step=step, bucket=(r["width"], r["height"]))
            captions = {"long": r["caption_long"], "medium": r["caption_medium"], "short": r["caption_short"]}
            out.append(Example(image=image, captions=captions, meta=meta))
        return out

    def batches(self, start_step: int = 0) -> Iterator[list[Example]]:
        """Batches from `start_step` to the end of the export."""
        for step in range(start_step, len(self.steps)):
            yield self.batch(step)
