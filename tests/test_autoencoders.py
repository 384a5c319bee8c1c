"""Autoencoders: tiny random configs of the real diffusers VAEs, loaded through specs, normalised as the releases."""

import pytest
import torch
from diffusers import AutoencoderKLFlux2, AutoencoderKLQwenImage
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline

from krea2.errors import Krea2Error
from krea2.models.autoencoders import load_autoencoder

MEAN = [0.5, -1.0, 0.25, 2.0]
STD = [2.0, 0.5, 1.5, 3.0]


@pytest.fixture(scope="module")
def qwen_image_root(tmp_path_factory):
    """A Qwen-Image-like folder: the VAE under vae/, as in the hub repo."""
    root = tmp_path_factory.mktemp("qwen-image")
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=MEAN, latents_std=STD)
    vae.save_pretrained(root / "vae")
    return root


@pytest.fixture(scope="module")
def flux2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux2-vae")
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                             layers_per_block=1)
    vae.bn.running_mean.copy_(torch.randn(16))  # non-trivial stats so the normalisation is visible
    vae.bn.running_var.copy_(torch.rand(16) * 3 + 0.5)
    vae.save_pretrained(path)
    return path


def images(b=2, h=16, w=16):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_qwen_image_normalises_per_channel(qwen_image_root):
    ae = load_autoencoder(f"qwen-image:{qwen_image_root}")
    assert (ae.channels, ae.compression) == (4, 2)
    assert load_autoencoder(f"qwen-image:{qwen_image_root / 'vae'}").channels == 4  # the VAE folder itself also works
    vae = AutoencoderKLQwenImage.from_pretrained(qwen_image_root / "vae").eval()
    mean, std = torch.tensor(MEAN).view(1, 4, 1, 1), torch.tensor(STD).view(1, 4, 1, 1)
    x = images()

    z = ae.encode(x)
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    with torch.no_grad():
        posterior_mean = vae.encode(x[:, :, None]).latent_dist.mean[:, :, 0]
        torch.testing.assert_close(z, (posterior_mean - mean) / std)
        want = vae.decode((z * std + mean)[:, :, None]).sample[:, :, 0].clamp(-1, 1)
        out = ae.decode(z)
    assert out.shape == x.shape
    torch.testing.assert_close(out, want)


def test_flux2_follows_the_diffusers_pipeline(flux2_dir):
    ae = load_autoencoder(f"flux2:{flux2_dir}")
    assert (ae.channels, ae.compression) == (4, 2)
    vae = AutoencoderKLFlux2.from_pretrained(flux2_dir).eval()
    bn_mean = vae.bn.running_mean.view(1, -1, 1, 1)
    bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    x = images()

    z = ae.encode(x)
    assert z.shape == (2, 4, 8, 8)
    with torch.no_grad():  # Flux2Pipeline._encode_vae_image, then the pipeline's decode path
        packed = (Flux2Pipeline._patchify_latents(vae.encode(x).latent_dist.mode()) - bn_mean) / bn_std
        # our latent, patchified 2x2 like the DiT does, is exactly the pipeline's latent
        torch.testing.assert_close(Flux2Pipeline._patchify_latents(z), packed)
        want = vae.decode(Flux2Pipeline._unpatchify_latents(packed * bn_std + bn_mean)).sample.clamp(-1, 1)
        torch.testing.assert_close(ae.decode(z), want)


def test_decode_clamps(qwen_image_root, flux2_dir):
    for spec in (f"qwen-image:{qwen_image_root}", f"flux2:{flux2_dir}"):
        ae = load_autoencoder(spec)
        last_conv = [m for m in ae.vae.decoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))][-1]
        last_conv.weight.data *= 100  # drive the raw RGB far outside [-1, 1]
        out = ae.decode(torch.randn(1, ae.channels, 8, 8, generator=torch.Generator().manual_seed(0)))
        assert out.abs().max() == 1 and (out.abs() == 1).float().mean() > 0.3 and out.shape[-1] == 8 * ae.compression
    assert load_autoencoder("identity").decode(torch.tensor([[-3.0, 0.5, 7.0]])).tolist() == [[-1.0, 0.5, 1.0]]


def test_identity_is_pixels():
    ae = load_autoencoder("identity")
    assert (ae.channels, ae.compression) == (3, 1)
    x = images()
    assert torch.equal(ae.encode(x), x) and torch.equal(ae.decode(ae.encode(x)), x)


def test_errors_are_one_line(tmp_path, qwen_image_root):
    for spec in (f"qwen-image:{tmp_path}/nope", f"flux2:{tmp_path}", "qwen-image:no-such-org/no-such-vae", "sdxl"):
        with pytest.raises(Krea2Error) as e:
            load_autoencoder(spec)
        assert "\n" not in str(e.value)
    with pytest.raises(Krea2Error, match="KREA2_AUTOENCODER"):
        load_autoencoder(f"qwen-image:{tmp_path}/nope")
    with pytest.raises(Krea2Error, match="multiples of 2"):
        load_autoencoder(f"qwen-image:{qwen_image_root}").encode(images(h=15))
