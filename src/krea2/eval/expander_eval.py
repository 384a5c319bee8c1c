"""`krea2 eval expander`: what a prompt expander does to the images of the world model.

For each evaluation prompt (docs/WORLD.md records carry the structured requirements) it samples n expansions and
draws n images twice with the same seeds: from the prompt as written and from the expansions (image j of a prompt
uses one seed in both arms). Reported:
- text faithfulness: the fraction of expansions that keep every requirement and contradict none, read by the
  grammar's parser and judged by the checker's rule (`krea2.expander.rewards.text_faithful`);
- image faithfulness: of the images the checker passes against their own expansion (the model drew what the
  expansion says), the fraction it also passes against the short prompt: whether what the expansion added
  contradicts the user when it is drawn. The base model's own misses are in the scores, not here;
- diversity: the world-encoder spread of a prompt's n images (`seed_diversity`), expanded against unexpanded, and
  their ratio;
- score: the checker's overall score (mean over tags) of the images without and with expansion.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from krea2.errors import Krea2Error


def evaluate_expander(pipe, expander, records: Sequence[dict], creativity: str = "medium", n: int = 2,
                      seed: int = 0, size: int | None = None, verify: bool = False) -> tuple[dict, list, list]:
    """Returns (report, unexpanded PIL images, expanded PIL images); image i of either arm uses seed + i.

    pipe: a krea2.pipeline.Pipeline; expander: a krea2.expander.Expander (unused at creativity raw); verify: measure
    the guarded expander (Expander.expand_many(verify=True)) instead of the model alone. Raises
    Krea2Error for n < 2 (diversity needs two images of a prompt) or a bad creativity.
    """
    from krea2.eval import checker
    from krea2.eval.world_eval import check_size, seed_diversity
    from krea2.expander import grammar
    from krea2.expander.rewards import constraint_ok, text_faithful
    from krea2.pipeline import to_pil

    grammar.check_level(creativity)
    if n < 2:
        raise Krea2Error("--n must be at least 2: diversity compares the images of one prompt")
    size = size or pipe.resolution
    check_size(size)
    reqs = [{k: v for k, v in r.items() if k != "tag"} for r in records]
    t0 = time.perf_counter()
    rep = [r for r in records for _ in range(n)]
    texts = expander.expand_many([r["prompt"] for r in rep], creativity, seed, verify=verify) \
        if creativity != "raw" else [r["prompt"] for r in rep]
    t1 = time.perf_counter()
    raw_images = to_pil(pipe.generate([r["prompt"] for r in rep], seed=seed, width=size, height=size))
    exp_images = to_pil(pipe.generate(texts, seed=seed, width=size, height=size))
    t2 = time.perf_counter()
    user = [q for q in reqs for _ in range(n)]
    faithful = [text_faithful(t, q) for t, q in zip(texts, user)]
    well_formed = [constraint_ok(grammar.parse(t)) for t in texts]
    raw_ok = [checker.check(im, r) for im, r in zip(raw_images, rep)]
    exp_ok = [checker.check(im, r) for im, r in zip(exp_images, rep)]
    drawn_as_said, kept = 0, 0  # image faithfulness: correct for the expansion -> correct for the prompt?
    for text, im, ok in zip(texts, exp_images, exp_ok):
        try:
            own = grammar.prompt_record(text)
        except Krea2Error:
            continue
        if checker.check(im, own):
            drawn_as_said += 1
            kept += ok
    raw_div, exp_div = seed_diversity(raw_images, n), seed_diversity(exp_images, n)
    raw_score, exp_score = checker.score_results(rep, raw_ok), checker.score_results(rep, exp_ok)
    report = {
        "creativity": creativity, "verify": verify, "n_prompts": len(records), "expansions_per_prompt": n,
        "text_faithfulness": sum(faithful) / len(faithful),
        "well_formed": sum(well_formed) / len(well_formed),
        "image_faithfulness": kept / drawn_as_said if drawn_as_said else None,
        "images_drawn_as_expanded": drawn_as_said,
        "diversity": {"unexpanded": raw_div, "expanded": exp_div,
                      "ratio": exp_div / raw_div if raw_div and exp_div is not None else None},
        "score": {"unexpanded": raw_score["overall"], "expanded": exp_score["overall"]},
        "per_tag": {"unexpanded": raw_score["per_tag"], "expanded": exp_score["per_tag"]},
        "settings": {"seed": seed, "size": size, "steps": pipe.sampling.steps, "guidance": pipe.sampling.guidance},
        "seconds": {"expand": round(t1 - t0, 2), "generate": round(t2 - t1, 2)},
        "expansions": [{"prompt": r["prompt"], "expansion": t, "faithful": f, "correct_unexpanded": a,
                        "correct_expanded": b, "seed": seed + i}
                       for i, (r, t, f, a, b) in enumerate(zip(rep, texts, faithful, raw_ok, exp_ok))],
    }
    return report, raw_images, exp_images


def format_summary(report: dict) -> list[str]:
    """Human lines; the last is `faithfulness X diversity Yx score A -> B` (X: the lower of text and image)."""
    img = report["image_faithfulness"]
    div = report["diversity"]
    lines = [f"creativity       {report['creativity']}{' (verified)' if report.get('verify') else ''}  "
             f"({report['n_prompts']} prompts x "
             f"{report['expansions_per_prompt']} expansions)",
             f"text faithful    {report['text_faithfulness']:.3f}  (parser + checker rule; well formed "
             f"{report['well_formed']:.3f})",
             f"image faithful   {'-' if img is None else f'{img:.3f}'}  (of {report['images_drawn_as_expanded']} "
             "images drawn as their expansion says, the share that also meets the prompt)"]
    for tag, a in report["per_tag"]["unexpanded"].items():
        lines.append(f"{tag:16s} {a:.3f} -> {report['per_tag']['expanded'][tag]:.3f}")
    ratio = div["ratio"]
    if ratio is not None:
        lines.append(f"diversity        {div['unexpanded']:.3f} -> {div['expanded']:.3f}  (world-encoder spread)")
    faith = min(report["text_faithfulness"], img if img is not None else 1.0)
    lines.append(f"faithfulness {faith:.3f} diversity {'-' if ratio is None else f'{ratio:.2f}'}x "
                 f"score {report['score']['unexpanded']:.3f} -> {report['score']['expanded']:.3f}")
    return lines
