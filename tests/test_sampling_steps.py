"""The step API of the sampler: Euler and Flow-GRPO SDE steps, log-probs, marginals, and sample() vs euler_sample."""

import math

import pytest
import torch

from krea2 import sampling
from krea2.models.dit import DiT
from krea2.sampling import Conditioning, SamplingConfig, euler_sample, euler_step, sample, sde_step


def reference_mean_std(x, v, t, t_next, eta):
    """flow_grpo's formula in its own variables (sigma = our t, dt < 0), written out independently of sde_step."""
    dt = t_next - t
    sigma_max = t_next if t == 1 else t  # flow_grpo puts sigmas[1] in the denominator at sigma = 1
    std_dev_t = eta * math.sqrt(t / (1 - sigma_max))
    mean = x * (1 + std_dev_t**2 / (2 * t) * dt) + v * (1 + std_dev_t**2 * (1 - t) / (2 * t)) * dt
    return mean, std_dev_t * math.sqrt(-dt)


def xv(n=4, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, d, generator=g, dtype=torch.float64)
    return x, torch.randn(n, 3, d, generator=g, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------- single steps
def test_eta_zero_is_the_euler_step_for_float_and_tensor_times():
    x, v = xv()
    x1, lp = sde_step(x, v, 0.7, 0.6, eta=0.0)
    assert torch.equal(x1, euler_step(x, v, 0.7, 0.6)) and torch.equal(x1, x + (0.6 - 0.7) * v)
    assert torch.equal(lp, torch.zeros(4, dtype=x.dtype))
    t, tn = torch.tensor([1.0, 0.9, 0.5, 0.2]), torch.tensor([0.9, 0.5, 0.2, 0.0])
    x1, _ = sde_step(x, v, t, tn, eta=0.0)
    for b in range(4):  # per-sample times act per sample
        assert torch.allclose(x1[b], x[b] + (tn[b].item() - t[b].item()) * v[b])
    with pytest.raises(ValueError, match="std 0"):  # a deterministic step gives a given sample no density
        sde_step(x, v, 0.7, 0.6, eta=0.0, prev_sample=x1)


@pytest.mark.parametrize("t,t_next", [(0.6, 0.5), (1.0, 0.9), (0.1, 0.0)])
def test_sde_step_draws_from_the_stated_gaussian(t, t_next):
    x, v = xv(1)
    n = 40_000
    eta = 0.7
    g = torch.Generator().manual_seed(1)
    xs, _ = sde_step(x.expand(n, -1, -1), v.expand(n, -1, -1), t, t_next, eta, generator=g)
    mean, std = reference_mean_std(x[0], v[0], t, t_next, eta)
    # 4.5 standard errors over 18 elements: a false alarm about once in 10⁴ runs
    assert (xs.mean(0) - mean).abs().max() < 4.5 * std / math.sqrt(n)
    assert (xs.std(0) / std - 1).abs().max() < 4.5 / math.sqrt(2 * n)
    if t == 1.0:  # the clamped first step: sigma = eta·sqrt(1 / (1 - t_next)), so std = eta
        assert std == pytest.approx(eta)


def test_log_prob_is_the_normal_density_averaged_and_recomputes_from_prev_sample():
    x, v = xv()
    t, tn = torch.tensor([0.9, 0.8, 0.5, 0.3]), torch.tensor([0.8, 0.6, 0.45, 0.0])
    g = torch.Generator().manual_seed(2)
    x1, lp = sde_step(x, v, t, tn, eta=0.8, generator=g)
    assert lp.shape == (4,) and lp.dtype == torch.float64
    for b in range(4):
        mean, std = reference_mean_std(x[b], v[b], t[b].item(), tn[b].item(), 0.8)
        expected = torch.distributions.Normal(mean, std).log_prob(x1[b]).mean()
        assert torch.allclose(lp[b], expected, rtol=1e-12, atol=1e-12)
    x1_again, lp_again = sde_step(x, v, t, tn, eta=0.8, prev_sample=x1)
    assert torch.equal(x1_again, x1) and torch.allclose(lp_again, lp, rtol=0, atol=1e-12)
    _, lp_other = sde_step(x, v + 0.1, t, tn, eta=0.8, prev_sample=x1)  # another policy: another density
    assert not torch.allclose(lp_other, lp)


def test_log_prob_gradient_reaches_the_velocity_not_the_sample():
    x, v = xv()
    v = v.clone().requires_grad_(True)
    x1, _ = sde_step(x, v.detach(), 0.8, 0.7, eta=0.7, generator=torch.Generator().manual_seed(3))
    x1.requires_grad_(True)
    _, lp = sde_step(x, v, 0.8, 0.7, eta=0.7, prev_sample=x1)
    lp.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0 and x1.grad is None


# ------------------------------------------------------------------------------------- marginals on a 1-D Gaussian
M, S = 1.5, 0.4  # data x0 ~ N(M, S²)


def exact_velocity(x, t):
    """E[ε - x0 | x_t = x] for x_t = (1 - t) x0 + t ε: (x, ε, x0) are jointly Gaussian, so it is linear in x."""
    a = 1 - t
    var = a * a * S * S + t * t
    return (t - a * S * S) / var * (x - a * M) - M


@pytest.mark.parametrize("eta", [0.0, 0.3, 0.7])
def test_sde_steps_with_the_exact_velocity_end_at_the_data_distribution(eta):
    # Euler (eta = 0) with 50 steps is 0.014 off in std; a wrong SDE drift is far off (no score term: +0.4,
    # half of it: +0.13, its sign flipped: +2), so the same tolerance catches a broken step
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40_000, 1, generator=g, dtype=torch.float64)
    ts = torch.linspace(1, 0, 51, dtype=torch.float64)
    for k in range(50):
        t, tn = float(ts[k]), float(ts[k + 1])
        x, _ = sde_step(x, exact_velocity(x, t), t, tn, eta, generator=g)
    assert abs(x.mean().item() - M) < 0.01
    assert abs(x.std().item() - S) < 0.02


