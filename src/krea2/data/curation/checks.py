"""Per-image jobs on the CPU: decode (with a reason for every failure), the cheap filters, and dedup hashes.

No aesthetic or quality scoring: the filters only catch extreme failures (SYSTEM.md 10.1); blur and softness pass.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import numpy as np
from PIL import Image, ImageFile, ImageOps

from krea2.data.curation.sources import read_bytes

MAX_PIXELS = 8192 * 8192  # above this a file is treated as a decompression bomb (PIL's own limit is ~179 MP)
ANALYSIS_SIDE = 256  # filters run on a copy at most this long: cheap, and enough for all measures


class Rejected(Exception):
    """The image cannot be used; the message is the recorded reason."""


def load_rgb(data: bytes, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, dict]:
    """Decode to (H, W, 3) uint8 RGB (alpha over white, CMYK/palette/16-bit converted) or raise Rejected(reason)."""
    if not data:
        raise Rejected("empty file (0 bytes)")
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt, mode, (w, h) = im.format, im.mode, im.size
            if w <= 0 or h <= 0:
                raise Rejected(f"zero-sized image ({w}x{h})")
            if w * h > max_pixels:
                raise Rejected(f"decompression bomb: {w}x{h} = {w * h / 1e6:.0f} MP > {max_pixels / 1e6:.0f} MP limit")
            im.verify()  # structure and checksums (PNG CRCs); the image must be reopened afterwards
            im = Image.open(io.BytesIO(data))
            frames = getattr(im, "n_frames", 1)
            im.load()
            # a camera's EXIF orientation (e.g. 6: rotated 90°) applied, so captions describe the upright image
            im = ImageOps.exif_transpose(im)
            w, h = im.size
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected(f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise Rejected("not an image: unrecognised format") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower() or isinstance(e, EOFError):
            raise Rejected(f"truncated file: {msg}") from None
        raise Rejected(f"corrupt {fmt or 'image'}: {msg}") from None
    rgb = to_rgb(im, fmt)
    return rgb, {"format": fmt, "mode": mode, "width": w, "height": h, "frames": frames}


SIXTEEN_BIT_FORMATS = {"PNG", "TIFF"}  # where Pillow's 32-bit "I" mode holds 16-bit samples


def to_rgb(im: Image.Image, fmt: str | None = None) -> np.ndarray:
    """(H, W, 3) uint8. High-bit-depth greyscale is scaled by its format's range (a 16-bit sample / 65535), never
    by the values present: a dark 16-bit image stays dark instead of being stretched to mid-grey."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":  # float images: [0, 1] by convention
            top = 1.0
        elif im.mode.startswith("I;16") or (fmt or im.format) in SIXTEEN_BIT_FORMATS:
            top = 65535.0
        else:
            top = 2.0**31 - 1
        a = np.clip(np.rint(a / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def row_rgb(row: dict) -> np.ndarray:
    rgb, _ = load_rgb(read_bytes(row["ref"]))
    return rgb


def _ext_format_mismatch(ref: str, fmt: str | None) -> str | None:
    ext = ref.rsplit(".", 1)[-1].lower() if "." in ref.rsplit("/", 1)[-1] else ""
    expected = {"jpg": "JPEG", "jpeg": "JPEG", "jfif": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF",
                "bmp": "BMP", "tif": "TIFF", "tiff": "TIFF"}.get(ext)
    if expected and fmt and expected != fmt:
        return f"extension .{ext} but the content is {fmt}"
    return None


def decode(row: dict) -> tuple[bool, dict]:
    data = read_bytes(row["ref"])  # a missing file raises: a failed attempt, retried (a mirror may be filling)
    try:
        rgb, info = load_rgb(data)
    except Rejected as e:
        return False, {"reason": str(e)}
    notes = [n for n in [_ext_format_mismatch(row["ref"], info["format"])] if n]
    if info["frames"] > 1:
        notes.append(f"animated: {info['frames']} frames, first used")
    if info["mode"] != "RGB":
        notes.append(f"mode {info['mode']} converted to RGB")
    return True, {**info, "notes": notes}


# -- filters ----------------------------------------------------------------------------------------------------------


@dataclass
class FilterConfig:
    """Thresholds of the cheap filters. Defaults drop only extreme cases; stages tighten them."""

    min_side: int = 16
    max_aspect: float = 4.0
    max_laplacian_var: float = 20000.0  # pure per-pixel noise scores ~1e5; sharp natural images ~1e2..5e3
    min_entropy: float = 0.05  # bits per channel; a constant image scores 0
    max_flat_ratio: float = 0.998  # share of pixels equal to the dominant colour
    max_border_ratio: float = 0.5  # share covered by letterbox/pillarbox bars unlike the interior

    @classmethod
    def from_options(cls, options: dict) -> FilterConfig:
        default = cls()
        return cls(**{f.name: type(getattr(default, f.name))(options[f.name])
                      for f in fields(cls) if f.name in options})


def _analysis_copy(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = ANALYSIS_SIDE / max(h, w)
    if scale >= 1:
        return rgb
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))


def laplacian_var(gray: np.ndarray) -> float:
    g = gray.astype(np.float64)
    if min(g.shape) < 3:
        return 0.0
    lap = -4 * g[1:-1, 1:-1] + g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:]
    return float(lap.var())


