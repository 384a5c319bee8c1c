"""Rectified flow in the release's convention: x_t = (1 − t)·x0 + t·ε, target v* = ε − x0, t = 1 is noise."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from krea2.sampling import SamplingConfig, joint_inputs, resolution_mu
from krea2.train.config import ObjectiveConfig
from krea2.train.data import Batch
from krea2.train.objectives.irepa import IREPA


def shifted_timesteps(n: int, mu: float, mean: float = 0.0, std: float = 1.0, generator=None,
                      device="cpu") -> Tensor:
    """Shifted logit-normal: u ~ N(mean, std²), t0 = sigmoid(u), t = e^mu·t0 / (e^mu·t0 + 1 − t0), inside (0, 1)."""
    u = torch.randn(n, generator=generator, device=device) * std + mean
    t0 = torch.sigmoid(u)
    e = math.exp(mu)
    return (e * t0 / (e * t0 + 1 - t0)).clamp(1e-5, 1 - 1e-5)


def flow_matching_loss(v_pred: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """Mean squared velocity error over image tokens and channels, uniform weight."""
    return (v_pred.float() - (noise - x0).float()).square().mean()


class FlowMatching(nn.Module):
    """The pretraining/midtraining objective; owns the optional iREPA projector (never exported)."""

    def __init__(self, cfg: ObjectiveConfig, model, sampling: SamplingConfig, pixels_per_token: int, stage_steps: int):
        super().__init__()
        self.cfg, self.sampling, self.pixels_per_token = cfg, sampling, pixels_per_token
        self.irepa = IREPA.from_config(cfg, model.cfg.features, stage_steps) if cfg.irepa else None

    def mu(self, n_tokens: int) -> float:
        return resolution_mu(n_tokens, self.sampling, self.pixels_per_token) + self.cfg.shift_offset

    def forward(self, model, batch: Batch, step: int, generator: torch.Generator) -> tuple[Tensor, dict]:
        B, N, _ = batch.x0.shape
        device = batch.x0.device
        t = shifted_timesteps(B, self.mu(N), self.cfg.logit_mean, self.cfg.logit_std, generator, device)
        noise = torch.randn(batch.x0.shape, generator=generator, device=device)
        xt = (1 - t)[:, None, None] * batch.x0 + t[:, None, None] * noise
        pos, mask = joint_inputs(batch.txtmask, batch.gh, batch.gw)
        weight = self.irepa.weight(step) if self.irepa is not None else 0.0
        if weight > 0:
            v, hidden = model(xt, batch.context, t, pos, mask, return_hidden=self.irepa.layer)
        else:
            v = model(xt, batch.context, t, pos, mask)
        loss = flow_matching_loss(v, batch.x0, noise)
        metrics = {"loss/flow": loss.detach()}
        if weight > 0:
            align = self.irepa(hidden, batch.images, batch.gh, batch.gw)
            metrics["loss/irepa"] = align.detach()
            loss = loss + weight * align
        return loss, metrics
