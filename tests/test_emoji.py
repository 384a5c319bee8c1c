"""The emoji data set: font found, names as captions, renders on white, folder for ingest."""

from __future__ import annotations

import json

import numpy as np
import pytest

from krea2.data import emoji

pytestmark = pytest.mark.skipif(emoji.font_path() is None, reason=emoji.MISSING)


def test_emoji_set_size_and_names():
    items = list(emoji.iter_emoji())
    assert 3500 <= len(items) <= 4200
    assert len({c for c, _ in items}) == len(items)
    names = dict(items)
    assert names["\U0001f600"] == "grinning face"


def test_render_is_rgb_on_white_and_distinct():
    a = np.asarray(emoji.render_emoji("\U0001f600", 32))
    b = np.asarray(emoji.render_emoji("\U0001f44d\U0001f3ff", 32))  # thumbs up, dark skin tone (a sequence)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert (a[0, 0] == 255).all()  # white corner
    assert a.std() > 20 and np.abs(a.astype(int) - b).mean() > 10


def test_examples_and_folder(tmp_path):
    ex = list(emoji.emoji_examples(24, limit=3))
    assert len(ex) == 3 and set(ex[0].captions) == {"long", "medium", "short"}
    assert ex[0].meta["name"] in ex[0].captions["long"]
    assert emoji.write_emoji_folder(tmp_path, 24, limit=3) == 3
    side = json.loads((tmp_path / "emoji_0000.json").read_text())
    assert side["captions"]["short"].endswith("emoji") and side["truth_terms"]


def test_missing_font_is_a_clear_error(monkeypatch):
    from krea2.errors import Krea2Error

    monkeypatch.setattr(emoji, "FONT_PATHS", ())
    emoji._font.cache_clear()
    with pytest.raises(Krea2Error, match="fonts-noto-color-emoji"):
        emoji.render_emoji("\U0001f600", 16)
    emoji._font.cache_clear()
