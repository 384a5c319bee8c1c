"""Style references: the encoder discards layout; strength, weighted mixing and negative references behave as the
control promises (strength 0 is the base model exactly; one reference at weight 1 is the single-reference path;
the order of references does not matter)."""

from __future__ import annotations

import pytest
import torch

from krea2.errors import Krea2Error
from krea2.models.checkpoint import save_random_checkpoint
from krea2.pipeline import load_pipeline
from krea2.sampling import Conditioning
from krea2.style import StyleEncoder, StyleMix, mix_references, styled_velocity


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return load_pipeline(str(save_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")))


def tokens(pipe, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(1, 4, pipe.model.cfg.features)


def test_encoder_sees_patches_not_where_they_are():
    torch.manual_seed(0)
    enc = StyleEncoder(features=64, tokens=4, patch=4, side=32).eval()
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    blocks = img.unfold(2, 4, 4).unfold(3, 4, 4)  # (B, 3, 8, 8, 4, 4): the 4x4 patches on an 8x8 grid
    perm = torch.randperm(64)
    shuffled = blocks.reshape(2, 3, 64, 4, 4)[:, :, perm].reshape(2, 3, 8, 8, 4, 4)
    shuffled = shuffled.permute(0, 1, 2, 4, 3, 5).reshape(2, 3, 32, 32)
    assert not torch.equal(shuffled, img)
    with torch.no_grad():
        torch.testing.assert_close(enc(shuffled), enc(img), atol=1e-5, rtol=1e-5)
        assert enc(img).shape == (2, 4, 64) and not torch.allclose(enc(img)[0], enc(img)[1])
    with pytest.raises(Krea2Error, match="must be"):
        enc(torch.zeros(1, 4, 32, 32))


def test_strength_zero_is_the_base_model_exactly(pipe):
    base = pipe.generate(["a red circle", "a blue square"], seed=3)
    mix = mix_references([tokens(pipe, 0)], [1.0], strength=0.0)
    assert torch.equal(pipe.generate(["a red circle", "a blue square"], seed=3, style=mix), base)
    styled = pipe.generate(["a red circle", "a blue square"], seed=3, style=mix_references([tokens(pipe, 0)], [1.0],
                                                                                         strength=1.0))
    assert not torch.equal(styled, base)


def test_one_reference_at_weight_one_is_the_single_reference_path_and_weights_are_relative(pipe):
    a = tokens(pipe, 0)
    single = StyleMix(a, None, 0.0, 0.7)
    for w in (1.0, 3.0):
        mix = mix_references([a], [w], 0.7)
        assert torch.equal(mix.positive, a) and mix.negative is None
    out = pipe.generate(["a red circle"], seed=1, style=single)
    assert torch.equal(pipe.generate(["a red circle"], seed=1, style=mix_references([a], [1.0], 0.7)), out)


def test_mixing_does_not_depend_on_the_order_of_references(pipe):
    a, b, c = (tokens(pipe, s) for s in range(3))
    m1 = mix_references([a, b], [0.3, 0.7], 1.0)
    m2 = mix_references([b, a], [0.7, 0.3], 1.0)
    assert torch.equal(m1.positive, m2.positive)
    m3 = mix_references([a, b, c, a], [1.0, 2.0, -1.0, 1.0], 1.0)
    m4 = mix_references([c, a, b, a], [-1.0, 1.0, 2.0, 1.0], 1.0)
    torch.testing.assert_close(m3.positive, m4.positive, atol=1e-6, rtol=0)
    torch.testing.assert_close(m3.positive, 0.5 * a + 0.5 * b, atol=1e-6, rtol=0)
    assert torch.equal(m3.negative, m4.negative) and m3.negative_weight == 1.0


def test_strength_interpolates_and_a_negative_equal_to_the_positive_cancels(pipe):
    cfg = pipe.model.cfg
    gh = gw = 4
    x, t = torch.randn(2, gh * gw, cfg.token_dim), torch.full((2,), 0.6)
    ctx, mask = pipe.encode(["a red circle", "a blue square"])
    cond = Conditioning.build(ctx, mask, gh, gw)
    uctx, umask = pipe.encode_empty()
    uncond = Conditioning.build(uctx.expand(2, -1, -1, -1), umask.expand(2, -1), gh, gw)
    a, b = tokens(pipe, 0), tokens(pipe, 1)
    with torch.no_grad():
        def v(mix):
            return styled_velocity(pipe.model, x, t, cond, uncond, 1.5, mix, gh, gw)

        base, full, half = v(None), v(StyleMix(a, None, 0.0, 1.0)), v(StyleMix(a, None, 0.0, 0.5))
        torch.testing.assert_close(half, 0.5 * (base + full), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v(mix_references([a, a], [1.0, -1.0], 1.0)), full, atol=1e-6, rtol=0)
        pushed = v(mix_references([a, b], [1.0, -0.5], 1.0))
        v_b = v(StyleMix(b, None, 0.0, 1.0))
        torch.testing.assert_close(pushed, full + 0.5 * (full - v_b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw,needle", [
    ({"weights": [1.0, 2.0]}, "1 style references but 2 weights"),
    ({"weights": [float("nan")]}, "finite and not all zero"),
    ({"weights": [0.0]}, "finite and not all zero"),
    ({"strength": 1.5}, r"strength must be in \[0, 1\]"),
    ({"strength": float("nan")}, r"strength must be in \[0, 1\]"),
])
def test_bad_mixes_are_one_line_errors(kw, needle):
    args = {"tokens": [torch.zeros(1, 4, 8)], "weights": [1.0], "strength": 0.5, **kw}
    with pytest.raises(Krea2Error, match=needle):
        mix_references(**args)


def style_recipe(steps, init=None, lora=None, **stage_keys):
    from krea2.train.config import parse_recipe

    model = {"init": str(init)} if init else {"preset": "tiny-world"}
    stage = {"name": "style", "steps": steps, "batch_size": 4, "lr": 1e-3, "warmup": 1, "log_every": 1,
             "save_every": 2, "data": {"source": "triplets", "size": 16, "pool": 16, "captions": {"short": 1.0}},
             "objective": {"name": "style", "tokens": 2, "width": 32, "side": 16}}
    stage |= ({"lora": lora} if lora else {}) | stage_keys
    return parse_recipe({"name": "s", "model": model, "stages": [stage]})


@pytest.mark.slow
def test_style_stage_trains_the_encoder_only_and_resumes_exactly(tmp_path):
    import shutil

    from krea2.models.loading import load_dit
    from krea2.style import load_style_encoder
    from krea2.train.trainer import train_recipe

    base = save_random_checkpoint(tmp_path / "base", resolution=16)
    ref = train_recipe(style_recipe(4, init=base), tmp_path / "ref", progress=False)
    start = load_dit(base / "model.safetensors").state_dict()
    out = load_dit(ref / "model.safetensors").state_dict()
    assert all(torch.equal(start[k], out[k]) for k in start)  # the base model is frozen
    enc = load_style_encoder(tmp_path / "ref" / "style")
    run = tmp_path / "run"
    train_recipe(style_recipe(2, init=base), run, progress=False)
    half = load_style_encoder(run / "style")
    assert any(not torch.equal(a, b) for a, b in zip(enc.state_dict().values(), half.state_dict().values()))
    for p in ("style/final", "final"):
        shutil.rmtree(run / p)
    train_recipe(style_recipe(4, init=base), run, resume=True, progress=False)
    again = load_style_encoder(run / "style")
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), again.state_dict().values()))
    with pytest.raises(Krea2Error, match="trains against a frozen base"):
        train_recipe(style_recipe(1), tmp_path / "fresh", progress=False)
    assert not (tmp_path / "fresh" / "recipe.json").exists()
    with pytest.raises(Krea2Error, match="holds no style encoder"):
        load_style_encoder(tmp_path)
    with pytest.raises(Krea2Error, match="does not exist; train one"):
        load_style_encoder(tmp_path / "nowhere")


