import json

import numpy as np
import pytest
import torch

from krea2.data import world
from krea2.eval.fid import fid, fid_vs_world, world_features
from krea2.eval.world_encoder import (
    ASSET,
    accuracy,
    load_world_encoder,
    save_world_encoder,
    to_tensor,
    train_world_encoder,
)


@pytest.fixture(scope="module")
def encoder():
    return load_world_encoder()


@pytest.mark.parametrize("size", [16, 32, 64])
def test_patch_features_on_a_grid_at_any_size(encoder, size):
    x = to_tensor([e.image for e in world.world_examples(3, size, seed=size)])
    assert x.shape == (3, 3, size, size) and -1 <= x.min() and x.max() <= 1
    f = encoder.features(x)
    assert f.shape == (3, encoder.cfg.dim, size // 4, size // 4)
    assert torch.allclose(encoder.pooled(x), f.mean((2, 3)), atol=1e-6)
    assert not any(p.requires_grad for p in encoder.parameters())


def test_shipped_encoder_reads_the_world(encoder):
    shipped = json.loads(ASSET.with_suffix(".json").read_text())["val_accuracy"]
    fresh = accuracy(encoder, sizes=(32,), n=96, seed=4321)
    for acc in (shipped, fresh):
        assert acc["background"] >= 0.98 and acc["color"] >= 0.95 and acc["shape"] >= 0.9, acc
        assert acc["style"] >= 0.85, acc


def test_fid_separates_world_renders_from_broken_images():
    n = 256
    real = [e.image for e in world.world_examples(n, 32, seed=1)]
    # same distribution, other samples: small; swapped colour channels, washed-out images or only single-object
    # scenes: far
    near = fid_vs_world(real, 32, n_reference=n, seed=2)
    swapped = fid_vs_world([im[..., ::-1] for im in real], 32, n_reference=n, seed=2)
    washed = fid_vs_world([(im // 2 + 64).astype(np.uint8) for im in real], 32, n_reference=n, seed=2)
    single = fid_vs_world([e.image for e in world.world_examples(n, 32, seed=3, n_objects=(1, 1))], 32,
                          n_reference=n, seed=2)
    assert 0 < near < min(swapped, washed, single) / 2.5, (near, swapped, washed, single)
    f = world_features(real[:10])
    assert f.shape == (10, 96)
    assert fid(f, f) == pytest.approx(0, abs=1e-2)  # rank 9 of 96: square roots of rounding-level eigenvalues


def test_training_runs_and_round_trips(tmp_path):
    model, info = train_world_encoder(steps=3, batch=4, sizes=(16,), log_every=0, val_n=8)
    assert set(info["val_accuracy"]) >= {"background", "style", "shape", "color", "size"}
    path = save_world_encoder(model, info, tmp_path / "enc.safetensors")
    again = load_world_encoder(path)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(again.features(x), model.features(x))
