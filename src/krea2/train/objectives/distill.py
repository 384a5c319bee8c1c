"""What the distillation objectives (TDM, DMD2) share: a few-step student on the Turbo grid, a frozen teacher with
its CFG folded into the target, a trainable fake score, and the distribution-matching generator loss.

Flow convention throughout: x_t = (1 - t) x0 + t ε, t = 1 is noise, velocity v = ε - x0, so the clean prediction
is x0 = x_t - t·v (`sampling.x0_from_velocity`). The student is the policy; its time inputs are exactly the
inference grid `schedule(n_tokens, SamplingConfig(steps=student_steps, guidance=0, mu=mu))` that
`krea2 generate --steps K --guidance 0 --mu MU` samples with, so what is trained is what is served.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from krea2.sampling import Conditioning, SamplingConfig, sample, schedule, x0_from_velocity
from krea2.train.objectives.base import Models, Objective, OptimizerSpec, Role


@dataclass
class DistillConfig:
    student_steps: int = 4  # K: the student's sampling steps (Krea 2 Turbo: 8)
    mu: float = 1.15  # the grid's shift, pinned (Turbo's), so the grid does not depend on resolution
    guidance: float = 3.5  # the teacher's CFG scale g (Krea convention v_c + g (v_c - v_u)), folded into the target
    fake_lr_scale: float = 1.0  # the fake score's learning rate as a multiple of the stage's
    t_min: float = 0.02  # diffusion times the teacher and fake score are queried at lie in [t_min, t_max]
    t_max: float = 0.98

    def __post_init__(self):
        if not 1 <= self.student_steps <= 64:
            raise ValueError("student_steps must be in 1..64")
        if not 0 <= self.guidance <= 30 or not self.fake_lr_scale > 0:
            raise ValueError("needs guidance in [0, 30] and fake_lr_scale > 0")
        if not 0 < self.t_min < self.t_max < 1:
            raise ValueError("needs 0 < t_min < t_max < 1")


def dmd_loss(x0: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """Distribution-matching generator loss (DMD, Yin et al. 2024, arXiv 2311.18828, eq. 7-8; DMD2 2405.14867):
    a surrogate whose gradient in x0 is (x0_fake - x0_real) / w, w = mean |x0 - x0_real| per sample (the
    normalisation that makes the step size independent of the noise level), so the student moves from its own
    distribution's score towards the teacher's. x0, x0_real, x0_fake: (B, ...); the two targets carry no graph.
    Zero gradient exactly when x0_fake == x0_real. (TDM's reference writes mse(x0, x0 + real - fake) / w, twice
    this gradient: Adam does not see the factor, gradient clipping does.)"""
    dims = tuple(range(1, x0.dim()))
    w = (x0.detach().float() - x0_real.float()).abs().mean(dims, keepdim=True).clamp_min(1e-6)
    grad = (x0_fake.float() - x0_real.float()) / w
    return 0.5 * ((x0.float() - (x0.detach().float() - grad)) ** 2).mean()


class Distillation(Objective):
    """Base of the distillation objectives: roles, optimisers, the student grid, rollouts and the teacher.

    roles: `teacher` (frozen) and `fake_score` (trainable, its own AdamW named "fake_score" at fake_lr_scale, with
    this objective's own modules, e.g. DMD2's GAN head), both copies of the stage's starting weights, which are the
    teacher: the student starts as the teacher and is made few-step."""

    roles = {"teacher": Role(init="policy", trainable=False), "fake_score": Role(init="policy", trainable=True)}
    # the generator surrogate has no data-fit scale; the guard checks finiteness only (for both optimisers: the
    # guard's spike test is per objective)
    spike_test = False

    def optimizers(self, models: Models) -> dict[str, OptimizerSpec]:
        return {"policy": OptimizerSpec([models.policy]),
                "fake_score": OptimizerSpec([models["fake_score"], self], self.cfg.fake_lr_scale)}

    def grid(self, n_tokens: int) -> Tensor:
        """The student's K + 1 times from 1 to 0 (float64), exactly those `krea2 generate` uses with its preset."""
        s = self.env.sampling
        cfg = SamplingConfig(steps=self.cfg.student_steps, guidance=0.0, mu=self.cfg.mu, y1=s.y1, y2=s.y2,
                             minres=s.minres, maxres=s.maxres)
        return schedule(n_tokens, cfg, self.env.pixels_per_token)

    def conditioning(self, batch, device) -> tuple[Conditioning, Conditioning | None]:
        cond = Conditioning.build(batch.context, batch.txtmask, batch.gh, batch.gw)
        if self.cfg.guidance <= 0 or self.env.null_text is None:
            return cond, None
        ctx, mask = (x.to(device) for x in self.env.null_text)
        B = batch.context.shape[0]
        return cond, Conditioning.build(ctx.expand(B, -1, -1, -1), mask.expand(B, -1), batch.gh, batch.gw)

    @staticmethod
    def velocity(model, x: Tensor, t: Tensor, cond: Conditioning, **kwargs):
        return model(x, cond.context, t, cond.pos, cond.mask, **kwargs)

    def rollout(self, policy, cond: Conditioning, batch, ts: Tensor, generator: torch.Generator, ctx):
        """The student's own deterministic K-step trajectory from fresh noise (no graph): the K + 1 states and the
        K velocities it took (backward simulation of the multi-step student's inputs)."""
        n = batch.context.shape[0]
        x = torch.randn(n, batch.gh * batch.gw, self.env.model.token_dim, generator=generator, device=ctx.device)
        with ctx.autocast:
            out = sample(policy, x, ts, cond, None, 0.0, trajectory=True)
        return out.trajectory, out.velocities

    def pick(self, states: list[Tensor], ts: Tensor, generator: torch.Generator, device):
        """A random student step i per sample: its input x_{t_i} (B, N, D), t_i and t_{i+1} (B,) and i (B,)."""
        K, B = len(ts) - 1, states[0].shape[0]
        i = torch.randint(K, (B,), generator=generator, device=device)
        x = torch.stack(states[:-1], dim=0)[i, torch.arange(B, device=device)].float()
        grid = ts.to(device=device, dtype=torch.float32)
        return x, grid[i], grid[i + 1], i

    @torch.no_grad()
    def teacher_x0(self, models: Models, x_t: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning | None,
                   ctx) -> Tensor:
        """The teacher's guided clean prediction x0_c + g (x0_c - x0_u) (the same as guiding the velocity)."""
        from krea2.sampling import guided_velocity

        with ctx.autocast:
            v = guided_velocity(models["teacher"], x_t, t, cond, uncond, self.cfg.guidance)
        return x0_from_velocity(x_t, v.float(), t)

    @torch.no_grad()
    def fake_x0(self, models: Models, x_t: Tensor, t: Tensor, cond: Conditioning, ctx) -> Tensor:
        with ctx.autocast:
            v = self.velocity(models["fake_score"], x_t, t, cond)
        return x0_from_velocity(x_t, v.float(), t)

    def uniform_t(self, n: int, lo: Tensor | float, hi: Tensor | float, generator, device) -> Tensor:
        """(n,) times uniform in [lo, hi] (floats or (n,) tensors)."""
        return lo + torch.rand(n, generator=generator, device=device) * (hi - lo)
