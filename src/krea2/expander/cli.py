"""`krea2-expander`: build the world prompt expander (SFT, then GRPO) and ship it into the package."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from krea2.errors import Krea2Error

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train the world prompt expander with TRL: sft, then grpo, then ship.")


@app.command()
def sft(
    out: Annotated[Path, typer.Option(help="Run folder (trainer checkpoints, TensorBoard under trainer/, final/).")],
    steps: Annotated[int, typer.Option(min=1)] = 1200,
    pairs: Annotated[int, typer.Option(min=16, help="Cascade pairs generated for the run.")] = 40000,
    batch: Annotated[int, typer.Option(min=1)] = 64,
    lr: Annotated[float, typer.Option(min=0.0)] = 3e-3,
    seed: Annotated[int, typer.Option()] = 0,
    init: Annotated[str | None, typer.Option(help="Continue SFT from this expander folder (else a fresh model).",
                                             show_default=False)] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last trainer checkpoint.")] = False,
):
    """Stage 1: a fresh Qwen3 expander and its tokenizer, trained with trl.SFTTrainer on (short -> intent + caption)."""
    from krea2.expander.train import SFTSettings, train_sft

    final = train_sft(out, SFTSettings(steps=steps, pairs=pairs, batch=batch, lr=lr, seed=seed,
                                                    init=init), resume=resume)
    typer.echo(f"wrote {final}")


@app.command()
def grpo(
    out: Annotated[Path, typer.Option(help="Run folder (prompt_pool.jsonl, trainer/, final/).")],
    init: Annotated[str, typer.Option(help="The SFT expander: a folder from `sft` (its final/) or world.")],
    steps: Annotated[int, typer.Option(min=1)] = 150,
    prompts: Annotated[int, typer.Option(min=3, help="Candidate prompts scored for the mix.")] = 300,
    group: Annotated[int, typer.Option(min=2, help="Completions per prompt (G).")] = 4,
    batch: Annotated[int, typer.Option(min=2, help="Completions per step (a multiple of --group).")] = 32,
    lr: Annotated[float, typer.Option(min=0.0)] = 2e-4,
    beta: Annotated[float, typer.Option(min=0.0, help="KL weight to the SFT model.")] = 0.04,
    diversity_weight: Annotated[float, typer.Option(min=0.0, help="Weight of the diversity term after "
                                                    "normalisation (faithfulness terms weigh 1).")] = 1.0,
    checkpoint: Annotated[str, typer.Option(help="Image model for the image rewards.")] = "world-turbo",
    seed: Annotated[int, typer.Option()] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last trainer checkpoint.")] = False,
):
    """Stage 2: trl.GRPOTrainer with text and image faithfulness and image diversity, gated, GDPO-normalised."""
    from krea2.expander.train import GRPOSettings, train_grpo

    if batch % group:
        raise Krea2Error(f"--batch {batch} is not a multiple of --group {group}; each step needs whole groups")
    final = train_grpo(init, out, GRPOSettings(steps=steps, prompts=prompts, group=group, batch=batch, lr=lr,
                                               beta=beta, diversity_weight=diversity_weight,
                                               checkpoint=checkpoint, seed=seed), resume=resume)
    typer.echo(f"wrote {final}")


@app.command()
def ship(
    source: Annotated[Path, typer.Argument(help="An expander folder (a run's final/).")],
    overwrite: Annotated[bool, typer.Option(help="Replace the expander shipped in the package.")] = False,
):
    """Copy an expander into the package as `--expander world`."""
    import shutil

    from krea2.expander.model import ASSET, load_expander
    from krea2.models.checkpoint import publish_dir

    if load_expander(str(source)).kind != "world":
        raise Krea2Error(f"{source} is not a world expander (no expander.json)")
    names = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "expander.json")
    publish_dir(ASSET, lambda tmp: [shutil.copy2(source / n, tmp / n) for n in names if (source / n).exists()],
                overwrite=overwrite)
    typer.echo(f"shipped {source} as {ASSET}")


def main() -> None:
    from krea2.cli import run

    run(app)


if __name__ == "__main__":
    main()
