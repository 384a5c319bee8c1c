"""Post-training objectives on the one trainer: STPO (our preference optimisation) and Flow-GRPO."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_trainer_contract import world_pairs

from krea2.errors import Krea2Error
from krea2.models.checkpoint import resolve_checkpoint
from krea2.models.loading import load_dit
from krea2.train.config import parse_recipe
from krea2.train.objectives.grpo import clipped_policy_loss, group_advantages, transition_kl
from krea2.train.objectives.stpo import winner_preserving_scale
from krea2.train.trainer import train_recipe


def test_group_advantages_are_zero_mean_per_group():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2])
    a = group_advantages(r, 4)
    assert torch.allclose(a.view(2, 4).sum(1), torch.zeros(2), atol=1e-6)
    assert torch.equal(a[4:], torch.zeros(4))  # a group with one reward value carries no signal
    assert a[0] > a[2] == a[3] > a[1]


def test_clipped_policy_loss():
    adv = torch.tensor([1.0, -1.0])
    old = torch.zeros(2)
    loss, frac = clipped_policy_loss(old, old, adv, 0.1)
    assert loss == 0 and frac == 0  # ratio 1, advantages sum to zero
    # a ratio far above 1 + eps with a positive advantage is clipped (no incentive beyond the trust region)
    loss, frac = clipped_policy_loss(torch.tensor([1.0, 0.0]), old, adv, 0.1)
    assert torch.isclose(loss, torch.tensor((-1.1 + 1.0) / 2)) and frac == 0.5


def test_transition_kl_is_zero_for_equal_policies_and_grows_with_the_gap():
    x, v = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    assert transition_kl(x, v, v, 0.8, 0.6, 0.7) == 0
    assert transition_kl(x, v, v + 0.1, 0.8, 0.6, 0.7) < transition_kl(x, v, v + 0.2, 0.8, 0.6, 0.7)


def test_winner_preserving_scale():
    target = torch.zeros(3, 2)
    v_w = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    v_l = torch.tensor([[4.0, 0.0], [0.0, 5.0], [-2.0, 0.0]])
    lam = winner_preserving_scale(v_w, target, v_l, target)
    # aligned gradients: λ = ‖g_w‖²/⟨g_w, g_l⟩ = 1/4; orthogonal or opposed: 1 (the loser cannot hurt the winner)
    assert torch.allclose(lam, torch.tensor([0.25, 1.0, 1.0]))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dpo", "stpo"])
def test_preference_objectives_start_at_ln2_and_change_the_model(tmp_path, name):
    pairs = world_pairs(tmp_path / "pairs.parquet", n=8)
    recipe = parse_recipe({"name": name, "model": {"preset": "tiny-world"}, "stages": [
        {"name": "po", "steps": 3, "batch_size": 4, "lr": 1e-3, "warmup": 1, "log_every": 1, "save_every": 100,
         "data": {"source": "pairs", "path": str(pairs)}, "objective": {"name": name}}]})
    train_recipe(recipe, tmp_path / "run", progress=False)
    first = json.loads((tmp_path / "run" / "po" / "losses.jsonl").read_text().splitlines()[0])
    if name == "dpo":
        assert abs(first["loss"] - 0.6931472) < 1e-5  # policy == reference: −log σ(0)
    from krea2.models.dit import DiT
    from krea2.train.trainer import init_weights

    torch.manual_seed(0)  # the stage's seed: the initial weights the trainer drew
    start = init_weights(DiT("tiny-world")).state_dict()
    out = load_dit(tmp_path / "run" / "final" / "model.safetensors").state_dict()
    changed = [k for k in start if not torch.equal(start[k], out[k])]
    assert changed and any(k.startswith("blocks.") for k in changed)


@pytest.mark.slow
def test_grpo_trains_the_world_model_on_checker_rewards(tmp_path):
    recipe = parse_recipe({"name": "g", "model": {"init": "world"}, "stages": [
        {"name": "rl", "steps": 2, "batch_size": 2, "lr": 1e-4, "warmup": 1, "log_every": 1, "save_every": 100,
         "data": {"source": "prompts", "size": 32, "pool": 18},
         "objective": {"name": "grpo", "group_size": 4, "sample_steps": 6,
                       "rewards": {"world_rubric": 1.0, "world_strict": 0.5}}}]})
    final = train_recipe(recipe, tmp_path / "run", progress=False)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "rl" / "losses.jsonl").read_text().splitlines()]
    assert losses[0] == 0.0  # first update: every ratio is 1 and advantages sum to zero per group
    base = load_dit(resolve_checkpoint("world").model_path, dtype=torch.float32).state_dict()
    after = load_dit(final / "model.safetensors").state_dict()
    assert any(not torch.equal(base[k], after[k]) for k in base)  # the rewards moved the policy
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(next((tmp_path / "run" / "tb" / "rl").iterdir())))
    ea.Reload()
    assert {"reward/world_rubric", "reward/world_strict", "grpo/kl", "grpo/clip_fraction"} <= set(ea.Tags()["scalars"])


def test_grpo_config_errors():
    with pytest.raises(Krea2Error, match="group_size must be >= 2"):
        parse_recipe({"name": "g", "model": {"preset": "tiny-world"}, "stages": [
            {"name": "rl", "steps": 1, "data": {"source": "prompts"}, "objective": {"name": "grpo", "group_size": 1}}]})
    with pytest.raises(Krea2Error, match="unknown or empty"):
        parse_recipe({"name": "g", "model": {"preset": "tiny-world"}, "stages": [
            {"name": "rl", "steps": 1, "data": {"source": "prompts"},
             "objective": {"name": "grpo", "rewards": {"aesthetics": 1.0}}}]})


def test_sampled_pairs_from_a_model(tmp_path):
    from krea2.models.checkpoint import save_random_checkpoint
    from krea2.pipeline import load_pipeline
    from krea2.train.data import read_pairs
    from krea2.train.pairs import sample_pairs, write_sampled_pairs

    ckpt = save_random_checkpoint(tmp_path / "rand", resolution=16)
    pipe = load_pipeline(str(ckpt))
    caps, winners, losers, metas = sample_pairs(pipe, 3, group_size=2, kind="offpolicy", progress=False)
    # a random model fails every prompt: each ground-truth render beats the group's worst sample
    assert len(caps) == 3 and all(m["kind"] == "offpolicy" and m["reward_w"] > m["reward_l"] for m in metas)
    assert winners[0].shape == losers[0].shape == (16, 16, 3) and winners[0].dtype == np.uint8
    with pytest.raises(Krea2Error, match="every group tied"):  # all-zero rewards: no on-policy preference
        write_sampled_pairs(str(ckpt), tmp_path / "p.parquet", 2, group_size=2, kind="onpolicy", progress=False)
    counts = write_sampled_pairs(str(ckpt), tmp_path / "q.parquet", 2, group_size=2, kind="both", progress=False)
    assert counts["pairs"] == len(read_pairs(tmp_path / "q.parquet")) >= 2
    with pytest.raises(Krea2Error, match="exists"):
        write_sampled_pairs(str(ckpt), tmp_path / "q.parquet", 2, progress=False)


class _Ctx:
    device = torch.device("cpu")

    def all_gather(self, x):
        return x


def test_prompt_pool_statistics_deprioritise_easy_failing_and_flat_prompts():
    from krea2.sampling import PRESETS
    from krea2.train.objectives.base import ObjectiveEnv
    from krea2.train.objectives.grpo import FlowGRPO, GRPOConfig

    env = ObjectiveEnv(__import__("krea2.models.dit", fromlist=["x"]).get_config("tiny-world"), PRESETS["raw"], 2, 10,
                       data_size=5)
    obj = FlowGRPO(GRPOConfig(group_size=2, min_visits=2), env)
    assert torch.equal(obj.batch_weights(), torch.ones(5))
    for _ in range(2):  # prompt 0 always solved, 1 always failed, 2 flat at 0.5, 3 informative; 4 never drawn
        obj.update_prompt_stats([0, 1, 2, 3], torch.tensor([1.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.2, 0.8]), _Ctx())
    assert torch.allclose(obj.batch_weights(), torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0]))
    assert set(dict(obj.named_buffers())) == {"prompt_visits", "prompt_reward", "prompt_spread"}  # in the state


def test_grpo_surrogate_is_not_judged_as_a_spike():
    """A policy-gradient surrogate hovers around 0: the guard must only catch non-finite values for it."""
    import math

    from krea2.train.guard import GuardConfig, SpikeGuard
    from krea2.train.objectives.grpo import FlowGRPO

    assert FlowGRPO.spike_test is False
    g = SpikeGuard(GuardConfig(spike_factor=math.inf, min_steps=2))
    assert all(g.check(v, 1.0) for v in [1e-5] * 30 + [1e-3, -1e-3])
    assert not g.check(float("nan"), 1.0)


def test_usage_errors_of_new_commands_are_not_tracebacks(tmp_path):
    import subprocess
    import sys

    for args in (["pairs"], ["pairs", "--out", "x.parquet", "--group", "1"], ["merge", "world", "--out", "m"]):
        p = subprocess.run([sys.executable, "-c", "from krea2.cli import main; main()", *args], capture_output=True,
                           text=True, timeout=120, cwd=tmp_path)
        assert p.returncode == 2 and "Traceback" not in p.stderr, (args, p.stderr[-500:])


def test_validate_checks_lora_targets(tmp_path):
    from krea2.train.config import load_recipe
    from krea2.train.trainer import validate_recipe

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    assert "LoRA rank 8 on 72 Linears" in validate_recipe(load_recipe(root / "recipes" / "world-lora-demo.toml"))
    with pytest.raises(Krea2Error, match="match no Linear module"):
        validate_recipe(load_recipe(root / "recipes" / "world-lora-demo.toml", ["stages.0.lora.targets=nothing"]))


def test_world_rl_ships_as_the_base_architecture_with_its_preset():
    from krea2.pipeline import load_pipeline

    info, base = resolve_checkpoint("world-rl"), resolve_checkpoint("world")
    assert info.model == base.model and info.text_encoder == base.text_encoder
    assert (info.sampling.steps, info.sampling.guidance) == (20, 2.0)  # the preset it scores best with (BENCHMARKS)
    rl, ref = load_dit(info.model_path, info.model), load_dit(base.model_path, base.model)
    moved = [k for k, v in rl.state_dict().items() if not torch.equal(v, ref.state_dict()[k])]
    assert len(moved) > len(rl.state_dict()) // 2  # post-trained, not a copy of the base
    images = load_pipeline("world-rl").generate(["a red circle", "two blue squares"], seed=0)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
