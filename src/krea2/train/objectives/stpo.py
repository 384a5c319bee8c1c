"""STPO: preference optimisation that keeps the winner's likelihood (our design of Krea's unpublished variant).

Krea's report says Diffusion-DPO raises the margin by lowering the likelihood of both winner and loser, drifting the
model off the pretraining distribution into high-frequency artifacts ("policy divergence"), and that STPO adds an
auxiliary loss and changes the DPO formulation; the formula is not published. Ours combines three published pieces
(docs/STPO.md has the derivation and the measurements):

1. Winner-preserving loser scaling (Diffusion-SDPO, Fu et al. 2025, arXiv 2511.03317): the loser's term enters the
   DPO logit scaled by λ ∈ [0, 1], the largest value for which, to first order in output space, the update does not
   raise the winner's error: with g_w, g_l the gradients of the winner's and loser's errors with respect to the
   model outputs, λ = min(1, ‖g_w‖² / ⟨g_w, g_l⟩) when ⟨g_w, g_l⟩ > 0, else 1 (per sample, no gradient through λ).
2. A winner anchor: α · the winner's flow-matching error (the SFT term of RPO / "DPO + NLL", Pang et al. 2024,
   arXiv 2404.19733), which keeps the winner's likelihood up in absolute terms, not just relative to the loser.
3. A trust region at small t: γ · ‖v_θ − v_ref‖² on the winner for t < t_trust, where the fine, high-frequency
   detail is decided; DPO's drift shows up there first.

    loss = −log σ(−β/2 · (Δw − λ·Δl)) + β/2 · (α · err_w + γ · 1[t < t_trust] · ‖v_θ(x_t^w) − v_ref(x_t^w)‖²)

The auxiliary terms are scaled by β/2, the DPO term's own pull on an error (its gradient with respect to Δw is
β/2·σ(−logit) ≤ β/2), so α and γ are relative weights: α = 1 pulls the winner's error down as hard as a DPO term
that is still far from saturated. Unscaled, they are thousands of times weaker than the DPO term and change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from krea2.train.data import PairBatch
from krea2.train.objectives.base import Models
from krea2.train.objectives.dpo import DiffusionDPO, DPOConfig
from krea2.train.objectives.flow import per_sample_error


@dataclass
class STPOConfig(DPOConfig):
    name: str = "stpo"
    anchor: float = 0.5  # α: weight of the winner's flow-matching error, relative to the DPO term (× β/2)
    trust: float = 1.0  # γ: weight of the small-t trust region to the reference, relative to the DPO term (× β/2)
    trust_t: float = 0.3  # t_trust: timesteps below this (near the data) are held to the reference
    scale_loser: bool = True  # Diffusion-SDPO's winner-preserving λ; False keeps λ = 1

    def __post_init__(self):
        super().__post_init__()
        if self.anchor < 0 or self.trust < 0 or not 0 <= self.trust_t <= 1:
            raise ValueError("needs anchor >= 0, trust >= 0 and trust_t in [0, 1]")


def winner_preserving_scale(v_w: Tensor, target_w: Tensor, v_l: Tensor, target_l: Tensor) -> Tensor:
    """λ (B,) in [0, 1]: the loser-gradient scale that does not increase the winner's error to first order.
    g = ∂‖v − target‖²/∂v = 2 (v − target); λ = min(1, ‖g_w‖²/⟨g_w, g_l⟩) where ⟨g_w, g_l⟩ > 0, else 1."""
    g_w, g_l = (v_w - target_w).flatten(1).float(), (v_l - target_l).flatten(1).float()
    dot, norm = (g_w * g_l).sum(1), g_w.square().sum(1)
    return torch.where(dot > 0, (norm / dot.clamp_min(1e-12)).clamp(max=1.0), torch.ones_like(dot)).detach()


class STPO(DiffusionDPO):
    Config = STPOConfig
    name = "stpo"
    guard_metric = "loss/dpo"

    def loss(self, models: Models, batch: PairBatch, step: int, generator: torch.Generator) -> tuple[Tensor, dict]:
        B, device = batch.size, batch.x0_w.device
        t, target, v, v_ref = self.pair_velocities(models, batch, generator)
        err, ref = per_sample_error(v, target), per_sample_error(v_ref, target)
        lam = (winner_preserving_scale(v[:B], target[:B], v[B:], target[B:]) if self.cfg.scale_loser
               else torch.ones(B, device=device))
        dw, dl = err[:B] - ref[:B], err[B:] - ref[B:]
        logits = -0.5 * self.cfg.beta * (dw - lam * dl)
        dpo = -F.logsigmoid(logits).mean()
        anchor = err[:B].mean()
        near_data = (t < self.cfg.trust_t).float()
        trust = ((v[:B].float() - v_ref[:B].float()).square().flatten(1).mean(1) * near_data).mean()
        loss = dpo + 0.5 * self.cfg.beta * (self.cfg.anchor * anchor + self.cfg.trust * trust)
        metrics = {"loss/dpo": dpo.detach(), "loss/anchor": anchor.detach(), "loss/trust": trust.detach(),
                   "dpo/accuracy": (logits > 0).float().mean().detach(), "dpo/margin": logits.mean().detach(),
                   "dpo/winner_vs_ref": dw.mean().detach(), "dpo/loser_vs_ref": dl.mean().detach(),
                   "stpo/loser_scale": lam.mean()}
        return loss, metrics
