"""`krea2 eval ...`: evaluation commands (mounted by krea2.commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Evaluation on the embedded world.")


@app.callback()
def _group() -> None:
    """Evaluation on the embedded world."""


@app.command()
def world(
    checkpoint: Annotated[str, typer.Option(help="world (the shipped checkpoint) or a checkpoint folder.")] = "world",
    prompts: Annotated[str, typer.Option(help="world_eval | world_eval_small | a JSONL prompt file.")] = "world_eval",
    out: Annotated[Path, typer.Option(help="JSON report; the image grid goes next to it as .png.")] = Path(
        "world_eval.json"),
    images_per_prompt: Annotated[int, typer.Option(min=1, help="Images per prompt (seeds seed, seed+1, ...); at one "
                                                   "image a tag of 30 prompts moves by +-0.08 between seeds.")] = 2,
    seed: Annotated[int, typer.Option(help="Image i of the run uses seed + i.")] = 0,
    steps: Annotated[int | None, typer.Option(help="Euler steps (default: the checkpoint's).")] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance g (default: the checkpoint's).")] = None,
    mu: Annotated[float | None, typer.Option(help="Schedule shift mu (default: the checkpoint's).")] = None,
    size: Annotated[int | None, typer.Option(help="Image side in px (default: the model's native side).")] = None,
    fid: Annotated[bool, typer.Option(help="Also report FID against world renders.")] = True,
):
    """Sample the world prompts, score them with the exact checker; prints per-tag accuracy and a failures line (why
    failed images fail; per tag in the JSON report), overall last."""
    from krea2.commands import note_snapped_size
    from krea2.eval.checker import load_prompts
    from krea2.eval.world_eval import check_size, evaluate_pipeline, format_summary, prompts_path, write_report
    from krea2.pipeline import load_pipeline

    records = load_prompts(prompts_path(prompts))
    pipe = load_pipeline(checkpoint, device="cpu")
    side = size or pipe.resolution
    check_size(side)  # before the size note, as before: a side the checker cannot read fails first
    note_snapped_size(pipe, side, side)
    report, images = evaluate_pipeline(pipe, records, images_per_prompt, seed, steps, guidance, size, with_fid=fid,
                                       mu=mu)
    report["checkpoint"], report["prompts"] = checkpoint, str(prompts_path(prompts))
    report_path, grid_path = write_report(report, images, out, cols=max(images_per_prompt, 9))
    typer.echo(f"wrote {report_path} and {grid_path} ({report['n_images']} images, "
               f"{report['seconds']['generate']:.1f}s sampling)")
    for line in format_summary(report):
        typer.echo(line)


@app.command("style")
def style(
    style_encoder: Annotated[str, typer.Option(help="world (the shipped adapter) or a style / style_po stage folder "
                                               "(style.json, style_encoder.safetensors[, lora.safetensors]).")
                             ] = "world",
    checkpoint: Annotated[str, typer.Option(help="The base model the encoder was trained for.")] = "world",
    prompts: Annotated[str, typer.Option(help="world_eval | world_eval_small | a JSONL file; lines may carry refs "
                                         "[{style, weight}] and strength.")] = "world_eval",
    strength: Annotated[float, typer.Option(help="Style strength in [0, 1] where a line gives none.")] = 1.0,
    images_per_prompt: Annotated[int, typer.Option(min=1)] = 2,
    seed: Annotated[int, typer.Option()] = 0,
    out: Annotated[Path, typer.Option(help="JSON report; the styled images' grid goes next to it as .png.")] = Path(
        "style_eval.json"),
):
    """Generate each prompt with references rendered in a known style and without; prints style accuracy, content
    and leakage (rise over the no-reference rate), the share of images holding any object ("drawn") with the style
    accuracy among them, and style accuracy per reference style; last line `style X content Y leakage Z`."""
    import json

    from krea2.errors import Krea2Error
    from krea2.eval.checker import load_prompts
    from krea2.eval.style_eval import evaluate_style, format_style_summary
    from krea2.eval.world_eval import prompts_path
    from krea2.limits import check_finite
    from krea2.pipeline import image_grid, load_pipeline
    from krea2.style import check_style_encoder, load_style_encoder

    check_finite(strength, "--strength")
    if not 0 <= strength <= 1:
        raise Krea2Error(f"--strength must be in [0, 1], got {strength}")
    records = load_prompts(prompts_path(prompts))
    encoder = load_style_encoder(style_encoder)
    pipe = load_pipeline(checkpoint, device="cpu")
    check_style_encoder(encoder, pipe.model)
    report, images = evaluate_style(pipe, encoder, records, strength, images_per_prompt, seed)
    report.update(checkpoint=checkpoint, style_encoder=str(style_encoder), prompts=str(prompts_path(prompts)))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    image_grid(images, cols=max(images_per_prompt, 9)).save(out.with_suffix(".png"))
    for line in format_style_summary(report):
        typer.echo(line)


@app.command("expander")
def expander(
    prompts: Annotated[str, typer.Option(help="world_eval | world_eval_small | a JSONL prompt file.")] = "world_eval",
    creativity: Annotated[str, typer.Option(help="raw | low | medium | high")] = "medium",
    expander: Annotated[str, typer.Option(help="world | hf:PATH | an expander folder.")] = "world",
    checkpoint: Annotated[str, typer.Option(help="The image model that draws both arms.")] = "world",
    n: Annotated[int, typer.Option(help="Expansions (and images) per prompt; at least 2.")] = 2,
    verify: Annotated[bool, typer.Option(help="Measure the guarded expander (rejected expansions resampled) "
                                         "instead of the model alone.")] = False,
    seed: Annotated[int, typer.Option()] = 0,
    out: Annotated[Path, typer.Option(help="JSON report; the expanded images' grid goes next to it as .png.")] = Path(
        "expander_eval.json"),
):
    """Images from expanded against unexpanded prompts: faithfulness (text by the parser, images by the checker),
    diversity and score; last line `faithfulness X diversity Yx score A -> B`."""
    import json

    from krea2.errors import Krea2Error
    from krea2.eval.checker import load_prompts
    from krea2.eval.expander_eval import evaluate_expander, format_summary
    from krea2.eval.world_eval import marked_grid, prompts_path
    from krea2.expander import load_expander
    from krea2.expander.grammar import check_level
    from krea2.pipeline import load_pipeline

    check_level(creativity)
    if n < 2:
        raise Krea2Error("--n must be at least 2: diversity compares the images of one prompt")
    records = load_prompts(prompts_path(prompts))
    lm = load_expander(expander) if creativity != "raw" else None
    pipe = load_pipeline(checkpoint, device="cpu")
    report, _, images = evaluate_expander(pipe, lm, records, creativity, n, seed, verify=verify)
    report.update(expander=expander, checkpoint=checkpoint, prompts=str(prompts_path(prompts)))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    marked_grid(images, [e["correct_expanded"] for e in report["expansions"]], cols=max(n, 9)).save(
        out.with_suffix(".png"))
    for line in format_summary(report):
        typer.echo(line)


@app.command("ae")
def ae(
    vae: Annotated[str, typer.Option(help="Autoencoder spec: world, world:FOLDER, identity, qwen-image[:PATH], ...")]
    = "world",
    size: Annotated[int, typer.Option(help="Render side in px (a world size divisible by the compression).")] = 64,
    n: Annotated[int, typer.Option(min=1, help="Ground-truth renders per style.")] = 200,
    seed: Annotated[int, typer.Option(min=0)] = 12345,
):
    """Reconstruct ground-truth world renders of every style; prints PSNR and the exact checker's accuracy per style,
    `checker accuracy X` last."""
    from krea2.data.world import GEOMETRIES
    from krea2.errors import Krea2Error
    from krea2.models.autoencoders import load_autoencoder
    from krea2.train.autoencoder import reconstruction_report

    if size not in GEOMETRIES:
        raise Krea2Error(f"--size {size}: the world renders at {sorted(GEOMETRIES)} px; pick one of those")
    model = load_autoencoder(vae)
    if size % model.compression:
        raise Krea2Error(f"--size {size} is not a multiple of the autoencoder's compression {model.compression}")
    rep = reconstruction_report(model.encode, model.decode, size, n, seed)
    for style, r in rep["styles"].items():
        typer.echo(f"{style:>9}  PSNR {r['psnr']:6.2f} dB  checker {r['accuracy']:.3f}")
    typer.echo(f"PSNR {rep['psnr']:.2f} dB ({size} px, {n} renders per style)")
    typer.echo(f"checker accuracy {rep['accuracy']:.3f}")


@app.command("train-encoder")
def train_encoder(
    steps: Annotated[int, typer.Option(help="Optimizer steps (batch 32 of fresh renders at 16-64 px).")] = 2500,
    out: Annotated[Path | None, typer.Option(help="Weights path (default: the shipped asset).")] = None,
    seed: Annotated[int, typer.Option()] = 0,
):
    """Train the world encoder (FID features, iREPA teacher) on world renders; a few minutes on CPU."""
    from krea2.eval.world_encoder import ASSET, save_world_encoder, train_world_encoder

    model, info = train_world_encoder(steps=steps, seed=seed)
    path = save_world_encoder(model, info, out or ASSET)
    typer.echo(f"validation accuracy {info['val_accuracy']}")
    typer.echo(f"wrote {path}")
