"""Pipeline.generate returns tensors: the same numbers as a direct euler_sample call, no output, "" encoded once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from krea2.errors import Krea2Error
from krea2.models.checkpoint import save_random_checkpoint
from krea2.pipeline import image_grid, load_pipeline, to_pil
from krea2.sampling import Conditioning, euler_sample, initial_noise, patchify, schedule, unpatchify


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    # tiny-world: identity autoencoder, patch 2 -> one token is 2 px; native 32 px; minilm text encoder
    return load_pipeline(str(save_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")))


def test_generate_equals_a_direct_euler_sample_call(pipe):
    prompts, seed = ["a red square", "two blue circles on green", ""], 7
    cfg = pipe.sampling_config(steps=3, guidance=2.0)
    out = pipe.generate(prompts, cfg, seed=seed)

    te, model, p = pipe.text_encoder, pipe.model, pipe.model.cfg.patch
    ctx, mask = te.encode(prompts)
    uctx, umask = te.encode([""])
    g = 32 // p
    cond = Conditioning.build(ctx, mask, g, g)
    uncond = Conditioning.build(uctx.expand(3, -1, -1, -1), umask.expand(3, -1), g, g)
    x = euler_sample(model, patchify(initial_noise(3, 3, 32, 32, seed), p), schedule(g * g, cfg, p), cond, uncond,
                     cfg.guidance)
    ref = pipe.autoencoder.decode(unpatchify(x, p, 32, 32))
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out, ref)
    assert out.min() >= -1 and out.max() <= 1 and out.std() > 0

    # image i uses seed + i whatever the chunking (text padding differs per chunk: float rounding only)
    chunked = pipe.generate(prompts, cfg, seed=seed, batch_size=1)
    assert (chunked - out).abs().max() < 1e-4
    assert torch.equal(pipe.generate(prompts[1:2], cfg, seed=seed + 1), chunked[1:2])


def test_empty_prompt_is_encoded_once_per_pipeline(pipe, monkeypatch):
    calls = []
    encode = pipe.text_encoder.encode
    monkeypatch.setattr(pipe.text_encoder, "encode", lambda prompts: calls.append(list(prompts)) or encode(prompts))
    monkeypatch.setattr(pipe, "_empty", None)
    cfg = pipe.sampling_config(steps=1)
    pipe.generate(["a", "b", "c", "d", "e"], cfg, batch_size=2)  # three chunks
    pipe.generate(["f"], cfg)
    assert calls.count([""]) == 1 and len(calls) == 5
    calls.clear()
    pipe.generate(["a"], pipe.sampling_config(steps=1, guidance=0.0))  # no unconditional pass at all
    assert calls == [["a"]]


def test_no_output_progress_callback_and_silent_size_snapping(pipe, capsys):
    seen = []
    out = pipe.generate(["x", "y", "z"], pipe.sampling_config(steps=2), batch_size=2, width=31, height=20,
                        progress=lambda done, total: seen.append((done, total)))
    assert out.shape == (3, 3, 20, 32)  # 31 -> 32 (a multiple of 2 px), 20 kept
    assert seen == [(i, 4) for i in range(1, 5)]  # 2 chunks x 2 steps
    assert capsys.readouterr() == ("", "")
    assert pipe.snap_size(31, None) == (32, 32)


def test_sampling_config_and_errors(pipe):
    cfg = pipe.sampling_config(steps=3, guidance=None, mu=0.5)
    assert (cfg.steps, cfg.guidance, cfg.mu, cfg.minres) == (3, pipe.sampling.guidance, 0.5, pipe.sampling.minres)
    assert pipe.sampling_config() == pipe.sampling
    cases = [(lambda: pipe.sampling_config(stepz=3), "unknown sampling setting"),
             (lambda: pipe.generate([]), "no prompts"),
             (lambda: pipe.generate(["x"], batch_size=0), "batch_size"),
             (lambda: pipe.generate(["x"], width=-4), "width must be a positive number of pixels")]
    for fn, needle in cases:
        with pytest.raises(Krea2Error, match=needle) as e:
            fn()
        assert "\n" not in str(e.value)


def test_to_pil_and_grid_outside_the_pipeline():
    images = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 4).expand(2, 3, 3, 4).clone()
    images[1] *= -1
    pil = to_pil(images)
    assert [im.size for im in pil] == [(4, 3), (4, 3)] and pil[0].mode == "RGB"
    assert np.asarray(pil[0])[0].tolist() == [[0] * 3, [128] * 3, [255] * 3, [255] * 3]  # 0 -> 127.5 -> 128
    assert np.asarray(pil[1])[0].tolist() == [[255] * 3, [128] * 3, [0] * 3, [0] * 3]
    grid = image_grid(images, cols=2)
    assert grid.size == (2 * (4 + 2) + 2, 3 + 4)
    assert np.array_equal(np.asarray(grid), np.asarray(image_grid(pil, cols=2)))
    with pytest.raises(Krea2Error, match="no images"):
        image_grid([])

