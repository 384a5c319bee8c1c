"""`krea2 export CHECKPOINT DIR --to diffusers-pipeline`: a full Krea2Pipeline folder that diffusers loads offline
and samples with, giving `krea2 generate`'s image; and the clear refusal of what diffusers cannot express."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderKLQwenImage, Krea2Pipeline
from test_text_encoders import qwen_dir  # noqa: F401  (a module fixture: a tiny random Qwen3-VL + tokenizer)

from krea2.errors import Krea2Error
from krea2.models.checkpoint import write_checkpoint_dir
from krea2.models.convert import export_diffusers_pipeline
from krea2.models.dit import DiT, get_config
from krea2.pipeline import load_pipeline

PROMPT = "a red cat on a blue mat"


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-image-vae")
    torch.manual_seed(1)
    AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                           latents_mean=[0.5, -1.0, 0.25, 2.0], latents_std=[2.0, 0.5, 1.5, 3.0]).save_pretrained(root)
    return root


def checkpoint(path, qwen_dir, vae_dir, mu=None):  # noqa: F811
    cfg = replace(get_config("tiny"), txtdim=16, txtlayers=12)  # the 12 release taps of a 16-wide Qwen3-VL
    torch.manual_seed(0)
    model = DiT(cfg)
    with torch.no_grad():  # zero-initialised output and modulations would make every image the same
        for p in model.parameters():
            p.normal_(0, 0.05)
    sampling = {"steps": 4, "guidance": 1.5, "mu": mu, "minres": 32, "maxres": 160}
    return write_checkpoint_dir(path, model, f"qwen3-vl:{qwen_dir}", f"qwen-image:{vae_dir}", sampling, 32)


@pytest.mark.parametrize("mu,guidance", [(None, 1.5), (1.15, 0.0)])
def test_exported_pipeline_samples_the_image_krea2_generate_gives(tmp_path, qwen_dir, vae_dir, mu, guidance,  # noqa: F811
                                                                  monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = checkpoint(tmp_path / "ckpt", qwen_dir, vae_dir, mu)
    out = export_diffusers_pipeline(str(ckpt), tmp_path / "pipe")
    assert {"model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler"} <= {
        p.name for p in out.iterdir()}
    pipe = Krea2Pipeline.from_pretrained(out, local_files_only=True)
    assert pipe.config.is_distilled == (mu == 1.15)
    theirs = pipe(PROMPT, height=32, width=32, num_inference_steps=4, guidance_scale=guidance,
                  generator=torch.Generator().manual_seed(7), output_type="pt").images
    ours_pipe = load_pipeline(str(ckpt))
    ours = ours_pipe.generate([PROMPT], ours_pipe.sampling_config(guidance=guidance), seed=7)
    assert theirs.shape == ours.shape == (1, 3, 32, 32)
    # float32 throughout; the schedules differ only in float64 vs float32 arithmetic of the same grid (max 2.1e-7)
    torch.testing.assert_close(theirs.float(), (ours + 1) / 2, atol=1e-5, rtol=0)  # measured: 2.1e-7
    assert float(ours.std()) > 0.05  # not a blank image that would match anything


def test_what_diffusers_cannot_express_is_refused(tmp_path, qwen_dir, vae_dir, cli_error):  # noqa: F811
    with pytest.raises(Krea2Error, match="Qwen3-VL only.*identity/pixel"):
        export_diffusers_pipeline("world", tmp_path / "w")
    ckpt = checkpoint(tmp_path / "ckpt", qwen_dir, vae_dir, mu=0.8)
    with pytest.raises(Krea2Error, match="pins mu = 0.8"):
        export_diffusers_pipeline(str(ckpt), tmp_path / "m")
    code, err = cli_error("export", "world", tmp_path / "cli", "--to", "diffusers-pipeline")
    assert code != 0 and "Krea2Pipeline cannot run world" in err and "--to diffusers" in err
    assert "Traceback" not in err and not (tmp_path / "cli").exists()
