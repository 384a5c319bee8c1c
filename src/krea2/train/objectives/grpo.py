"""Flow-GRPO: online RL of the flow policy with group-relative advantages and SDE rollouts.

Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL" (arXiv 2505.05470; reference code
yifan123/flow_grpo). Per step, for each prompt of the batch:
1. rollouts: G samples from the policy with the marginal-preserving SDE step (`sampling.sde_step`), no CFG, keeping
   every state x_k and the log-probability of each transition x_k -> x_{k+1};
2. rewards on the decoded images, each normalised within its group and summed with its weight (GDPO's
   group-decoupled normalisation for several rewards): A_i = Σ_r w_r (R_r,i − mean_g R_r) / (std_g R_r + eps);
3. updates on a random subset of the K transitions: the PPO-clipped ratio of new to old transition
   log-probabilities times A, plus β · KL(policy ‖ reference) of the Gaussian transitions,
   ‖μ_θ − μ_ref‖² / (2σ_k²), with the reference a frozen copy of the starting policy.
Groups live on one rank (each rank repeats its own prompts G times), so advantages need no all-gather.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from krea2.sampling import Conditioning, SamplingConfig, sample, schedule, sde_mean, sde_std, sde_step
from krea2.train.data import PromptBatch
from krea2.train.objectives.base import Models, Objective, Role


@dataclass
class GRPOConfig:
    name: str = "grpo"
    group_size: int = 4  # G images per prompt
    sample_steps: int = 10  # K SDE steps per rollout
    eta: float = 0.7  # SDE noise level (flow_grpo's noise_level)
    mu: float | None = None  # schedule shift; None: the resolution rule of the recipe's [sampling]
    clip_range: float = 1e-4  # PPO ratio clip; small because per-step ratios stay close to 1 (flow_grpo's 1e-4)
    kl_beta: float = 0.004  # weight of the KL to the reference (0: off)
    train_fraction: float = 0.6  # fraction of the K transitions trained on per rollout batch
    inner_epochs: int = 1  # policy updates per rollout batch
    adv_clip: float = 5.0  # advantages clipped to ±adv_clip
    rewards: dict[str, float] = field(default_factory=lambda: {"world_rubric": 1.0})
    # the prompt pool as resource allocation: prompts the first reward finds too easy, always failing, or whose
    # group carries no signal (all rewards equal) are drawn `deprioritize` times as often once seen min_visits times
    prompt_stats: bool = True
    easy: float = 0.95
    hard: float = 0.05
    deprioritize: float = 0.1
    min_visits: int = 2

    def __post_init__(self):
        from krea2.rewards import REWARDS, is_known

        if self.group_size < 2:
            raise ValueError("group_size must be >= 2: advantages are relative to the group")
        if self.sample_steps < 1 or self.inner_epochs < 1:
            raise ValueError("sample_steps and inner_epochs must be >= 1")
        if not self.eta > 0 or not self.clip_range > 0 or not self.kl_beta >= 0 or not 0 < self.train_fraction <= 1:
            raise ValueError("needs eta > 0, clip_range > 0, kl_beta >= 0 and train_fraction in (0, 1]")
        if not 0 < self.deprioritize <= 1 or self.min_visits < 1 or not 0 <= self.hard < self.easy <= 1:
            raise ValueError("needs deprioritize in (0, 1], min_visits >= 1 and 0 <= hard < easy <= 1")
        unknown = sorted(name for name in self.rewards if not is_known(name))
        if unknown or not self.rewards:
            raise ValueError(f"rewards {unknown or '{}'} unknown or empty; known: {sorted(REWARDS)} (learnt ones "
                             "also as NAME:FOLDER)")


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """(B·G,) rewards, consecutive groups of G -> advantages (B·G,) normalised within each group: zero mean per
    group; a group whose rewards are all equal gives zeros (no signal, no update)."""
    r = rewards.float().view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def clipped_policy_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float
                        ) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate, to minimise: mean(max(−A·ρ, −A·clip(ρ, 1 ± ε))), ρ = exp(logπ − logπ_old).
    Returns the loss and the fraction of samples where the clip is active."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), (clipped > unclipped).float().mean()


class FlowGRPO(Objective):
    Config = GRPOConfig
    name = "grpo"
    roles = {"ref": Role(init="policy", trainable=False)}
    data_kind = "prompts"
    guard_metric = "loss"
    spike_test = False  # the clipped surrogate is ~0 with either sign: only non-finite values are bad steps

    def __init__(self, cfg: GRPOConfig, env):
        super().__init__(cfg, env)
        from krea2.rewards import get_reward

        self.reward_fns = {name: get_reward(name) for name in cfg.rewards}
        # per-prompt statistics of the first reward: buffers, so they ride in the training state (exact resume)
        n = env.data_size if cfg.prompt_stats and env.data_size else 0
        self.register_buffer("prompt_visits", torch.zeros(n))
        self.register_buffer("prompt_reward", torch.zeros(n))
        self.register_buffer("prompt_spread", torch.zeros(n))

    def flagged(self) -> Tensor:
        """(pool,) bool: prompts seen min_visits times that are too easy, always failing or without signal."""
        seen = self.prompt_visits >= self.cfg.min_visits
        r = self.prompt_reward
        return seen & ((r >= self.cfg.easy) | (r <= self.cfg.hard) | (self.prompt_spread == 0))

    def batch_weights(self) -> Tensor | None:
        if not len(self.prompt_visits):
            return None
        return torch.where(self.flagged(), self.cfg.deprioritize, 1.0).cpu()

    @torch.no_grad()
    def update_prompt_stats(self, indices: list[int], rewards: Tensor, ctx) -> dict:
        """Fold each group's mean and spread of the first reward into its prompt's statistics (EMA 0.5), with the
        groups of every rank, so all ranks keep the same statistics and draw the same weighted batches."""
        if not len(self.prompt_visits):
            return {}
        groups = rewards.float().view(-1, self.cfg.group_size)
        local = torch.stack([torch.tensor(indices, dtype=torch.float32), groups.mean(1), groups.std(1)], dim=1)
        for i, mean, spread in ctx.all_gather(local.to(ctx.device)).cpu().tolist():
            i = int(i)
            first = self.prompt_visits[i] == 0
            self.prompt_reward[i] = mean if first else 0.5 * self.prompt_reward[i] + 0.5 * mean
            self.prompt_spread[i] = spread
            self.prompt_visits[i] += 1
        seen = self.prompt_visits > 0
        return {"grpo/pool_seen": seen.float().mean(),
                "grpo/pool_deprioritized": self.flagged().float().sum() / seen.float().sum().clamp_min(1)}

    def schedule(self, n_tokens: int) -> Tensor:
        s = self.env.sampling
        cfg = SamplingConfig(steps=self.cfg.sample_steps, guidance=0.0, mu=self.cfg.mu, y1=s.y1, y2=s.y2,
                             minres=s.minres, maxres=s.maxres)
        return schedule(n_tokens, cfg, self.env.pixels_per_token)

    def rewards(self, images: Tensor, records: list[dict]) -> tuple[Tensor, dict, Tensor]:
        """Weighted sum of per-group normalised rewards (B·G,), each reward's batch mean, and the first reward."""
        adv, means, first = torch.zeros(len(records)), {}, None
        for name, weight in self.cfg.rewards.items():
            r = self.reward_fns[name](images, records).float().cpu()
            first = r if first is None else first
            means[f"reward/{name.partition(':')[0]}"] = r.mean()  # NAME:FOLDER logs as NAME (comparable runs)
            adv += weight * group_advantages(r, self.cfg.group_size)
        return adv.clamp(-self.cfg.adv_clip, self.cfg.adv_clip), means, first

    def step(self, models: Models, batch: PromptBatch, step: int, generator: torch.Generator, ctx) -> dict:
        G, policy = self.cfg.group_size, models.policy
        n = batch.size * G
        context, txtmask = batch.context.repeat_interleave(G, 0), batch.txtmask.repeat_interleave(G, 0)
        records = [r for r in batch.records for _ in range(G)]
        cond = Conditioning.build(context, txtmask, batch.gh, batch.gw)
        ts = self.schedule(batch.gh * batch.gw)
        x = torch.randn(n, batch.gh * batch.gw, self.env.model.token_dim, generator=generator, device=ctx.device)
        with ctx.autocast:  # rollouts: no CFG, no graph
            roll = sample(policy, x, ts, cond, None, 0.0, step="sde", eta=self.cfg.eta, generator=generator,
                          trajectory=True)
        images = ctx.decode(roll.x, batch.gh, batch.gw)
        advantages, metrics, first = self.rewards(images, records)
        metrics.update(self.update_prompt_stats(batch.indices, first, ctx))
        advantages = advantages.to(ctx.device)
        K = len(ts) - 1
        n_train = max(1, math.ceil(self.cfg.train_fraction * K))
        losses, kls, clips = [], [], []
        for _ in range(self.cfg.inner_epochs):
            chosen = torch.randperm(K, generator=generator, device=ctx.device)[:n_train].tolist()
            total = 0.0
            for k in chosen:
                t, t_next = float(ts[k]), float(ts[k + 1])
                xk, x_next = roll.trajectory[k], roll.trajectory[k + 1]
                tt = torch.full((n,), t, device=ctx.device)
                with ctx.autocast:
                    v = policy(xk, cond.context, tt, cond.pos, cond.mask)
                _, log_prob = sde_step(xk, v, t, t_next, self.cfg.eta, prev_sample=x_next)
                loss, clip_frac = clipped_policy_loss(log_prob, roll.log_probs[:, k], advantages,
                                                      self.cfg.clip_range)
                kl = torch.zeros(())
                if self.cfg.kl_beta > 0:
                    with torch.no_grad(), ctx.autocast:
                        v_ref = models["ref"](xk, cond.context, tt, cond.pos, cond.mask)
                    kl = transition_kl(xk, v, v_ref, t, t_next, self.cfg.eta)
                    loss = loss + self.cfg.kl_beta * kl
                ctx.backward(loss / n_train)
                total += float(loss.detach()) / n_train
                kls.append(float(kl.detach()))
                clips.append(float(clip_frac))
            losses.append(total)
            ctx.optimizer_step("policy", torch.tensor(total))
        def mean(values):
            return torch.tensor(sum(values) / len(values))

        return {"loss": mean(losses), **metrics, "grpo/kl": mean(kls), "grpo/clip_fraction": mean(clips),
                "grpo/advantage_abs": advantages.abs().mean().cpu()}


def transition_kl(x: Tensor, v: Tensor, v_ref: Tensor, t: float, t_next: float, eta: float) -> Tensor:
    """KL between the policy's and the reference's Gaussian transitions from x at t (same std):
    ‖μ_θ − μ_ref‖² / (2σ²), averaged over elements and the batch."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, v, v_ref = x.to(dtype), v.to(dtype), v_ref.to(dtype)
    tt, tn = torch.tensor(t, dtype=dtype, device=x.device), torch.tensor(t_next, dtype=dtype, device=x.device)
    _, std = sde_std(tt, tn, eta)
    return ((sde_mean(x, v, tt, tn, eta) - sde_mean(x, v_ref, tt, tn, eta)) ** 2).mean() / (2 * std**2)
