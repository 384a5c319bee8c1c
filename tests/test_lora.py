"""LoRA: formats both ways (exact), hooks vs merge, diffusers' own loader, errors, extraction, CLI and pipeline."""

from __future__ import annotations

import copy
import json
import re
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from krea2 import cli
from krea2.errors import Krea2Error
from krea2.models.checkpoint import read_checkpoint_dir, save_random_checkpoint, write_checkpoint
from krea2.models.convert import to_diffusers, to_diffusers_state_dict
from krea2.models.dit import PRESETS, DiT, DiTConfig
from krea2.models.loading import load_dit
from krea2.models.lora import (
    FORMATS,
    LoRA,
    LoRAModule,
    active_loras,
    apply_lora,
    diffusers_name,
    extract_lora,
    kohya_name,
    lora_modules,
    lora_state_from_peft,
    merge_into_state_dict,
    merge_lora,
    official_from_diffusers,
    official_from_kohya,
    parse_lora_spec,
    read_lora,
    save_lora,
    set_lora_scale,
    unload_lora,
    write_lora,
)
from krea2.sampling import joint_inputs

cli._mount()


def random_model(preset="tiny", seed=0) -> DiT:
    torch.manual_seed(seed)
    m = DiT(preset)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1 or p.shape[0] == 2:
                p.normal_(0, 0.1)  # norms and modulations are zero at init; randomise to exercise them
    return m.eval()


def random_inputs(cfg, B=2, Lt=5, gh=4, gw=3):
    torch.manual_seed(1)
    txtmask = torch.ones(B, Lt, dtype=torch.bool)
    txtmask[1, 3:] = False
    pos, mask = joint_inputs(txtmask, gh, gw)
    img, ctx = torch.randn(B, gh * gw, cfg.token_dim), torch.randn(B, Lt, cfg.txtlayers, cfg.txtdim)
    return img, ctx, torch.rand(B), pos, mask, txtmask


def run(model, inputs):
    img, ctx, t, pos, mask, _ = inputs
    with torch.no_grad():
        return model(img, ctx, t, pos, mask)


def random_lora(model, seed=0, every=1, rank=4, alphas=(8.0, 2.0, 4.0), zero_b=False) -> LoRA:
    """Every `every`-th Linear, ranks rank and rank/2 alternating, alphas cycling (ratios 2, 1 and 0.5 at rank 4)."""
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for i, (name, (out, inp)) in enumerate(list(lora_modules(model).items())[::every]):
        r = rank if i % 2 == 0 else rank // 2
        A = torch.randn(r, inp, generator=g) * 0.2
        B = torch.zeros(out, r) if zero_b else torch.randn(out, r, generator=g) * 0.2
        mods[name] = LoRAModule(A, B, alphas[i % len(alphas)] * r / rank)
    return LoRA(mods, {"trained_on": "tiny"})


def same(a: LoRA, b: LoRA) -> bool:
    return a.modules.keys() == b.modules.keys() and all(
        torch.equal(m.A, b.modules[n].A) and torch.equal(m.B, b.modules[n].B) and m.A.dtype == b.modules[n].A.dtype
        and m.alpha == b.modules[n].alpha for n, m in a.modules.items())


def one_line_error(fn, *needles):
    with pytest.raises(Krea2Error) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


# ---- names and formats ----------------------------------------------------------------------------------------------


def test_module_names_match_diffusers_and_kohya():
    mods = lora_modules("tiny")
    assert len(mods) == 56 and len(lora_modules("krea2-12b")) == 264  # every Linear, as the trainer's targets="all"
    # diffusers' own single-file converter names each Linear's weight the way diffusers_name does
    converted = to_diffusers_state_dict({f"{n}.weight": torch.zeros(1) for n in mods})
    assert sorted(k.removesuffix(".weight") for k in converted) == sorted(diffusers_name(n) for n in mods)
    for n in mods:
        assert official_from_diffusers(diffusers_name(n)) == n and official_from_kohya(kohya_name(n)) == n
    assert kohya_name("txtfusion.layerwise_blocks.1.mlp.gate") == "txtfusion_layerwise_blocks_1_mlp_gate"
    assert parse_lora_spec("a/b.safetensors:0.5") == (parse_lora_spec("a/b.safetensors")[0], 0.5)
    assert parse_lora_spec("C:/x.safetensors")[1] == 1.0