@pytest.mark.slow
def test_a_reference_lora_trains_with_the_encoder_and_runs_in_the_reference_passes_only(tmp_path):
    import copy

    from krea2.models.lora import active_loras, merge_lora
    from krea2.style import load_style_encoder
    from krea2.train.trainer import train_recipe

    base = save_random_checkpoint(tmp_path / "base", resolution=16)
    train_recipe(style_recipe(2, init=base, lora={"rank": 4, "alpha": 4.0, "targets": "attention"}),
                 tmp_path / "run", progress=False)
    enc = load_style_encoder(tmp_path / "run" / "style")
    assert enc.lora is not None and all(m.B.abs().max() > 0 for m in enc.lora.modules.values())  # B left zero
    pipe = load_pipeline(str(base))
    with torch.no_grad():
        ref = enc(torch.rand(1, 3, 16, 16) * 2 - 1)
    merged = merge_lora(copy.deepcopy(pipe.model), enc.lora)
    cfg, g = pipe.model.cfg, torch.Generator().manual_seed(0)
    n = 16 // (pipe.autoencoder.compression * cfg.patch)  # tokens per side of a 16 px image
    x, t = torch.randn(2, n * n, cfg.channels * cfg.patch ** 2, generator=g), torch.tensor([0.7, 0.3])
    ctx, mask = pipe.encode(["a red circle", "a blue square"])
    cond = Conditioning.build(ctx, mask, n, n)
    with torch.no_grad():
        v_base = pipe.model(x, cond.context, t, cond.pos, cond.mask)
        plain = StyleMix(ref, None, 0.0, 1.0)  # the same tokens through the merged model, no LoRA in the mix
        v_ref = styled_velocity(merged, x, t, cond, None, 0.0, plain, n, n)
        for s in (0.0, 0.5, 1.0):
            v = styled_velocity(pipe.model, x, t, cond, None, 0.0, mix_references([ref], [1.0], s, enc.lora), n, n)
            torch.testing.assert_close(v, v_base + s * (v_ref - v_base), rtol=1e-4, atol=1e-5)
            assert active_loras(pipe.model) == {}  # the adapter is gone after the reference pass
        assert not torch.allclose(v_ref, styled_velocity(pipe.model, x, t, cond, None, 0.0, plain, n, n))
    zero = mix_references([ref], [1.0], 0.0, enc.lora)
    assert torch.equal(pipe.generate(["a red circle"], seed=2, style=zero), pipe.generate(["a red circle"], seed=2))
    # whole sampling at strength 1: the LoRA in every reference pass = the merged model reading the segment
    full = pipe.generate(["a red circle"], seed=2, style=mix_references([ref], [1.0], 1.0, enc.lora))
    merged_pipe = load_pipeline(str(base))
    merged_pipe.model = merged
    torch.testing.assert_close(full, merged_pipe.generate(["a red circle"], seed=2, style=plain), atol=1e-4, rtol=0)
    # the stage's output is the base unchanged (the LoRA stays beside it), not base + ΔW
    from krea2.models.loading import load_dit

    out, start = load_dit(tmp_path / "run" / "final" / "model.safetensors").state_dict(), pipe.model.state_dict()
    assert out.keys() == start.keys() and all(torch.equal(out[k], start[k]) for k in start)
    with pytest.raises(Krea2Error, match="negative style references alone"):
        mix_references([ref], [-1.0], 1.0, enc.lora)
    from krea2.style import check_style_encoder

    check_style_encoder(enc, pipe.model)
    with pytest.raises(Krea2Error, match="int8-quantised"):
        check_style_encoder(enc, load_pipeline(str(base), quantize="int8").model)
    with pytest.raises(Krea2Error, match="EMA/PMA"):
        train_recipe(style_recipe(2, init=base, lora={"rank": 4}, ema=0.9), tmp_path / "x", progress=False)


