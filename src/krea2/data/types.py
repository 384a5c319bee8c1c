"""Plain records passed between data sources and the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

CAPTION_KINDS = ("long", "medium", "short")


@dataclass
class Example:
    """One captioned image as every data source hands it to the trainer."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    captions: dict[str, str]  # keys from CAPTION_KINDS; a source may lack some
    meta: dict = field(default_factory=dict)
