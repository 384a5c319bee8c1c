"""LoRA training on the model set: adapters only in the state, the base untouched, folding exact, resume exact."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import losses, write_recipe

from krea2.errors import Krea2Error
from krea2.models.dit import DiT
from krea2.train.config import load_recipe
from krea2.train.lora import LoRAConfig, lora_targets
from krea2.train.trainer import train_recipe

LORA_STAGE = """
[[stages]]
name = "b"
steps = 4
batch_size = 8
lr = 1e-2
warmup = 1
save_every = 2
log_every = 1
seed = 6
ema = 0.9
[stages.data]
source = "world"
size = 16
pool = 48
[stages.lora]
rank = 4
alpha = 8.0
targets = "attention"
"""


def test_target_sets_on_the_12b_layout():
    with torch.device("meta"):
        model = DiT("krea2-12b")
    assert len(lora_targets(model, "all")) == 264 and len(lora_targets(model, "attention")) == 140
    assert lora_targets(model, r"blocks\.0\.mlp\.gate") == ["blocks.0.mlp.gate"]  # not attn.gate: regexes fullmatch
    with pytest.raises(ValueError, match="match no Linear"):
        lora_targets(model, "blocks.0.attn")
    with pytest.raises(ValueError, match="neither all, attention nor a regex"):
        LoRAConfig(targets="blocks.(")


@pytest.mark.slow
def test_lora_stage_trains_adapters_only_and_resumes_exactly(tmp_path):
    recipe_file = write_recipe(tmp_path, steps=2, extra=LORA_STAGE)
    ref = tmp_path / "ref"
    train_recipe(load_recipe(recipe_file), ref, progress=False)
    base = load_file(ref / "a" / "final" / "model.safetensors")
    out = load_file(ref / "b" / "final" / "model.safetensors")
    adapters = ref / "b" / "lora.safetensors"
    lora = load_file(adapters)
    with safe_open(str(adapters), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "krea2-lora" and float(meta["lora_alpha"]) == 8.0 and meta["rank"] == "4"
    assert set(lora) == {f"blocks.{i}.attn.{m}.lora_{ab}.weight" for i in range(2)
                         for m in ("wq", "wk", "wv", "wo", "gate") for ab in "AB"}
    for k in base:  # targets: base + alpha/rank · B A (the EMA of the adapters); everything else untouched
        module = k.rsplit(".", 1)[0]
        if f"{module}.lora_A.weight" in lora and k.endswith(".weight"):
            delta = 2.0 * lora[f"{module}.lora_B.weight"] @ lora[f"{module}.lora_A.weight"]
            torch.testing.assert_close(out[k], base[k] + delta, atol=1e-6, rtol=0)
            assert delta.abs().max() > 0
        else:
            assert torch.equal(out[k], base[k]), k

    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(ref / "b" / "state")).read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith("model.dit.")]
    assert model_keys and all(".lora_" in k for k in model_keys)  # the frozen base is not in the state
    assert len([k for k in keys if k.startswith("model.ema.")]) == len(lora)  # one EMA shadow per adapter tensor

    run = tmp_path / "run"
    train_recipe(load_recipe(recipe_file, ["stages.1.steps=2"]), run, progress=False)
    shutil.rmtree(run / "b" / "final")
    shutil.rmtree(run / "final")
    train_recipe(load_recipe(recipe_file), run, resume=True, progress=False)
    assert losses(ref, "b") == losses(run, "b")
    again = load_file(run / "b" / "lora.safetensors")  # (the header's metadata order is not fixed: compare tensors)
    assert again.keys() == lora.keys() and all(torch.equal(again[k], lora[k]) for k in lora)


@pytest.mark.slow
def test_base_shifting_inits_save_adapters_exact_against_the_original_base(tmp_path, init="pissa"):
    """PiSSA/OLoRA take B0 A0 out of the base; the saved file must still be `final` - base on the base users have.
    (OLoRA shares the code path: the initial factors are read back from the wrapped layers, whatever made them.)"""
    from krea2.models.lora import merge_into_state_dict, read_lora

    stage = LORA_STAGE.replace("steps = 4", "steps = 2").replace("ema = 0.9\n", "") + f'init = "{init}"\n'
    run = tmp_path / "run"
    train_recipe(load_recipe(write_recipe(tmp_path, steps=2, extra=stage)), run, progress=False)
    base = load_file(run / "a" / "final" / "model.safetensors")
    out = load_file(run / "b" / "final" / "model.safetensors")
    lora = read_lora(run / "b" / "lora.safetensors")
    assert all(m.rank == 8 for m in lora.modules.values())  # [B, -B0] [A; A0]: rank 2 x 4, same scale
    merged = merge_into_state_dict(base, lora)
    assert any(not torch.equal(out[k], base[k]) for k in base)
    for k in base:
        torch.testing.assert_close(merged[k], out[k], atol=2e-6, rtol=1e-5, msg=k)


def test_lora_dropout_with_tensor_parallel_is_refused(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, steps=1, extra=LORA_STAGE + "dropout = 0.1\n"),
                         ["parallel.tp=2", "parallel.dp_shard=1"])
    with pytest.raises(Krea2Error, match="LoRA dropout with tensor parallel"):
        from krea2.models.autoencoders import load_autoencoder
        from krea2.models.text_encoders import load_text_encoder
        from krea2.train.parallel import DistInfo
        from krea2.train.trainer import Context, build_stage

        ctx = Context(recipe, tmp_path, load_text_encoder("minilm"), load_autoencoder("identity"), DistInfo())
        build_stage(ctx, recipe.stages[1], DiT("tiny-world"))


def test_sample_grids_preview_the_adapters_on_a_second_checkpoint(tmp_path):
    """`[stages.lora] preview = CKPT`: each sample step also draws the current adapters on CKPT with its own preset
    (train on the base, look at the Turbo student); the last preview is exactly CKPT + the saved LoRA."""
    import numpy as np
    from PIL import Image

    from krea2.pipeline import image_grid, load_pipeline
    from krea2.train.trainer import SAMPLE_PROMPTS

    preview_ckpt = tmp_path / "preview"
    first = write_recipe(tmp_path, steps=2)
    train_recipe(load_recipe(first), tmp_path / "base", progress=False)
    shutil.copytree(tmp_path / "base" / "final", preview_ckpt)
    stage = LORA_STAGE.replace("ema = 0.9", "sample_every = 4") + f'preview = "{preview_ckpt}"\n'
    recipe_file = write_recipe(tmp_path, steps=2, extra=stage)
    run = tmp_path / "run"
    train_recipe(load_recipe(recipe_file), run, progress=False)
    shot = run / "b" / "samples" / f"step_0000004_{str(preview_ckpt).replace('/', '_')}.png"
    assert shot.is_file() and (run / "b" / "samples" / "step_0000004.png").is_file()
    prompts = load_recipe(recipe_file).sample_prompts or SAMPLE_PROMPTS
    pipe = load_pipeline(str(preview_ckpt))
    plain = np.asarray(image_grid(pipe.generate(prompts, width=16, height=16), cols=len(prompts)))
    pipe.load_lora(run / "b" / "lora.safetensors")
    adapted = np.asarray(image_grid(pipe.generate(prompts, width=16, height=16), cols=len(prompts)))
    saved = np.asarray(Image.open(shot))
    assert np.array_equal(saved, adapted) and not np.array_equal(saved, plain)