# ------------------------------------------------------------------------------------------------ sample() on a DiT
def tiny_world(seed=0) -> DiT:
    torch.manual_seed(seed)
    m = DiT("tiny-world")
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 1 or p.shape[0] == 2:
                p.normal_(0, 0.1)  # norms and modulations are zero at init; randomise so every parameter matters
    return m.eval()


def tiny_inputs(model: DiT, B=2, Lt=5, gh=4, gw=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    latent = torch.randn(B, cfg.channels, gh * cfg.patch, gw * cfg.patch, generator=g)
    txtmask = torch.ones(B, Lt, dtype=torch.bool)
    txtmask[1, -2:] = False
    cond = Conditioning.build(torch.randn(B, Lt, cfg.txtlayers, cfg.txtdim, generator=g), txtmask, gh, gw)
    uncond = Conditioning.build(torch.randn(B, Lt, cfg.txtlayers, cfg.txtdim, generator=g), txtmask, gh, gw)
    ts = sampling.schedule(gh * gw, SamplingConfig(steps=4, mu=1.15))
    return sampling.patchify(latent, cfg.patch), ts, cond, uncond


def test_sample_euler_is_euler_sample_bit_for_bit():
    model = tiny_world()
    x, ts, cond, uncond = tiny_inputs(model)
    for guidance, un in ((3.5, uncond), (0.0, None)):
        ref = euler_sample(model, x, ts, cond, un, guidance)
        seen = []
        out = sample(model, x, ts, cond, un, guidance, trajectory=True, progress=seen.append)
        assert torch.equal(out.x, ref)
        assert out.log_probs is None and seen == [0, 1, 2, 3]
        assert len(out.trajectory) == len(ts) and out.trajectory[0] is x and torch.equal(out.trajectory[-1], ref)
        assert not out.x.requires_grad


def test_sample_sde_log_probs_recompute_from_the_trajectory():
    model = tiny_world()
    x, ts, cond, uncond = tiny_inputs(model)
    run = lambda: sample(model, x, ts, cond, uncond, 2.0, step="sde", eta=0.7,  # noqa: E731
                         generator=torch.Generator().manual_seed(5), trajectory=True)
    out = run()
    assert out.log_probs.shape == (2, len(ts) - 1) and torch.isfinite(out.log_probs).all()
    assert torch.equal(run().x, out.x)  # the generator fixes the rollout
    assert not torch.equal(out.x, euler_sample(model, x, ts, cond, uncond, 2.0))
    with torch.no_grad():  # what a GRPO update does: recompute each step's log-prob of the stored transition
        for k in range(len(ts) - 1):
            t = torch.full((2,), float(ts[k]))
            v = sampling.guided_velocity(model, out.trajectory[k], t, cond, uncond, 2.0)
            _, lp = sde_step(out.trajectory[k], v, float(ts[k]), float(ts[k + 1]), 0.7,
                             prev_sample=out.trajectory[k + 1])
            assert torch.allclose(lp, out.log_probs[:, k], rtol=0, atol=1e-5)
    eta0 = sample(model, x, ts, cond, uncond, 2.0, step="sde", eta=0.0)
    assert torch.equal(eta0.x, euler_sample(model, x, ts, cond, uncond, 2.0)) and (eta0.log_probs == 0).all()


@pytest.mark.parametrize("step", ["euler", "sde"])
def test_gradient_flows_through_sample_with_grad(step):
    model = tiny_world()
    x, ts, cond, uncond = tiny_inputs(model)
    out = sample(model, x, ts, cond, uncond, 2.0, step=step, eta=0.5, generator=torch.Generator().manual_seed(6),
                 grad=True)
    loss = out.x.square().mean() + (out.log_probs.mean() if step == "sde" else 0)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert sum(int(g.abs().sum() > 0) for g in grads) >= 0.9 * len(grads)
    with pytest.raises(ValueError, match="unknown step"):
        sample(model, x, ts, cond, uncond, 2.0, step="heun")