def test_the_world_style_adapter_ships_with_its_reference_lora():
    from krea2.style import check_style_encoder, load_style_encoder

    enc = load_style_encoder("world")
    # rank 32 on the 6 blocks' 5 attention and 3 MLP Linears
    assert enc.lora is not None and len(enc.lora.modules) == 48 and enc.lora.ranks == [32]
    pipe = load_pipeline("world")
    check_style_encoder(enc, pipe.model)
    with torch.no_grad():
        ref = enc(torch.zeros(1, 3, 32, 32))
    base = pipe.generate(["a red circle"], seed=0)
    assert torch.equal(pipe.generate(["a red circle"], seed=0, style=mix_references([ref], [1.0], 0.0, enc.lora)),
                       base)
    assert not torch.equal(pipe.generate(["a red circle"], seed=0, style=mix_references([ref], [1.0], 1.0, enc.lora)),
                           base)


def test_leakage_is_a_reference_object_the_prompt_did_not_ask_for():
    from krea2.eval.checker import DetectedObject, Detection
    from krea2.eval.style_eval import leaks

    refs = [{"objects": [{"shape": "circle", "color": "red"}]}]
    det = Detection("white", "flat", [DetectedObject("circle", "red", "large", "center", (0.5, 0.5), 1.0)])
    assert leaks(det, {"objects": [{"shape": "square", "color": "blue"}]}, refs)
    assert not leaks(det, {"objects": [{"shape": "circle"}]}, refs)  # asked for a circle of any colour
    assert not leaks(det, {"objects": [{"shape": "circle", "color": "red"}]}, refs)
    assert leaks(det, {"objects": [{"shape": "circle", "color": "green"}]}, refs)
    assert not leaks(det, {"objects": [{"shape": "square"}]}, [{"objects": [{"shape": "circle", "color": "blue"}]}])