def test_round_trips_through_every_format_are_exact(tmp_path):
    model = random_model()
    for dtype in (torch.float32, torch.bfloat16):
        lora = random_lora(model)
        for m in lora.modules.values():
            m.A, m.B = m.A.to(dtype), m.B.to(dtype)
        for fmt in FORMATS:
            path = write_lora(lora, tmp_path / f"{fmt}.safetensors", fmt)
            back = read_lora(path, model)
            assert back.format == fmt and same(lora, back), fmt
            assert back.metadata == {"trained_on": "tiny"}
        # through all formats in a row, reading each with no model (names checked by grammar only)
        cur = lora
        for fmt in [*FORMATS[1:], *FORMATS[:1]]:
            cur = read_lora(write_lora(cur, tmp_path / "chain.safetensors", fmt))
        assert same(lora, cur)
    keys = set(load_file(tmp_path / "kohya.safetensors"))
    assert {"lora_unet_blocks_0_attn_wq.lora_down.weight", "lora_unet_blocks_0_attn_wq.lora_up.weight",
            "lora_unet_blocks_0_attn_wq.alpha"} <= keys
    assert "transformer.transformer_blocks.1.attn.to_out.0.lora_A.weight" in load_file(
        tmp_path / "diffusers.safetensors")
    assert "diffusion_model.txtfusion.refiner_blocks.0.mlp.down.lora_B.weight" in load_file(
        tmp_path / "comfyui.safetensors")
    assert "base_model.model.last.linear.lora_A.weight" in load_file(tmp_path / "ai-toolkit.safetensors")


def test_alphas_that_are_not_powers_of_two(tmp_path):
    # krea2, diffusers and kohya carry alpha: exact. comfyui / ai-toolkit fold alpha/rank = 0.75 into B with one
    # rounding and read back as alpha = rank with the same ΔW
    model = random_model()
    lora = random_lora(model, alphas=(3.0, 0.1))
    for fmt in FORMATS:
        back = read_lora(write_lora(lora, tmp_path / f"{fmt}.safetensors", fmt), model)
        if fmt in ("krea2", "diffusers", "kohya"):
            assert same(lora, back), fmt
            continue
        for n, m in lora.modules.items():
            b = back.modules[n]
            assert torch.equal(b.A, m.A) and b.alpha == b.rank
            assert torch.allclose(b.delta(), m.delta(), rtol=1e-6, atol=1e-7)
    assert load_file(tmp_path / "kohya.safetensors")["lora_unet_blocks_0_attn_wq.alpha"].dtype == torch.float64  # 0.05


def test_kohya_alpha_not_rank_scales_exactly(tmp_path):
    model = random_model()
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(4, 64, generator=g), torch.randn(256, 4, generator=g)
    down2, up2 = torch.randn(2, 64, generator=g), torch.randn(64, 2, generator=g)
    save_file({"lora_unet_blocks_1_mlp_gate.lora_down.weight": down, "lora_unet_blocks_1_mlp_gate.lora_up.weight": up,
               "lora_unet_blocks_1_mlp_gate.alpha": torch.tensor(3.0),
               # no alpha: kohya's and ComfyUI's default alpha = rank (scale 1)
               "lora_unet_blocks_0_attn_wo.lora_down.weight": down2, "lora_unet_blocks_0_attn_wo.lora_up.weight": up2},
              tmp_path / "k.safetensors", metadata={"ss_network_dim": "4"})
    lora = read_lora(tmp_path / "k.safetensors", model)
    assert lora.format == "kohya" and lora.metadata == {"ss_network_dim": "4"}
    assert lora.modules["blocks.1.mlp.gate"].alpha == 3.0 and lora.modules["blocks.0.attn.wo"].alpha == 2.0
    ref = copy.deepcopy(model)
    merged = merge_lora(copy.deepcopy(model), lora)
    assert torch.equal(merged.blocks[1].mlp.gate.weight, ref.blocks[1].mlp.gate.weight + 0.75 * (up @ down))
    assert torch.equal(merged.blocks[0].attn.wo.weight, ref.blocks[0].attn.wo.weight + up2 @ down2)
    inputs = random_inputs(model.cfg)
    apply_lora(model, lora)
    assert (run(model, inputs) - run(merged, inputs)).abs().max() < 1e-5


# ---- applying -------------------------------------------------------------------------------------------------------


