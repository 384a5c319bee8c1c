"""Diffusion-DPO in flow form: prefer the winner of each pair relative to a frozen reference model.

Wallace et al. 2023, "Diffusion Model Alignment Using Direct Preference Optimization" (arXiv 2311.12908), with the
denoising error replaced by the velocity error of rectified flow as in Flow-DPO (Liu et al. 2025, "Improving Video
Generation with Human Feedback", arXiv 2501.13918). Winner, loser and reference share t and the noise:

    Δw = ‖v_θ(x_t^w) − (ε − x0^w)‖² − ‖v_ref(x_t^w) − (ε − x0^w)‖²        (per-sample mean over tokens/channels)
    Δl = the same for the loser
    loss = −log σ(−β/2 · (Δw − Δl))

β multiplies mean squared errors (per element), so it is in the thousands like Diffusion-DPO's β·T.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from krea2.train.data import PairBatch
from krea2.train.objectives.base import Models, Role
from krea2.train.objectives.flow import Denoising, TimestepConfig, per_sample_error


@dataclass
class DPOConfig(TimestepConfig):
    name: str = "dpo"
    beta: float = 2000.0  # > 0: strength of the preference against the KL to the reference

    def __post_init__(self):
        super().__post_init__()
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")


def dpo_loss(err_w: Tensor, err_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float) -> tuple[Tensor, dict]:
    """Diffusion-DPO from per-sample errors (B,) of policy and reference; returns the mean loss and metrics:
    implicit accuracy (the policy prefers the winner more than the reference does), the margin β/2·(Δl − Δw), and
    the winner's and loser's error relative to the reference (Δw, Δl)."""
    dw, dl = err_w - ref_w, err_l - ref_l
    logits = -0.5 * beta * (dw - dl)
    loss = -F.logsigmoid(logits).mean()
    metrics = {"loss/dpo": loss.detach(), "dpo/accuracy": (logits > 0).float().mean().detach(),
               "dpo/margin": logits.mean().detach(), "dpo/winner_vs_ref": dw.mean().detach(),
               "dpo/loser_vs_ref": dl.mean().detach()}
    return loss, metrics


class DiffusionDPO(Denoising):
    Config = DPOConfig
    name = "dpo"
    roles = {"ref": Role(init="policy", trainable=False)}
    data_kind = "pairs"
    guard_metric = "loss/dpo"

    def pair_velocities(self, models: Models, batch: PairBatch, generator: torch.Generator,
                        reference: Tensor | None = None, ref_reference: Tensor | None = None, adapter=None,
                        ref_adapter=None):
        """Winner and loser in one forward (shared t, noise and text) through the policy and, without grad, the
        reference. reference / ref_reference (B, Nr, features): style tokens for the policy's and the reference's
        pass (`style_po`), shared by a pair, through block adapters adapter / ref_adapter where given. Returns t
        (B,), the target ε − x0 (2B, N, D) and the velocities v_θ, v_ref (2B, N, D), winners first."""
        B, N, _ = batch.x0_w.shape
        device = batch.x0_w.device
        t = self.timesteps(B, N, generator, device)
        noise = torch.randn(batch.x0_w.shape, generator=generator, device=device).repeat(2, 1, 1)
        x0 = torch.cat([batch.x0_w, batch.x0_l])
        args = (x0, noise, t.repeat(2), batch.context.repeat(2, 1, 1, 1), batch.txtmask.repeat(2, 1), batch.gh,
                batch.gw)
        v = self.velocity(models.policy, *args, reference=None if reference is None else reference.repeat(2, 1, 1),
                          adapter=adapter)
        with torch.no_grad():
            v_ref = self.velocity(models["ref"], *args, adapter=ref_adapter,
                                  reference=None if ref_reference is None else ref_reference.repeat(2, 1, 1))
        return t, noise - x0, v, v_ref

    def loss(self, models: Models, batch: PairBatch, step: int, generator: torch.Generator) -> tuple[Tensor, dict]:
        B = batch.size
        _, target, v, v_ref = self.pair_velocities(models, batch, generator)
        err, ref = per_sample_error(v, target), per_sample_error(v_ref, target)
        return dpo_loss(err[:B], err[B:], ref[:B], ref[B:], self.cfg.beta)
