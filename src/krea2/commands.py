"""Sub-commands of `krea2`. Heavy imports stay inside the commands so `--help` is instant."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from krea2.errors import Krea2Error


def generate(
    # optional for click so that no prompts is our one-line error (exit 2), not a usage dump
    prompts: Annotated[list[str] | None, typer.Argument(help="One or more prompts.", show_default=False)] = None,
    checkpoint: Annotated[str, typer.Option(help="world | world-turbo | world-rl | raw | turbo | checkpoint folder | "
                                                 ".safetensors")] = "world",
    text_encoder: Annotated[str | None, typer.Option(help="Text encoder spec (default: the checkpoint's).")] = None,
    vae: Annotated[str | None, typer.Option(help="Autoencoder spec (default: the checkpoint's).")] = None,
    steps: Annotated[int | None, typer.Option(help="Euler steps (default: the checkpoint's preset).")] = None,
    cfg: Annotated[float | None, typer.Option(help="Guidance g (Krea convention; g <= 0 = no uncond pass).")] = None,
    mu: Annotated[float | None, typer.Option(help="Pin the schedule shift mu.")] = None,
    width: Annotated[int | None, typer.Option()] = None,
    height: Annotated[int | None, typer.Option()] = None,
    seed: Annotated[int, typer.Option(help="Image i uses seed + i.")] = 0,
    num_images: Annotated[int, typer.Option(help="Images per prompt.")] = 1,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("out"),
    bf16: Annotated[bool, typer.Option(help="Load the DiT in bfloat16.")] = False,
    quantize: Annotated[str | None, typer.Option(
        help="Store the transformer blocks' weights in 8 bits: fp8 | int8 (8-bit checkpoints load as stored).",
        show_default=False)] = None,
    lora: Annotated[list[str] | None, typer.Option(
        help="Apply a LoRA: FILE[:SCALE] (any format, scale 1 by default); repeat for several.", show_default=False)]
    = None,
    style_ref: Annotated[list[str] | None, typer.Option(
        help="A style reference image IMG[:WEIGHT] (weight 1 by default; negative: steer away); repeat for several "
             "(up to 10). Needs --style-encoder.", show_default=False)] = None,
    style_strength: Annotated[float | None, typer.Option(
        help="Style strength in [0, 1] (0: the base model; default 0.5).", show_default=False)] = None,
    style_encoder: Annotated[str | None, typer.Option(
        help="The style adapter: world (shipped, for the world checkpoint) or the folder of a style / style_po "
             "stage (runs/OUT/STAGE, e.g. runs/world-style-po/po).",
        show_default=False)] = None,
    expand: Annotated[str, typer.Option(
        help="Prompt expansion: raw (none) | low | medium | high; each image gets its own expansion.")] = "raw",
    expander: Annotated[str, typer.Option(help="world | hf:PATH (a local causal LM) | an expander folder.")]
    = "world",
):
    """Generate images from text."""
    import torch

    from krea2 import limits
    from krea2.models.lora import parse_lora_spec
    from krea2.pipeline import image_grid, load_pipeline, to_pil

    prompts = limits.check_prompts(prompts)
    limits.check_count(num_images, "--num-images")
    limits.check_count(num_images * len(prompts), "images in all (prompts x --num-images)")
    limits.check_steps(steps, "--steps")
    limits.check_finite(cfg, "--cfg")
    limits.check_finite(mu, "--mu")
    limits.check_side(width, "--width")
    limits.check_side(height, "--height")
    if not style_ref and (style_encoder is not None or style_strength is not None):
        raise Krea2Error("--style-encoder and --style-strength apply to style references; add --style-ref IMG")
    if out.exists() and not out.is_dir():
        raise Krea2Error(f"--out {out} is a file; give a folder for the images")
    from krea2.expander.grammar import check_level

    check_level(expand)
    lm = None
    if expand != "raw":  # loaded before the image model: a missing expander costs nothing
        from krea2.expander import load_expander

        lm = load_expander(expander)
    references = None
    if style_ref:  # every style input checked before --out is made or the model loads
        from krea2.style import load_style_encoder, read_reference

        limits.check_finite(style_strength, "--style-strength")
        if not 0 <= (style_strength if style_strength is not None else 0.5) <= 1:
            raise Krea2Error(f"--style-strength must be in [0, 1], got {style_strength}")
        if style_encoder is None:
            raise Krea2Error("--style-ref needs --style-encoder (world, or the folder of a style / style_po stage)")
        encoder = load_style_encoder(style_encoder)
        references = [read_reference(spec) for spec in style_ref]
    try:  # before loading and sampling, so a bad path costs nothing
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Krea2Error(f"cannot create --out {out}: {e.strerror or e}; give a writable folder") from None
    if quantize is not None and quantize not in ("fp8", "int8"):
        raise Krea2Error(f"unknown --quantize {quantize!r}; use fp8 or int8")
    if quantize is not None and lora:
        raise Krea2Error("--lora cannot be combined with --quantize yet; merge the LoRA first (krea2 lora merge)")
    loras = [parse_lora_spec(s) for s in lora or []]
    for path, _ in loras:  # before loading the model, which may take minutes
        if not path.is_file():
            raise Krea2Error(f"LoRA file not found: {path}")
    pipe = load_pipeline(checkpoint, dtype=torch.bfloat16 if bf16 else None, text_encoder=text_encoder,
                         autoencoder=vae, quantize=quantize)
    if references:
        from krea2.style import check_style_encoder

        check_style_encoder(encoder, pipe.model)
    for path, scale in loras:
        pipe.load_lora(path, scale)
    note_snapped_size(pipe, width, height)
    expanded = [p for p in prompts for _ in range(num_images)]
    if lm is not None:
        expanded = pipe.expand_prompts(expanded, lm, expand, seed=seed)
        for i, text in enumerate(expanded):
            typer.echo(f"{i:04d}: {text}")
        (out / "prompts.txt").write_text("".join(t + "\n" for t in expanded))
    style = None
    if references:
        from krea2.style import mix_references

        with torch.no_grad():
            tokens = [encoder(img[None]) for img, _ in references]
        style = mix_references(tokens, [w for _, w in references],
                               0.5 if style_strength is None else style_strength, **encoder.injection_kwargs)
    images = to_pil(pipe.generate(expanded, pipe.sampling_config(steps=steps, guidance=cfg, mu=mu), seed=seed,
                                  width=width, height=height, progress=True, style=style))
    for i, im in enumerate(images):
        im.save(out / f"{i:04d}.png")
    if len(images) > 1:
        image_grid(images, cols=num_images if num_images > 1 else None).save(out / "grid.png")
    typer.echo(f"wrote {len(images)} image(s) to {out}")


def note_snapped_size(pipe, width: int | None, height: int | None) -> None:
    """Tell the user (stderr) when a side is rounded up to the token size, as the release does."""
    snapped = pipe.snap_size(width, height)
    for name, v, r in (("width", width, snapped[0]), ("height", height, snapped[1])):
        v = v or pipe.resolution
        if r != v:
            typer.echo(f"note: {name} {v} is not a multiple of {pipe.pixels_per_token}; using {r}", err=True)


def parse_dtype(name: str | None):
    """bf16 | fp16 | fp32 -> torch dtype; None stays None (keep the stored dtype)."""
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name is not None and name not in dtypes:
        raise Krea2Error(f"unknown --dtype {name!r}; use bf16, fp16 or fp32")
    return None if name is None else dtypes[name]


def export(
    checkpoint: Annotated[str, typer.Argument(help="world | raw | turbo | checkpoint folder | .safetensors")],
    out: Annotated[Path, typer.Argument(help="Output folder.")],
    to: Annotated[str, typer.Option(help="diffusers (Krea2Transformer2DModel folder), diffusers-pipeline (a full "
                                    "Krea2Pipeline folder) or krea2 (checkpoint folder).")] = "diffusers",
    dtype: Annotated[str | None, typer.Option(
        help="Cast the weights: bf16 | fp16 | fp32, or fp8 (--to krea2: the ComfyUI scaled-fp8 layout, blocks "
             "only; default: as stored).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing, non-empty output folder.")] = False,
):
    """Export a DiT to diffusers, or re-save a krea2 checkpoint folder (e.g. in bf16 for shipping)."""
    import torch

    from krea2.models.checkpoint import resolve_checkpoint, write_checkpoint_dir
    from krea2.models.convert import export_diffusers
    from krea2.models.loading import load_dit
    from krea2.models.quantize import dequantize_dit, quantized_format, write_quantized_checkpoint

    if to not in ("diffusers", "diffusers-pipeline", "krea2"):
        raise Krea2Error(f"unknown export format {to!r}; supported: diffusers, diffusers-pipeline, krea2")
    if dtype == "fp8" and to != "krea2":
        raise Krea2Error("--dtype fp8 writes the ComfyUI scaled-fp8 layout, for --to krea2 only; diffusers folders "
                         "take bf16, fp16 or fp32")
    torch_dtype = None if dtype == "fp8" else parse_dtype(dtype)
    if out.exists() and not out.is_dir():
        raise Krea2Error(f"{out} exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:  # before loading: refuse without doing the work
        raise Krea2Error(f"{out} already exists and is not empty; choose another output folder or pass --overwrite")
    if to == "diffusers-pipeline":
        from krea2.models.convert import export_diffusers_pipeline

        export_diffusers_pipeline(checkpoint, out, dtype=torch_dtype, overwrite=overwrite)
        typer.echo(f"wrote a diffusers Krea2Pipeline folder to {out}")
        return
    info = resolve_checkpoint(checkpoint)
    model = load_dit(info.model_path, info.model)
    stored = quantized_format(model)
    if to == "krea2" and (dtype == "fp8" or (stored and dtype is None)):
        fmt = "fp8" if dtype == "fp8" else stored
        write_quantized_checkpoint(out, model, info.config(model.cfg), fmt=fmt, overwrite=overwrite)
        typer.echo(f"wrote a krea2 checkpoint folder ({fmt} block weights) to {out}")
        return
    if stored:  # an 8-bit checkpoint written in a float dtype: dequantised (its quantisation error stays)
        dequantize_dit(model, torch_dtype or torch.bfloat16)
    if to == "diffusers":
        export_diffusers(model, out, dtype=torch_dtype, overwrite=overwrite)
        typer.echo(f"wrote a diffusers Krea2Transformer2DModel folder to {out}")
        return
    write_checkpoint_dir(out, model, info.text_encoder, info.autoencoder, info.sampling, info.resolution,
                         dtype=torch_dtype, overwrite=overwrite)
    typer.echo(f"wrote a krea2 checkpoint folder to {out}")


def merge(
    # optional for click so that missing inputs are our one-line error (exit 2), not a usage dump
    checkpoints: Annotated[list[str] | None, typer.Argument(
        help="Checkpoints to merge: folders, world, raw, turbo or .safetensors.", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(help="Output checkpoint folder (required).", show_default=False)]
    = None,
    weights: Annotated[str | None, typer.Option(
        help="One per checkpoint, comma-separated, e.g. 0.7,0.3. average: normalised to sum 1 (default uniform); "
             "task_arithmetic/ties: used as given (default 1 each).", show_default=False)] = None,
    method: Annotated[str, typer.Option(help="average | task_arithmetic | ties")] = "average",
    base: Annotated[str | None, typer.Option(
        help="The checkpoint the inputs were fine-tuned from (task_arithmetic, ties).", show_default=False)] = None,
    density: Annotated[float, typer.Option(help="ties: fraction of each task vector kept, by magnitude.")] = 0.2,
    dtype: Annotated[str | None, typer.Option(help="bf16 | fp16 | fp32 (default: as the first input stores it).",
                                              show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
):
    """Merge checkpoints into one folder (weight averaging, task arithmetic, or TIES)."""
    from krea2.models.checkpoint import merge_checkpoints

    if not checkpoints:
        raise Krea2Error("no checkpoints given; e.g. krea2 merge runs/a/final runs/b/final --out merged")
    if out is None:
        raise Krea2Error("--out is required: the folder to write the merged checkpoint to")
    parsed = None
    if weights is not None:
        try:
            parsed = [float(w) for w in weights.split(",")]
        except ValueError:
            raise Krea2Error(f"--weights must be comma-separated numbers, e.g. 0.5,0.5; got {weights!r}") from None
    path = merge_checkpoints(checkpoints, out, weights=parsed, method=method, base=base, density=density,
                             dtype=parse_dtype(dtype), overwrite=overwrite)
    typer.echo(f"wrote a krea2 checkpoint folder to {path} ({method} of {len(checkpoints)} checkpoints)")


def pairs(
    out: Annotated[Path, typer.Option(help="The pairs file to write (.parquet); never overwritten.")],
    checkpoint: Annotated[str, typer.Option(help="The model to sample (world or a checkpoint folder).")] = "world",
    prompts: Annotated[int, typer.Option(min=1, help="World prompts (long captions of fresh scenes; --kind style: "
                                                     "the evaluation families' grammar, fresh seeds).")] = 200,
    group: Annotated[int, typer.Option(min=2, help="Images per prompt; best and worst make a pair.")] = 4,
    size: Annotated[int | None, typer.Option(min=8, help="Image side (default: the checkpoint's).")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    kind: Annotated[str, typer.Option(help="onpolicy | offpolicy (ground-truth winner) | both | style (drawn with "
                                           "a style reference, judged by style accuracy minus leakage)")]
    = "onpolicy",
    strict: Annotated[bool, typer.Option(help="Only pairs whose winner passes the checker and loser fails.")] = False,
    style_encoder: Annotated[str | None, typer.Option(
        help="--kind style: the style adapter to sample with, at strength 1 (world or the folder of a style / "
             "style_po stage); --checkpoint must be the base it was trained for.",
        show_default=False)] = None,
):
    """Sample preference pairs from a model, judged by the world checker (for dpo / stpo stages); --kind style:
    drawn with a style reference, judged by style accuracy minus leakage (for a style_po stage)."""
    from krea2.train.pairs import write_sampled_pairs

    counts = write_sampled_pairs(checkpoint, out, prompts, group, size, seed, kind, strict,
                                 style_encoder=style_encoder)
    typer.echo(f"wrote {out}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in counts.items()))


def serve(
    checkpoint: Annotated[str, typer.Option(
        help="world | world-turbo | world-rl | raw | turbo | checkpoint folder")] = "world",
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default; 0.0.0.0 exposes it).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free one).")] = 8000,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait; more get 429 with Retry-After.")] = 32,
    max_batch: Annotated[int, typer.Option(help="Images of one shape sampled together.")] = 8,
    max_n: Annotated[int, typer.Option(help="Images per request.")] = 8,
    timeout: Annotated[float, typer.Option(help="Seconds a request may take, queueing included (then 504).")] = 120.0,
    max_body: Annotated[int, typer.Option(help="Largest request body in bytes (then 413).")] = 64 * 1024,
    max_pixels: Annotated[int, typer.Option(help="Largest width x height per image (and per style reference "
                                           "upload, checked before decoding).")] = 1024 * 1024,
    style_encoder: Annotated[str | None, typer.Option(
        help="A style adapter (world or the folder of a style / style_po stage, runs/OUT/STAGE): enables the "
             "`style_refs` field.",
        show_default=False)] = None,
    lora: Annotated[list[str] | None, typer.Option(
        help="Load a LoRA, FILE or NAME=FILE (switched off); requests turn it on with "
             "\"lora\": [{\"name\": NAME, \"scale\": S}]. Repeat for several.", show_default=False)] = None,
):
    """Serve a checkpoint over HTTP: POST /v1/images/generations (OpenAI images API shape), GET / (a web page),
    /healthz and /metrics (Prometheus)."""
    from krea2.serve import ServeConfig
    from krea2.serve import serve as run

    run(ServeConfig(checkpoint, host, port, max_queue, max_batch, max_n, timeout, max_body, max_pixels,
                    style_encoder=style_encoder, loras=tuple(lora or ())))


def expand(
    prompt: Annotated[str | None, typer.Argument(help="The short prompt.", show_default=False)] = None,
    creativity: Annotated[str, typer.Option(help="raw | low | medium | high")] = "medium",
    expander: Annotated[str, typer.Option(help="world | hf:PATH (a local causal LM) | an expander folder.")]
    = "world",
    n: Annotated[int, typer.Option("-n", "--n", min=1, max=64, help="Expansions to sample.")] = 1,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    intent: Annotated[bool, typer.Option(help="Print the world expander's whole completion (intent + caption), as "
                                         "sampled.")] = False,
    verify: Annotated[bool, typer.Option(help="Resample expansions the exact faithfulness check rejects (world "
                                         "expander, world prompts); the prompt itself after 4 tries.")] = True,
):
    """Expand a short prompt into rich captions, one per line."""
    from krea2 import limits
    from krea2.expander import load_expander
    from krea2.expander.grammar import check_level

    prompt = limits.check_prompts([prompt] if prompt is not None else None)[0]
    if check_level(creativity) == "raw":
        for _ in range(n):
            typer.echo(prompt)
        return
    lm = load_expander(expander)
    lines = lm.completions(prompt, creativity, n, seed) if intent else lm.expand(prompt, creativity, n, seed, verify)
    for line in lines:
        typer.echo(line)


def register(app: typer.Typer) -> None:
    app.command()(generate)
    app.command()(expand)
    app.command()(serve)
    app.command()(pairs)
    app.command()(export)
    app.command()(merge)
    from krea2.data.curation.cli import app as curate_app
    from krea2.eval.cli import app as eval_app
    from krea2.models.lora_cli import app as lora_app

    app.add_typer(curate_app, name="curate", help="Data curation: the table-as-queue.")
    app.add_typer(eval_app, name="eval", help="Evaluation on the embedded world.")
    app.add_typer(lora_app, name="lora", help="LoRA files: convert, merge, extract.")
    from krea2.train.cli import register as register_train

    register_train(app)
