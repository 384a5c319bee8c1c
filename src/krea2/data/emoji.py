"""The emoji data set: every emoji the Noto Color Emoji font draws, captioned from its Unicode name.

About 3,900 small, clean, named images: large enough to train and measure a text-to-image model on one CPU, and full
of near-duplicates (skin tones, genders, families, flags) that exercise dedup.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from krea2.data.types import Example
from krea2.errors import Krea2Error

FONT_PATHS = (
    Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"),
    Path("/usr/share/fonts/noto/NotoColorEmoji.ttf"),
    Path("/usr/local/share/fonts/NotoColorEmoji.ttf"),
)
BITMAP_SIZE = 109  # CBDT fonts hold one strike: 109 px renders 136x128 glyph bitmaps
MISSING = "Noto Color Emoji font not found: install it with `apt-get install fonts-noto-color-emoji`"


def font_path() -> Path | None:
    return next((p for p in FONT_PATHS if p.is_file()), None)


@lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont:
    path = font_path()
    if path is None:
        raise Krea2Error(MISSING)
    return ImageFont.truetype(str(path), BITMAP_SIZE)


def _name(char: str) -> str:
    import emoji

    return emoji.EMOJI_DATA[char]["en"].strip(":").replace("_", " ")


@lru_cache(maxsize=1)
def _emoji_list() -> tuple[tuple[str, str], ...]:
    import emoji

    font = _font()
    one_glyph = font.getlength("\U0001f600")  # a sequence the font lacks lays out as several glyphs
    out = []
    for char, data in emoji.EMOJI_DATA.items():
        if data.get("status") != emoji.STATUS["fully_qualified"]:
            continue
        if abs(font.getlength(char) - one_glyph) > 0.5:
            continue
        if font.getmask(char, mode="RGBA").getbbox() is None:  # newer than the font: it draws nothing
            continue
        out.append((char, _name(char)))
    out.sort(key=lambda t: [ord(c) for c in t[0]])  # code point order: stable across emoji package versions
    return tuple(out)


def iter_emoji() -> Iterator[tuple[str, str]]:
    """(char, name) for every fully-qualified emoji the installed font draws as one glyph, in code point order."""
    yield from _emoji_list()


def render_emoji(char: str, size: int) -> Image.Image:
    """The emoji centred on a white square of side `size` (RGB)."""
    font = _font()
    canvas = Image.new("RGBA", (160, 160), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((80, 80), char, font=font, embedded_color=True, anchor="mm")
    box = canvas.getbbox()
    if box is None:
        raise Krea2Error(f"the emoji font draws nothing for {char!r} (U+{ord(char[0]):04X})")
    glyph = canvas.crop(box)
    side = max(glyph.size)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 0))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    square = square.resize((size, size), Image.LANCZOS)
    white = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    return Image.alpha_composite(white, square).convert("RGB")


def emoji_captions(name: str) -> dict[str, str]:
    """Long, medium and short captions from an emoji's name (the name is the whole ground truth)."""
    return {
        "long": f"An emoji of {name}, drawn in a glossy, colourful cartoon style, centred on a plain white background.",
        "medium": f"A {name} emoji on a white background.",
        "short": f"{name} emoji",
    }


def emoji_examples(size: int, limit: int | None = None) -> Iterator[Example]:
    for i, (char, name) in enumerate(iter_emoji()):
        if limit is not None and i >= limit:
            return
        image = np.asarray(render_emoji(char, size))
        yield Example(image=image, captions=emoji_captions(name), meta={"char": char, "name": name, "index": i})


def write_emoji_folder(out_dir: str | Path, size: int, limit: int | None = None) -> int:
    """PNG files plus a JSON sidecar each (name, captions, licence) for `krea2 curate ingest`. Returns the count."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for ex in emoji_examples(size, limit):
        stem = out / f"emoji_{ex.meta['index']:04d}"
        Image.fromarray(ex.image).save(stem.with_suffix(".png"))
        side = {"source": "emoji", "license": "OFL-1.1 (Noto Color Emoji)", "name": ex.meta["name"],
                "char": ex.meta["char"], "captions": ex.captions, "truth_terms": name_terms(ex.meta["name"])}
        stem.with_suffix(".json").write_text(json.dumps(side, ensure_ascii=False))
        n += 1
    return n


_STOP = {"a", "an", "the", "of", "with", "and", "in", "on", "for", "to", "at", "face", "button"}


def name_terms(name: str) -> list[str]:
    """Words of the name a faithful caption must contain (caption accuracy ground truth)."""
    words = [w.strip("(),.!'\u2019").lower() for w in name.replace("-", " ").split()]
    return [w for w in words if w and w not in _STOP] or [name.lower()]
