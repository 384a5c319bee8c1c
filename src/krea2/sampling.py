"""The released sampler as plain functions: schedule, patchify, positions, guided Euler from t = 1 to t = 0."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingConfig:
    steps: int = 52
    guidance: float = 3.5  # Krea convention: v = c + g (c - u); standard CFG scale is g + 1; g <= 0: no uncond pass
    mu: float | None = None  # None: interpolate from the image-token count
    y1: float = 0.5
    y2: float = 1.15
    minres: int = 256
    maxres: int = 1280


PRESETS = {
    "raw": SamplingConfig(steps=52, guidance=3.5),
    "turbo": SamplingConfig(steps=8, guidance=0.0, mu=1.15),
}


def sampling_preset(name: str, **overrides) -> SamplingConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown sampling preset {name!r}; choose from {sorted(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def resolution_mu(n_img_tokens: int, cfg: SamplingConfig, pixels_per_token: int = 16) -> float:
    """Shift mu linear in image-token count between minres² and maxres² (not clamped)."""
    x1, x2 = (cfg.minres // pixels_per_token) ** 2, (cfg.maxres // pixels_per_token) ** 2
    return cfg.y1 + (cfg.y2 - cfg.y1) * (n_img_tokens - x1) / (x2 - x1)


def shift_time(t: Tensor, mu: float) -> Tensor:
    """t -> e^mu / (e^mu + 1/t - 1): the same shift for the inference grid and for training timesteps."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


def schedule(n_img_tokens: int, cfg: SamplingConfig, pixels_per_token: int = 16) -> Tensor:
    """Timesteps from 1 to 0 (steps + 1 values), returned as float64.

    Computed in float32 like the release (torch's default dtype), so the grid is bit-identical to the official one.
    """
    mu = cfg.mu if cfg.mu is not None else resolution_mu(n_img_tokens, cfg, pixels_per_token)
    ts = torch.linspace(1, 0, cfg.steps + 1, dtype=torch.float32)
    return shift_time(ts, mu).double()


