"""The bad-input corpus: one bad input per row, across every command, each answered with exit 2 and one line
naming the problem (usage errors: click's usage block), never a traceback, and nothing written. The kinds and the
limits are in docs/LIMITS.md; BENCHMARKS.md "Bad-input corpus" counts the rows. More specific tests of each kind
live beside their code (test_limits, test_cli, test_train, test_curation_*, test_serve, test_distill)."""

from __future__ import annotations

import pytest

CASES = [
    # A: usage errors (unknown options, bad types, bad choices) in every command group
    (["generate", "x", "--bogus"], "No such option: --bogus"),
    (["generate", "x", "--steps", "abc"], "Invalid value for '--steps'"),
    (["serve", "--bogus"], "No such option: --bogus"),
    (["pairs", "--bogus"], "No such option: --bogus"),
    (["eval", "world", "--images-per-prompt", "0"], "Invalid value for '--images-per-prompt'"),
    # B/C/D: numbers out of range or non-finite, refused before any work
    (["serve", "--port", "70000"], "--port must be in 0..65535, got 70000"),
    (["serve", "--max-batch", "0"], "--max-batch"),
    (["serve", "--timeout", "nan"], "--timeout must be > 0 seconds"),
    (["eval", "world", "--mu", "nan"], "mu must be a finite number, got nan"),
    (["eval", "world", "--steps", "0"], "steps must be between 1 and 1000, got 0"),
    (["eval", "world", "--size", "33"], "--size 33 is neither"),
    (["train-ae", "--out", "{tmp}/ae", "--set", "lr=-1"], "need finite lr > 0"),
    (["train-aesthetic", "--out", "{tmp}/a", "--set", "width=12"], "width 4-8 or a multiple of 8"),
    (["train-aesthetic", "--out", "{tmp}/a", "--set", "seed=-1"], "seed >= 0"),
    (["train-aesthetic", "--out", "{tmp}/a", "--set", "lr=inf"], "finite lr > 0"),
    (["train-aesthetic", "--out", "{tmp}/a", "--set", "images=x"], "'x' is not a int"),
    (["train-aesthetic", "--out", "{tmp}/a", "--set", "bogus=1"], "expected key=value with key one of"),
    (["train", "recipes/world-rl.toml", "--set", 'stages.0.objective.rewards={"world_aesthetic:{tmp}/none" = 1.0}',
      "--validate"], "has no aesthetic.safetensors"),
    (["pairs", "--out", "{tmp}/p.parquet", "--kind", "style"], "--kind style needs --style-encoder"),
    (["pairs", "--out", "{tmp}/p.parquet", "--style-encoder", "world"], "--style-encoder only goes with --kind"),
    (["pairs", "--out", "{tmp}/p.parquet", "--kind", "style", "--style-encoder", "world", "--size", "16"],
     "--size does not go with --kind style"),
    (["pairs", "--out", "{tmp}/p.parquet", "--kind", "sideways"], "pair kind 'sideways' unknown"),
    (["train", "recipes/world-style-po.toml", "--set", "stages.0.objective.method=ipo", "--validate"],
     "method 'ipo' unknown"),
    (["train", "recipes/world-style-po.toml", "--set", "stages.0.objective.adapter=", "--validate"],
     "style_po needs adapter"),
    (["train", "recipes/world-style.toml", "--set", "stages.0.objective.backbone=hf:{tmp}/none", "--validate"],
     "not found locally (no config.json)"),
    (["train", "recipes/world-style.toml", "--set", "stages.0.objective.backbone={tmp}/none", "--validate"],
     "use hf:PATH"),
    (["train", "recipes/world-style.toml", "--set", "stages.0.objective.injection=crossattn", "--validate"],
     "style injection 'crossattn' unknown"),
    # F: recipe values, caught by --validate as the run would
    (["train", "recipes/world-turbo.toml", "--set", "stages.0.save_every=0", "--validate"], "save_every >= 1"),
    (["train", "recipes/world-turbo.toml", "--set", "stages.0.objective.student_steps=0", "--validate"],
     "student_steps must be in 1..64"),
    (["train", "recipes/world-turbo.toml", "--set", "stages.0.objective.guidance=nan", "--validate"],
     "guidance in [0, 30]"),
    (["train", "recipes/world-turbo.toml", "--set", "stages.0.objective.t_min=0.99", "--validate"],
     "0 < t_min < t_max < 1"),
    (["train", "recipes/world-turbo-dmd2.toml", "--set", "stages.0.data.source=prompts", "--validate"],
     "objective dmd2 reads images but data source prompts gives prompts"),
    (["train", "recipes/world-turbo-dmd2.toml", "--set", "stages.0.objective.gan_layer=99", "--validate"],
     "gan_layer 99 > the model's 6 blocks"),
    (["train", "{tmp}/nosuch.toml"], "recipe not found"),
    # missing or unusable inputs, named
    (["serve", "--checkpoint", "nosuch"], "checkpoint not found: nosuch"),
    (["export", "nosuch", "{tmp}/o"], "checkpoint not found: nosuch"),
    (["export", "world", "{tmp}/o", "--to", "onnx"], "unknown export format 'onnx'"),
    (["export", "world", "{tmp}/o", "--to", "diffusers-pipeline"], "Krea2Pipeline cannot run world"),
    (["eval", "world", "--checkpoint", "nosuch"], "checkpoint not found: nosuch"),
    (["eval", "world", "--prompts", "{tmp}/none.jsonl"], "prompt file {tmp}/none.jsonl not found"),
    (["eval", "ae", "--vae", "bogus"], "unknown autoencoder 'bogus'"),
    (["merge"], "no checkpoints given"),
    (["lora", "convert", "{tmp}/nosuch.safetensors", "{tmp}/l.safetensors"], "LoRA file not found"),
    (["lora", "extract", "world", "world"], "--out is required"),
    (["lora", "merge", "world"], "no LoRA given"),
    # the prompt expander: levels, counts, empty prompts, missing models
    (["expand", ""], "prompt 1 is empty"),
    (["expand", "a red circle", "--creativity", "max"], "unknown creativity 'max'"),
    (["expand", "a red circle", "-n", "0"], "Invalid value for '-n'"),
    (["expand", "a red circle", "--expander", "hf:{tmp}/nolm"], "expander 'hf:{tmp}/nolm' not found"),
    (["eval", "expander", "--n", "1"], "--n must be at least 2"),
    (["eval", "expander", "--creativity", "max"], "unknown creativity 'max'"),
    (["generate", "x", "--expand", "medium", "--expander", "{tmp}/nolm", "--out", "{tmp}/o"], "not found"),
    # N: unsupported database URLs, credentials never printed
    (["curate", "init", "--db", "mysql://u:secret@localhost/db"], "unsupported database URL scheme mysql://"),
]


@pytest.mark.parametrize("args,needle", CASES, ids=[" ".join(a[:2]) + f" #{i}" for i, (a, _) in enumerate(CASES)])
def test_bad_input_is_one_clean_error(args, needle, tmp_path, cli_error):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, err = cli_error(*args)
    assert code == 2, err
    assert needle.replace("{tmp}", str(tmp_path)) in err, err
    assert "Traceback" not in err and "secret" not in err
    if not err.lstrip().startswith("Usage"):  # our errors: one line
        assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "l.safetensors").exists()