@pytest.mark.slow
def test_eval_style_end_to_end(tmp_path, cli_error, monkeypatch):
    import json

    from krea2 import cli
    from krea2.train.trainer import train_recipe

    train_recipe(style_recipe(2, init=save_random_checkpoint(tmp_path / "base", resolution=16)), tmp_path / "run",
                 progress=False)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "a red circle", "tag": "single_object", "objects": [{"shape": "circle", "color": "red"}]},
        {"prompt": "a blue square", "tag": "colors", "objects": [{"shape": "square", "color": "blue"}],
         "refs": [{"style": "striped", "weight": 1.0}, {"style": "outline", "weight": -0.5}], "strength": 0.5},
    ]) + "\n")
    import sys
    from contextlib import redirect_stdout
    from io import StringIO

    out = StringIO()
    monkeypatch.setattr(sys, "argv", [
        "krea2", "eval", "style", "--style-encoder", str(tmp_path / "run" / "style"), "--checkpoint",
        str(tmp_path / "run" / "final"), "--prompts", str(prompts), "--images-per-prompt", "2",
        "--out", str(tmp_path / "r.json")])
    cli._mount()
    with redirect_stdout(out):
        try:
            cli.main()
        except SystemExit as e:  # success may return or exit 0
            assert e.code in (0, None)
    last = out.getvalue().strip().splitlines()[-1]
    assert last.startswith("style ") and " content " in last and " leakage " in last
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n_images"] == 4 and 0 <= report["style"] <= 1 and (tmp_path / "r.png").is_file()
    # prompt 1 has no refs: style STYLES[0 mod 5] = flat; prompt 2's heaviest positive reference is striped
    assert set(report["per_style"]) == {"flat", "striped"}
    assert report["style"] == pytest.approx(sum(report["per_style"].values()) / 2)
    assert 0 <= report["drawn"] <= 1 and report["style"] <= report["style_when_drawn"] + 1e-9 or report["drawn"] == 0
    code, err = cli_error("eval", "style", "--style-encoder", tmp_path, "--strength", "2")
    assert code == 2 and "--strength must be in [0, 1]" in err


