"""Parity with the official release: every fixture folder, velocity, schedule and sampled tokens."""

import json

import pytest
import torch
from conftest import REFERENCE_DIR, fixture_dirs
from safetensors.torch import load_file

from krea2.models.dit import DiT, DiTConfig
from krea2.sampling import Conditioning, SamplingConfig, euler_sample, patchify, schedule

FIXTURES = fixture_dirs()
pytestmark = pytest.mark.skipif(not FIXTURES, reason=f"no reference fixtures under {REFERENCE_DIR}")


def load_fixture(d):
    cfg = json.loads((d / "config.json").read_text())
    model = DiT(DiTConfig.from_dict(cfg["model"]))
    model.load_state_dict(load_file(d / "weights.safetensors"), strict=True)
    return cfg, model.eval(), load_file(d / "inputs.safetensors"), load_file(d / "outputs.safetensors")


def sampling_config(s: dict) -> SamplingConfig:
    return SamplingConfig(steps=s["steps"], guidance=s["guidance"], minres=s["minres"], maxres=s["maxres"],
                          y1=s["y1"], y2=s["y2"], mu=s.get("mu"))


@pytest.mark.parametrize("d", FIXTURES, ids=[d.name for d in FIXTURES])
def test_velocity(d):
    _, model, i, o = load_fixture(d)
    with torch.no_grad():
        v = model(i["img_tokens"], i["context"], i["t"], i["pos"], i["mask"].bool())
    assert v.shape == o["velocity"].shape
    assert (v - o["velocity"]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("d", FIXTURES, ids=[d.name for d in FIXTURES])
def test_patchify_matches_fixture(d):
    cfg, _, i, _ = load_fixture(d)
    assert torch.equal(patchify(i["latent"], cfg["model"]["patch"]), i["img_tokens"])


@pytest.mark.parametrize("d", FIXTURES, ids=[d.name for d in FIXTURES])
def test_schedule_exact(d):
    cfg, _, i, o = load_fixture(d)
    s, p = cfg["sampling"], cfg["model"]["patch"]
    n_tokens = i["img_tokens"].shape[1]
    ts = schedule(n_tokens, sampling_config(s), pixels_per_token=s["ae_compression"] * p)
    assert ts.dtype == torch.float64
    assert torch.equal(ts, o["schedule"])


@pytest.mark.parametrize("d", FIXTURES, ids=[d.name for d in FIXTURES])
def test_sampled_tokens(d):
    cfg, model, i, o = load_fixture(d)
    s, p = cfg["sampling"], cfg["model"]["patch"]
    ts = schedule(i["img_tokens"].shape[1], sampling_config(s), pixels_per_token=s["ae_compression"] * p)
    cond = Conditioning(i["context"], i["pos"], i["mask"].bool())
    uncond = Conditioning(i["uncond_context"], i["uncond_pos"], i["uncond_mask"].bool())
    x = euler_sample(model, i["img_tokens"], ts, cond, uncond, s["guidance"])
    assert (x - o["sampled_tokens"]).abs().max().item() <= 1e-5


def test_released_sampling_presets_and_mu_table():
    from krea2.sampling import resolution_mu, sampling_preset

    raw, turbo = sampling_preset("raw"), sampling_preset("turbo")
    assert (raw.steps, raw.guidance, raw.mu) == (52, 3.5, None)
    assert (turbo.steps, turbo.guidance, turbo.mu) == (8, 0.0, 1.15)
    assert sampling_preset("raw", steps=28).steps == 28
    # SYSTEM.md 3.4: 256² -> 0.500, 512² -> 0.581, 1024² -> 0.906, 1280² -> 1.150
    for tokens, mu in ((256, 0.500), (1024, 0.581), (4096, 0.906), (6400, 1.150)):
        assert abs(resolution_mu(tokens, raw) - mu) < 1e-3
    ts = schedule(4096, turbo)
    assert len(ts) == 9 and ts[0] == 1 and ts[-1] == 0
