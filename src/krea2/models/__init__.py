"""Models: the DiT (released architecture), text encoders, autoencoders, loading and conversion."""

from krea2.models.dit import PRESETS, DiT, DiTConfig, get_config

__all__ = ["DiT", "DiTConfig", "PRESETS", "get_config"]
