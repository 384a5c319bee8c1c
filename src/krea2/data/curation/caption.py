"""The captioning cascade: OCR -> long caption (from image, OCR text, metadata) -> medium and short rewrites.

Each step is pluggable by name: `truth` reads the ground truth of the embedded sets (world scene records, emoji names,
or a sidecar caption), `rapidocr` runs rapidocr-onnxruntime, `vlm:PATH` / `llm:PATH` run a local transformers model,
`rules` rewrites without a model. The caption step also records caption accuracy: the share of the image's known
contents (`truth_terms`) its long caption names; rows below `min_accuracy` are dropped downstream.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import numpy as np

from krea2.data.curation.checks import row_rgb
from krea2.errors import Krea2Error


def _meta(row: dict) -> dict:
    return json.loads(row["meta"]) if row.get("meta") else {}


# -- OCR --------------------------------------------------------------------------------------------------------------


def make_ocr(engine: str) -> Callable[[dict], str]:
    if engine == "none":
        return lambda row: ""
    if engine == "truth":
        return lambda row: str(_meta(row).get("ocr_text", ""))
    if engine == "rapidocr":
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as e:
            raise Krea2Error("rapidocr-onnxruntime is missing: pip install rapidocr-onnxruntime") from e
        engine_ = RapidOCR()

        def ocr(row: dict) -> str:
            rgb = row_rgb(row)
            result, _ = engine_(np.ascontiguousarray(rgb[..., ::-1]))  # BGR, as OpenCV reads
            return " ".join(text for _, text, score in (result or []) if float(score) >= 0.5)

        return ocr
    raise Krea2Error(f"unknown OCR engine {engine!r}: pick none, truth or rapidocr")


# -- long caption -----------------------------------------------------------------------------------------------------


def _truth_long(row: dict) -> str:
    meta = _meta(row)
    caps = meta.get("captions") or {}
    text = caps.get("long") or meta.get("caption")
    if not text:
        raise ValueError("no ground-truth caption in the row's metadata: use --captioner vlm:MODEL_PATH")
    return text


def _transformers_generate(spec: str, kind: str):
    """A local transformers model (no downloads): image-text-to-text for captions, text-generation for rewrites."""
    path = spec.split(":", 1)[1]
    try:
        from transformers import pipeline

        task = "image-text-to-text" if kind == "vlm" else "text-generation"
        return pipeline(task, model=path, model_kwargs={"local_files_only": True})
    except Exception as e:  # noqa: BLE001 - any load failure is a configuration problem for the user
        raise Krea2Error(f"cannot load {kind} model {path!r} locally: {str(e).splitlines()[0]}") from e


CAPTION_PROMPT = ("Describe this image in one dense paragraph: every object, its colour, size and position, the "
                  "background and the style. Visible text: {ocr}. Known metadata: {meta}.")
REWRITE_PROMPT = "Rewrite this image caption in {n} words or fewer, keeping the main subject:\n{text}\n"


def make_captioner(engine: str) -> Callable[[dict, str], str]:
    if engine == "truth":
        return lambda row, ocr: _truth_long(row)
    if engine.startswith("vlm:"):
        pipe = _transformers_generate(engine, "vlm")

        def caption(row: dict, ocr: str) -> str:
            from PIL import Image

            msg = [{"role": "user", "content": [
                {"type": "image", "image": Image.fromarray(row_rgb(row))},
                {"type": "text", "text": CAPTION_PROMPT.format(ocr=ocr or "none", meta=_meta(row).get("tags", ""))}]}]
            out = pipe(text=msg, max_new_tokens=200, return_full_text=False)
            return out[0]["generated_text"].strip()

        return caption
    raise Krea2Error(f"unknown captioner {engine!r}: pick truth or vlm:MODEL_PATH")


def with_ocr(caption: str, ocr: str) -> str:
    """Quoted text in captions must match the OCR output: add it when the captioner left it out."""
    if ocr and ocr.lower() not in caption.lower():
        return f'{caption.rstrip()} The text reads "{ocr}".'
    return caption


def caption_accuracy(caption: str, terms: list[str]) -> float | None:
    if not terms:
        return None  # nothing known about the image: no score (a VLM judge would fill this at real scale)
    low = caption.lower()
    return sum(t.lower() in low for t in terms) / len(terms)


# -- rewrites ---------------------------------------------------------------------------------------------------------


def rules_rewrite(long: str) -> dict[str, str]:
    first = re.split(r"(?<=[.!?])\s+", long.strip())[0]
    medium = " ".join(first.split()[:30])
    short = " ".join(medium.rstrip(".!?").split()[:8])
    return {"medium": medium, "short": short}


def make_rewriter(engine: str) -> Callable[[dict, str], dict[str, str]]:
    if engine == "rules":
        return lambda row, long: rules_rewrite(long)
    if engine == "truth":
        def truth(row: dict, long: str) -> dict[str, str]:
            caps = _meta(row).get("captions") or {}
            fallback = rules_rewrite(long)
            return {k: caps.get(k) or fallback[k] for k in ("medium", "short")}

        return truth
    if engine.startswith("llm:"):
        pipe = _transformers_generate(engine, "llm")

        def rewrite(row: dict, long: str) -> dict[str, str]:
            out = {}
            for kind, n in (("medium", 30), ("short", 8)):
                gen = pipe(REWRITE_PROMPT.format(n=n, text=long), max_new_tokens=2 * n, return_full_text=False)
                out[kind] = gen[0]["generated_text"].strip().splitlines()[0]
            return out

        return rewrite
    raise Krea2Error(f"unknown rewriter {engine!r}: pick truth, rules or llm:MODEL_PATH")


# -- job processors ---------------------------------------------------------------------------------------------------


def make_processor(job: str, options: dict):
    from krea2.data.curation.jobs import per_row

    if job == "ocr":
        ocr = make_ocr(options.get("ocr", "truth"))
        return per_row(lambda row: (True, {"text": ocr(row)}))
    if job == "caption":
        captioner = make_captioner(options.get("captioner", "truth"))
        min_accuracy = float(options.get("min_accuracy", 0.8))

        def caption(row: dict) -> tuple[bool, dict]:
            ocr_text = json.loads(row["ocr"])["text"]
            long = with_ocr(captioner(row, ocr_text), ocr_text)
            acc = caption_accuracy(long, _meta(row).get("truth_terms") or [])
            return acc is None or acc >= min_accuracy, {"long": long, "accuracy": acc}

        return per_row(caption)
    if job == "rewrite":
        rewriter = make_rewriter(options.get("rewriter", "truth"))

        def rewrite(row: dict) -> tuple[bool, dict]:
            long = json.loads(row["caption"])["long"]
            out = rewriter(row, long)
            return bool(out.get("medium") and out.get("short")), out

        return per_row(rewrite)
    raise ValueError(job)
