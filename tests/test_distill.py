"""Turbo distillation: TDM and DMD2 objectives, the student grid, the generator gradient, the Gaussian toy."""

from __future__ import annotations

import copy
import json
import math
import shutil
from contextlib import nullcontext

import pytest
import torch
from torch import nn

from krea2.errors import Krea2Error
from krea2.models.dit import DiT, get_config
from krea2.sampling import Conditioning, SamplingConfig, forward_transition, sampling_preset, schedule
from krea2.train.config import parse_recipe
from krea2.train.objectives.base import Models, ObjectiveEnv
from krea2.train.objectives.distill import dmd_loss
from krea2.train.objectives.dmd2 import DMD2, DMD2Config
from krea2.train.objectives.tdm import TDM, TDMConfig, fake_score_loss, trajectory_point
from krea2.train.trainer import train_recipe


class Ctx:
    """The trainer's StepContext, reduced to what the objectives call (one process, fp32)."""

    device = torch.device("cpu")
    autocast = nullcontext()

    def __init__(self):
        self.stepped = []

    def backward(self, loss):
        loss.backward()

    def optimizer_step(self, name, metric):
        self.stepped.append(name)
        return True


def record_times(model: nn.Module) -> list:
    """The times (sorted distinct values of t) of every call of the model, in call order."""
    times = []
    model.register_forward_pre_hook(lambda m, args: times.append(sorted(set(args[2].tolist()))))
    return times


def env(preset="tiny-world", steps=10):
    cfg = get_config(preset)
    null = (torch.randn(1, 8, cfg.txtlayers, cfg.txtdim), torch.tensor([[True] * 2 + [False] * 6]))
    return ObjectiveEnv(cfg, SamplingConfig(steps=20, guidance=2.0, minres=32, maxres=160), 8, steps, None, null)


def prompt_batch(cfg, B=3, g=4):
    from krea2.train.data import PromptBatch

    ctx = torch.randn(B, 8, cfg.txtlayers, cfg.txtdim)
    mask = torch.ones(B, 8, dtype=torch.bool)
    return PromptBatch(ctx, mask, ["p"] * B, [{}] * B, list(range(B)), g, g, g * 8, g * 8)


def models_for(cfg, seed=0):
    torch.manual_seed(seed)
    policy = DiT(cfg)
    for p in policy.parameters():  # the release zero-inits the output layer: make every role's output non-trivial
        nn.init.normal_(p, std=0.05)
    return Models(policy, {"teacher": copy.deepcopy(policy).requires_grad_(False),
                           "fake_score": copy.deepcopy(policy)})


@pytest.mark.parametrize("K", [4, 8])
def test_student_time_inputs_are_exactly_the_inference_grid(K):
    """Every time the student is called at during TDM's step is a point of the grid `krea2 generate` samples the
    student with (steps K, g 0, mu 1.15), and the rollout walks the whole grid in order."""
    from krea2.pipeline import Pipeline

    e = env()
    obj = TDM(TDMConfig(student_steps=K, guidance=2.0), e)
    models = models_for(e.model)
    times = record_times(models.policy)
    batch = prompt_batch(e.model)
    obj.step(models, batch, 0, torch.Generator().manual_seed(0), Ctx())
    grid = schedule(batch.gh * batch.gw, sampling_preset("turbo", steps=K), e.pixels_per_token)
    f32 = [float(v) for v in grid[:-1].float()]
    assert [ts[0] for ts in times[:K]] == f32
    assert set().union(*map(set, times)) <= set(f32)

    # the same times as the pipeline's sampler at the Turbo preset
    class TE:
        def encode(self, prompts):
            return batch.context[:1].expand(len(prompts), -1, -1, -1), batch.txtmask[:1].expand(len(prompts), -1)

    class AE:
        compression = 1

        def decode(self, x):
            return x[:, :3]

    served = models_for(e.model).policy
    served_times = record_times(served)
    Pipeline(served, TE(), AE(), SamplingConfig(steps=K, guidance=0.0, mu=1.15), 32, "cpu").generate(["a"], seed=0)
    assert [ts[0] for ts in served_times] == f32