def test_zero_b_leaves_outputs_unchanged():
    model = random_model()
    inputs = random_inputs(model.cfg)
    base = run(model, inputs)
    apply_lora(model, random_lora(model, zero_b=True), scale=3.0)
    assert torch.equal(run(model, inputs), base)
    apply_lora(model, random_lora(model, seed=1), scale=1.0, name="real")  # the test can fail: a real B moves things
    assert (run(model, inputs) - base).abs().max() > 1e-3


def test_hooked_matches_merged_several_loras_scales_hotswap_unload():
    model = random_model()
    inputs = random_inputs(model.cfg)
    base = run(model, inputs)
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    a, b, c = random_lora(model, seed=1), random_lora(model, seed=2, every=3), random_lora(model, seed=3, every=2)
    apply_lora(model, a, 0.7, name="a")
    apply_lora(model, b, -1.3, name="b")
    assert active_loras(model) == {"a": 0.7, "b": -1.3}
    assert model.state_dict().keys() == sd_before.keys()  # hooks: names and weights untouched
    assert all(torch.equal(v, sd_before[k]) for k, v in model.state_dict().items())
    hooked = run(model, inputs)
    merged = merge_lora(merge_lora(random_model(), a, 0.7), b, -1.3)
    assert (hooked - run(merged, inputs)).abs().max() < 1e-5 and (hooked - base).abs().max() > 1e-3
    sd = merge_into_state_dict(merge_into_state_dict(sd_before, a, 0.7), b, -1.3)
    assert all(torch.equal(sd[k], v) for k, v in merged.state_dict().items())
    set_lora_scale(model, "b", 0.0)
    assert (run(model, inputs) - run(merge_lora(random_model(), a, 0.7), inputs)).abs().max() < 1e-5
    apply_lora(model, c, 0.7, name="a")  # hot-swap: same name, another adapter
    assert (run(model, inputs) - run(merge_lora(random_model(), c, 0.7), inputs)).abs().max() < 1e-5
    unload_lora(model, "a")
    assert torch.equal(run(model, inputs), base)  # b is loaded at scale 0
    one_line_error(lambda: unload_lora(model, "nope"), "no LoRA named 'nope'", "loaded: b")
    unload_lora(model)
    assert active_loras(model) == {} and torch.equal(run(model, inputs), base)
    assert not any(m._forward_hooks for m in model.modules())


def test_diffusers_loader_reads_our_diffusers_and_comfyui_exports(tmp_path):
    from diffusers.loaders.lora_pipeline import Krea2LoraLoaderMixin

    model = random_model()
    inputs = random_inputs(model.cfg)
    img, ctx, t, pos, _, txtmask = inputs
    # every Linear, two ranks, alpha/rank 2, 1 and 0.5 (rank_pattern, alpha_pattern and the fold all exercised)
    lora = random_lora(model)
    ours = run(model, inputs)
    apply_lora(model, lora)
    ours_lora = run(model, inputs)
    assert (ours_lora - ours).abs().max() > 1e-3
    for fmt in ("diffusers", "comfyui"):
        path = write_lora(lora, tmp_path / f"{fmt}.safetensors", fmt)
        tf = to_diffusers(random_model())
        # what Krea2Pipeline.load_lora_weights does: the mixin's lora_state_dict (which converts the ComfyUI
        # `diffusion_model.` layout), then load_lora_into_transformer -> Krea2Transformer2DModel.load_lora_adapter
        sd, meta = Krea2LoraLoaderMixin.lora_state_dict(str(tmp_path), weight_name=path.name,
                                                        return_lora_metadata=True)
        Krea2LoraLoaderMixin.load_lora_into_transformer(sd, transformer=tf, metadata=meta)
        with torch.no_grad():
            theirs = tf(img, ctx, t, pos[0], txtmask, return_dict=False)[0]
        assert (theirs - ours_lora).abs().max() < 1e-5, fmt


