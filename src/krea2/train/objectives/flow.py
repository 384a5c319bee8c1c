"""Rectified flow in the release's convention: x_t = (1 − t)·x0 + t·ε, target v* = ε − x0, t = 1 is noise.

Follows minRF (cloneofsimo/minRF) and SD3's shifted logit-normal timesteps; the pretraining, midtraining and SFT
objective (SFT is this objective on curated rows from a stage `init`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from krea2.sampling import joint_inputs, resolution_mu
from krea2.train.data import Batch
from krea2.train.objectives.base import LossObjective, Models, ObjectiveEnv
from krea2.train.objectives.irepa import IREPA, IREPAConfig


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


def per_sample_error(v_pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per sample (B,) of velocities (B, N, D) against a target of the same shape."""
    return (v_pred.float() - target.float()).square().flatten(1).mean(1)


def velocity_error(v_pred: Tensor, x0: Tensor, noise: Tensor) -> Tensor:
    """Per-sample mean squared velocity error (B,) against ε − x0: the flow loss before the batch mean."""
    return per_sample_error(v_pred, noise - x0)


@dataclass
class TimestepConfig:
    """Training timesteps: shifted logit-normal around the resolution rule's mu (+ shift_offset)."""

    shift_offset: float = 0.0
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self):
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")


@dataclass
class FlowConfig(TimestepConfig):
    name: str = "flow"
    irepa: IREPAConfig | bool | None = None

    def __post_init__(self):
        super().__post_init__()
        self.irepa = IREPAConfig() if self.irepa is True else (self.irepa or None)

    def check(self, model, steps: int | None = None) -> None:
        if self.irepa is not None:
            self.irepa.check(model.layers, steps)


class Denoising(LossObjective):
    """Shared by objectives that noise clean latents and regress the velocity: timesteps, noising, the optional
    iREPA term (whose projector this objective owns and the model set shards)."""

    def __init__(self, cfg, env: ObjectiveEnv):
        super().__init__(cfg, env)
        irepa = getattr(cfg, "irepa", None)
        self.irepa = IREPA.from_config(irepa, env.model.features, env.stage_steps) if irepa is not None else None

    def mu(self, n_tokens: int) -> float:
        return resolution_mu(n_tokens, self.env.sampling, self.env.pixels_per_token) + self.cfg.shift_offset

    def timesteps(self, n: int, n_tokens: int, generator, device) -> Tensor:
        return shifted_timesteps(n, self.mu(n_tokens), self.cfg.logit_mean, self.cfg.logit_std, generator, device)

    def irepa_weight(self, step: int) -> float:
        return self.irepa.weight(step) if self.irepa is not None else 0.0

    def velocity(self, model, x0: Tensor, noise: Tensor, t: Tensor, context: Tensor, txtmask: Tensor, gh: int,
                 gw: int, hidden_layer: int | None = None, reference: Tensor | None = None, adapter=None):
        """v(x_t, t) for x_t = (1 − t)·x0 + t·noise; with hidden_layer=k also block k's image tokens; reference
        (B, Nr, features): style tokens as the reference segment, or through `adapter` (a `krea2.style.BlockAdapter`)
        when given (`krea2.style`)."""
        xt = (1 - t)[:, None, None] * x0 + t[:, None, None] * noise
        if adapter is not None:
            from krea2.style import reference_pass

            with reference_pass(model, reference, xt.shape[1], adapter=adapter):
                return self.velocity(model, x0, noise, t, context, txtmask, gh, gw, hidden_layer)
        refmask = None if reference is None else torch.ones(reference.shape[:2], dtype=torch.bool, device=xt.device)
        pos, mask = joint_inputs(txtmask, gh, gw, refmask)
        if reference is None:  # the release's five inputs exactly
            return model(xt, context, t, pos, mask, return_hidden=hidden_layer)
        return model(xt, context, t, pos, mask, return_hidden=hidden_layer, reference=reference)


class FlowMatching(Denoising):
    """The pretraining/midtraining/SFT objective: flow matching, plus iREPA while its weight is on."""

    Config = FlowConfig
    name = "flow"
    guard_metric = "loss/flow"  # judge the data-fit term: iREPA's −cos can make the total negative

    def loss(self, models: Models, batch: Batch, step: int, generator: torch.Generator) -> tuple[Tensor, dict]:
        B, N, _ = batch.x0.shape
        device = batch.x0.device
        t = self.timesteps(B, N, generator, device)
        noise = torch.randn(batch.x0.shape, generator=generator, device=device)
        weight = self.irepa_weight(step)
        out = self.velocity(models.policy, batch.x0, noise, t, batch.context, batch.txtmask, batch.gh, batch.gw,
                            self.irepa.layer if weight > 0 else None)
        v, hidden = out if weight > 0 else (out, None)
        loss = flow_matching_loss(v, batch.x0, noise)
        metrics = {"loss/flow": loss.detach()}
        if weight > 0:
            align = self.irepa(hidden, batch.images, batch.gh, batch.gw)
            metrics["loss/irepa"] = align.detach()
            loss = loss + weight * align
        return loss, metrics
