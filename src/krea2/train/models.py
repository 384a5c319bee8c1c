"""The model set of a stage: every model an objective asks for, built, transformed, placed and parallelised by one
function, with the EMA created after sharding.

Order (torchtitan's: build -> convert -> parallelize -> optimiser):
1. roles: the policy, plus each role the objective declares (a frozen copy of the policy for a DPO reference, a
   trainable copy for a fake score, a checkpoint for a teacher);
2. transforms (adapters such as peft LoRA) applied to each DiT before sharding, so TP/FSDP see the final modules;
3. placement on the run's device: the DiTs, the objective's own modules and anything they keep outside the module
   tree (a frozen iREPA teacher follows through the objective's `_apply`);
4. parallelism: `parallelize_dit` for each DiT; the objective's trainable leaf modules (an iREPA projector) become
   FSDP2 units over the same data-parallel mesh, so their gradients are reduced and their state is sharded like the
   DiT's; frozen roles are sharded too (memory) and put in eval mode;
5. EMA of the policy's trainable parameters, from the sharded parameters (DTensor shadows on every rank).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from krea2.train import parallel
from krea2.train.objectives.base import Models, Objective

Transform = Callable[[str, nn.Module], nn.Module]  # (role, DiT) -> DiT, e.g. inject LoRA adapters


class EMA(nn.Module):
    """Shadow weights of the trainable parameters as buffers, so they ride in the training state (DCP) without
    entering an optimiser. Built from the parameters as they are after sharding: under FSDP2 the shadows are DTensor
    shards of the same layout, so `lerp_` never mixes full tensors and shards."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        for i, (_, p) in enumerate(self._params(model)):
            self.register_buffer(f"w{i}", p.detach().clone().float())

    def _params(self, model: nn.Module):
        params = dict(model.named_parameters())
        return [(n, params[n]) for n in self.names]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for i, (_, p) in enumerate(self._params(model)):
            getattr(self, f"w{i}").lerp_(p.detach().float(), 1 - self.decay)

    def shadows(self) -> dict[str, torch.Tensor]:
        """Full (gathered) shadow weights by parameter name; a collective under FSDP: every rank calls it."""
        from torch.distributed.tensor import DTensor

        out = {}
        for i, n in enumerate(self.names):
            w = getattr(self, f"w{i}")
            out[n] = (w.full_tensor() if isinstance(w, DTensor) else w).cpu()
        return out


@dataclass
class ModelSet:
    """The stage's models by role, the objective, the EMA, and the module whose state the training checkpoint
    holds (trainable roles, the objective's own modules and the EMA; frozen roles are rebuilt from their init)."""

    models: Models
    objective: Objective
    ema: EMA | None
    state: nn.ModuleDict

    @property
    def policy(self) -> nn.Module:
        return self.models.policy


def load_master_weights(path, cfg=None) -> nn.Module:
    """A checkpoint as fp32 trainable weights, whatever the file holds (bf16, or fp8/int8 codes, dequantised: an
    8-bit layer would otherwise load as buffers that never train)."""
    from krea2.models.loading import load_dit
    from krea2.models.quantize import dequantize_dit

    return dequantize_dit(load_dit(path, cfg, dtype=torch.float32), torch.float32)


def build_role(role, policy_init: nn.Module) -> nn.Module:
    """A copy of the policy's starting weights, or a checkpoint's DiT."""
    if role.init == "policy":
        model = copy.deepcopy(policy_init)
    else:
        from krea2.models.checkpoint import resolve_checkpoint

        info = resolve_checkpoint(role.init)
        model = load_master_weights(info.model_path, info.model)
    return model.train(role.trainable).requires_grad_(role.trainable)


def shard_objective(objective: nn.Module, mesh, cfg: parallel.ParallelConfig) -> None:
    """Make each trainable leaf module of the objective an FSDP2 unit over the data-parallel mesh.

    Leaves, not the objective itself: the objective's modules are called directly (`self.projector(x)`), never
    through `objective.forward`, and FSDP2 gathers parameters in the forward hook of the module it wraps."""
    from torch.distributed.fsdp import fully_shard

    for module in list(objective.modules()):
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            fully_shard(module, mesh=parallel.dp_mesh(mesh), mp_policy=parallel.mixed_precision(cfg))


def build_model_set(policy: nn.Module, objective: Objective, device: torch.device, mesh=None,
                    pcfg: parallel.ParallelConfig | None = None, ema_decay: float = 0.0,
                    transforms: list[Transform] | None = None) -> ModelSet:
    """Build, transform, place and parallelise the policy, the objective's roles and its modules.

    policy: the DiT the stage starts from (any device); pcfg: the stage's resolved parallel settings; with mesh
    None and pcfg given only activation checkpointing and compile apply. Returns the ModelSet (policy in train mode).
    """
    roles = {name: build_role(role, policy) for name, role in objective.roles.items()}
    if not objective.trains_policy:
        policy.requires_grad_(False)
    dits = {"policy": policy.train(), **roles}
    for t in transforms or []:
        dits = {name: t(name, m) for name, m in dits.items()}
    for name, m in dits.items():
        m.to(device)
        if pcfg is not None:
            trainable = name == "policy" or objective.roles[name].trainable
            # frozen roles never run backward: activation checkpointing would only cost recomputation
            rcfg = pcfg if trainable else replace(pcfg, activation_checkpoint="none")
            dits[name] = parallel.parallelize_dit(m, mesh, rcfg)
    objective.to(device)
    if mesh is not None:
        shard_objective(objective, mesh, pcfg)
    models = Models(dits.pop("policy"), dits)
    ema = EMA(models.policy, ema_decay) if ema_decay else None
    # with adapters, the training state holds them alone: the frozen base is rebuilt from the stage's init
    from krea2.train.lora import adapter_modules, is_lora_model

    state = nn.ModuleDict({"dit": adapter_modules(models.policy) if is_lora_model(models.policy) else models.policy,
                           "objective": objective})
    for name, m in models.roles.items():
        if objective.roles[name].trainable:
            state[name] = m
    if ema is not None:
        state["ema"] = ema
    return ModelSet(models, objective, ema, state)
