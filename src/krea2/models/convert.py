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