def test_peft_state_saves_and_applies_like_peft(tmp_path):
    from peft import LoraConfig, get_peft_model, inject_adapter_in_model

    model = random_model()
    inputs = random_inputs(model.cfg)
    targets = [n for n in lora_modules(model) if re.fullmatch(r"blocks\.\d+\.(attn|mlp)\.\w+|first", n)]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                        rank_pattern={"blocks.1.mlp.down": 2}, alpha_pattern={"blocks.0.attn.wq": 1.0})
    peft_model = inject_adapter_in_model(config, copy.deepcopy(model))
    state, alphas = lora_state_from_peft(peft_model)
    assert set(alphas) == set(targets) and alphas["blocks.0.attn.wq"] == 1.0 and alphas["blocks.1.attn.wq"] == 8.0
    assert state["blocks.1.mlp.down.lora_A.weight"].shape == (2, 256)
    path = save_lora(tmp_path / "a.safetensors", state, alphas, metadata={"steps": 10, "recipe": "x"})
    lora = read_lora(path, model)
    assert lora.metadata == {"steps": "10", "recipe": "x"} and lora.modules["blocks.1.mlp.down"].alpha == 8.0
    apply_lora(model, lora)
    assert (run(model, inputs) - run(peft_model, inputs)).abs().max() < 1e-5
    # get_peft_model's `base_model.model.` prefix is stripped; a single alpha writes no per-module table
    wrapped = get_peft_model(random_model(), LoraConfig(r=2, lora_alpha=2, target_modules=["first", "last.linear"]))
    state, alphas = lora_state_from_peft(wrapped)
    assert sorted(state) == ["first.lora_A.weight", "first.lora_B.weight", "last.linear.lora_A.weight",
                             "last.linear.lora_B.weight"]
    save_lora(tmp_path / "b.safetensors", state, 2.0)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "b.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "krea2-lora", "lora_alpha": "2.0", "rank": "2"}
    one_line_error(lambda: save_lora(tmp_path / "c.safetensors", {"first.lora_A.weight": torch.zeros(2, 2)}, 1.0),
                   "first has lora_A only")
    one_line_error(lambda: lora_state_from_peft(model), "no peft LoRA adapter")


# ---- errors ---------------------------------------------------------------------------------------------------------


