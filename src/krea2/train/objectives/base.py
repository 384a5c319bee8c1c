"""The objective contract: what a recipe stage optimises, apart from the loop that runs it.

An objective owns its config, its extra modules (an iREPA projector, a critic head), the models it needs besides
the policy (declared as roles, built and sharded by the model set) and its update. The trainer owns the loop, the
learning-rate schedule, the spike guard, logging, checkpoints and parallelism, and never names an objective.

Two ways to write one (SiT's transport swap; torchtitan's `forward_backward_step` / `train_step` override points):
- `LossObjective`: write `loss()`; the inherited `step()` does one backward and one policy update
  (flow matching, SFT, Diffusion-DPO).
- `Objective`: write `step()` with what the trainer hands over in `StepContext` (backward, an optimiser step by
  name, all-reduce/all-gather, sampling, rewards): rollouts and several updates per batch (GRPO), or several
  optimisers (TDM, DMD2's fake score).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from krea2.models.dit import DiTConfig
    from krea2.sampling import SamplingConfig


@dataclass(frozen=True)
class Role:
    """A model an objective needs besides the policy.

    init: "policy" (a copy of the policy's starting weights: a DPO reference, a TDM teacher or fake score) or a
    checkpoint spec (`world`, a folder, a .safetensors file). trainable: gets gradients and its own optimiser.
    """

    init: str = "policy"
    trainable: bool = False


@dataclass(frozen=True)
class ObjectiveEnv:
    """What every objective is built from: the policy's architecture and the stage's sampler settings."""

    model: DiTConfig
    sampling: SamplingConfig
    pixels_per_token: int  # autoencoder compression x patch: image pixels per token side
    stage_steps: int
    data_size: int | None = None  # examples in the stage's data source, where it has a fixed pool
    # the empty prompt's text states (1, Lt, layers, dim) and mask (1, Lt): the unconditional branch of CFG
    null_text: tuple[Tensor, Tensor] | None = None


@dataclass
class OptimizerSpec:
    """The modules one optimiser trains (their parameters with requires_grad; weight decay split by name, see
    `krea2.train.trainer.param_groups`) and its learning rate as a multiple of the stage's WSD schedule."""

    modules: list[nn.Module]
    lr_scale: float = 1.0


class StepContext(Protocol):
    """What `Objective.step` may call; the trainer implements it (see `krea2.train.trainer.TrainerContext`)."""

    device: torch.device
    autocast: object  # a context manager: the stage's precision

    def backward(self, loss: Tensor) -> None: ...

    def optimizer_step(self, name: str, metric: Tensor) -> bool:
        """Clip, judge `metric` with the guard, step (or skip) optimiser `name`, update its EMA, zero its grads."""

    def all_reduce_mean(self, x: Tensor) -> Tensor: ...

    def all_gather(self, x: Tensor) -> Tensor: ...

    def decode(self, tokens: Tensor, gh: int, gw: int) -> Tensor:
        """Image tokens (B, gh·gw, C·p·p) -> images (B, 3, H, W) in [-1, 1] (for rewards)."""


@dataclass
class Models:
    """The models of one stage by role; `policy` always exists. Roles are `nn.Module`s placed and parallelised."""

    policy: nn.Module
    roles: dict[str, nn.Module] = field(default_factory=dict)

    def __getitem__(self, name: str) -> nn.Module:
        return self.policy if name == "policy" else self.roles[name]


class Objective(nn.Module):
    """Base class. Subclasses set `Config` (their own dataclass: the `[stages.objective]` table), `name`, and may
    set `roles`, `data_kind` and `guard_metric` (the metric the spike guard judges; it must be in step's output).

    The Config's fields are typed (checked like every recipe table); it may have a `name` field (it then records
    the name), an `irepa: IREPAConfig | bool | None` field (subclass `flow.Denoising` to use the term), a
    `check(model_cfg, steps)` method raising ValueError for settings that do not fit the architecture (run by
    `krea2 train --validate`), and a `check_files(model_cfg)` method raising Krea2Error for files it starts from that
    are missing or do not fit (run by --validate where it checks paths). Register a new objective by adding it to
    `krea2.train.objectives.OBJECTIVES` (a plugin module imported before `train_recipe`, or a patch to the
    registry)."""

    Config: ClassVar[type]
    name: ClassVar[str]
    roles: ClassVar[dict[str, Role]] = {}
    data_kind: ClassVar[str] = "images"  # images | pairs | prompts: the batch type the objective reads
    guard_metric: ClassVar[str] = "loss"
    # the guard's spike test needs a loss with a scale (a data fit); a policy-gradient surrogate hovers around 0 and
    # has none, so such objectives set this False and the guard checks finiteness only
    spike_test: ClassVar[bool] = True
    # False: the policy is frozen (requires_grad off before the EMA and optimisers are built) and only the
    # objective's own modules train, e.g. a style encoder feeding a fixed base model
    trains_policy: ClassVar[bool] = True

    def __init__(self, cfg, env: ObjectiveEnv):
        super().__init__()
        self.cfg, self.env = cfg, env

    def batch_weights(self) -> Tensor | None:
        """Sampling weights over the data source's pool for the next batch (None: uniform). Must be the same on
        every rank and a function of the objective's saved state, so resume stays exact."""
        return None

    @classmethod
    def lora_config(cls, cfg, lora):
        """The stage's `[stages.lora]` (a `krea2.train.lora.LoRAConfig` or None) as this objective, with its Config
        `cfg`, trains it; the default keeps it as written (a style preference stage starts the adapters from its
        supervised adapter). Raises Krea2Error for a stage the objective cannot train (run by --validate too)."""
        return lora

    @classmethod
    def data_options(cls, cfg) -> dict:
        """Keyword options the stage's data source is built with for this objective's Config `cfg` (e.g. a style
        stage with a teacher asks triplets for their styled captions); default none."""
        return {}

    def optimizers(self, models: Models) -> dict[str, OptimizerSpec]:
        """One optimiser named "policy" over the policy's trainable parameters and this objective's own."""
        return {"policy": OptimizerSpec([models.policy, self])}

    def export(self, stage_dir, write: bool) -> None:
        """Write what the stage made besides the DiT into stage_dir (e.g. a style encoder). Called on every rank
        (gathering sharded parameters is a collective); only `write` (the main rank) writes files."""

    def step(self, models: Models, batch, step: int, generator: torch.Generator, ctx: StepContext) -> dict:
        """One training step: must call ctx.optimizer_step for each optimiser it updates. Returns scalar metrics
        (0-d tensors or floats), including `guard_metric` and "loss"."""
        raise NotImplementedError


class LossObjective(Objective):
    """An objective that is a single differentiable loss of the policy (and frozen roles)."""

    def loss(self, models: Models, batch, step: int, generator: torch.Generator) -> tuple[Tensor, dict]:
        raise NotImplementedError

    def step(self, models: Models, batch, step: int, generator: torch.Generator, ctx: StepContext) -> dict:
        with ctx.autocast:
            loss, metrics = self.loss(models, batch, step, generator)
        ctx.backward(loss)
        metrics = {"loss": loss.detach(), **metrics}
        ctx.optimizer_step("policy", metrics[self.guard_metric])
        return metrics