def patchify(latent: Tensor, p: int) -> Tensor:
    """(B, C, H, W) -> (B, H/p·W/p, C·p·p), row-major over the grid, feature index c·p² + dy·p + dx."""
    B, C, H, W = latent.shape
    x = latent.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens: Tensor, p: int, h: int, w: int) -> Tensor:
    """Inverse of patchify for a latent of h × w."""
    B, _, D = tokens.shape
    C = D // (p * p)
    x = tokens.reshape(B, h // p, w // p, C, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, C, h, w)


def image_positions(gh: int, gw: int, device=None) -> Tensor:
    """(gh·gw, 3) positions (0, i, j) of the patch grid."""
    i, j = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    return torch.stack([torch.zeros_like(i), i, j], dim=-1).reshape(-1, 3).float()


def joint_inputs(txtmask: Tensor, gh: int, gw: int, refmask: Tensor | None = None,
                 ref_grid: tuple[int, int] | None = None) -> tuple[Tensor, Tensor]:
    """Positions (B, L, 3) and the joint validity mask (B, L) of the segments [text; reference; image].

    Text sits at (0, 0, 0) and image patch (i, j) at (0, i, j), as the release places them. An optional reference
    segment (refmask (B, Nr) bool) sits at (1, i, j) of its own grid `ref_grid` (rh·rw = Nr; default one row), a
    distinct first index so RoPE tells reference tokens from image tokens at the same (i, j).
    """
    B, Lt = txtmask.shape
    device = txtmask.device
    parts = [torch.zeros(Lt, 3, device=device)]
    masks = [txtmask.bool()]
    if refmask is not None:
        rh, rw = ref_grid or (1, refmask.shape[1])
        if rh * rw != refmask.shape[1]:
            raise ValueError(f"ref_grid {rh}x{rw} does not hold {refmask.shape[1]} reference tokens")
        ref = image_positions(rh, rw, device)
        ref[:, 0] = 1
        parts.append(ref)
        masks.append(refmask.bool())
    parts.append(image_positions(gh, gw, device))
    masks.append(torch.ones(B, gh * gw, dtype=torch.bool, device=device))
    return torch.cat(parts).expand(B, -1, -1), torch.cat(masks, dim=1)


@dataclass
class Conditioning:
    """One branch (conditional or unconditional): text states, an optional reference segment, positions, mask."""

    context: Tensor
    pos: Tensor
    mask: Tensor
    reference: Tensor | None = None  # (B, Nr, features): tokens in the model's width, e.g. a style adapter's

    @classmethod
    def build(cls, context: Tensor, txtmask: Tensor, gh: int, gw: int, reference: Tensor | None = None,
              refmask: Tensor | None = None, ref_grid: tuple[int, int] | None = None) -> Conditioning:
        if reference is not None and refmask is None:
            refmask = torch.ones(reference.shape[:2], dtype=torch.bool, device=reference.device)
        pos, mask = joint_inputs(txtmask, gh, gw, refmask if reference is not None else None, ref_grid)
        return cls(context, pos, mask, reference)

    def model_kwargs(self) -> dict:
        """Keyword arguments beyond the release's five: none on the release path."""
        return {} if self.reference is None else {"reference": self.reference}


def guided_velocity(model: Callable, x: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning | None,
                    guidance: float) -> Tensor:
    """v = v_c + g (v_c - v_u); g <= 0 (or no uncond) runs the conditional pass only, as the release does."""
    vc = model(x, cond.context, t, cond.pos, cond.mask, **cond.model_kwargs())
    if guidance <= 0 or uncond is None:  # the release: any g <= 0 means no guidance
        return vc
    vu = model(x, uncond.context, t, uncond.pos, uncond.mask, **uncond.model_kwargs())
    return vc + guidance * (vc - vu)


def model_dtype_of(model: Callable, x: Tensor) -> torch.dtype:
    """The dtype a model's inputs are cast to: its first parameter's, else x's (a function or parameter-free module)."""
    p = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    return x.dtype if p is None else p.dtype


@torch.no_grad()
def euler_sample(model: Callable, x: Tensor, ts: Tensor, cond: Conditioning, uncond: Conditioning | None,
                 guidance: float, progress: Callable | None = None, velocity: Callable | None = None) -> Tensor:
    """Euler from ts[0] = 1 to ts[-1] = 0 over tokens x; the state stays in x's dtype (fp32 by default).
    velocity(model, x, t, cond, uncond, guidance): the step's velocity, `guided_velocity` (the release) by default;
    style references pass `functools.partial(krea2.style.styled_velocity, mix=..., gh=..., gw=...)`."""
    velocity = velocity or guided_velocity
    B = x.shape[0]
    model_dtype = model_dtype_of(model, x)
    for k in range(len(ts) - 1):
        t = torch.full((B,), float(ts[k]), device=x.device, dtype=x.dtype)
        v = velocity(model, x.to(model_dtype), t, cond, uncond, guidance)
        x = x + (float(ts[k + 1]) - float(ts[k])) * v.to(x.dtype)
        if progress is not None:
            progress(k)
    return x


def initial_noise(n: int, channels: int, h: int, w: int, seed: int, device="cpu", dtype=torch.float32) -> Tensor:
    """Image i uses randn(1, C, h, w) from a generator seeded seed + i (the release's seeding)."""
    out = []
    for i in range(n):
        g = torch.Generator(device=device).manual_seed(seed + i)
        out.append(torch.randn(1, channels, h, w, generator=g, device=device, dtype=dtype))
    return torch.cat(out)


# ------------------------------------------------------------------------------------------- trainable sampling
# The functions above are the release path (euler_sample stays bit-identical); those below are the step API that
# objectives build on: RL rollouts with per-step log-probs (Flow-GRPO) and generation that keeps the graph (DMD2, TDM).
def _per_sample(t: float | Tensor, x: Tensor) -> float | Tensor:
    """A float stays a float; a (B,) or scalar tensor becomes (B, 1, ..., 1) in x's dtype, to broadcast over x."""
    if not isinstance(t, Tensor):
        return float(t)
    return t.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def euler_step(x: Tensor, v: Tensor, t: float | Tensor, t_next: float | Tensor) -> Tensor:
    """x_{k+1} = x_k + (t_next - t) v: one deterministic step of the probability-flow ODE.

    x, v: (B, ...) state and velocity v = ε - x0, same shape. t, t_next: floats or (B,) tensors in [0, 1], t = 1 is
    noise; sampling goes down, so t_next < t. With floats this is exactly euler_sample's update.
    """
    return x + (_per_sample(t_next, x) - _per_sample(t, x)) * v


def sde_std(t: Tensor, t_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """(sigma_t, std) of the Flow-GRPO SDE step from t to t_next (tensors broadcastable to the state).

    sigma_t = eta·sqrt(t / (1 - t)) is the diffusion coefficient; std = sigma_t·sqrt(t - t_next) the step's noise.
    At t = 1 the ratio is infinite, so like flow_grpo (which puts sigmas[1], the first step's target, in the
    denominator) t_next stands in for t under the square root's denominator there.
    """
    t_safe = torch.where(t >= 1, t_next, t)
    sigma = eta * torch.sqrt(t / (1 - t_safe))
    return sigma, sigma * torch.sqrt(t - t_next)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, std²) per element, averaged over all non-batch dims: (B,). std must be > 0."""
    lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.mean(dim=tuple(range(1, lp.dim())))


def sde_mean(x: Tensor, v: Tensor, t: Tensor, t_next: Tensor, eta: float) -> Tensor:
    """The mean of `sde_step`'s transition: x + (t_next - t)·[v + eta²/(2(1 - t))·(x + (1 - t) v)] (1 - t_next in
    the denominator at t = 1). Linear in v, so two velocities' means differ by a per-step factor times v1 - v2 (the
    KL between two policies' transitions, as Flow-GRPO regularises to the reference). t, t_next broadcast to x."""
    t_safe = torch.where(t >= 1, t_next, t)
    drift = v + (eta**2 / (2 * (1 - t_safe))) * (x + (1 - t) * v)  # eta²/(2(1 - t)) = sigma_t²/(2t)
    return x + (t_next - t) * drift