def test_generator_gradient_is_zero_when_the_fake_score_equals_the_teacher():
    e = env()
    batch = prompt_batch(e.model)
    models = models_for(e.model)
    models.roles["fake_score"] = models["teacher"]  # the same function, bit for bit
    with torch.no_grad():  # a student that differs from the teacher
        for p in models.policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x_t, t = torch.randn(3, 16, e.model.token_dim), torch.tensor([0.3, 0.6, 0.9])

    def grads(guidance):
        obj = TDM(TDMConfig(guidance=guidance), e)
        cond, uncond = obj.conditioning(batch, "cpu")
        models.policy.zero_grad()
        v = obj.velocity(models.policy, x_t, t, cond)
        x0 = x_t - t[:, None, None] * v
        real = obj.teacher_x0(models, x_t, t, cond, uncond, Ctx())
        fake = obj.fake_x0(models, x_t, t, cond, Ctx())
        dmd_loss(x0, real, fake).backward()
        return [p.grad for p in models.policy.parameters() if p.grad is not None]

    assert all(bool((g == 0).all()) for g in grads(0.0))  # fake == teacher, no CFG: nothing to learn
    assert any(bool((g != 0).any()) for g in grads(2.0))  # the folded CFG is a target of its own


class GradCtx(Ctx):
    """Like the trainer: each optimizer_step records its parameters' gradients, then zeroes them."""

    def __init__(self, specs):
        super().__init__()
        self.params = {n: [p for m in spec.modules for p in m.parameters() if p.requires_grad]
                       for n, spec in specs.items()}
        self.seen = {}

    def optimizer_step(self, name, metric):
        everything = [p for ps in self.params.values() for p in ps]
        self.seen[name] = {id(p): None if p.grad is None else p.grad.clone() for p in everything}
        for p in self.params[name]:
            p.grad = None
        return super().optimizer_step(name, metric)


@pytest.mark.parametrize("objective", ["tdm", "dmd2"])
def test_each_update_reaches_only_its_own_parameters(objective):
    """The fake-score update leaves the student without gradients; the generator update (with DMD2's GAN term
    through the fake score) leaves the fake score and the GAN head without any."""
    from krea2.train.data import Batch

    e = env()
    models = models_for(e.model)
    if objective == "tdm":
        obj, batch = TDM(TDMConfig(student_steps=2, guidance=1.0), e), prompt_batch(e.model)
    else:
        obj = DMD2(DMD2Config(student_steps=2, guidance=1.0, fake_updates=1, gan_weight=0.1), e)
        pb = prompt_batch(e.model)
        batch = Batch(torch.randn(3, 16, e.model.token_dim), pb.context, pb.txtmask, torch.zeros(3, 3, 8, 8), 4, 4)
    ctx = GradCtx(obj.optimizers(models))
    metrics = obj.step(models, batch, 0, torch.Generator().manual_seed(0), ctx)
    assert ctx.stepped == ["fake_score", "policy"] and math.isfinite(float(metrics["loss"]))
    policy = {id(p) for p in ctx.params["policy"]}
    fake = {id(p) for p in ctx.params["fake_score"]}
    at_fake, at_policy = ctx.seen["fake_score"], ctx.seen["policy"]
    assert all(at_fake[i] is None for i in policy)  # the fake update gave the student nothing
    assert any(at_fake[i] is not None and bool(at_fake[i].abs().sum() > 0) for i in fake)
    assert all(at_policy[i] is None for i in fake)  # the generator update gave the fake score (and head) nothing
    assert any(at_policy[i] is not None and bool(at_policy[i].abs().sum() > 0) for i in policy)
    if objective == "dmd2":
        assert obj.gan_head is not None and all(p.requires_grad for p in obj.gan_head.parameters())


def test_dmd_loss_gradient_is_the_normalised_score_difference():
    x0 = torch.randn(2, 5, 3, requires_grad=True)
    real, fake = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    dmd_loss(x0, real, fake).backward()
    w = (x0.detach() - real).abs().mean((1, 2), keepdim=True)
    torch.testing.assert_close(x0.grad, (fake - real) / w / x0.numel())