@pytest.mark.slow
def test_generate_with_style_references(tmp_path, cli_error):
    import numpy as np
    from PIL import Image

    from krea2.data import world
    from krea2.train.trainer import train_recipe

    # a random base whose output depends on its inputs (the trainer's fresh init has a zero output layer)
    base = save_random_checkpoint(tmp_path / "base", resolution=16)
    train_recipe(style_recipe(2, init=base), tmp_path / "run", progress=False)
    ref = tmp_path / "ref.png"
    scene = world.sample_scene(np.random.default_rng(0), styles=["striped"])
    Image.fromarray(world.render(scene, 16, 0)).save(ref)
    enc, ckpt = tmp_path / "run" / "style", tmp_path / "run" / "final"

    def run(out, *extra):  # a failing call: (exit code, stderr)
        return cli_error("generate", "a red circle", "--checkpoint", ckpt, "--out", tmp_path / out, *extra)

    import sys

    from krea2 import cli

    cli._mount()

    def ok(out, *extra):  # a successful call: the first image
        sys.argv = ["krea2", "generate", "a red circle", "--checkpoint", str(ckpt), "--out", str(tmp_path / out),
                    *map(str, extra)]
        try:
            cli.main()
        except SystemExit as e:
            assert e.code in (0, None)
        return np.asarray(Image.open(tmp_path / out / "0000.png"))

    try:
        plain = ok("plain")
        zero = ok("zero", "--style-ref", ref, "--style-encoder", enc, "--style-strength", 0)
        full = ok("full", "--style-ref", f"{ref}:2", "--style-ref", f"{ref}:-0.5", "--style-encoder", enc,
                  "--style-strength", 1)
    finally:
        sys.argv = ["krea2"]
    assert np.array_equal(zero, plain) and not np.array_equal(full, plain)
    (tmp_path / "not.png").write_bytes(b"not an image")
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    for spec, needle in [(f"{ref}", "needs --style-encoder"), (tmp_path / "not.png", "cannot be used"),
                         (tmp_path / "anim.gif", "is animated"), (tmp_path / "none.png", "not found"),
                         (f"{ref}:nan", "finite, non-zero")]:
        extra = ["--style-ref", spec] + ([] if needle == "needs --style-encoder" else ["--style-encoder", enc])
        code, err = run("bad", *extra)
        assert code == 2 and needle in err and "Traceback" not in err, err
    code, err = run("bad", "--style-ref", ref, "--style-encoder", enc, "--style-strength", "1.5")
    assert code == 2 and "strength must be in [0, 1]" in err
    code, err = run("bad", "--style-ref", f"{ref}:abc", "--style-encoder", enc)
    assert code == 2 and "the weight 'abc' is not a number" in err
    code, err = run("bad", "--style-encoder", enc)  # style options without a reference are not silently ignored
    assert code == 2 and "add --style-ref" in err
    assert not (tmp_path / "bad").exists()  # every refusal came before --out was made


def style_pairs_file(path, n: int = 8, size: int = 16):
    """Winner: a render in the reference's style; loser: the same caption's scene in another style; the reference: a
    third scene in the winner's style (what `krea2 pairs --kind style` writes, from renders instead of samples)."""
    import dataclasses

    import numpy as np

    from krea2.data import world
    from krea2.train.data import write_pairs

    rng = np.random.default_rng(3)
    caps, wins, loss, refs = [], [], [], []
    for i in range(n):
        style, other = world.STYLES[i % 5], world.STYLES[(i + 2) % 5]
        scene = world.sample_scene(rng, styles=[style], n_objects=(1, 1))
        caps.append(world.captions(scene, rng)["short"])
        wins.append(world.render(scene, size, i))
        loss.append(world.render(dataclasses.replace(scene, style=other), size, i))
        refs.append(world.render(world.sample_scene(rng, styles=[style]), size, 100 + i))
    return write_pairs(path, caps, wins, loss, [{"kind": "style"}] * n, refs)


