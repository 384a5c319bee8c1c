"""TDM: Trajectory Distribution Matching, a data-free distillation of the teacher into a few-step student.

Luo et al. 2025, "Learning Few-Step Diffusion Models by Trajectory Distribution Matching" (arXiv 2503.06674; the
authors' reference code Luo-Yihong/TDM, `train_tdm_demo.py`), in flow-matching form. Krea 2 Turbo is distilled this
way (8 steps, no CFG, mu pinned at 1.15). Per training step, on prompts only:
1. the student samples its own deterministic K-step trajectory from noise on the Turbo grid (no graph);
2. each sample takes one student step i, from x_{t_i}: the student's clean and noise predictions x0^, ε^ give its
   own ODE point x_s = (1 - s) x0^ + s ε^ at s = t_{i+1} (or a random s in [t_{i+1}, t_i) with `random_mid`), which
   is diffused forward to a time t in the step's own interval (s, t_i) (`separate`; else (s, t_max)):
   x_t = (1 - t) x0^ + t ε_mix, ε_mix mixing the student's ε^ and fresh noise (`sampling.forward_transition`);
3. fake score: a trainable copy of the teacher learns the student's distribution of each step by regressing x0^
   from x_t, weighted by min(SNR_t, 5) (SNR = ((1 - t)/t)²) and by the importance weight
   exp(-mean(ε_mix²)/2) / exp(-mean(ε'²)/2) for the non-Gaussian ε_mix (the reference's `is_weight`);
4. generator: the student's x0^ (with graph, one step, input detached) follows teacher minus fake at x_t, with the
   teacher's CFG folded into the target (x0_c + g (x0_c - x0_u)), so the student needs no guidance; the update is
   DMD's normalised surrogate (`distill.dmd_loss`).
Both updates run every step (one fake update per generator update, as the reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from krea2.sampling import forward_transition, noise_from_velocity, x0_from_velocity
from krea2.train.objectives.distill import Distillation, DistillConfig, dmd_loss


@dataclass
class TDMConfig(DistillConfig):
    name: str = "tdm"
    separate: bool = True  # diffuse within each student step's own interval (the reference's --use_separate)
    random_mid: bool = False  # the ODE point s anywhere in [t_{i+1}, t_i) (--use_randmid), a regulariser
    snr_clip: float = 5.0  # the fake loss's SNR weight is min(SNR_t, snr_clip)
    importance_weight: bool = True

    def __post_init__(self):
        super().__post_init__()
        if not self.snr_clip > 0:
            raise ValueError("snr_clip must be > 0")


def trajectory_point(x_i: Tensor, v_i: Tensor, t_i: Tensor, t_next: Tensor, t_min: float, t_max: float,
                     separate: bool, random_mid: bool, generator: torch.Generator
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Where TDM queries the scores for one student step (step 2 of the module docstring).

    x_i, v_i: (B, N, D) the step's input and the student's velocity there; t_i, t_next: (B,) its grid times.
    Returns x_t (B, N, D), t (B,) in [s, t_i] or [s, t_max] (s floored at t_min), x0^ = x_i - t_i v_i, ε_mix with
    x_t = (1 - t) x0^ + t ε_mix, and the fresh noise ε' drawn for the forward transition (importance weight)."""
    B, device = x_i.shape[0], x_i.device
    x0, eps = x0_from_velocity(x_i, v_i, t_i), noise_from_velocity(x_i, v_i, t_i)
    s = t_next
    if random_mid:
        s = t_next + torch.rand(B, generator=generator, device=device) * 0.98 * (t_i - t_next)
    s4 = s.view(-1, *([1] * (x_i.dim() - 1)))
    x_s = (1 - s4) * x0 + s4 * eps
    lo = s.clamp_min(t_min)
    hi = t_i.clamp(max=t_max) if separate else torch.full_like(t_i, t_max)
    hi = torch.where(lo < hi, hi, t_i)  # an ODE point above t_max (a random mid in step 0): up to t_i, not a point
    hi = hi.clamp_min(lo)
    t = lo + torch.rand(B, generator=generator, device=device) * (hi - lo)
    fresh = torch.randn(x_i.shape, generator=generator, device=device)
    x_t, _ = forward_transition(x_s, s, t, fresh)
    t4 = t.view(-1, *([1] * (x_i.dim() - 1)))
    eps_mix = (x_t - (1 - t4) * x0) / t4
    return x_t, t, x0, eps_mix, fresh