def test_exact_student_rollout_reproduces_the_teacher_ode_endpoint_on_a_gaussian_toy():
    """Data x0 ~ N(0, s²): x_t ~ N(0, σ(t)²), σ(t)² = (1 - t)² s² + t², and the probability-flow ODE scales x by
    σ(t') / σ(t). A student whose velocity is the exact flow map of each grid step ends where the teacher's ODE
    ends (x_1 · s), and TDM's ODE point of each step is the teacher's trajectory at the next grid time."""
    s_data, K = 0.5, 4
    sigma = lambda t: math.sqrt((1 - t) ** 2 * s_data**2 + t**2)  # noqa: E731
    e = env()
    obj = TDM(TDMConfig(student_steps=K, guidance=0.0), e)
    batch = prompt_batch(e.model, B=5)
    grid = obj.grid(batch.gh * batch.gw)
    nxt = {float(a): float(b) for a, b in zip(grid[:-1].float(), grid[1:].float())}

    class FlowMap(nn.Module):  # the perfect few-step student: v = (x_{t'} - x_t) / (t' - t)
        def forward(self, x, context, t, pos, mask=None):
            t0 = float(t[0])
            t1 = nxt[t0]
            return x * (sigma(t1) / sigma(t0) - 1) / (t1 - t0)

    cond = Conditioning.build(batch.context, batch.txtmask, batch.gh, batch.gw)
    states, velocities = obj.rollout(FlowMap(), cond, batch, grid, torch.Generator().manual_seed(3), Ctx())
    x1 = states[0]
    torch.testing.assert_close(states[-1], x1 * s_data, atol=1e-5, rtol=1e-5)

    # the teacher's ODE by fine Euler on the instantaneous velocity v = x σ'(t) / σ(t)
    def v_exact(x, t):
        dsig = ((1 - t) * -(s_data**2) + t) / sigma(t)
        return x * dsig / sigma(t)

    x, ts = x1.clone(), torch.linspace(1, 0, 4001, dtype=torch.float64)
    for a, b in zip(ts[:-1], ts[1:]):
        x = x + (float(b) - float(a)) * v_exact(x, float(a))
    torch.testing.assert_close(states[-1], x, atol=1e-3, rtol=1e-3)

    # TDM's ODE point at s = t_{i+1} (with t = s: no fresh noise) is the teacher's trajectory there
    for i in range(K):
        t_i, t_n = torch.full((5,), float(grid[i])), torch.full((5,), float(grid[i + 1]))
        x_t, t, x0, eps_mix, _ = trajectory_point(states[i], velocities[i], t_i, t_n, 0.0, 0.999, True, False,
                                                  torch.Generator().manual_seed(i))
        assert bool(((t >= t_n.clamp_min(0.0) - 1e-6) & (t <= t_i + 1e-6)).all())  # inside the step's interval
        s_point = states[i] + (t_n - t_i)[:, None, None] * velocities[i]
        torch.testing.assert_close(s_point, x1 * sigma(float(grid[i + 1])), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x_t, (1 - t)[:, None, None] * x0 + t[:, None, None] * eps_mix)


def test_forward_transition_has_the_marginal_of_the_later_time():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.full((200_000,), 0.7), torch.randn(200_000, generator=g)
    s, t = torch.tensor([0.3]), torch.tensor([0.8])
    x_s = (1 - s) * x0 + s * eps
    x_t, ratio = forward_transition(x_s, s.expand(1), t.expand(1), torch.randn(200_000, generator=g))
    assert abs(float(x_t.mean()) - 0.2 * 0.7) < 5e-3 and abs(float(x_t.std()) - 0.8) < 5e-3
    assert abs(float(ratio) - 0.2 / 0.7) < 1e-6
    with pytest.raises(ValueError, match="t must be >= s"):
        forward_transition(x_s, t, s, eps)


def test_fake_score_loss_weights():
    a, b = torch.zeros(2, 4), torch.ones(2, 4)
    t = torch.tensor([0.1, 0.5])  # SNR 81 -> clipped to 5; SNR 1
    assert float(fake_score_loss(a, b, t)) == pytest.approx((5 + 1) / 2)
    same = torch.randn(2, 4)
    assert float(fake_score_loss(a, b, t, same, same)) == pytest.approx(3.0)  # ε_mix = ε': importance weight 1
    big = same * 2
    w = torch.exp(-0.5 * (big**2).mean(1) + 0.5 * (same**2).mean(1))
    assert float(fake_score_loss(a, b, t, big, same)) == pytest.approx(float(((torch.tensor([5.0, 1.0])) * w).mean()))


