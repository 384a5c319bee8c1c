"""The one place that range-checks sampling inputs (steps, guidance, mu, image sides, image counts, prompts).

`Pipeline.generate`/`sampling_config` (and so `krea2 eval world` and `krea2 pairs`) check steps, guidance, mu and
sides; `krea2 generate` also checks prompts, image counts and its output folder, all before any work starts: a bad
value is one Krea2Error naming the option, its value and the allowed range.
The limits and why (docs/LIMITS.md):
- steps 1..1000: the release samples in 8 (Turbo) or 52 (Raw) steps; past 1000 Euler steps nothing changes but time.
- image side 1..4096 px (override: KREA2_MAX_SIDE): 4096 px at the release's 16 px per token is 65,536 image tokens,
  already 16x the 1024 px tokens it was trained at; a side past that is almost always a typo (a 100000 px side
  would run for hours at step 0).
- images per `krea2 generate` call 1..1024 (override: KREA2_MAX_IMAGES).
- guidance and mu finite (NaN or inf would make every pixel NaN and write black images).
- prompts non-empty after stripping: an empty prompt is the unconditional input; generating from it silently would
  look like a prompt was followed.
"""

from __future__ import annotations

import math
import os

from krea2.errors import Krea2Error

MAX_STEPS = 1000
MAX_SIDE = 4096
MAX_IMAGES = 1024


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise Krea2Error(f"{name}={raw!r} is not an integer") from None
    if value < 1:
        raise Krea2Error(f"{name} must be >= 1, got {value}")
    return value


def max_side() -> int:
    return _env_int("KREA2_MAX_SIDE", MAX_SIDE)


def check_steps(steps: int | None, what: str = "steps") -> None:
    if steps is not None and not (1 <= steps <= MAX_STEPS):
        raise Krea2Error(f"{what} must be between 1 and {MAX_STEPS}, got {steps}")


def check_finite(value: float | None, what: str) -> None:
    if value is not None and not math.isfinite(value):
        raise Krea2Error(f"{what} must be a finite number, got {value}")


def check_side(value: int | None, what: str) -> None:
    """None means the checkpoint's native side."""
    if value is None:
        return
    limit = max_side()
    if value < 1:
        raise Krea2Error(f"{what} must be a positive number of pixels, got {value}")
    if value > limit:
        raise Krea2Error(f"{what} {value} px is over the limit of {limit} px (set KREA2_MAX_SIDE to raise it)")


def check_count(value: int, what: str) -> None:
    limit = _env_int("KREA2_MAX_IMAGES", MAX_IMAGES)
    if not 1 <= value <= limit:
        raise Krea2Error(f"{what} must be between 1 and {limit}, got {value} (set KREA2_MAX_IMAGES to raise it)")


def check_prompts(prompts) -> list[str]:
    """A list of non-empty prompt strings; Krea2Error naming the first bad one (1-based)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts or [])
    if not prompts:
        raise Krea2Error('no prompts given; pass at least one, e.g. "a red fox in snow"')
    for i, p in enumerate(prompts, 1):
        if not isinstance(p, str):
            raise Krea2Error(f"prompt {i} is not text: {p!r}")
        if not p.strip():
            raise Krea2Error(f"prompt {i} is empty; give it some text (an empty prompt is the unconditional input)")
    return prompts


def check_sampling(steps: int | None = None, guidance: float | None = None, mu: float | None = None) -> None:
    check_steps(steps)
    check_finite(guidance, "guidance")
    check_finite(mu, "mu")