@pytest.mark.slow
def test_style_preference_starts_at_ln2_from_the_adapter_and_trains_encoder_and_lora(tmp_path):
    import json

    from krea2.models.loading import load_dit
    from krea2.style import load_style_encoder
    from krea2.train.config import parse_recipe
    from krea2.train.trainer import train_recipe

    base = save_random_checkpoint(tmp_path / "base", resolution=16)
    lora = {"rank": 4, "alpha": 4.0, "targets": "attention"}
    train_recipe(style_recipe(2, init=base, lora=lora, lr=1e-2), tmp_path / "sup", progress=False)
    start = load_style_encoder(tmp_path / "sup" / "style")
    pairs = style_pairs_file(tmp_path / "pairs.parquet")
    stage = {"name": "po", "steps": 3, "batch_size": 4, "lr": 1e-2, "warmup": 1, "log_every": 1, "save_every": 100,
             "data": {"source": "style_pairs", "path": str(pairs)}, "lora": {**lora, "alpha": 8.0},
             "objective": {"name": "style_po", "method": "dpo", "adapter": str(tmp_path / "sup" / "style")}}
    train_recipe(parse_recipe({"name": "p", "model": {"init": str(base)}, "stages": [stage]}), tmp_path / "run",
                 progress=False)
    first = json.loads((tmp_path / "run" / "po" / "losses.jsonl").read_text().splitlines()[0])
    # policy (encoder + peft LoRA rescaled to another alpha) == reference (encoder copy + the LoRA merged into the
    # frozen ref) at the first step: −log σ(0) to float rounding; a reference without the LoRA is ~1e-3 off
    assert abs(first["loss"] - 0.6931472) < 1e-4
    out = load_style_encoder(tmp_path / "run" / "po")
    assert any(not torch.equal(a, b) for a, b in zip(start.state_dict().values(), out.state_dict().values()))
    assert out.lora.modules.keys() == start.lora.modules.keys() and out.lora.alphas == [8.0]
    assert any(not torch.allclose(out.lora.modules[k].delta(), start.lora.modules[k].delta())
               for k in start.lora.modules)
    before, after = load_dit(base / "model.safetensors").state_dict(), load_dit(
        tmp_path / "run" / "final" / "model.safetensors").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base stays frozen
    # --validate loads the adapter; a resume refuses an adapter that changed since the run started
    import shutil

    from krea2.train.trainer import validate_recipe

    recipe = parse_recipe({"name": "p", "model": {"init": str(base)}, "stages": [{**stage, "steps": 5}]})
    assert "style_po, 5 steps" in validate_recipe(recipe)
    from krea2.train.data import read_pairs, write_pairs

    exs = read_pairs(pairs)  # the same pairs without their references: --validate reads the schema and refuses
    plain = write_pairs(tmp_path / "plain.parquet", [e.captions["long"] for e in exs], [e.image for e in exs],
                        [e.meta["loser"] for e in exs])
    no_refs = {**stage, "data": {"source": "style_pairs", "path": str(plain)}}
    with pytest.raises(Krea2Error, match=r"lacks column\(s\) \['reference'\]"):
        validate_recipe(parse_recipe({"name": "p", "model": {"init": str(base)}, "stages": [no_refs]}))
    shutil.copytree(tmp_path / "sup" / "style", tmp_path / "bare", ignore=shutil.ignore_patterns("lora.*"))
    bare = {**stage, "objective": {**stage["objective"], "adapter": str(tmp_path / "bare")}}
    with pytest.raises(Krea2Error, match="neither a reference LoRA"):
        validate_recipe(parse_recipe({"name": "p", "model": {"init": str(base)}, "stages": [bare]}))
    for d in ("po/final", "final"):
        shutil.rmtree(tmp_path / "run" / d)
    (tmp_path / "sup" / "style" / "lora.safetensors").write_bytes(
        (tmp_path / "run" / "po" / "lora.safetensors").read_bytes())
    with pytest.raises(Krea2Error, match="changed since this run started"):
        train_recipe(recipe, tmp_path / "run", resume=True, progress=False)
    bad = {**stage, "data": {"source": "pairs", "path": str(pairs)}}
    with pytest.raises(Krea2Error, match="reads style_pairs"):
        train_recipe(parse_recipe({"name": "p", "model": {"init": str(base)}, "stages": [bad]}), tmp_path / "x",
                     progress=False)
    no_lora = {k: v for k, v in stage.items() if k != "lora"}
    with pytest.raises(Krea2Error, match=r"add \[stages.lora\]"):
        train_recipe(parse_recipe({"name": "p", "model": {"init": str(base)}, "stages": [no_lora]}), tmp_path / "y",
                     progress=False)