def test_errors_are_one_line(tmp_path, monkeypatch, capsys):
    model = random_model()
    save_file({"encoder.layer.0.weight": torch.zeros(2), "lm_head.lora_A.weight": torch.zeros(2, 2)},
              tmp_path / "other.safetensors")
    one_line_error(lambda: read_lora(tmp_path / "other.safetensors", model), "encoder.layer.0.weight",
                   "no key of a Krea 2 LoRA")
    part = load_file(write_lora(random_lora(model, every=7), tmp_path / "ok.safetensors"))
    part["blocks.7.attn.wq.lora_A.weight"] = torch.zeros(4, 64)  # a 2-layer model has no block 7
    part["blocks.0.attn.wq.dora_scale"] = torch.zeros(64)
    save_file(part, tmp_path / "partial.safetensors")
    one_line_error(lambda: read_lora(tmp_path / "partial.safetensors", model), f"2 of {len(part)} keys",
                   "blocks.0.attn.wq.dora_scale")
    with pytest.warns(UserWarning, match="2 of"):
        assert len(read_lora(tmp_path / "partial.safetensors", model, strict=False).modules) == 8
    wider = DiTConfig(**{**PRESETS["tiny"].to_dict(), "features": 128})
    one_line_error(lambda: read_lora(tmp_path / "ok.safetensors", wider), "another model size")
    one_line_error(lambda: read_lora(tmp_path / "ok.safetensors", "tiny-world"), "6 of 16 keys")  # 1 text block
    one_line_error(lambda: read_lora(tmp_path / "nope.safetensors"), "LoRA file not found")
    # through the console entry point: exit 2, one line
    monkeypatch.setattr(sys, "argv", ["krea2", "lora", "convert", str(tmp_path / "other.safetensors"),
                                      str(tmp_path / "o.safetensors"), "--to", "kohya"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ")


# ---- extraction, merge, generate ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def invoke(*args):
    res = CliRunner().invoke(cli.app, [str(a) for a in args])
    assert res.exit_code == 0, (res.output, res.exception)
    return res


def test_extract_recovers_a_planted_low_rank_difference(ckpt, tmp_path):
    base = load_file(ckpt / "model.safetensors")
    g = torch.Generator().manual_seed(5)
    planted = ["blocks.0.attn.wq", "blocks.1.mlp.down", "txtfusion.refiner_blocks.0.mlp.up", "first"]
    tuned = dict(base)
    for n in planted:
        out, inp = base[f"{n}.weight"].shape
        tuned[f"{n}.weight"] = base[f"{n}.weight"] + torch.randn(out, 2, generator=g) @ torch.randn(2, inp,
                                                                                                  generator=g) * 0.1
    tuned["blocks.0.prenorm.scale"] = base["blocks.0.prenorm.scale"] + 1  # not a Linear: reported, not extracted
    info = read_checkpoint_dir(ckpt)
    write_checkpoint(tmp_path / "tuned", tuned, info.config())
    res = invoke("lora", "extract", ckpt, tmp_path / "tuned", "--rank", 4, "--out", tmp_path / "x.safetensors")
    err = float(re.search(r"relative reconstruction error (\S+)", res.output)[1])
    assert err < 1e-5 and "blocks.0.prenorm.scale" in res.output
    lora = read_lora(tmp_path / "x.safetensors", info.model)
    assert sorted(lora.modules) == sorted(planted) and all(m.rank == 2 for m in lora.modules.values())
    merged = merge_into_state_dict(base, lora)
    for n in planted:
        d = tuned[f"{n}.weight"] - base[f"{n}.weight"]
        assert (merged[f"{n}.weight"] - tuned[f"{n}.weight"]).norm() <= 1e-5 * d.norm()
    _, report = extract_lora(base, tuned, 1)  # rank 1 of a rank-2 difference: a real error, reported
    assert report.error > 0.05


def test_cli_merge_convert_and_generate_with_lora(ckpt, tmp_path):
    model = load_dit(ckpt / "model.safetensors")
    lora = random_lora(model, every=2)
    write_lora(lora, tmp_path / "style.safetensors", "comfyui")
    invoke("lora", "convert", tmp_path / "style.safetensors", tmp_path / "style_k.safetensors", "--to", "kohya",
           "--checkpoint", ckpt)
    assert same(read_lora(tmp_path / "style_k.safetensors"), lora)
    assert "kohya" in invoke("lora", "info", tmp_path / "style_k.safetensors").output
    invoke("lora", "merge", ckpt, f"{tmp_path / 'style_k.safetensors'}:0.5", "--out", tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    expected = merge_into_state_dict(load_file(ckpt / "model.safetensors"), lora, 0.5)
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in merged)
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["lora_merge"] == [{"lora": str(tmp_path / "style_k.safetensors"), "scale": 0.5}]

    fast = ["--steps", "2", "--seed", "3"]
    invoke("generate", "a red square", "--checkpoint", ckpt, "--out", tmp_path / "g0", *fast)
    invoke("generate", "a red square", "--checkpoint", ckpt, "--out", tmp_path / "g1", *fast,
           "--lora", f"{tmp_path / 'style.safetensors'}:0.25", "--lora", f"{tmp_path / 'style_k.safetensors'}:0.25")
    invoke("generate", "a red square", "--checkpoint", tmp_path / "merged", "--out", tmp_path / "g2", *fast)
    import numpy as np
    from PIL import Image

    px = [np.asarray(Image.open(tmp_path / d / "0000.png"), dtype=np.int16) for d in ("g0", "g1", "g2")]
    assert np.abs(px[1] - px[2]).max() <= 1 and np.abs(px[0] - px[1]).max() > 1  # 0.25 + 0.25 == merged at 0.5


def test_pipeline_load_set_scale_hotswap_unload(ckpt, tmp_path):
    from krea2.pipeline import load_pipeline

    pipe = load_pipeline(str(ckpt))
    inputs = random_inputs(pipe.model.cfg)
    base = run(pipe.model, inputs)
    write_lora(random_lora(pipe.model, seed=1), tmp_path / "style.safetensors", "kohya")
    assert pipe.load_lora(tmp_path / "style.safetensors", 0.5) == "style"
    assert pipe.load_lora(tmp_path / "style.safetensors") == "style_2"
    assert pipe.loras == {"style": 0.5, "style_2": 1.0}
    pipe.set_lora_scale("style", 1.0)
    two = run(pipe.model, inputs)
    other = random_lora(pipe.model, seed=9)
    pipe.load_lora(other, 2.0, name="style_2")  # hot-swap
    swapped = run(pipe.model, inputs)
    assert (swapped - two).abs().max() > 1e-3
    pipe.unload_lora("style")
    assert (run(pipe.model, inputs) - run(merge_lora(load_dit(ckpt / "model.safetensors"), other, 2.0),
                                          inputs)).abs().max() < 1e-5
    pipe.unload_lora()
    assert pipe.loras == {} and torch.equal(run(pipe.model, inputs), base)
    images = pipe.generate("x", pipe.sampling_config(steps=1), width=8, height=8)
    assert images.shape == (1, 3, 8, 8)
