"""Conversion between our (the released) layout and diffusers' `Krea2Transformer2DModel`.

The tensor renames are diffusers' own single-file converter; we only map the config and write the folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from krea2.errors import Krea2Error
from krea2.models.dit import DiT, DiTConfig, swiglu_hidden


def diffusers_config(cfg: DiTConfig) -> dict:
    if cfg.bias:
        raise Krea2Error("diffusers' Krea2Transformer2DModel has no biases in blocks; cannot export a bias=True model")
    return dict(
        in_channels=cfg.token_dim, num_layers=cfg.layers, attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kvheads,
        intermediate_size=swiglu_hidden(cfg.features, cfg.multiplier), timestep_embed_dim=cfg.tdim,
        text_hidden_dim=cfg.txtdim, num_text_layers=cfg.txtlayers, text_num_attention_heads=cfg.txtheads,
        text_num_key_value_heads=cfg.txtkvheads, text_intermediate_size=swiglu_hidden(cfg.txtdim, cfg.multiplier),
        num_layerwise_text_blocks=cfg.txtblocks, num_refiner_text_blocks=cfg.txtblocks,
        axes_dims_rope=tuple(cfg.rope_axes), rope_theta=float(cfg.theta), norm_eps=1e-5,
    )


def to_diffusers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_krea2_transformer_checkpoint_to_diffusers

    return convert_krea2_transformer_checkpoint_to_diffusers(dict(sd))


def to_diffusers(model: DiT):
    """A `diffusers.Krea2Transformer2DModel` holding this model's weights."""
    from diffusers import Krea2Transformer2DModel

    with torch.device("meta"):
        out = Krea2Transformer2DModel(**diffusers_config(model.cfg))
    sd = to_diffusers_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
    out.load_state_dict(sd, strict=True, assign=True)
    return out.eval()


def export_diffusers(model: DiT, out_dir: str | Path, dtype: torch.dtype | None = None,
                     overwrite: bool = False) -> Path:
    """Write a folder that `Krea2Transformer2DModel.from_pretrained(out_dir)` loads, published whole (crash-safe).

    Raises Krea2Error if out_dir is a file, or a non-empty folder and overwrite is False (nothing is replaced unasked).
    """
    from krea2.models.checkpoint import publish_dir

    tf = to_diffusers(model)
    if dtype is not None:
        tf = tf.to(dtype)
    return publish_dir(out_dir, lambda tmp: tf.save_pretrained(tmp, safe_serialization=True), overwrite=overwrite)


# the shift Krea2Pipeline pins for a distilled checkpoint (`is_distilled`); any other pinned mu has no diffusers form
DIFFUSERS_DISTILLED_MU = 1.15


def diffusers_pipeline_problems(info) -> list[str]:
    """What diffusers' Krea2Pipeline cannot express about a checkpoint (empty: it can be exported whole)."""
    from krea2.models.text_encoders import parse_spec

    problems = []
    te_kind = parse_spec(info.text_encoder)[0]
    if te_kind != "qwen3-vl":
        problems.append(f"its text encoder is {info.text_encoder!r}; Krea2Pipeline runs Qwen3-VL only")
    ae_kind = (info.autoencoder or "qwen-image").partition(":")[0]
    if ae_kind != "qwen-image":
        problems.append(f"its autoencoder is {info.autoencoder!r}; Krea2Pipeline decodes with AutoencoderKLQwenImage "
                        "only (no identity/pixel or world autoencoder)")
    mu = info.sampling.mu
    if mu is not None and mu != DIFFUSERS_DISTILLED_MU:
        problems.append(f"its sampling pins mu = {mu}; Krea2Pipeline pins {DIFFUSERS_DISTILLED_MU} (is_distilled) "
                        "or computes mu from the resolution")
    return problems


def export_diffusers_pipeline(checkpoint: str, out_dir: str | Path, dtype: torch.dtype | None = None,
                              overwrite: bool = False) -> Path:
    """Write a full diffusers folder (model_index.json, transformer, vae, text_encoder, tokenizer, scheduler) that
    `diffusers.Krea2Pipeline.from_pretrained(out_dir)` loads offline, published whole (crash-safe).

    The scheduler is FlowMatchEulerDiscreteScheduler with the checkpoint's resolution rule (base/max shift y1/y2 at
    (minres/px per token)² and (maxres/px per token)² image tokens), or `is_distilled` when mu is pinned at 1.15;
    the text encoder's layer taps become `text_encoder_select_layers`. Steps and guidance are call arguments of
    the pipeline (`num_inference_steps`, `guidance_scale`, the same Krea convention). Raises Krea2Error, naming
    each reason, for a checkpoint the pipeline cannot express (see `diffusers_pipeline_problems`) or a non-empty
    out_dir without overwrite.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Krea2Pipeline

    from krea2.models.autoencoders import load_autoencoder
    from krea2.models.checkpoint import publish_dir, resolve_checkpoint
    from krea2.models.loading import load_dit
    from krea2.models.text_encoders import load_text_encoder

    info = resolve_checkpoint(checkpoint)
    problems = diffusers_pipeline_problems(info)
    if problems:
        raise Krea2Error(f"diffusers' Krea2Pipeline cannot run {checkpoint}: " + "; ".join(problems) +
                         ". Export the transformer alone with --to diffusers")
    model = load_dit(info.model_path, info.model, dtype=torch.float32)
    text_encoder = load_text_encoder(info.text_encoder)
    vae = load_autoencoder(info.autoencoder).vae
    s, ppt = info.sampling, vae.spatial_compression_ratio * model.cfg.patch
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, time_shift_type="exponential", base_shift=s.y1, max_shift=s.y2,
        base_image_seq_len=(s.minres // ppt) ** 2, max_image_seq_len=(s.maxres // ppt) ** 2)
    transformer = to_diffusers(model)
    modules = [transformer, vae, text_encoder.model.model]  # Qwen3VLForConditionalGeneration.model: Qwen3VLModel
    if dtype is not None:
        modules = [m.to(dtype) for m in modules]
    pipe = Krea2Pipeline(scheduler=scheduler, vae=modules[1], text_encoder=modules[2],
                         tokenizer=text_encoder.tokenizer, transformer=modules[0],
                         text_encoder_select_layers=list(text_encoder.layers),
                         is_distilled=s.mu == DIFFUSERS_DISTILLED_MU, patch_size=model.cfg.patch)
    return publish_dir(out_dir, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True), overwrite=overwrite)