def test_lora_weights_start_the_adapters_from_a_file(tmp_path):
    import copy

    from krea2.models.dit import DiT
    from krea2.models.lora import LoRA, LoRAModule, write_lora
    from krea2.train.lora import LoRAConfig, inject_lora, lora_targets

    torch.manual_seed(0)
    model = DiT("tiny-world")
    names = lora_targets(model, "attention")
    g = torch.Generator().manual_seed(1)
    lora = LoRA({n: LoRAModule(torch.randn(2, model.get_submodule(n).in_features, generator=g),
                               torch.randn(model.get_submodule(n).out_features, 2, generator=g), 6.0) for n in names})
    file = write_lora(lora, tmp_path / "a.safetensors")
    x = torch.randn(3, model.get_submodule(names[0]).in_features)
    wrapped = inject_lora(copy.deepcopy(model), LoRAConfig(rank=2, alpha=1.0, targets="attention",
                                                           weights=str(file)))
    expect = model.get_submodule(names[0])(x) + x @ lora.modules[names[0]].delta().T
    torch.testing.assert_close(wrapped.get_submodule(names[0])(x), expect, rtol=1e-5, atol=1e-5)
    with pytest.raises(Krea2Error, match="rank 2"):
        inject_lora(copy.deepcopy(model), LoRAConfig(rank=4, targets="attention", weights=str(file)))
    with pytest.raises(Krea2Error, match="other modules than targets"):
        inject_lora(copy.deepcopy(model), LoRAConfig(rank=2, targets="all", weights=str(file)))
    with pytest.raises(Krea2Error, match="not found"):
        inject_lora(copy.deepcopy(model), LoRAConfig(rank=2, targets="attention", weights=str(tmp_path / "no")))
    with pytest.raises(ValueError, match="would replace them"):
        LoRAConfig(init="pissa", weights="a.safetensors")


def test_style_pairs_keep_the_best_and_worst_by_style_minus_leakage(tmp_path, monkeypatch):
    import numpy as np

    from krea2.eval.checker import DetectedObject, Detection
    from krea2.train import pairs as pairs_mod
    from krea2.train.data import read_pairs, write_pairs

    det = Detection("white", "flat", [DetectedObject("circle", "red", "large", "center", (0.5, 0.5), 1.0)])
    circle = {"prompt": "a red circle", "objects": [{"shape": "circle", "color": "red"}]}
    square = {"prompt": "a blue square", "objects": [{"shape": "square", "color": "blue"}]}
    ref = {"style": "flat", "objects": [{"shape": "square", "color": "green"}]}
    leaky = {"style": "flat", "objects": [{"shape": "circle", "color": "red"}]}
    assert pairs_mod.style_reward(det, circle, [ref]) == 1.25  # in style, asked content, nothing leaked
    assert pairs_mod.style_reward(det, circle, [{**ref, "style": "outline"}]) == 0.25  # another style
    assert pairs_mod.style_reward(det, square, [ref]) == 1.0  # in style, wrong content
    assert pairs_mod.style_reward(det, square, [leaky]) == 0.0  # in style but drew the reference's red circle
    # the sampler: the pair is the argmax and argmin of the reward over the group, with the reference it drew
    pipe = load_pipeline(str(save_random_checkpoint(tmp_path / "ckpt", resolution=16)))
    enc = StyleEncoder(pipe.model.cfg.features, 2, 4, 32, 4, 16)
    seen = []

    def reward(det, record, scenes, content_weight=0.25):
        seen.append(scenes[0]["style"])
        return float(len(seen) % 3)  # group of 3: rewards 1, 2, 0 -> best the 2nd image, worst the 3rd

    monkeypatch.setattr(pairs_mod, "style_reward", reward)
    caps, wins, loss, metas, refs = pairs_mod.sample_style_pairs(pipe, enc, 2, group_size=3, seed=5, progress=False)
    assert len(caps) == 2 and [m["style"] for m in metas] == seen[::3]
    with torch.no_grad():
        tokens = enc(torch.from_numpy(refs[0]).permute(2, 0, 1)[None].float() / 127.5 - 1)
    images = pipe.generate([caps[0]] * 3, seed=5 * 1_000_003, style=mix_references([tokens], [1.0], 1.0))
    u8 = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(wins[0], u8[1]) and np.array_equal(loss[0], u8[2])
    write_pairs(tmp_path / "p.parquet", caps, wins, loss, metas, refs)
    back = read_pairs(tmp_path / "p.parquet")
    assert np.array_equal(back[1].meta["reference"], refs[1]) and np.array_equal(back[1].meta["loser"], loss[1])
