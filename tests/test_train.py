"""The trainer: loss falls, a SIGKILLed run resumes to the uninterrupted losses, recipes parse, iREPA is wired right."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from krea2.errors import Krea2Error
from krea2.models.checkpoint import merge_state_dicts
from krea2.models.dit import DiT
from krea2.train.config import load_recipe, parse_recipe
from krea2.train.models import EMA
from krea2.train.objectives.flow import flow_matching_loss, shifted_timesteps
from krea2.train.objectives.irepa import IREPA, spatial_normalize
from krea2.train.trainer import train_recipe, validate_recipe, wsd_lr

ROOT = Path(__file__).resolve().parents[1]

TINY = """
name = "tiny"
sample_prompts = ["a red circle", "a blue square"]
[model]
preset = "tiny-world"
[sampling]
steps = 4
guidance = 1.0
minres = 32
maxres = 160
[[stages]]
name = "a"
steps = {steps}
batch_size = 8
lr = 3e-3
warmup = 2
save_every = 2
log_every = 2
seed = 5
[stages.data]
source = "world"
size = 16
pool = 48
n_objects = [1, 1]
sizes = ["large"]
"""


def write_recipe(tmp_path, steps=8, extra=""):
    p = tmp_path / "tiny.toml"
    p.write_text(TINY.format(steps=steps) + extra)
    return p


def losses(run: Path, stage="a") -> dict[int, float]:
    out = {}
    for line in (run / stage / "losses.jsonl").read_text().splitlines():
        d = json.loads(line)
        out[d["step"]] = d["loss"]
    return out


def test_short_training_loss_falls(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, steps=40))
    recipe.stages[0].sample_every = 40
    final = train_recipe(recipe, tmp_path / "run", progress=False)
    ls = losses(tmp_path / "run")
    first, last = sum(ls[i] for i in range(5)) / 5, sum(ls[i] for i in range(35, 40)) / 5
    assert last < 0.8 * first, (first, last)
    assert (final / "model.safetensors").is_file() and (final / "config.json").is_file()
    assert list((tmp_path / "run" / "a" / "samples").glob("*.png"))
    assert list((tmp_path / "run" / "tb" / "a").iterdir())  # TensorBoard events


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    recipe_file = write_recipe(tmp_path, steps=10)
    ref = tmp_path / "ref"
    train_recipe(load_recipe(recipe_file), ref, progress=False)

    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "krea2.train", str(recipe_file), "--out", str(run), "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = run / "a" / "losses.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill mid-stage, after at least one checkpoint (every 2 steps)
        if log.exists() and len(log.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(log.read_text().splitlines()) < 10, "the run finished before it could be killed"
    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming at step" in done.stdout + done.stderr
    a, b = losses(ref), losses(run)
    assert sorted(a) == sorted(b) == list(range(10))
    assert all(a[k] == b[k] for k in a), [(k, a[k], b[k]) for k in a if a[k] != b[k]]
    wa = (ref / "final" / "model.safetensors").read_bytes()
    assert wa == (run / "final" / "model.safetensors").read_bytes()


def test_existing_run_needs_resume(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path, steps=2))
    train_recipe(recipe, tmp_path / "r", progress=False)
    (tmp_path / "r" / "a" / "final" / "model.safetensors").unlink()
    with pytest.raises(Krea2Error, match="--resume"):
        train_recipe(recipe, tmp_path / "r", progress=False)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "recipes").glob("*.toml")))
def test_shipped_recipes_parse_and_build(name):
    recipe = load_recipe(ROOT / "recipes" / name)
    summary = validate_recipe(recipe, check_paths=False)  # their data (pairs, exported rows) is made by earlier steps
    assert summary.count("\n") == len(recipe.stages)  # one line per built stage
    if name.startswith("krea2"):
        assert "12,820,073,036 parameters" in summary
        assert "256 tokens" in summary and "4096 tokens" in summary


def test_recipe_errors_are_one_line(tmp_path):
    with pytest.raises(Krea2Error, match="unknown key"):
        parse_recipe({"name": "x", "model": {"preset": "tiny"}, "stages": [{"name": "a", "steps": 1, "lrr": 1}]})
    with pytest.raises(Krea2Error, match="no \\[\\[stages\\]\\]"):
        parse_recipe({"name": "x", "model": {"preset": "tiny"}})
    with pytest.raises(Krea2Error, match="precision"):
        parse_recipe({"name": "x", "model": {}, "stages": [{"name": "a", "steps": 1, "precision": "fp8"}]})
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [")
    with pytest.raises(Krea2Error, match="not valid TOML"):
        load_recipe(bad)


def test_wsd_schedule():
    from krea2.train.config import StageConfig

    s = StageConfig(name="s", steps=100, lr=1.0, warmup=10, decay=0.2)
    assert wsd_lr(0, s) == pytest.approx(0.1)
    assert wsd_lr(50, s) == 1.0
    assert wsd_lr(80, s) == pytest.approx(1.0) and wsd_lr(90, s) == pytest.approx(0.5)
    assert wsd_lr(99, s) == pytest.approx(0.05)


def test_pma_average():
    a, b = {"w": torch.ones(3)}, {"w": torch.zeros(3)}
    assert torch.equal(merge_state_dicts([a, b])["w"], torch.full((3,), 0.5))


def test_ema_tracks_trainable_parameters_only():
    model = DiT("tiny")
    model.txtfusion.requires_grad_(False)  # e.g. frozen text fusion: no shadow for it
    ema = EMA(model, decay=0.9)
    before = model.blocks[0].attn.wq.weight.detach().clone()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    sd = ema.shadows()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(sd) == trainable and not any(n.startswith("txtfusion.") for n in sd)
    torch.testing.assert_close(sd["blocks.0.attn.wq.weight"], before + 0.1)  # 0.9 * old + 0.1 * (old + 1)
    assert set(ema.state_dict()) == {f"w{i}" for i in range(len(trainable))}  # rides in checkpoints


def test_shifted_timesteps_follow_the_shift():
    g = torch.Generator().manual_seed(0)
    t0 = shifted_timesteps(20000, 0.0, generator=g)
    g = torch.Generator().manual_seed(0)
    t1 = shifted_timesteps(20000, 1.0, generator=g)
    assert 0 < t0.min() and t0.max() < 1
    assert abs(t0.median().item() - 0.5) < 0.02
    assert t1.median() > 0.7  # e^1 / (e^1 + 1) = 0.73: a larger shift puts more steps near noise


def test_flow_target_is_noise_minus_data():
    x0, eps = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    assert flow_matching_loss(eps - x0, x0, eps) == 0


class GridTeacher(torch.nn.Module):
    dim = 8

    def features(self, images):
        return F.avg_pool2d(images.repeat(1, 3, 1, 1)[:, :8], 2)


def test_irepa_gradient_stops_after_the_aligned_block():
    torch.manual_seed(0)
    model = DiT("tiny")
    cfg = model.cfg
    irepa = IREPA(GridTeacher(), cfg.features, layer=1, weight=1.0, gamma=0.6, until=10)
    B, gh, gw, Lt = 2, 4, 4, 3
    img = torch.randn(B, gh * gw, cfg.token_dim)
    ctx = torch.randn(B, Lt, cfg.txtlayers, cfg.txtdim)
    from krea2.sampling import joint_inputs

    pos, mask = joint_inputs(torch.ones(B, Lt, dtype=torch.bool), gh, gw)
    _, hidden = model(img, ctx, torch.rand(B), pos, mask, return_hidden=1)
    irepa(hidden, torch.randn(B, 3, 8, 8), gh, gw).backward()
    assert model.blocks[0].attn.wq.weight.grad is not None and model.blocks[0].attn.wq.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.blocks[1].parameters())
    assert model.last.linear.weight.grad is None


def test_irepa_pieces():
    conv = torch.nn.Conv2d(6, 4, 1)
    lin = torch.nn.Linear(6, 4)
    lin.weight.data, lin.bias.data = conv.weight.data[:, :, 0, 0], conv.bias.data
    x = torch.randn(2, 6, 3, 3)
    assert torch.allclose(conv(x), lin(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), atol=1e-6)
    y = torch.randn(2, 4, 5, 5) + 3
    z = spatial_normalize(y, gamma=1.0)
    assert torch.allclose(z.flatten(2).mean(-1), torch.zeros(2, 4), atol=1e-5)
    # perfectly aligned features give a loss of -1
    irepa = IREPA(GridTeacher(), 8, layer=1, weight=1.0, gamma=0.6, until=100)
    images = torch.randn(2, 3, 8, 8)
    target = spatial_normalize(irepa.teacher.features(images), 0.6)
    with torch.no_grad():
        irepa.projector.weight.zero_()
        irepa.projector.bias.zero_()
        irepa.projector.weight[:, :, 1, 1] = torch.eye(8)
    hidden = target.flatten(2).transpose(1, 2)
    assert irepa(hidden, images, 4, 4).item() == pytest.approx(-1.0, abs=1e-5)
    assert irepa.weight(0) == 1.0 and irepa.weight(100) == 0.0 and irepa.weight(99) == pytest.approx(0.2)


def test_hf_vision_teacher_patch_grid(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    from krea2.train.objectives.irepa import load_teacher

    cfg = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=28, patch_size=14)
    Dinov2Model(cfg).save_pretrained(tmp_path / "dino")
    teacher = load_teacher(f"hf:{tmp_path / 'dino'}")
    feats = teacher.features(torch.rand(3, 3, 32, 32) * 2 - 1)
    assert feats.shape == (3, 16, 2, 2)  # CLS dropped, 28/14 = 2 patches a side
    with pytest.raises(Krea2Error, match="not found locally"):
        load_teacher(f"hf:{tmp_path / 'missing'}")


def test_guard_ignores_auxiliary_negative_losses():
    from krea2.train.guard import GuardConfig, SpikeGuard

    g = SpikeGuard(GuardConfig(min_steps=3, window=5))
    for v in (-0.01, -0.02, -0.015, -0.01):
        assert g.check(v)
    assert g.check(0.001)  # not a spike: a ratio to a negative median means nothing
    assert not g.check(float("nan"))


class FakeEncoder:
    identity = "fake"

    def encode(self, prompts):
        n = max(len(p.split()) for p in prompts) + 1
        states = torch.stack([torch.full((n, 2, 4), float(len(p))) for p in prompts])
        mask = torch.tensor([[i <= len(p.split()) for i in range(n)] for p in prompts])
        return states, mask


def test_size_buckets_and_deterministic_batches():
    from krea2.models.autoencoders import load_autoencoder
    from krea2.train.data import DataConfig, ImagePool

    cfg = DataConfig(source="world", size=[16, 32], pool=24, n_objects=(1, 2), caption_dropout=0.5)
    data = ImagePool(cfg, 3, FakeEncoder(), load_autoencoder("identity"), patch=4, progress=False)
    shapes = set()
    for step in range(12):
        b = data.batch(step, 6)
        assert b.images.shape[-1] in (16, 32) and b.x0.shape[1] == (b.images.shape[-1] // 4) ** 2
        shapes.add(b.images.shape[-1])
        again = data.batch(step, 6)  # a pure function of the step: resume reproduces it
        assert torch.equal(b.x0, again.x0) and torch.equal(b.context, again.context)
        # two data-parallel ranks get the two halves of the same global batch
        halves = [data.batch(step, 6, rank=r, world=2) for r in range(2)]
        assert torch.equal(torch.cat([h.x0 for h in halves]), b.x0)
    assert shapes == {16, 32}
    # caption dropout swaps in the empty prompt's encoding (one valid slot with this fake encoder), never zeros
    assert any(m.sum(1).min() == 1 for m in [data.batch(s, 6).txtmask for s in range(12)])


def test_object_count_weights_set_the_mix_of_a_world_pool():
    from krea2.data.world import world_examples
    from krea2.train.data import DataConfig, pool_examples

    cfg = DataConfig(source="world", size=16, pool=400, n_objects=(1, 4), n_objects_weights=[1, 0, 0, 3])
    counts = [len(ex.meta["scene"]["objects"]) for ex in pool_examples(cfg, 5)]
    assert set(counts) == {1, 4} and 0.65 < counts.count(4) / len(counts) < 0.85  # 3:1 of 400, binomial sd 0.02
    # no weights = the uniform draw of earlier releases, scene for scene
    plain = [ex.meta["scene"] for ex in world_examples(20, 16, 5, n_objects=(1, 4))]
    assert plain == [ex.meta["scene"] for ex in pool_examples(DataConfig(source="world", size=16, pool=20), 5)]
    for bad in ([1, 1], [1, -1, 0, 0], [0, 0, 0, 0], [1, float("inf"), 0, 0]):
        with pytest.raises(ValueError, match="n_objects_weights"):
            DataConfig(source="world", n_objects=(1, 4), n_objects_weights=bad)
    with pytest.raises(ValueError, match="without tags"):  # tags choose their own scenes: the weights would be lost
        DataConfig(source="world", tags=["counting"], n_objects_weights=[1, 1, 1, 1])
    triplets = pool_examples(DataConfig(source="triplets", size=16, pool=40, n_objects=(1, 2),
                                        n_objects_weights=[0, 1]), 5)
    assert {len(ex.meta["scene"]["objects"]) for ex in triplets} == {2}


def test_multi_stage_resume_reuses_finished_stages(tmp_path):
    from krea2.models.dit import PRESETS

    model = {**PRESETS["tiny-world"].to_dict(), "patch": 4}  # not inferable from shapes: read from config.json
    stage = {"steps": 2, "batch_size": 4, "save_every": 1, "data": {"source": "world", "size": 16, "pool": 16}}
    recipe = parse_recipe({"name": "two", "model": model, "stages": [{"name": "a", **stage}, {"name": "b", **stage}]})
    train_recipe(recipe, tmp_path / "r", progress=False)
    first = (tmp_path / "r" / "a" / "final" / "model.safetensors").read_bytes()
    (tmp_path / "r" / "b" / "final" / "model.safetensors").unlink()  # as if killed after b's last checkpoint
    final = train_recipe(recipe, tmp_path / "r", resume=True, progress=False)
    assert (tmp_path / "r" / "a" / "final" / "model.safetensors").read_bytes() == first
    assert json.loads((final / "config.json").read_text())["model"]["patch"] == 4


def test_transfer_copies_every_fitting_tensor_and_keeps_the_rest(tmp_path):
    """[model] transfer: a pixel model's body moves to a new patch/channel layout; embed and output stay fresh."""
    from krea2.models.checkpoint import save_random_checkpoint
    from krea2.models.dit import DiT, get_config
    from krea2.train.trainer import init_weights, transfer_weights

    src = save_random_checkpoint(tmp_path / "pixel", preset="tiny-world")
    cfg = {**get_config("tiny-world").__dict__, "channels": 16, "patch": 1}
    model = init_weights(DiT(get_config(cfg)))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    moved, kept = transfer_weights(model, str(src))
    from krea2.models.loading import load_dit

    source = load_dit(str(src / "model.safetensors"), get_config("tiny-world"))
    sd, own = source.state_dict(), model.state_dict()
    assert kept and moved == len(own) - len(kept)
    for k, v in own.items():
        if k in kept:
            assert sd.get(k) is None or sd[k].shape != v.shape, k
            assert torch.equal(v, fresh[k]), k
        else:
            assert torch.equal(v, sd[k]), k
    other = init_weights(DiT(get_config({**cfg, "features": 96, "txtdim": 48, "tdim": 24, "heads": 3, "kvheads": 1,
                                          "txtheads": 3, "txtkvheads": 3, "txtlayers": 5, "multiplier": 3})))
    with pytest.raises(Krea2Error, match="no tensor of that checkpoint fits"):
        transfer_weights(other, str(src))


@pytest.mark.parametrize("damage", ["truncate-metadata", "garble-extra"])
def test_damaged_training_state_is_a_one_line_error_naming_it(tmp_path, damage):
    recipe = load_recipe(write_recipe(tmp_path, steps=4))
    recipe.stages[0].save_every = 2
    train_recipe(recipe, tmp_path / "r", progress=False)
    (tmp_path / "r" / "a" / "final" / "model.safetensors").unlink()  # as if killed after the step-2 save
    state = tmp_path / "r" / "a" / "state"
    target = state / (".metadata" if damage == "truncate-metadata" else "extra.json")
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 3])
    with pytest.raises(Krea2Error, match=r"training state in .*state is damaged.*move it aside"):
        train_recipe(recipe, tmp_path / "r", resume=True, progress=False)