def sde_step(x: Tensor, v: Tensor, t: float | Tensor, t_next: float | Tensor, eta: float,
             generator: torch.Generator | None = None, prev_sample: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One step of the marginal-preserving SDE, from t to t_next < t, and the log-density of the step taken.

    Follows Flow-GRPO's ODE-to-SDE conversion (Liu et al. 2025, arXiv 2505.05470; yifan123/flow_grpo
    `sde_step_with_logprob`), whose sigma is our t. For x_t = (1 - t) x0 + t ε the score is -(x + (1 - t) v) / t,
    and the reverse-time SDE with diffusion sigma_t and the same marginals as the ODE dx = v dt has drift
    v + sigma_t² / (2t) · (x + (1 - t) v):
        mean = x + (t_next - t) · [v + sigma_t² / (2t) · (x + (1 - t) v)],  std = sigma_t · sqrt(t - t_next),
        sigma_t = eta · sqrt(t / (1 - t))   (so sigma_t² / (2t) = eta² / (2 (1 - t)): no division by t).
    At t = 1 (the first step) 1 - t_next replaces 1 - t in both, as flow_grpo does with sigmas[1].

    x, v: (B, ...) state and velocity v = ε - x0 (unitless latent/pixel units). t, t_next: floats or (B,) tensors in
    [0, 1], t = 1 is noise. eta >= 0: noise level (flow_grpo's noise_level, 0.7 there); eta = 0 is euler_step.
    prev_sample None draws x_next = mean + std·ε (ε from `generator`); a given prev_sample is taken as x_next, to
    recompute the log-probability of a stored transition under a new velocity (the GRPO ratio).

    Returns x_next (B, ...) and log_prob (B,): log N(x_next; mean, std²) averaged over the non-batch dims, in nats
    per element; x_next enters it detached, so gradients reach only the mean (the policy), as in flow_grpo. Both are
    in x's dtype promoted to at least float32. Where std = 0 (eta = 0, or t_next = t) the step is deterministic and
    has no density: sampling returns log_prob 0 there; recomputing a given prev_sample raises ValueError.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)  # bf16 overflows in the mean (flow_grpo upcasts too)
    x, v = x.to(dtype), v.to(dtype)
    if eta == 0 and prev_sample is None:
        return euler_step(x, v, t, t_next), x.new_zeros(x.shape[0])
    t = torch.as_tensor(t, dtype=dtype, device=x.device).reshape(-1, *([1] * (x.dim() - 1)))
    t_next = torch.as_tensor(t_next, dtype=dtype, device=x.device).reshape(-1, *([1] * (x.dim() - 1)))
    _, std = sde_std(t, t_next, eta)
    mean = sde_mean(x, v, t, t_next, eta)
    deterministic = (std == 0).expand(x.shape[0], *std.shape[1:]).reshape(x.shape[0])
    if prev_sample is None:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=dtype)
        x_next = mean + std * noise
    else:
        if deterministic.any():
            raise ValueError("sde_step: the step has std 0 (eta = 0 or t_next = t), so a given prev_sample has no "
                             "log-density; use eta > 0 and t_next < t")
        x_next = prev_sample.to(dtype)
    log_prob = gaussian_log_prob(x_next.detach(), mean, torch.where(std > 0, std, torch.ones_like(std)))
    return x_next, torch.where(deterministic, torch.zeros_like(log_prob), log_prob)


