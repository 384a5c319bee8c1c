"""Style encoders on transformers vision backbones (SigLIP, DINOv2, Qwen3-VL's vision tower; tiny random configs of
the real classes) and the per-block adapter injection: the tower's tensors are the model's own, Qwen-VL patches are
laid out as its image processor lays them, the encoder cannot see the reference's layout, a style stage trains the
heads on a frozen backbone and its folder loads back to the same tokens; a fresh block adapter is the base exactly."""

from __future__ import annotations

import pytest
import torch

from krea2.errors import Krea2Error
from krea2.models.vision import VisionBackbone, load_vision_backbone
from krea2.style import StyleEncoder, canonical_tiles


def save_dinov2(folder):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             image_size=32, patch_size=8)).save_pretrained(folder)
    return folder


def save_siglip(folder):
    """The dual SigLIP model (text and vision towers), as google/siglip-* ship."""
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(1)
    cfg = SiglipConfig(text_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                    "intermediate_size": 32, "vocab_size": 64},
                       vision_config={"hidden_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2,
                                      "intermediate_size": 32, "image_size": 32, "patch_size": 8})
    model = SiglipModel(cfg)
    model.save_pretrained(folder)
    return model


def save_qwen3_vl(folder):
    """A whole Qwen3-VL (language model and vision tower), as Qwen/Qwen3-VL-* ship."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(2)
    cfg = Qwen3VLConfig(
        text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "intermediate_size": 64, "vocab_size": 128, "head_dim": 16,
                     "rope_scaling": {"rope_type": "default", "mrope_section": [2, 3, 3]}},
        vision_config={"depth": 2, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32, "patch_size": 4,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 32,
                       "num_position_embeddings": 64, "deepstack_visual_indexes": [0]})
    model = Qwen3VLForConditionalGeneration(cfg)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    siglip, qwen = save_siglip(root / "siglip"), save_qwen3_vl(root / "qwen3vl")
    return {"dinov2": save_dinov2(root / "dinov2"), "siglip": (root / "siglip", siglip),
            "qwen3vl": (root / "qwen3vl", qwen)}


def test_the_vision_tower_is_the_models_own(backbones):
    from transformers import SiglipVisionConfig

    path, siglip = backbones["siglip"]
    tower, mean, std = load_vision_backbone(path)
    assert isinstance(tower.config, SiglipVisionConfig) and (mean, std) == ((0.5,) * 3, (0.5,) * 3)
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tower(pixel_values=pixels).last_hidden_state,
                                   siglip.vision_model(pixel_values=pixels).last_hidden_state, atol=0, rtol=0)
    path, qwen = backbones["qwen3vl"]
    tower, _, _ = load_vision_backbone(path)
    visual = qwen.model.visual.state_dict()
    assert tower.config.model_type == "qwen3_vl_vision" and set(tower.state_dict()) == set(visual)
    assert all(torch.equal(t, visual[k]) for k, t in tower.state_dict().items())
    assert load_vision_backbone(backbones["dinov2"])[1] == (0.485, 0.456, 0.406)  # DINO: ImageNet statistics
    with pytest.raises(Krea2Error, match="not found locally"):
        load_vision_backbone(path.parent / "missing")
    (path.parent / "pickled").mkdir()
    (path.parent / "pickled" / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(Krea2Error, match="no .safetensors"):
        load_vision_backbone(path.parent / "pickled")


def test_qwen_patches_are_laid_out_as_its_image_processor_does(backbones):
    import numpy as np
    from transformers import Qwen2VLImageProcessor

    path, qwen = backbones["qwen3vl"]
    tower, mean, std = load_vision_backbone(path)
    vb = VisionBackbone(tower, mean, std, side=16)
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    proc = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                 image_std=[0.5] * 3, min_pixels=16, max_pixels=16 * 16)
    pil = [((im.permute(1, 2, 0) + 1) / 2).numpy() for im in images]
    batch = proc(images=pil, do_resize=False, do_rescale=False, return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 2
    with torch.no_grad():
        official = tower(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).last_hidden_state
        ours = vb(images)  # (2, 16, 16), row order
    m = 2  # official rows come in 2 x 2 merge windows: (gh/m, gw/m, m, m) per image
    official = official.reshape(2, 2, 2, m, m, -1).permute(0, 1, 3, 2, 4, 5).reshape(2, 16, -1)
    np.testing.assert_allclose(ours.numpy(), official.numpy(), atol=1e-5)
    with pytest.raises(Krea2Error, match="divisible by patch x merge"):
        VisionBackbone(tower, mean, std, side=12)


@pytest.mark.parametrize("kind", ["dinov2", "siglip", "qwen3vl"])
def test_a_backbone_encoder_cannot_see_the_references_layout(backbones, kind):
    spec = backbones[kind]
    path = spec if kind == "dinov2" else spec[0]
    vb = VisionBackbone(*load_vision_backbone(path), side=16 if kind == "qwen3vl" else None)
    torch.manual_seed(0)
    enc = StyleEncoder(64, tokens=3, width=32, backbone=vb).eval()
    s, p = vb.side, vb.patch
    g = s // p
    img = torch.rand(2, 3, s, s) * 2 - 1
    tiles = img.unfold(2, p, p).unfold(3, p, p).reshape(2, 3, g * g, p, p)
    perm = torch.randperm(g * g)
    moved = tiles[:, :, perm].reshape(2, 3, g, g, p, p).permute(0, 1, 2, 4, 3, 5).reshape(2, 3, s, s)
    assert not torch.equal(moved, img)
    with torch.no_grad():
        torch.testing.assert_close(enc(moved), enc(img), atol=1e-5, rtol=1e-5)
        assert enc(img).shape == (2, 3, 64) and not torch.allclose(enc(img)[0], enc(img)[1])
    torch.testing.assert_close(canonical_tiles(moved, p), canonical_tiles(img, p))
    assert not any(q.requires_grad for q in vb.parameters())  # frozen unless train_backbone
    enc.train()
    assert not vb.training  # a frozen backbone keeps its dropout off


@pytest.mark.slow
def test_a_siglip_style_adapter_trains_its_heads_then_its_preference_step_keeps_the_backbone_frozen(tmp_path,
                                                                                                   backbones):
    import json

    import numpy as np

    from krea2.models.checkpoint import save_random_checkpoint
    from krea2.pipeline import load_pipeline
    from krea2.style import load_style_encoder, mix_references
    from krea2.train.config import parse_recipe
    from krea2.train.trainer import train_recipe
    from tests.test_style import style_pairs_file, style_recipe

    path, siglip = backbones["siglip"]
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        official = siglip.vision_model(pixel_values=pixels).last_hidden_state

    def same_tower(enc):  # the saved tower is SigLIP's own, unchanged by training
        with torch.no_grad():
            torch.testing.assert_close(enc.backbone.model(pixel_values=pixels).last_hidden_state, official, atol=0,
                                       rtol=0)

    base = save_random_checkpoint(tmp_path / "base", resolution=16)
    objective = {"name": "style", "tokens": 2, "width": 32, "side": 16, "backbone": f"hf:{path}",
                 "injection": "adapter", "adapter_width": 8}
    with pytest.raises(Krea2Error, match="not found locally"):  # a typo in the path fails before anything is saved
        train_recipe(style_recipe(2, init=base, objective={**objective, "backbone": f"hf:{path}x"}, lr=1e-2),
                     tmp_path / "sup", progress=False)
    assert not (tmp_path / "sup" / "recipe.json").exists()  # so the corrected recipe may use the same --out
    final = train_recipe(style_recipe(2, init=base, objective=objective, lr=1e-2), tmp_path / "sup", progress=False)
    folder = tmp_path / "sup" / "style"
    assert (folder / "backbone" / "config.json").is_file()
    enc = load_style_encoder(folder)
    same_tower(enc)
    assert all(o.weight.abs().sum() > 0 for o in enc.adapter.o)  # zero-initialised outputs: trained
    ref = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32))
    with torch.no_grad():
        tokens = enc(ref)
    torch.testing.assert_close(tokens, load_style_encoder(folder)(ref), atol=0, rtol=0)  # loads back exactly
    pipe = load_pipeline(str(final))
    styled = pipe.generate(["a red circle"], seed=0, style=mix_references([tokens], [1.0], 1.0,
                                                                          **enc.injection_kwargs))
    assert not torch.equal(styled, pipe.generate(["a red circle"], seed=0))
    stage = {"name": "po", "steps": 2, "batch_size": 4, "lr": 1e-2, "warmup": 1, "log_every": 1, "save_every": 100,
             "data": {"source": "style_pairs", "path": str(style_pairs_file(tmp_path / "pairs.parquet"))},
             "objective": {"name": "style_po", "method": "dpo", "adapter": str(folder)}}
    train_recipe(parse_recipe({"name": "p", "model": {"init": str(base)}, "stages": [stage]}), tmp_path / "po",
                 progress=False)
    first = json.loads((tmp_path / "po" / "po" / "losses.jsonl").read_text().splitlines()[0])
    assert abs(first["loss"] - 0.6931472) < 1e-4
    after = load_style_encoder(tmp_path / "po" / "po")
    same_tower(after)  # the preference step trains the heads and the adapter, never the backbone
    assert not torch.equal(after.adapter.o[0].weight, enc.adapter.o[0].weight)
    shutil_copy = tmp_path / "nobackbone"
    shutil_copy.mkdir()
    for name in ("style.json", "style_encoder.safetensors"):
        (shutil_copy / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(Krea2Error, match="lacks backbone/config.json"):
        load_style_encoder(shutil_copy)


def test_a_fresh_block_adapter_is_the_base_model_and_runs_in_reference_passes_only():
    from krea2.models.dit import DiT
    from krea2.sampling import joint_inputs
    from krea2.style import reference_pass

    torch.manual_seed(0)
    model = DiT("tiny-world").eval()
    cfg = model.cfg
    enc = StyleEncoder(cfg.features, injection="adapter", layers=cfg.layers, adapter_width=16)
    x, t = torch.randn(2, 16, cfg.token_dim), torch.rand(2)
    ctx, txtmask = torch.randn(2, 5, cfg.txtlayers, cfg.txtdim), torch.ones(2, 5, dtype=torch.bool)
    pos, mask = joint_inputs(txtmask, 4, 4)
    with torch.no_grad():
        base = model(x, ctx, t, pos, mask)
        tokens = enc(torch.rand(2, 3, 32, 32) * 2 - 1)
        with reference_pass(model, tokens, 16, adapter=enc.adapter) as segment:
            assert segment is None  # the adapter takes the tokens; no reference segment
            assert torch.equal(model(x, ctx, t, pos, mask), base)  # zero-initialised outputs: the base exactly
        for o in enc.adapter.o:
            torch.nn.init.normal_(o.weight, std=0.1)
        with reference_pass(model, tokens, 16, adapter=enc.adapter):
            moved = model(x, ctx, t, pos, mask)
            other = model(x, ctx, t, pos, mask)
        assert not torch.allclose(moved, base) and torch.equal(moved, other)
        assert torch.equal(model(x, ctx, t, pos, mask), base)  # hooks gone after the pass
        with pytest.raises(RuntimeError, match="mid-pass"):
            with reference_pass(model, tokens, 16, adapter=enc.adapter):
                raise RuntimeError("mid-pass")
        assert torch.equal(model(x, ctx, t, pos, mask), base)  # and after a pass that failed
    with pytest.raises(Krea2Error, match="trained for a DiT with"):
        with enc.adapter.attached(torch.nn.Module(), tokens, 16):
            pass


@pytest.mark.slow
def test_block_adapter_style_stage_then_preference_step_without_a_lora(tmp_path):
    import json

    from krea2.models.checkpoint import save_random_checkpoint
    from krea2.models.loading import load_dit
    from krea2.pipeline import load_pipeline
    from krea2.style import load_style_encoder, mix_references
    from krea2.train.config import parse_recipe
    from krea2.train.trainer import train_recipe
    from tests.test_style import style_pairs_file, style_recipe

    base = save_random_checkpoint(tmp_path / "base", resolution=16)
    objective = {"name": "style", "tokens": 2, "width": 32, "side": 16, "injection": "adapter", "adapter_width": 8}
    final = train_recipe(style_recipe(2, init=base, objective=objective, lr=1e-2), tmp_path / "sup", progress=False)
    start = load_style_encoder(tmp_path / "sup" / "style")
    assert start.lora is None and start.adapter is not None
    assert any(o.weight.abs().sum() > 0 for o in start.adapter.o)  # the zero-initialised outputs trained
    pipe = load_pipeline(str(final))
    torch.manual_seed(0)
    with torch.no_grad():
        tokens = start(torch.rand(1, 3, 16, 16) * 2 - 1)
    base_images = pipe.generate(["a red circle"], seed=0)
    mix = mix_references([tokens], [1.0], 1.0, **start.injection_kwargs)
    assert not torch.equal(pipe.generate(["a red circle"], seed=0, style=mix), base_images)
    pairs = style_pairs_file(tmp_path / "pairs.parquet")
    stage = {"name": "po", "steps": 2, "batch_size": 4, "lr": 1e-2, "warmup": 1, "log_every": 1, "save_every": 100,
             "data": {"source": "style_pairs", "path": str(pairs)},
             "objective": {"name": "style_po", "method": "dpo", "adapter": str(tmp_path / "sup" / "style")}}
    train_recipe(parse_recipe({"name": "p", "model": {"init": str(base)}, "stages": [stage]}), tmp_path / "run",
                 progress=False)
    first = json.loads((tmp_path / "run" / "po" / "losses.jsonl").read_text().splitlines()[0])
    assert abs(first["loss"] - 0.6931472) < 1e-4  # policy = reference (the adapter's copy) at the first step
    out = load_style_encoder(tmp_path / "run" / "po")
    assert any(not torch.equal(a, b) for a, b in zip(start.adapter.state_dict().values(),
                                                      out.adapter.state_dict().values()))
    before, after = load_dit(base / "model.safetensors").state_dict(), load_dit(
        tmp_path / "run" / "final" / "model.safetensors").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base stays frozen


@pytest.mark.slow
def test_a_style_stage_learns_from_a_teacher_reading_the_style_in_words_and_continues_a_saved_adapter(tmp_path):
    import json

    from krea2.models.checkpoint import save_random_checkpoint
    from krea2.models.dit import DiT
    from krea2.style import load_style_encoder
    from krea2.train.lora import LoRAConfig, adapters_disabled, inject_lora
    from krea2.train.trainer import train_recipe
    from tests.test_style import style_recipe

    torch.manual_seed(0)  # adapters switched off are the base model exactly (the teacher's pass)
    model = DiT("tiny-world").eval()
    x, t = torch.randn(1, 16, model.cfg.token_dim), torch.rand(1)
    ctx, txtmask = torch.randn(1, 5, model.cfg.txtlayers, model.cfg.txtdim), torch.ones(1, 5, dtype=torch.bool)
    from krea2.sampling import joint_inputs

    pos, mask = joint_inputs(txtmask, 4, 4)
    with torch.no_grad():
        base = model(x, ctx, t, pos, mask)
        inject_lora(model, LoRAConfig(rank=2, alpha=2.0, targets="attention", init="gaussian"))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
        assert not torch.allclose(model(x, ctx, t, pos, mask), base)
        with adapters_disabled(model):  # the same weights; peft's wrapper may order a fused op differently
            torch.testing.assert_close(model(x, ctx, t, pos, mask), base, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model(x, ctx, t, pos, mask), base)

    base_ckpt = save_random_checkpoint(tmp_path / "base", resolution=16)
    lora = {"rank": 4, "alpha": 4.0, "targets": "attention"}
    objective = {"name": "style", "tokens": 2, "width": 32, "side": 16, "teacher_weight": 1.0}
    train_recipe(style_recipe(2, init=base_ckpt, lora=lora, objective=objective, lr=1e-2), tmp_path / "sup",
                 progress=False)
    train_recipe(style_recipe(1, init=base_ckpt, lora=lora, objective={**objective, "teacher_weight": 0.0}),
                 tmp_path / "flow", progress=False)

    def first(run):
        return json.loads((tmp_path / run / "style" / "losses.jsonl").read_text().splitlines()[0])["loss"]

    assert first("sup") > first("flow")  # same start and batch: the teacher's term adds to the flow loss
    start = load_style_encoder(tmp_path / "sup" / "style")
    # a vanishing lr from the saved adapter: the stage writes back what it started from (encoder and LoRA)
    cont = {"name": "style", "adapter": str(tmp_path / "sup" / "style")}
    train_recipe(style_recipe(1, init=base_ckpt, lora=lora, objective=cont, lr=1e-12), tmp_path / "cont",
                 progress=False)
    again = load_style_encoder(tmp_path / "cont" / "style")
    for a, b in zip(start.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b)
    fresh = StyleEncoder(64, 2, 4, 32, 4, 16)
    assert not torch.allclose(fresh.queries, again.queries)
    for k in start.lora.modules:
        torch.testing.assert_close(again.lora.modules[k].delta(), start.lora.modules[k].delta())
    with pytest.raises(Krea2Error, match="has a reference LoRA: add"):
        train_recipe(style_recipe(1, init=base_ckpt, objective=cont), tmp_path / "x", progress=False)
