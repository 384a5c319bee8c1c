"""`krea2 train RECIPE` and `torchrun -m krea2.train RECIPE`: the same entry point."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe TOML (see recipes/).")],
    out: Annotated[Path | None, typer.Option(help="Output folder (default runs/<recipe name>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run from its last checkpoint.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override, e.g. --set stages.0.steps=20")] = None,
    validate: Annotated[bool, typer.Option(help="Parse the recipe and build its stages, then stop.")] = False,
    progress: Annotated[bool, typer.Option(help="Progress bars.")] = True,
):
    """Train a recipe: every stage in order, each from the previous stage's output."""
    from krea2.train.config import load_recipe
    from krea2.train.trainer import train_recipe, validate_recipe

    r = load_recipe(recipe, set_)
    if validate:
        typer.echo(validate_recipe(r))
        return
    final = train_recipe(r, out or Path("runs") / r.name, resume=resume, progress=progress)
    import os

    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        typer.echo(f"final checkpoint: {final}")
        run = out or Path("runs") / r.name
        for s in r.stages:  # what a stage wrote besides the DiT, where users look for it
            if (run / s.name / "style.json").is_file():
                typer.echo(f"style adapter: {run / s.name} (use --style-encoder {run / s.name})")


def train_ae(
    out: Annotated[Path, typer.Option(help="Run folder: state/ (resume), tb/, final/ (the autoencoder).")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override key=value, e.g. steps=8000 "
                                                   "(fields of krea2.train.autoencoder.AEConfig).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last saved state.")] = False,
):
    """Train the world autoencoder (4x, 32 channels) on world renders and emoji; use it as --vae world:OUT/final."""
    from krea2.train.autoencoder import AEConfig, train_autoencoder
    from krea2.train.config import parse_overrides

    cfg = parse_overrides(AEConfig(), list(set_ or []))
    path = train_autoencoder(cfg, out, resume=resume)
    typer.echo(f"wrote the autoencoder to {path}; evaluate it with: krea2 eval ae --vae world:{path} --size 64")


def train_aesthetic(
    out: Annotated[Path, typer.Option(help="Output folder: aesthetic.safetensors, aesthetic.json (report), tb/.")],
    checkpoint: Annotated[str, typer.Option(help="The model whose samples are the negatives (world or a folder).")]
    = "world",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Config override key=value, e.g. images=2048 "
                                                   "(fields of krea2.rewards.aesthetic.AestheticConfig).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out folder.")] = False,
    progress: Annotated[bool, typer.Option(help="Progress bars.")] = True,
):
    """Train the aesthetic stand-in reward: world renders against a model's samples; use it as the GRPO reward
    world_aesthetic:OUT."""
    from krea2.rewards.aesthetic import AestheticConfig, train_aesthetic
    from krea2.train.config import parse_overrides

    cfg = parse_overrides(AestheticConfig(), list(set_ or []), command="train-aesthetic")
    rep = train_aesthetic(checkpoint, out, cfg, overwrite=overwrite, progress=progress)
    typer.echo(f"wrote {out}: held-out reward renders {rep['holdout_reward_renders']:.3f}, samples "
               f"{rep['holdout_reward_samples']:.3f}\nholdout accuracy {rep['holdout_accuracy']:.3f}")


def register(app: typer.Typer) -> None:
    app.command()(train)
    app.command("train-ae")(train_ae)
    app.command("train-aesthetic")(train_aesthetic)


def main(argv: list[str] | None = None) -> None:
    """Entry for `python -m krea2.train` (torchrun): the train command alone, with one-line errors."""
    import sys

    from krea2.cli import usage_errors
    from krea2.errors import Krea2Error

    single = typer.Typer(add_completion=False)
    single.command()(train)
    try:
        rc = single(args=argv, standalone_mode=False)
    except Krea2Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except usage_errors() as e:
        e.show()
        sys.exit(e.exit_code)
    if isinstance(rc, int) and rc:  # click returns Ctrl-C's 130 instead of raising in this mode
        sys.exit(rc)