def rgb_entropy(rgb: np.ndarray) -> float:
    """Mean Shannon entropy (bits) of the three channel histograms."""
    out = []
    for c in range(3):
        p = np.bincount(rgb[..., c].ravel(), minlength=256).astype(np.float64)
        p = p[p > 0] / p.sum()
        out.append(float(-(p * np.log2(p)).sum()))
    return float(np.mean(out))


def flat_ratio(rgb: np.ndarray, tol: int = 8) -> tuple[float, list[int]]:
    """Share of pixels within `tol` of the dominant (coarsely quantised) colour, and that colour."""
    q = (rgb // 16).reshape(-1, 3).astype(np.int32)
    keys = q[:, 0] * 256 + q[:, 1] * 16 + q[:, 2]
    dom = np.bincount(keys).argmax()
    colour = np.median(rgb.reshape(-1, 3)[keys == dom], axis=0)
    near = (np.abs(rgb.reshape(-1, 3).astype(np.int32) - colour).max(axis=1) <= tol).mean()
    return float(near), [int(c) for c in colour]


def border_ratio(rgb: np.ndarray, tol: float = 6.0) -> float:
    """Area share of uniform bands at the edges whose colour the interior does not share (letterbox, frames)."""
    h, w = rgb.shape[:2]
    a = rgb.astype(np.int32)

    def band(lines: np.ndarray) -> int:  # lines: (n, L, 3), edge first
        edge = lines[0].mean(axis=0)
        n = 0
        for line in lines:
            if np.abs(line - edge).max() > tol * 3 or line.std(axis=0).max() > tol:
                break
            n += 1
        return n

    cols = a.transpose(1, 0, 2)
    top, bottom, left, right = band(a), band(a[::-1]), band(cols), band(cols[::-1])
    if top + bottom >= h or left + right >= w:
        return 0.0  # the whole image is uniform: the entropy and flat filters speak for it
    interior = a[top:h - bottom, left:w - right].reshape(-1, 3)

    def frame(n: int, edge_colour: np.ndarray) -> int:  # a background runs into the interior; a frame does not
        return n if n and (np.abs(interior - edge_colour).max(axis=1) <= tol * 2).mean() < 0.3 else 0

    tb = frame(top, a[0].mean(0)) + frame(bottom, a[-1].mean(0))
    lr = frame(left, a[:, 0].mean(0)) + frame(right, a[:, -1].mean(0))
    if tb and lr:
        return 0.0  # bands on all sides: a flat background around the subject, not letterbox or pillarbox bars
    return float(max(tb / h, lr / w))


def measure(rgb: np.ndarray) -> dict:
    small = _analysis_copy(rgb)
    gray = small.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    flat, colour = flat_ratio(small)
    return {
        "laplacian_var": round(laplacian_var(gray), 2),
        "entropy": round(rgb_entropy(small), 4),
        "flat_ratio": round(flat, 4),
        "flat_colour": colour,
        "white_ratio": round(float((small.min(axis=2) >= 245).mean()), 4),
        "black_ratio": round(float((small.max(axis=2) <= 10).mean()), 4),
        "border_ratio": round(border_ratio(small), 4),
    }


def filter_image(rgb: np.ndarray, cfg: FilterConfig) -> tuple[bool, dict]:
    h, w = rgb.shape[:2]
    m = {"width": w, "height": h, "aspect": round(max(w, h) / max(1, min(w, h)), 3), **measure(rgb)}
    reasons = []
    if min(w, h) < cfg.min_side:
        reasons.append(f"too small: {w}x{h} < {cfg.min_side}")
    if m["aspect"] > cfg.max_aspect:
        reasons.append(f"aspect ratio {m['aspect']} > {cfg.max_aspect}")
    if m["laplacian_var"] > cfg.max_laplacian_var:
        reasons.append(f"extreme texture or noise: Laplacian variance {m['laplacian_var']:.0f}")
    if m["entropy"] < cfg.min_entropy:
        reasons.append(f"near-constant image: RGB entropy {m['entropy']:.3f} bits")
    if m["flat_ratio"] > cfg.max_flat_ratio:
        reasons.append(f"flat: {m['flat_ratio']:.1%} of pixels one colour")
    if m["border_ratio"] > cfg.max_border_ratio:
        reasons.append(f"border artifact: uniform bands cover {m['border_ratio']:.0%}")
    return not reasons, {**m, "reasons": reasons, "config": asdict(cfg)}


# -- dedup hashes -----------------------------------------------------------------------------------------------------

PHASH_SIZE = 12  # 144 bits: the default 8x8 gives many false positives
COLOR_GRID = 4  # colour hash: mean RGB of a 4x4 grid (48 bytes), compared by the largest cell difference


def image_hashes(rgb: np.ndarray) -> dict:
    """phash ignores colour; imagehash's colorhash (hue shares) cannot tell skin tones apart, a colour grid can."""
    import imagehash

    im = Image.fromarray(rgb)
    grid = np.asarray(im.resize((COLOR_GRID, COLOR_GRID), Image.BOX), dtype=np.uint8)
    return {"phash": str(imagehash.phash(im, hash_size=PHASH_SIZE)), "colorhash": grid.tobytes().hex()}


def make_row_fn(job: str, options: dict) -> Callable[[dict], tuple[bool, object]]:
    if job == "decode":
        return decode
    if job == "filter":
        cfg = FilterConfig.from_options(options)
        return lambda row: filter_image(row_rgb(row), cfg)
    if job == "hash":
        return lambda row: (True, image_hashes(row_rgb(row)))
    raise ValueError(job)