def x0_from_velocity(x: Tensor, v: Tensor, t: float | Tensor) -> Tensor:
    """The clean-sample prediction x0 = x_t - t·v of x_t = (1 - t) x0 + t ε with v = ε - x0 (t float or (B,))."""
    return x - _per_sample(t, x) * v


def noise_from_velocity(x: Tensor, v: Tensor, t: float | Tensor) -> Tensor:
    """The noise prediction ε = x_t + (1 - t)·v (t float or (B,)); with x0_from_velocity it gives x_t back."""
    return x + (1 - _per_sample(t, x)) * v


def forward_transition(x_s: Tensor, s: Tensor, t: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """Diffuse x_s at time s to a later time t >= s along q(x_t | x_s) of x_t = (1 - t) x0 + t ε:
        x_t = (α_t / α_s) x_s + β ε',   β² = σ_t² - (α_t / α_s)² σ_s²,   α = 1 - t, σ = t.
    x_s, noise: (B, ...); s, t: (B,) in [0, 1) with t >= s. Returns x_t and the ratio α_t / α_s (B, 1, ...), so the
    caller can express x_t's noise relative to a clean prediction (TDM's mixed noise). Raises ValueError if t < s.
    """
    if bool((t < s).any()):
        raise ValueError("forward_transition: t must be >= s (it adds noise; it cannot remove it)")
    s, t = _per_sample(s, x_s), _per_sample(t, x_s)
    ratio = (1 - t) / (1 - s)
    beta = (t**2 - (ratio * s) ** 2).clamp_min(0).sqrt()
    return ratio * x_s + beta * noise, ratio


@dataclass
class SampleResult:
    """What `sample` returns. x: (B, N, D) final tokens at ts[-1]. trajectory: the K + 1 states x_0 (the input noise)
    .. x_K (K = len(ts) - 1) when asked, else None; velocities: the K guided velocities at x_0 .. x_{K-1} with it.
    log_probs: (B, K) per-step log-densities for step="sde", else None.
    """

    x: Tensor
    trajectory: list[Tensor] | None = None
    log_probs: Tensor | None = None
    velocities: list[Tensor] | None = None


def sample(model: Callable, x: Tensor, ts: Tensor, cond: Conditioning, uncond: Conditioning | None, guidance: float,
           *, step: str = "euler", eta: float = 0.0, generator: torch.Generator | None = None, grad: bool = False,
           trajectory: bool = False, progress: Callable | None = None) -> SampleResult:
    """Guided sampling from ts[0] = 1 to ts[-1] over tokens x (B, N, D), with a choice of step and of autograd.

    step="euler" is euler_step (with grad=False exactly euler_sample's result); step="sde" is sde_step with noise
    level eta, drawing from `generator`, and records each step's log-probability. grad=False runs under no_grad;
    grad=True keeps the graph through every model call, for objectives that backpropagate through generation.
    The Euler state stays in x's dtype (as in euler_sample); the SDE state is at least float32.
    """
    if step not in ("euler", "sde"):
        raise ValueError(f"sample: unknown step {step!r}; use 'euler' or 'sde'")
    B = x.shape[0]
    model_dtype = model_dtype_of(model, x)
    states = [x] if trajectory else None
    velocities = [] if trajectory else None
    log_probs = []
    with torch.set_grad_enabled(grad):
        for k in range(len(ts) - 1):
            t, t_next = float(ts[k]), float(ts[k + 1])
            tt = torch.full((B,), t, device=x.device, dtype=x.dtype)
            v = guided_velocity(model, x.to(model_dtype), tt, cond, uncond, guidance)
            if velocities is not None:
                velocities.append(v)
            if step == "euler":
                x = euler_step(x, v.to(x.dtype), t, t_next)
            else:
                x, lp = sde_step(x, v, t, t_next, eta, generator=generator)
                log_probs.append(lp)
            if states is not None:
                states.append(x)
            if progress is not None:
                progress(k)
    if step == "euler":
        return SampleResult(x, states, None, velocities)
    return SampleResult(x, states, torch.stack(log_probs, dim=1) if log_probs else x.new_zeros(B, 0), velocities)
