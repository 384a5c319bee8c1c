"""World evaluation: sample the prompt file with fixed seeds, score with the exact checker, report FID beside it."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from krea2.data import world
from krea2.errors import Krea2Error
from krea2.eval import checker

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "prompts"
PROMPT_SETS = {"world_eval": (30, 0), "world_eval_small": (6, 1)}  # name: (prompts per tag, seed)
FID_REFERENCE_SEED = 1234  # the real renders FID compares against; fixed so reports stay comparable


def write_prompts(path: str | Path, n_per_tag: int, seed: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in world.make_eval_prompts(n_per_tag, seed)))
    return path


def prompts_path(name_or_path: str | Path | None = None) -> Path:
    """A shipped set by name (world_eval, world_eval_small) or a JSONL path."""
    name = str(name_or_path or "world_eval")
    return PROMPTS_DIR / f"{name}.jsonl" if name in PROMPT_SETS else Path(name)


def check_size(size: int) -> None:
    """Fail before sampling when the checker could not read images of this side."""
    if size not in world.GEOMETRIES and not any(size % s == 0 for s in world.GEOMETRIES):
        raise Krea2Error(f"the world checker reads {list(world.SUPPORTED_SIZES)} px images (or multiples); "
                         f"--size {size} is neither; pick one of those")


def evaluate_images(records: Sequence[dict], images: Sequence) -> tuple[dict, list[dict]]:
    """Score images (image i against record i) and describe what the checker saw in each."""
    rows = []
    for rec, img in zip(records, images, strict=True):
        det = checker.detect(img)
        why = checker.failure(det, rec)
        rows.append({"prompt": rec["prompt"], "tag": rec["tag"], "correct": why is None, "failure": why,
                     "background": det.background, "style": det.style,
                     "objects": [f"{o.size} {o.color} {o.shape} @ {o.position}" for o in det.objects]})
    summary = checker.score_results(records, [r["correct"] for r in rows])
    return {**summary, "failures": failure_breakdown(rows)}, rows


def failure_breakdown(rows: Sequence[dict]) -> dict:
    """Failed images by reason (`checker.failure`), per tag and over all tags: {"all": {reason: n}, tag: {...}},
    reasons in checker.FAILURES order, absent ones left out."""
    out: dict[str, dict[str, int]] = {}
    for key in ["all"] + sorted({r["tag"] for r in rows}, key=world.TAGS.index):
        reasons = [r["failure"] for r in rows if r["failure"] and key in ("all", r["tag"])]
        out[key] = {f: reasons.count(f) for f in checker.FAILURES if f in reasons}
    return out


def marked_grid(images: Sequence, correct: Sequence[bool], cols: int, scale: int = 2):
    """Image grid with a green (correct) or red (wrong) frame around each image, upscaled to stay visible."""
    from PIL import Image, ImageOps

    from krea2.pipeline import image_grid

    framed = []
    for im, ok in zip(images, correct, strict=True):
        im = im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))
        im = im.convert("RGB").resize((im.width * scale, im.height * scale), Image.NEAREST)
        framed.append(ImageOps.expand(im, border=2, fill=(0, 170, 0) if ok else (210, 0, 0)))
    return image_grid(framed, cols=cols)


def fid_to_world(images: Sequence, n_reference: int | None = None) -> float | None:
    """FID of images against fresh world renders at the side the checker reads them, on the project's world encoder.

    None when the encoder weights are absent or there are too few images for a covariance.
    """
    from krea2.eval.fid import fid_vs_world

    canvases = [checker.as_canvas(im) for im in images]
    if len(canvases) < 2:
        return None
    try:
        return fid_vs_world(canvases, canvases[0].shape[0], n_reference=n_reference or max(len(canvases), 256),
                            seed=FID_REFERENCE_SEED)
    except FileNotFoundError:
        return None


def high_frequency_energy(images: Sequence) -> float:
    """Mean squared response of the 3x3 Laplacian over the images, pixel values in [0, 1]: the speckle and
    fragment edges that preference optimisation drifts into raise it; world renders are flat regions with edges."""
    arr = np.stack([checker.as_canvas(im) for im in images]).astype(np.float64) / 255.0
    lap = (4 * arr[:, 1:-1, 1:-1] - arr[:, :-2, 1:-1] - arr[:, 2:, 1:-1] - arr[:, 1:-1, :-2] - arr[:, 1:-1, 2:])
    return float(np.mean(lap**2))


def hf_ratio_to_world(images: Sequence) -> float:
    """high_frequency_energy of the images over that of fresh world renders of the same side (1 = as sharp-edged
    as the ground truth; above 1: extra high-frequency energy)."""
    from krea2.data.world import world_examples

    side = checker.as_canvas(images[0]).shape[0]
    ref = [ex.image for ex in world_examples(256, side, FID_REFERENCE_SEED)]
    return high_frequency_energy(images) / high_frequency_energy(ref)


def seed_diversity(images: Sequence, images_per_prompt: int) -> float | None:
    """Spread across seeds of one prompt: the mean pairwise L2 distance between the world-encoder features of a
    prompt's images (consecutive groups of images_per_prompt), averaged over prompts. A mode-collapsed model (a
    distilled student drawing the same picture for every seed) scores near 0. None below 2 images per prompt or
    without the encoder weights."""
    from krea2.eval.fid import world_features

    if images_per_prompt < 2:
        return None
    try:
        f = world_features([checker.as_canvas(im) for im in images])
    except FileNotFoundError:
        return None
    groups = f.reshape(-1, images_per_prompt, f.shape[-1])
    d = np.linalg.norm(groups[:, :, None] - groups[:, None, :], axis=-1)
    pairs = images_per_prompt * (images_per_prompt - 1)
    return float((d.sum(axis=(1, 2)) / pairs).mean())


def evaluate_pipeline(pipe, records: Sequence[dict], images_per_prompt: int = 1, seed: int = 0,
                      steps: int | None = None, guidance: float | None = None, size: int | None = None,
                      with_fid: bool = True, mu: float | None = None) -> tuple[dict, list]:
    """Generate images_per_prompt images per record (image i of the run uses seed + i), check and report.

    pipe is a krea2.pipeline.Pipeline (or anything with its sampling_config/generate/resolution); steps/guidance/mu
    of None keep the checkpoint's. Returns (report, PIL images); the report also gives the model calls per image
    (nfe), sampling seconds per image and the seed diversity (`seed_diversity`). Raises Krea2Error for a bad size
    or count.
    """
    from krea2.pipeline import to_pil

    if images_per_prompt < 1:
        raise Krea2Error("--images-per-prompt must be at least 1")
    size = size or pipe.resolution
    check_size(size)
    expanded = [r for r in records for _ in range(images_per_prompt)]
    t0 = time.perf_counter()
    sampling = pipe.sampling_config(steps=steps, guidance=guidance, mu=mu)
    images = to_pil(pipe.generate([r["prompt"] for r in expanded], sampling, seed=seed, width=size, height=size))
    t1 = time.perf_counter()
    summary, rows = evaluate_images(expanded, images)
    t2 = time.perf_counter()
    fid = fid_to_world(images) if with_fid else None
    t3 = time.perf_counter()
    for i, row in enumerate(rows):
        row["seed"] = seed + i
    report = {**summary, "fid": fid, "hf_ratio": round(hf_ratio_to_world(images), 4),
              "diversity": seed_diversity(images, images_per_prompt),
              "nfe": sampling.steps * (2 if sampling.guidance > 0 else 1),
              "seconds_per_image": round((t1 - t0) / len(images), 5), "n_prompts": len(records),
              "n_images": len(images),
              "settings": {"images_per_prompt": images_per_prompt, "seed": seed, "steps": sampling.steps,
                           "guidance": sampling.guidance, "mu": sampling.mu, "size": size},
              "seconds": {"generate": round(t1 - t0, 2), "check": round(t2 - t1, 2), "fid": round(t3 - t2, 2)},
              "images": rows}
    return report, images


def write_report(report: dict, images: Sequence, out: str | Path, cols: int) -> tuple[Path, Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    grid_path = out.with_suffix(".png")
    marked_grid(images, [r["correct"] for r in report["images"]], cols=cols).save(grid_path)
    return out, grid_path


def format_summary(report: dict) -> list[str]:
    """Human lines; the overall score is the last one."""
    lines = [f"{tag:14s} {acc:.3f}  ({report['counts'][tag]} images)" for tag, acc in report["per_tag"].items()]
    if report.get("fid") is not None:
        lines.append(f"{'fid':14s} {report['fid']:.2f}  (world encoder, vs world renders)")
    if report.get("hf_ratio") is not None:
        lines.append(f"{'hf_ratio':14s} {report['hf_ratio']:.3f}  (high-frequency energy / world renders')")
    if report.get("diversity") is not None:
        lines.append(f"{'diversity':14s} {report['diversity']:.3f}  (world-encoder spread across seeds of a prompt)")
    elif "diversity" in report:
        lines.append(f"{'diversity':14s} -  (not measured: needs --images-per-prompt >= 2)")
    if report.get("failures", {}).get("all"):
        lines.append(f"{'failures':14s} " + ", ".join(f"{k} {n}" for k, n in report["failures"]["all"].items()))
    if report.get("nfe") is not None:
        lines.append(f"{'nfe':14s} {report['nfe']}  ({report['seconds_per_image'] * 1000:.1f} ms sampling per image)")
    lines.append(f"overall {report['overall']:.4f}")
    return lines
