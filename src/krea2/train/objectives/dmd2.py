"""DMD2: improved Distribution Matching Distillation, with a multi-step student.

Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis" (arXiv 2405.14867; reference
code tianweiy/DMD2), in flow-matching form. Per training step:
1. backward simulation: the student samples its own K-step trajectory from noise on the Turbo grid (no graph) and
   each sample takes one step i, so the multi-step student trains on the inputs it meets at inference. The
   trajectory is the deterministic Euler one the student is served with (DMD2's reference re-noises each clean
   prediction with fresh noise between steps instead);
2. fake score (every step): flow matching on the student's clean predictions x0^ at t ~ U[t_min, t_max], plus,
   with `gan_weight` > 0, a GAN head on the fake score's hidden image tokens (block `gan_layer`) telling noised real
   images (the batch's) from noised student samples (non-saturating logistic loss);
3. generator (every `fake_updates`-th step: the two-time-scale update rule): x0^ with graph follows
   teacher (CFG folded in) minus fake at x_t = (1 - t) x0^ + t ε, t ~ U[t_min, t_max] (`distill.dmd_loss`), plus
   gan_weight times the generator's GAN loss through the fake score's features (frozen for that pass).
One gan_weight scales both GAN terms and real and student images share the noise time t (DMD2 weighs the two
terms separately and draws the times apart).
Reads captioned images: the captions are the prompts, the images only feed the GAN head (with gan_weight 0 the
objective is data-free like TDM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from krea2.sampling import x0_from_velocity
from krea2.train.objectives.distill import Distillation, DistillConfig, dmd_loss


@dataclass
class DMD2Config(DistillConfig):
    name: str = "dmd2"
    fake_updates: int = 5  # fake-score updates per generator update (DMD2's two-time-scale rule)
    gan_weight: float = 0.0  # 0: no GAN head; DMD2 uses ~3e-3 for the generator and 1e-2 for the head
    gan_layer: int = 0  # the fake score's block whose image tokens the head reads (1-based; 0: the middle one)

    def __post_init__(self):
        super().__post_init__()
        if self.fake_updates < 1 or not self.gan_weight >= 0 or self.gan_layer < 0:
            raise ValueError("needs fake_updates >= 1, gan_weight >= 0 and gan_layer >= 0")

    def check(self, model_cfg, steps: int) -> None:
        if self.gan_layer > model_cfg.layers:
            raise ValueError(f"gan_layer {self.gan_layer} > the model's {model_cfg.layers} blocks")


class GANHead(nn.Module):
    """A per-token logistic discriminator on the fake score's hidden image tokens (B, N, features) -> logits (B,)
    (mean over tokens: a patch discriminator)."""

    def __init__(self, features: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(features), nn.Linear(features, features), nn.SiLU(),
                                 nn.Linear(features, 1))

    def forward(self, hidden: Tensor) -> Tensor:
        return self.net(hidden.float()).squeeze(-1).mean(-1)


class DMD2(Distillation):
    Config = DMD2Config
    name = "dmd2"
    data_kind = "images"

    def __init__(self, cfg: DMD2Config, env):
        super().__init__(cfg, env)
        self.layer = cfg.gan_layer or max(1, env.model.layers // 2)
        self.gan_head = GANHead(env.model.features) if cfg.gan_weight > 0 else None
        # the last generator loss, reported as "loss" on fake-score-only steps (a buffer: it resumes with the state)
        self.register_buffer("last_loss", torch.zeros(()))

    def noised(self, x0: Tensor, t: Tensor, generator) -> Tensor:
        t4 = t.view(-1, *([1] * (x0.dim() - 1)))
        return (1 - t4) * x0 + t4 * torch.randn(x0.shape, generator=generator, device=x0.device)

    def gan_logits(self, fake_score, x_t: Tensor, t: Tensor, cond, ctx) -> Tensor:
        with ctx.autocast:
            _, hidden = self.velocity(fake_score, x_t, t, cond, return_hidden=self.layer)
        return self.gan_head(hidden)

    def step(self, models, batch, step: int, generator: torch.Generator, ctx) -> dict:
        device, c = ctx.device, self.cfg
        cond, uncond = self.conditioning(batch, device)
        ts = self.grid(batch.gh * batch.gw)
        states, velocities = self.rollout(models.policy, cond, batch, ts, generator, ctx)
        B = batch.context.shape[0]

        # fake score: flow matching on the student's samples (+ the GAN head on real vs student)
        x_i, t_i, _, i = self.pick(states, ts, generator, device)
        v_i = torch.stack(velocities, 0)[i, torch.arange(B, device=device)].float()
        x0 = x0_from_velocity(x_i, v_i, t_i)
        t = self.uniform_t(B, c.t_min, c.t_max, generator, device)
        noise = torch.randn(x0.shape, generator=generator, device=device)
        t4 = t.view(-1, 1, 1)
        x_t = (1 - t4) * x0 + t4 * noise
        with ctx.autocast:  # with the GAN head, one pass gives the velocity and the hidden tokens it reads
            out = self.velocity(models["fake_score"], x_t, t, cond,
                                **({"return_hidden": self.layer} if self.gan_head is not None else {}))
        v_fake = out[0] if self.gan_head is not None else out
        fake_loss = ((v_fake.float() - (noise - x0)) ** 2).mean()
        metrics = {"dmd2/fake_loss": fake_loss.detach()}
        total = fake_loss
        if self.gan_head is not None:
            real_t = self.noised(batch.x0.float(), t, generator)
            d_real = self.gan_logits(models["fake_score"], real_t, t, cond, ctx)
            d_fake = self.gan_head(out[1])
            d_loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
            total = total + c.gan_weight * d_loss
            metrics["dmd2/d_loss"] = d_loss.detach()
        ctx.backward(total)
        ctx.optimizer_step("fake_score", total.detach())
        if step % c.fake_updates:
            return {"loss": self.last_loss.clone().cpu(), **metrics}

        # generator, every fake_updates-th step
        x_i, t_i, _, _ = self.pick(states, ts, generator, device)
        with ctx.autocast:
            v = self.velocity(models.policy, x_i, t_i, cond)
        x0 = x0_from_velocity(x_i, v.float(), t_i)
        t = self.uniform_t(B, c.t_min, c.t_max, generator, device)
        with torch.no_grad():
            x_t = self.noised(x0.detach(), t, generator)
            x0_real = self.teacher_x0(models, x_t, t, cond, uncond, ctx)
            x0_fake = self.fake_x0(models, x_t, t, cond, ctx)
        loss = dmd_loss(x0, x0_real, x0_fake)
        metrics["dmd2/dm_loss"] = loss.detach()
        if self.gan_head is not None:
            # the fake score and the head only pass gradients through to x0^ here: frozen, so no parameter gradient
            # is computed (nor reduced under FSDP) that the fake score's optimiser would have to discard
            frozen = [p for m in (models["fake_score"], self.gan_head) for p in m.parameters() if p.requires_grad]
            for p in frozen:
                p.requires_grad_(False)
            try:
                g_loss = F.softplus(-self.gan_logits(models["fake_score"], self.noised(x0, t, generator), t, cond,
                                                     ctx)).mean()
                loss = loss + c.gan_weight * g_loss
                metrics["dmd2/g_loss"] = g_loss.detach()
                ctx.backward(loss)
            finally:
                for p in frozen:
                    p.requires_grad_(True)
        else:
            ctx.backward(loss)
        ctx.optimizer_step("policy", loss.detach())
        metrics["dmd2/real_fake_gap"] = (x0_real - x0_fake).abs().mean().cpu()
        self.last_loss.copy_(loss.detach())
        return {"loss": loss.detach(), **metrics}
