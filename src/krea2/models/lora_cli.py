"""`krea2 lora ...`: convert, inspect, merge and extract LoRA files (mounted by krea2.commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from krea2.errors import Krea2Error

app = typer.Typer(add_completion=False, no_args_is_help=True, help="LoRA files: convert, merge, extract.")
FORMATS_HELP = "krea2 | diffusers | comfyui | kohya | ai-toolkit"


@app.callback()
def _group() -> None:
    """LoRA files: convert between formats, inspect, merge into a checkpoint, extract from two checkpoints."""


def _model_config(checkpoint: str | None):
    """The DiT config of a checkpoint spec, read from its config.json or its tensor header (no weights loaded)."""
    if checkpoint is None:
        return None
    from krea2.models.checkpoint import resolve_checkpoint
    from krea2.models.loading import infer_config, read_shapes

    info = resolve_checkpoint(checkpoint)
    return info.model or infer_config(read_shapes(info.model_path))


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="The LoRA to read (any format; detected from its keys).")],
    out: Annotated[Path, typer.Argument(help="The .safetensors file to write.")],
    to: Annotated[str, typer.Option(help=FORMATS_HELP)] = "krea2",
    checkpoint: Annotated[str | None, typer.Option(
        help="Check the LoRA fits this model (world | raw | turbo | folder | .safetensors).", show_default=False)]
    = None,
):
    """Convert a LoRA between formats; alpha / rank scaling is kept exactly."""
    from krea2.models.lora import FORMATS, inexact_folds, read_lora, write_lora

    if to not in FORMATS:
        raise Krea2Error(f"unknown LoRA format {to!r}; use one of {', '.join(FORMATS)}")
    lora = read_lora(src, _model_config(checkpoint))
    if to in ("comfyui", "ai-toolkit") and (inexact := inexact_folds(lora)):
        typer.echo(f"note: alpha/rank of {len(inexact)} module(s) (e.g. {inexact[0]}) is not a power of two; {to} "
                   "files carry no alpha diffusers reads, so it is folded into lora_B with one rounding", err=True)
    write_lora(lora, out, to)
    typer.echo(f"wrote {out} ({to}; read as {lora.format}: {lora.summary()})")


@app.command()
def info(
    src: Annotated[Path, typer.Argument(help="A LoRA file.")],
    checkpoint: Annotated[str | None, typer.Option(help="Check the LoRA fits this model.", show_default=False)]
    = None,
):
    """Print a LoRA's format, modules, ranks and alphas."""
    from krea2.models.lora import read_lora

    lora = read_lora(src, _model_config(checkpoint))
    typer.echo(f"{src}: {lora.format}, {lora.summary()}")
    for name, m in lora.modules.items():
        typer.echo(f"  {name}  rank {m.rank}  alpha {m.alpha:g}  {m.A.shape[1]} -> {m.B.shape[0]}  {m.A.dtype}")


@app.command()
def merge(
    checkpoint: Annotated[str, typer.Argument(help="The base: world | raw | turbo | folder | .safetensors.")],
    loras: Annotated[list[str] | None, typer.Argument(help="LoRA files, each FILE[:SCALE] (scale 1 by default).",
                                                      show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(help="Output checkpoint folder (required).", show_default=False)] = None,
    dtype: Annotated[str | None, typer.Option(help="bf16 | fp16 | fp32 (default: as the base stores it).",
                                              show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
):
    """Fold LoRAs into a checkpoint: W += scale · alpha/rank · B A; writes a release-format checkpoint folder."""
    from krea2.commands import parse_dtype
    from krea2.models.checkpoint import resolve_checkpoint, write_checkpoint
    from krea2.models.loading import infer_config, read_safetensors, strip_prefix
    from krea2.models.lora import merge_into_state_dict, parse_lora_spec, read_lora

    if not loras:
        raise Krea2Error("no LoRA given; e.g. krea2 lora merge world style.safetensors:0.8 --out merged")
    if out is None:
        raise Krea2Error("--out is required: the folder to write the merged checkpoint to")
    torch_dtype = parse_dtype(dtype)
    if out.is_dir() and any(out.iterdir()) and not overwrite:  # before reading gigabytes
        raise Krea2Error(f"{out} already exists and is not empty; choose another output folder or overwrite it "
                         "(--overwrite)")
    specs = [parse_lora_spec(s) for s in loras]
    info = resolve_checkpoint(checkpoint)
    sd = strip_prefix(read_safetensors(info.model_path))  # memory-mapped: only the merged weights are copied
    cfg = info.model or infer_config(sd)
    adapters = [(read_lora(path, cfg), path, scale) for path, scale in specs]  # all checked before any work
    for lora, _, scale in adapters:
        sd = merge_into_state_dict(sd, lora, scale)
    config = info.config(cfg)
    config["lora_merge"] = [*config.get("lora_merge", []), *({"lora": str(p), "scale": s} for _, p, s in adapters)]
    write_checkpoint(out, sd, config, dtype=torch_dtype, overwrite=overwrite)
    typer.echo(f"wrote a krea2 checkpoint folder to {out} ({checkpoint} + " +
               ", ".join(f"{p.name} x {s:g}" for _, p, s in adapters) + ")")


@app.command()
def extract(
    base: Annotated[str, typer.Argument(help="The base checkpoint.")],
    tuned: Annotated[str, typer.Argument(help="The fine-tuned checkpoint (same architecture).")],
    rank: Annotated[int, typer.Option(help="LoRA rank (per module at most min(out, in)).")] = 32,
    out: Annotated[Path | None, typer.Option(help="The LoRA file to write (required).", show_default=False)] = None,
    to: Annotated[str, typer.Option(help=FORMATS_HELP)] = "krea2",
    dtype: Annotated[str, typer.Option(help="bf16 | fp16 | fp32: the stored LoRA tensors.")] = "fp32",
):
    """Extract tuned − base as a LoRA (truncated SVD per Linear); prints the relative reconstruction error."""
    from krea2.commands import parse_dtype
    from krea2.models.checkpoint import resolve_checkpoint
    from krea2.models.loading import read_safetensors, strip_prefix
    from krea2.models.lora import FORMATS, extract_lora, write_lora

    if out is None:
        raise Krea2Error("--out is required: the LoRA file to write")
    if to not in FORMATS:
        raise Krea2Error(f"unknown LoRA format {to!r}; use one of {', '.join(FORMATS)}")
    sds = [strip_prefix(read_safetensors(resolve_checkpoint(c).model_path)) for c in (base, tuned)]
    lora, report = extract_lora(sds[0], sds[1], rank, dtype=parse_dtype(dtype))
    write_lora(lora, out, to)
    worst, worst_err = report.worst()
    typer.echo(f"wrote {out} ({to}: {lora.summary()}); relative reconstruction error {report.error:.3e} "
               f"(worst {worst} {worst_err:.3e})")
    if report.other_changed:
        typer.echo(f"note: {len(report.other_changed)} changed tensor(s) are not Linear weights and are not in the "
                   f"LoRA (e.g. {report.other_changed[0]})", err=True)
