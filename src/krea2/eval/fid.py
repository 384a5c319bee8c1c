"""Frechet distance between feature sets (FID), here on the project's world encoder instead of Inception."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(feats.detach().cpu() if isinstance(feats, torch.Tensor) else feats, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"FID needs features of shape (N >= 2, D), got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(s1 + s2 - 2 (s1 s2)^1/2), with tr (s1 s2)^1/2 = sum sqrt eig(s1^1/2 s2 s1^1/2).

    The symmetric form needs only eigh (no scipy) and stays real for singular, rank-deficient covariances.
    """
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def fid(feats_a, feats_b) -> float:
    """FID between two (N, D) feature sets."""
    return frechet_distance(*feature_stats(feats_a), *feature_stats(feats_b))


@torch.no_grad()
def world_features(images, batch: int = 128) -> np.ndarray:
    """Pooled world-encoder features of images (uint8 arrays or PIL), (N, D)."""
    from krea2.eval.world_encoder import to_tensor

    encoder = _encoder()
    return np.concatenate([encoder.pooled(to_tensor(images[i:i + batch])).numpy()
                           for i in range(0, len(images), batch)])


@functools.lru_cache(maxsize=1)
def _encoder():
    from krea2.eval.world_encoder import load_world_encoder

    return load_world_encoder()


@functools.lru_cache(maxsize=8)
def world_reference_stats(size: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Feature statistics of n fresh world renders (the 'real' set), cached per process."""
    from krea2.data.world import world_examples

    return feature_stats(world_features([e.image for e in world_examples(n, size, seed)]))


def fid_vs_world(images: Sequence, size: int, n_reference: int = 512, seed: int = 1234) -> float:
    """FID of generated images against world renders at side `size` (raises FileNotFoundError without weights)."""
    generated = feature_stats(world_features(list(images)))
    return frechet_distance(*generated, *world_reference_stats(size, n_reference, seed))