def test_distillation_configs_are_checked():
    base = {"name": "t", "model": {"preset": "tiny-world"}}
    with pytest.raises(Krea2Error, match="student_steps"):
        parse_recipe({**base, "stages": [{"name": "d", "steps": 1, "data": {"source": "prompts"},
                                          "objective": {"name": "tdm", "student_steps": 0}}]})
    with pytest.raises(Krea2Error, match="reads images"):  # DMD2 reads captioned images (its GAN's real data)
        from krea2.train.trainer import validate_recipe

        validate_recipe(parse_recipe({**base, "stages": [{"name": "d", "steps": 1, "data": {"source": "prompts"},
                                                          "objective": {"name": "dmd2"}}]}))


def recipe(name, steps, out_steps=None, **objective):
    data = {"source": "prompts", "size": 32, "pool": 16} if name == "tdm" else {"source": "world", "size": 32,
                                                                                 "pool": 16}
    return parse_recipe({"name": name, "model": {"preset": "tiny-world"},
                         "sampling": {"steps": 2, "guidance": 0.0, "mu": 1.15},
                         "stages": [{"name": "d", "steps": out_steps or steps, "batch_size": 4, "lr": 1e-3,
                                     "warmup": 1, "log_every": 1, "save_every": 2,
                                     "data": data, "objective": {"name": name, "student_steps": 2, **objective}}]})


@pytest.mark.slow
@pytest.mark.parametrize("name,extra", [("tdm", {}), ("dmd2", {"fake_updates": 2, "gan_weight": 0.1})])
def test_distillation_resumes_exactly_and_trains_student_and_fake_score(tmp_path, name, extra):
    ref = train_recipe(recipe(name, 4, **extra), tmp_path / "ref", progress=False)
    run = tmp_path / "run"
    train_recipe(recipe(name, 4, out_steps=2, **extra), run, progress=False)
    shutil.rmtree(run / "d" / "final")
    shutil.rmtree(run / "final")
    train_recipe(recipe(name, 4, **extra), run, resume=True, progress=False)
    lines = lambda p: (p / "d" / "losses.jsonl").read_text().splitlines()  # noqa: E731
    assert lines(tmp_path / "ref") == lines(run)
    assert all(math.isfinite(json.loads(x)["loss"]) for x in lines(run))
    assert (ref / "model.safetensors").read_bytes() == (run / "final" / "model.safetensors").read_bytes()
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(run / "d" / "state")).read_metadata().state_dict_metadata
    assert any(k.startswith("model.fake_score.") for k in keys)
    assert any(k.startswith("optimizer.state.fake_score.") for k in keys)
    assert not any(k.startswith("model.teacher.") for k in keys)  # frozen: rebuilt from the init, not saved
    if name == "dmd2":
        assert any(k.startswith("model.objective.gan_head.") for k in keys)
    cfg = json.loads((ref / "config.json").read_text())
    assert cfg["sampling"]["steps"] == 2 and cfg["sampling"]["guidance"] == 0.0 and cfg["sampling"]["mu"] == 1.15


def test_world_turbo_ships_with_its_preset():
    from krea2.models.checkpoint import resolve_checkpoint
    from krea2.pipeline import load_pipeline

    info = resolve_checkpoint("world-turbo")
    s = info.sampling
    assert (s.steps, s.guidance, s.mu) == (8, 0.0, 1.15)  # the TDM 8-step student, as Krea 2 Turbo
    assert info.model == resolve_checkpoint("world").model  # the teacher's architecture
    pipe = load_pipeline("world-turbo")
    calls = []
    pipe.model.register_forward_pre_hook(lambda m, args: calls.append(1))
    images = pipe.generate(["a red circle", "a blue square"], seed=0)
    assert images.shape == (2, 3, 32, 32) and len(calls) == 8  # 8 steps, one pass each: no guidance