def fake_score_loss(x0_fake: Tensor, x0_target: Tensor, t: Tensor, eps_mix: Tensor | None = None,
                    fresh: Tensor | None = None, snr_clip: float = 5.0) -> Tensor:
    """TDM's fake-score loss: mean over the batch of mean((x0_fake - x0^)²) · min(SNR_t, snr_clip) · w_IS, with
    w_IS = exp(-mean(ε_mix²)/2) / exp(-mean(ε'²)/2) when eps_mix and fresh are given (else 1).
    x0_fake, x0_target: (B, ...); t: (B,) in (0, 1)."""
    dims = tuple(range(1, x0_fake.dim()))
    per = ((x0_fake.float() - x0_target.float()) ** 2).mean(dims)
    snr = ((1 - t.float()) / t.float()) ** 2
    weight = snr.clamp(max=snr_clip)
    if eps_mix is not None:
        weight = weight * torch.exp(-0.5 * (eps_mix.float() ** 2).mean(dims) + 0.5 * (fresh.float() ** 2).mean(dims))
    return (per * weight).mean()


class TDM(Distillation):
    Config = TDMConfig
    name = "tdm"
    data_kind = "prompts"

    def query(self, x_i: Tensor, v_i: Tensor, t_i: Tensor, t_next: Tensor, generator):
        c = self.cfg
        return trajectory_point(x_i, v_i, t_i, t_next, c.t_min, c.t_max, c.separate, c.random_mid, generator)

    def step(self, models, batch, step: int, generator: torch.Generator, ctx) -> dict:
        device = ctx.device
        cond, uncond = self.conditioning(batch, device)
        ts = self.grid(batch.gh * batch.gw)
        states, velocities = self.rollout(models.policy, cond, batch, ts, generator, ctx)

        # fake score: learn the student's distribution of each step, from its own (stored) velocities
        x_i, t_i, t_next, i = self.pick(states, ts, generator, device)
        v_i = torch.stack(velocities, 0)[i, torch.arange(len(i), device=device)].float()
        with torch.no_grad():
            x_t, t, x0, eps_mix, fresh = self.query(x_i, v_i, t_i, t_next, generator)
        with ctx.autocast:
            v_fake = self.velocity(models["fake_score"], x_t, t, cond)
        x0_fake = x0_from_velocity(x_t, v_fake.float(), t)
        fake_loss = fake_score_loss(x0_fake, x0, t, eps_mix if self.cfg.importance_weight else None, fresh,
                                    self.cfg.snr_clip)
        ctx.backward(fake_loss)
        ctx.optimizer_step("fake_score", fake_loss.detach())

        # generator: one student step with graph, pulled towards the guided teacher and away from the fake score
        x_i, t_i, t_next, _ = self.pick(states, ts, generator, device)
        with ctx.autocast:
            v = self.velocity(models.policy, x_i, t_i, cond)
        x0 = x0_from_velocity(x_i, v.float(), t_i)
        with torch.no_grad():
            x_t, t, _, _, _ = self.query(x_i, v.detach().float(), t_i, t_next, generator)
            x0_real = self.teacher_x0(models, x_t, t, cond, uncond, ctx)
            x0_fake = self.fake_x0(models, x_t, t, cond, ctx)
        loss = dmd_loss(x0, x0_real, x0_fake)
        ctx.backward(loss)
        ctx.optimizer_step("policy", loss.detach())
        return {"loss": loss.detach(), "tdm/fake_loss": fake_loss.detach(),
                "tdm/real_fake_gap": (x0_real - x0_fake).abs().mean().cpu(), "tdm/t": t.mean().cpu()}
