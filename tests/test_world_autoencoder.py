"""The world autoencoder: training (`krea2 train-ae`), exact resume, loading with latent normalisation, evaluation."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from krea2 import cli
from krea2.errors import Krea2Error
from krea2.models.autoencoders import LATENT_STATS, WorldAutoencoder, load_autoencoder
from krea2.train import autoencoder as tae
from krea2.train.config import parse_overrides

cli._mount()
TINY = dict(steps=4, batch_size=4, sizes=(32,), width=16, enc_blocks=1, dec_blocks=1, warmup=1, save_every=2,
            sample_every=4, log_every=1, eval_images=5, emoji_every=0)


def _weights(folder):
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def test_trained_autoencoder_loads_with_its_latent_normalisation(tmp_path):
    final = tae.train_autoencoder(tae.AEConfig(**TINY), tmp_path / "run", progress=False)
    ae = load_autoencoder(f"world:{final}")
    assert isinstance(ae, WorldAutoencoder) and ae.channels == 32 and ae.compression == 4
    x, _ = tae.world_renders(6, 32, seed=3)
    z = ae.encode(x)
    assert z.shape == (6, 32, 8, 8)
    stats = json.loads((final / LATENT_STATS).read_text())
    raw = ae.vae.encode(x)
    mean = torch.tensor(stats["latents_mean"]).view(1, -1, 1, 1)
    std = torch.tensor(stats["latents_std"]).view(1, -1, 1, 1)
    torch.testing.assert_close(z, (raw - mean) / std)
    torch.testing.assert_close(ae.decode(z), ae.vae.decode(raw).clamp(-1, 1), atol=1e-5, rtol=1e-5)
    # the stored stats are applied as stored: on the renders they were measured on, zero mean and unit std
    zs = ae.encode(tae.world_renders(512, 32, seed=424242 + 32)[0])
    torch.testing.assert_close(zs.transpose(0, 1).flatten(1).mean(1), torch.zeros(32), atol=1e-3, rtol=0)
    torch.testing.assert_close(zs.transpose(0, 1).flatten(1).std(1), torch.ones(32), atol=1e-3, rtol=0)


def test_fresh_autoencoder_is_the_best_linear_code():
    """Before training, the residual nets are zero and encode/decode is the PCA of 4x4 patches: decoding the code of
    a render equals projecting its patches onto the top principal directions (and nothing better is linear)."""
    ae = tae.build_ae(tae.AEConfig(**TINY))
    x, _ = tae.world_renders(8, 32, seed=5)
    u = torch.nn.functional.pixel_unshuffle(x, 4)
    w, b = ae.dec_linear.weight[:, :, 0, 0], ae.dec_linear.bias  # (48, c) orthonormal columns, patch mean
    proj = torch.einsum("pc,qc,bqhw->bphw", w, w, u - b.view(1, -1, 1, 1)) + b.view(1, -1, 1, 1)
    torch.testing.assert_close(ae.decode(ae.encode(x)), torch.nn.functional.pixel_shuffle(proj, 4), atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(w.T @ w, torch.eye(32), atol=1e-5, rtol=0)
    # the span is the top-32 principal subspace of the 4x4 patches build_ae saw (projectors agree; signs do not matter)
    cfg = tae.AEConfig(**TINY)
    seen = torch.cat([torch.nn.functional.pixel_unshuffle(tae.world_renders(256, s, seed=cfg.seed + s)[0], 4)
                      .permute(0, 2, 3, 1).reshape(-1, 48) for s in cfg.sizes])
    top = torch.linalg.svd(seen - seen.mean(0), full_matrices=False).Vh[:32]
    torch.testing.assert_close(w @ w.T, top.T @ top, atol=1e-4, rtol=0)
    assert tae.psnr(ae.decode(ae.encode(x)), x) > 25  # PCA-32 of 4x4 patches: ~33 dB at 32 px


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = tae.AEConfig(**TINY)
    straight = tae.train_autoencoder(cfg, tmp_path / "a", progress=False)

    real = tae.reconstruction_loss
    calls = {"n": 0}

    def crash_at_step_3(y, x, w):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # after the state of step 2 was saved
        return real(y, x, w)

    monkeypatch.setattr(tae, "reconstruction_loss", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        tae.train_autoencoder(cfg, tmp_path / "b", progress=False)
    monkeypatch.setattr(tae, "reconstruction_loss", real)
    with pytest.raises(Krea2Error, match="--resume"):
        tae.train_autoencoder(cfg, tmp_path / "b", progress=False)
    resumed = tae.train_autoencoder(cfg, tmp_path / "b", resume=True, progress=False)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((straight / LATENT_STATS).read_text()) == json.loads((resumed / LATENT_STATS).read_text())
    changed = tae.AEConfig(**{**TINY, "lr": 5e-4})
    with pytest.raises(Krea2Error, match="different config.*lr"):
        tae.train_autoencoder(changed, tmp_path / "b", resume=True, progress=False)


def test_reconstruction_report_reads_exact_and_blurred_reconstructions():
    ident = tae.reconstruction_report(lambda x: x, lambda z: z, 32, 20)
    assert ident["accuracy"] == 1.0 and ident["psnr"] > 90
    # a 3x3 box blur: what a soft autoencoder does to edges and grain; the checker must notice
    blur = torch.nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    soft = tae.reconstruction_report(lambda x: x, blur, 32, 20)
    assert soft["accuracy"] < 0.8 and soft["psnr"] < 30
    assert soft["styles"]["grainy"]["accuracy"] < 0.5  # averaging grain makes the fill look flat


def test_overrides_and_bad_input():
    cfg = parse_overrides(tae.AEConfig(), ["steps=10", "sizes=32,64", "lr=0.002"])
    assert (cfg.steps, cfg.sizes, cfg.lr) == (10, (32, 64), 0.002)
    with pytest.raises(Krea2Error, match="key one of"):
        parse_overrides(tae.AEConfig(), ["stepz=10"])
    with pytest.raises(Krea2Error, match="is not a int"):
        parse_overrides(tae.AEConfig(), ["steps=many"])
    with pytest.raises(Krea2Error, match="sizes must be world sizes"):
        parse_overrides(tae.AEConfig(), ["sizes=30"])
    for bad, needle in (("latent_channels=64", "<= 48"), ("width=100", "multiple of 8"), ("seed=-1", ">= 0"),
                        ("lr=nan", "finite lr"), ("latent_noise=inf", "finite")):
        with pytest.raises(Krea2Error, match=needle):
            parse_overrides(tae.AEConfig(), [bad])


def test_cli_errors_are_one_line(tmp_path, cli_error):
    code, err = cli_error("eval", "ae", "--vae", f"world:{tmp_path}", "--size", "32")
    assert code == 2 and "no world autoencoder" in err and "Traceback" not in err
    code, err = cli_error("eval", "ae", "--vae", "identity", "--size", "31")
    assert code == 2 and "--size 31" in err
    code, err = cli_error("train-ae", "--out", tmp_path / "r", "--set", "steps=0")
    assert code == 2 and "steps must be >= 1" in err
    r = CliRunner().invoke(cli.app, ["eval", "ae", "--vae", "identity", "--size", "32", "--n", "4"])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1] == "checker accuracy 1.000"
